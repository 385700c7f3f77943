"""The condition language of rule sets, and its reference interpreter.

The rule-set front end (:mod:`needlepoint.rulesets`) parses a rule's YAML into these objects;
this module only defines them and their semantics. A rule's ``when`` names facts by alias; each
alias is one *pattern*: a fact kind and a set of field tests, or the negation of one (``not:``).
A rule may list alternatives (``when_any``); it fires once per alternative that matches.
Patterns never refer to each other's fields (joins are computed in :mod:`needlepoint.core.prepare`
as derived fields such as ``same_side``), which keeps the compiled durable-rules network clear of
the engine's cross-fact comparison defect.

The engine (:mod:`needlepoint.core.durable`) decides which rules fire. This module's
:func:`test_holds` is the same semantics in Python, used for aggregates, for ``explain`` and to
cross-check the engine in tests. Semantics follow the engine exactly: a missing field satisfies
no comparison (not even ``ne``) and only ``exists: false``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The fact kinds the core asserts and the fields each carries. "codes" fields hold coded
# concepts and can only be tested for value-set membership; rules never name raw codes.
FACT_FIELDS: dict[str, dict[str, str]] = {
    "patient": {"age_years": "number", "sex": "string", "deceased": "bool"},
    # days_ago: since the onset (else the recording) of a condition, since a medication began
    "condition": {"code": "codes", "days_ago": "number"},
    "medication": {"code": "codes", "days_ago": "number"},
    "observation": {"concept": "string", "value": "number", "age_days": "number", "value_code": "codes"},
    "allergy": {"code": "codes", "severity": "string", "criticality": "string"},
    "prior_injection": {
        "code": "codes",
        "agents": "codes",
        "days_ago": "number",
        "target": "string",
        "same_target": "bool",
        "same_side": "bool",
    },
    "planned_surgery": {"code": "codes", "days_until": "number", "ipsilateral": "bool"},
    "order": {
        "target": "string",
        "side": "string",
        "intent": "string",
        "intra_articular": "bool",
        "code": "codes",
        "reason": "codes",
    },
    "injectate": {"category": "string", "code": "codes"},
    "flag": {"name": "string"},
    "data_issue": {"kind": "string", "concept": "string", "detail": "string"},
    "summary": {},  # one field per aggregate the rule set declares
}

# Property names a fact never uses for its own fields: the kind (t), the engine's identity and
# session (id, sid), value-set tags and the fact's index. An aggregate named after one of them
# would break every evaluation (id, sid) or silently disable every summary rule (t); the front end
# refuses such aggregate and parameter names. (The engine's own markers, $s and $t, cannot be
# written as names: aggregates and parameters are identifiers.)
ENGINE_RESERVED_NAMES = ("t", "id", "sid", "_tags", "_fid")

OPERATORS = ("eq", "ne", "gt", "gte", "lt", "lte", "in", "exists")
ORDERING_OPERATORS = ("gt", "gte", "lt", "lte")
_DURABLE_OP = {"ne": "$neq", "gt": "$gt", "gte": "$gte", "lt": "$lt", "lte": "$lte"}


@dataclass(frozen=True, slots=True)
class ParamRef:
    name: str

    def __str__(self) -> str:
        return f"${self.name}"


@dataclass(frozen=True, slots=True)
class FieldTest:
    field: str
    op: str  # one of OPERATORS
    operand: Any  # literal, ParamRef, a value-set id (codes + in), a tuple (string + in), bool (exists)

    def describe(self) -> str:
        symbol = {"eq": "=", "ne": "≠", "gt": ">", "gte": "≥", "lt": "<", "lte": "≤"}.get(self.op, self.op)
        if self.op == "in" and isinstance(self.operand, tuple):
            return f"{self.field} in [{', '.join(map(str, self.operand))}]"
        return f"{self.field} {symbol} {self.operand}"


@dataclass(frozen=True, slots=True)
class Pattern:
    alias: str
    kind: str
    tests: tuple[FieldTest, ...]
    negated: bool = False


def tag(field: str, value_set: str) -> str:
    """The tag a prepared fact carries when its ``field`` has a code in ``value_set``."""
    return f"{field}@{value_set}"


# --- the reference interpreter -------------------------------------------------------------


def resolve_operand(operand: Any, params: dict[str, Any]) -> Any:
    return params[operand.name] if isinstance(operand, ParamRef) else operand


def test_holds(test: FieldTest, fact: dict, params: dict[str, Any]) -> bool:
    """Does ``fact`` satisfy ``test``? Mirrors the engine's semantics exactly."""
    if test.op == "exists":
        return (test.field in fact and fact[test.field] is not None) == test.operand
    if test.op == "in" and not isinstance(test.operand, tuple):
        return tag(test.field, test.operand) in fact.get("_tags", ())
    if test.field not in fact or fact[test.field] is None:
        return False
    value = fact[test.field]
    if test.op == "in":
        return value in test.operand
    operand = resolve_operand(test.operand, params)
    if test.op == "eq":
        return value == operand
    if test.op == "ne":
        return value != operand
    if test.op == "gt":
        return value > operand
    if test.op == "gte":
        return value >= operand
    if test.op == "lt":
        return value < operand
    return value <= operand  # lte


def pattern_matches(pattern: Pattern, fact: dict, params: dict[str, Any]) -> bool:
    """Positive match of one fact against a pattern (ignores ``negated``)."""
    return fact["t"] == pattern.kind and all(test_holds(t, fact, params) for t in pattern.tests)


def alternative_matches(patterns: tuple[Pattern, ...], facts: list[dict], params: dict[str, Any]) -> dict[str, list[dict]] | None:
    """All facts matching each positive alias, or None if the alternative does not hold."""
    matched: dict[str, list[dict]] = {}
    for pattern in patterns:
        hits = [f for f in facts if pattern_matches(pattern, f, params)]
        if pattern.negated:
            if hits:
                return None
        elif not hits:
            return None
        else:
            matched[pattern.alias] = hits
    return matched


def compile_matcher(pattern: Pattern, params: dict[str, Any]) -> Callable[[Mapping[str, Any]], bool]:
    """A fast predicate for facts *of the pattern's kind*, with the same semantics as
    :func:`test_holds`. Parameters are inlined; operands are validated literals (str, int,
    float, bool), rendered with ``repr`` into one expression compiled once per rule set."""
    terms = [_term(i, test, params, pattern.alias) for i, test in enumerate(pattern.tests)]
    return eval(f"lambda f: {' and '.join(terms) or 'True'}", {})  # noqa: S307 - validated literals only


def compile_signature(
    tests: Sequence[tuple[str, FieldTest]], fields: Sequence[str], params: dict[str, Any]
) -> Callable[[Mapping[str, Any]], tuple]:
    """A function giving what some tests can see of a fact, in one call: ``(its tags, the answer
    to each test, the value of each of fields)``. ``tests`` are (alias of a pattern making it,
    test) pairs. Each answer is what :func:`compile_matcher` gives for a pattern of that one
    test: the expressions are the same, compiled together so that a fact costs one call rather
    than one per test."""
    answers = "".join(f"{_term(i, test, params, alias)}, " for i, (alias, test) in enumerate(tests))
    values = "".join(f"f.get({name!r}), " for name in fields)
    return eval(f"lambda f: (tuple(f.get('_tags', ())), ({answers}), ({values}))", {})  # noqa: S307 - validated literals only


def _term(i: int, test: FieldTest, params: dict[str, Any], alias: str) -> str:
    """A test as a Python expression on a fact ``f`` that is True or False; ``i`` numbers the
    expression's variable, ``alias`` names the pattern in an error."""
    field = repr(test.field)
    if test.op == "exists":
        return f"(f.get({field}) is not None) is {test.operand!r}"
    if test.op == "in" and not isinstance(test.operand, tuple):
        return f"{tag(test.field, test.operand)!r} in f.get('_tags', ())"
    if test.op == "in":
        return f"f.get({field}) in {frozenset(test.operand)!r}"
    operand = resolve_operand(test.operand, params)
    if not isinstance(operand, (str, int, float, bool)):
        from .ruleset import RuleSetError  # (the model module imports this one)

        raise RuleSetError(alias, f"cannot compile operand {operand!r}")
    symbol = {"eq": "==", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}[test.op]
    return f"((v{i} := f.get({field})) is not None and v{i} {symbol} {operand!r})"


# --- compilation of one pattern into durable-rules JSON --------------------------------------


def durable_test(test: FieldTest, params: dict[str, Any]) -> dict:
    if test.op == "exists":
        return {"$ex" if test.operand else "$nex": {test.field: 1}}
    if test.op == "in" and not isinstance(test.operand, tuple):
        return {"$iany": {"_tags": {"$i": tag(test.field, test.operand)}}}
    if test.op == "in":
        return {"$or": [{test.field: v} for v in test.operand]}
    operand = resolve_operand(test.operand, params)
    if test.op == "eq":
        return {test.field: operand}
    return {_DURABLE_OP[test.op]: {test.field: operand}}


def durable_pattern(pattern: Pattern, params: dict[str, Any]) -> dict:
    """A positive pattern as a durable-rules pattern (negations never reach the engine: see
    :mod:`needlepoint.core.compiler`)."""
    conditions = [{"t": pattern.kind}] + [durable_test(t, params) for t in pattern.tests]
    return {pattern.alias: {"$and": conditions}}
