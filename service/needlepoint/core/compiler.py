"""Compile a :class:`RuleSet` into one durable-rules definition, once, at load time.

Each alternative of a rule becomes one engine rule named ``RULE-ID#n``. Negated patterns are
not compiled as engine negations: durable-rules 2.0.28 lets a negation that is blocked in one
rule suppress the negation joins of other rules that start with the same fact (a defect our
differential tests found; ``tests/test_engine_defects.py`` reproduces it). Instead every
distinct negated pattern gets a short property name (``n0``, ``n1``…); the preparer asserts one
``{"t": "absent", "n3": true, …}`` fact naming every negated pattern that no fact matches, and
each alternative tests all its negations in one positive pattern on that fact. Parameters are
compiled in as literals (a site overlay therefore compiles to its own engine rule set), value
sets become tag tests (``{"$iany": {"_tags": {"$i": "code@vitamin-k-antagonists"}}}``) so the
engine never sees a code list, and the compiler refuses what the engine would mishandle:
too many distinct equality tests (the engine loops forever past ~511 under one node) and
property names whose 32-bit hashes collide.
"""

from __future__ import annotations

from typing import Any

from .conditions import ENGINE_RESERVED_NAMES, FACT_FIELDS, Pattern, durable_pattern
from .durable import fnv1a_32
from .ruleset import RuleSet, RuleSetError

MAX_EQUALITY_TESTS = 400


def engine_rule_name(rule_id: str, alternative: int) -> str:
    return f"{rule_id}#{alternative}"


def rule_id_of(engine_rule_name: str) -> tuple[str, int]:
    rule_id, _, alternative = engine_rule_name.rpartition("#")
    return rule_id, int(alternative)


def _equality_tests(node: Any, found: set[tuple[str, Any]]) -> None:
    """Collect distinct (property, value) equality tests in a compiled condition tree."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$and", "$or"):
                for child in value:
                    _equality_tests(child, found)
            elif key == "$iany":
                for _field, cond in value.items():
                    _equality_tests(cond, found)
            elif key.startswith("$"):
                continue
            else:
                found.add((key, orjsonable(value)))


def orjsonable(value: Any) -> Any:
    return value if not isinstance(value, list) else tuple(value)


def negation_key(pattern: Pattern) -> str:
    """A stable key for a negated pattern: the same test in two rules shares one key."""
    tests = ",".join(f"{t.field}:{t.op}:{t.operand}" for t in pattern.tests)
    return f"{pattern.kind}[{tests}]"


ABSENT_ALIAS = "_absent"


def negated_patterns(ruleset: RuleSet) -> dict[str, Pattern]:
    """Every distinct negated pattern of the rule set, by the property that marks its absence."""
    found: dict[str, Pattern] = {}
    for rule in ruleset.rules:
        for alternative in rule.alternatives:
            for pattern in alternative:
                if pattern.negated:
                    found.setdefault(negation_key(pattern), pattern)
    return {f"n{i}": found[key] for i, key in enumerate(sorted(found))}


def _engine_patterns(alternative: tuple[Pattern, ...], params: dict, absence_of: dict[str, str]) -> list[dict]:
    patterns = [durable_pattern(p, params) for p in alternative if not p.negated]
    absences = [{absence_of[negation_key(p)]: True} for p in alternative if p.negated]
    if absences:
        patterns.append({ABSENT_ALIAS: {"$and": [{"t": "absent"}, *absences]}})
    return patterns


def compile_ruleset(ruleset: RuleSet) -> dict:
    params = ruleset.param_values()
    negations = negated_patterns(ruleset)
    absence_of = {negation_key(p): prop for prop, p in negations.items()}
    definition: dict[str, dict] = {}
    for rule in ruleset.rules:
        for i, alternative in enumerate(rule.alternatives):
            definition[engine_rule_name(rule.id, i)] = {"all": _engine_patterns(alternative, params, absence_of)}

    tests: set = set()
    for body in definition.values():
        for pattern in body["all"]:
            for cond in pattern.values():
                _equality_tests(cond, tests)
    if len(tests) > MAX_EQUALITY_TESTS:
        raise RuleSetError(
            ruleset.id,
            f"{len(tests)} distinct equality tests; the engine hangs past ~511, so the limit is {MAX_EQUALITY_TESTS}. "
            "Move long code lists into value sets (tested as tags).",
        )

    properties = set(ENGINE_RESERVED_NAMES) | {f for fields in FACT_FIELDS.values() for f in fields}
    properties |= {a.name for a in ruleset.aggregates} | set(negations)
    seen: dict[int, str] = {}
    for prop in sorted(properties):
        h = fnv1a_32(prop)
        if h in seen:
            raise RuleSetError(ruleset.id, f"property names {seen[h]!r} and {prop!r} collide in the engine's hash")
        seen[h] = prop
    return definition
