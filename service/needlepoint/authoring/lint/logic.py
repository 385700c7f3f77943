"""What lint knows of the semantics of patterns: which values the tests on one fact allow
(intervals of numbers, sets of strings), whether a pattern or an alternative can ever hold, and
whether one alternative implies another. The checks in :mod:`.checks` (never-fire, shadowing,
conflicts, bands) are built on these. Everything works on the builder's entries
(:mod:`needlepoint.rulesets.builder`), with parameter values as in force (a site overlay applied).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from needlepoint.core.conditions import FACT_FIELDS, FieldTest, ParamRef
from needlepoint.rulesets.builder import AggregateEntry, ConceptEntry, ParamEntry, PatternEntry, RuleEntry, ValueSetEntry
from needlepoint.rulesets.format import number

# --- what the prepared facts look like (core/prepare.py), as far as lint relies on it ---------

# Fields every prepared fact of the kind carries, so ``exists: false`` never holds on them.
ALWAYS_SET = frozenset(
    {
        ("observation", "concept"),
        ("observation", "age_days"),
        ("allergy", "severity"),
        ("order", "intra_articular"),
        ("flag", "name"),
        ("prior_injection", "days_ago"),
        ("prior_injection", "same_target"),
        ("prior_injection", "same_side"),
        ("planned_surgery", "days_until"),
        ("planned_surgery", "ipsilateral"),
        ("data_issue", "kind"),
        ("data_issue", "concept"),
        ("data_issue", "detail"),
    }
)
# Fields no prepared fact carries. Coded fields become value-set tags, never fields. The order
# fact has no requested_modality: ruleset.yaml's requested_modality reads the order's codes.
NEVER_SET = frozenset(
    {(kind, f) for kind, fields in FACT_FIELDS.items() for f, t in fields.items() if t == "codes"}
    | {("order", "requested_modality")}
)
# Kinds with exactly one fact per evaluation (and one observation per concept, the newest).
SINGLETON_KINDS = ("patient", "order", "summary")
INTEGER_FIELDS = frozenset({("patient", "age_years"), ("prior_injection", "days_ago"), ("planned_surgery", "days_until")})

def fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    if value == math.inf:
        return "∞"
    if value == -math.inf:
        return "-∞"
    return str(value)

# --- intervals -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Interval:
    """An interval of numbers; infinite ends are never inclusive."""

    lo: float = -math.inf
    lo_in: bool = False
    hi: float = math.inf
    hi_in: bool = False

    def __and__(self, other: Interval) -> Interval:
        if self.lo > other.lo or (self.lo == other.lo and not self.lo_in):
            lo, lo_in = self.lo, self.lo_in
        else:
            lo, lo_in = other.lo, other.lo_in
        if self.hi < other.hi or (self.hi == other.hi and not self.hi_in):
            hi, hi_in = self.hi, self.hi_in
        else:
            hi, hi_in = other.hi, other.hi_in
        return Interval(lo, lo_in, hi, hi_in)

    def empty(self) -> bool:
        return self.lo > self.hi or (self.lo == self.hi and not (self.lo_in and self.hi_in))

    def has(self, x: float) -> bool:
        return (self.lo < x or (self.lo == x and self.lo_in)) and (x < self.hi or (x == self.hi and self.hi_in))

    def contains(self, other: Interval) -> bool:
        lo_ok = self.lo < other.lo or (self.lo == other.lo and (self.lo_in or not other.lo_in))
        hi_ok = self.hi > other.hi or (self.hi == other.hi and (self.hi_in or not other.hi_in))
        return lo_ok and hi_ok

    def two_sided(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def integers(self) -> Interval:
        """The same set of integers, with inclusive integer ends."""
        lo = self.lo if math.isinf(self.lo) else (math.ceil(self.lo) if self.lo_in else math.floor(self.lo) + 1)
        hi = self.hi if math.isinf(self.hi) else (math.floor(self.hi) if self.hi_in else math.ceil(self.hi) - 1)
        return Interval(lo, not math.isinf(lo), hi, not math.isinf(hi))

    def __str__(self) -> str:
        if self.lo == self.hi and self.lo_in and self.hi_in:
            return f"{{{fmt(self.lo)}}}"
        return f"{'[' if self.lo_in else '('}{fmt(self.lo)}, {fmt(self.hi)}{']' if self.hi_in else ')'}"

UNKNOWN = object()

@dataclass
class Numeric:
    """What the tests on one numeric field allow."""

    iv: Interval
    points: set | None  # from eq / in, when given
    excluded: set
    lo_test: FieldTest | None = None
    hi_test: FieldTest | None = None

    def satisfiable(self, integer: bool) -> bool:
        iv = self.iv.integers() if integer else self.iv
        if iv.empty():
            return False
        if self.points is not None:
            return any(iv.has(p) and p not in self.excluded and (not integer or float(p).is_integer()) for p in self.points)
        if iv.lo == iv.hi:
            return iv.lo not in self.excluded
        return True

class Semantics:
    """The semantic questions, over a rule set's entries and the parameter values in force."""

    values: dict[str, Any]
    params: dict[str, ParamEntry]
    concepts: dict[str, ConceptEntry]
    value_sets: dict[str, ValueSetEntry]
    aggregates: dict[str, AggregateEntry]

    # -- semantics: what the tests on one fact allow --

    def ftype(self, kind: str, fld: str) -> str | None:
        if kind == "summary":
            return "number" if fld in self.aggregates else None
        return FACT_FIELDS.get(kind, {}).get(fld)

    def resolve(self, operand: Any) -> Any:
        if isinstance(operand, ParamRef):
            return self.values.get(operand.name, UNKNOWN)
        return operand

    def show(self, test: FieldTest) -> str:
        if isinstance(test.operand, ParamRef):
            return f"{test.field} {test.op}: {test.operand} = {fmt(self.resolve(test.operand))}"
        if isinstance(test.operand, tuple):
            return f"{test.field} in: [{', '.join(map(str, test.operand))}]"
        return f"{test.field} {test.op}: {fmt(test.operand)}"

    def numeric(self, tests: Iterable[FieldTest]) -> Numeric:
        num = Numeric(Interval(), None, set())
        for t in tests:
            v: Any = self.resolve(t.operand) if not isinstance(t.operand, tuple) else t.operand  # a value of any type
            if v is UNKNOWN or t.op == "exists":
                continue
            if t.op == "in":
                vals = {x for x in v if number(x)}
                num.points = vals if num.points is None else num.points & vals
                continue
            if not number(v):
                continue
            if t.op == "eq":
                num.points = {v} if num.points is None else num.points & {v}
                bound = Interval(v, True, v, True)
            elif t.op == "ne":
                num.excluded.add(v)
                continue
            else:
                bound = {
                    "gt": Interval(v, False),
                    "gte": Interval(v, True),
                    "lt": Interval(hi=v, hi_in=False),
                    "lte": Interval(hi=v, hi_in=True),
                }[t.op]
            before = num.iv
            num.iv = num.iv & bound
            if num.iv.lo != before.lo or num.iv.lo_in != before.lo_in:
                num.lo_test = t
            if num.iv.hi != before.hi or num.iv.hi_in != before.hi_in:
                num.hi_test = t
        return num

    def candidates(self, tests: Iterable[FieldTest]) -> tuple[set | None, set]:
        """The values eq/in allow (None: any) and the values ne excludes, for string/bool fields."""
        allowed: set | None = None
        excluded: set = set()
        for t in tests:
            if t.op == "in":
                vals = set(t.operand) if isinstance(t.operand, tuple) else set()
            elif t.op in ("eq", "ne"):
                v = self.resolve(t.operand)
                if v is UNKNOWN:
                    continue
                if t.op == "ne":
                    excluded.add(v)
                    continue
                vals = {v}
            else:
                continue
            allowed = vals if allowed is None else allowed & vals
        return allowed, excluded

    def concept_of(self, tests: Iterable[FieldTest]) -> ConceptEntry | None:
        for t in tests:
            if t.field == "concept" and t.op in ("eq", "in"):
                values = t.operand if isinstance(t.operand, tuple) else (self.resolve(t.operand),)
                if len(values) == 1 and values[0] in self.concepts:
                    return self.concepts[values[0]]
        return None

    def domain(self, kind: str, fld: str, tests: Iterable[FieldTest]) -> tuple[Interval, str]:
        """The values a prepared fact can carry in a numeric field, and why."""
        if kind == "summary":
            agg = self.aggregates.get(fld)
            if agg is not None and agg.mode == "criteria":
                return Interval(0, True, agg.size, True), f"{fld} counts {agg.size} criteria, so it lies between 0 and {agg.size}"
            return Interval(0, True), f"{fld} is a count, never negative"
        if (kind, fld) == ("observation", "value"):
            concept = self.concept_of(tests)
            if concept is not None and concept.plausible is not None:
                lo, hi = concept.plausible
                aside = f"{concept.id} values outside the plausible range {fmt(lo)}-{fmt(hi)} {concept.unit or ''} are set aside"
                return Interval(max(0, lo), True, hi, True), aside.replace("  ", " ")
            return Interval(0, True), "observation values are never negative"
        if (kind, fld) in (("observation", "age_days"), ("patient", "age_years")):
            return Interval(0, True), f"{fld} is never negative"
        return Interval(), ""

    def unsat(self, kind: str, tests: tuple[FieldTest, ...] | list[FieldTest]) -> tuple[FieldTest | None, str] | None:
        """Why no single fact of ``kind`` can pass all ``tests`` (None: one can)."""
        by_field: dict[str, list[FieldTest]] = {}
        for t in tests:
            by_field.setdefault(t.field, []).append(t)
        concept = self.concept_of(tests) if kind == "observation" else None
        for fld, ts in by_field.items():
            ftype = self.ftype(kind, fld)
            exists = [t for t in ts if t.op == "exists"]
            compares = [t for t in ts if t.op != "exists"]
            present = [t for t in exists if t.operand is True]
            absent = [t for t in exists if t.operand is False]
            if present and absent:
                return absent[0], f"{fld} cannot both exist and not exist"
            if absent:
                if compares:
                    return compares[
                        0
                    ], f"{fld} exists: false, but a missing field satisfies no comparison ({self.show(compares[0])})"
                if (kind, fld) in ALWAYS_SET or kind == "summary":
                    return absent[0], f"every {kind} fact carries {fld}, so exists: false never holds"
                continue
            if (kind, fld) in NEVER_SET:
                if ftype == "codes" and present:
                    return (
                        present[0],
                        f"{kind}.{fld} is coded: prepared facts carry value-set tags, not the field, so exists: true never "
                        "holds; test {in: value-set}",
                    )
                if ftype != "codes" and ts:
                    return (
                        ts[0],
                        f"the prepared {kind} fact never carries {fld} (requested modalities are read from the order's codes "
                        "through ruleset.yaml requested_modality)",
                    )
            if concept is not None and fld == "value" and concept.unit is None:
                return ts[
                    0
                ], f"concept {concept.id} is coded (no unit in observations.yaml): its facts carry value_code, never value"
            if concept is not None and fld == "value_code" and concept.unit is not None:
                return ts[0], f"concept {concept.id} is numeric (unit {concept.unit}): its facts carry value, never value_code"
            if not compares:
                continue
            if ftype == "number":
                integer = kind == "summary" or (kind, fld) in INTEGER_FIELDS
                num = self.numeric(compares)
                if not num.satisfiable(integer):
                    return compares[-1], f"{' and '.join(self.show(t) for t in compares)} cannot all hold"
                dom, why = self.domain(kind, fld, tests)
                clipped = Numeric(num.iv & dom, num.points, num.excluded)
                if not clipped.satisfiable(integer):
                    return compares[-1], f"{' and '.join(self.show(t) for t in compares)} can never hold: {why}"
            elif ftype in ("string", "bool"):
                allowed, excluded = self.candidates(compares)
                if allowed is not None and not (allowed - excluded):
                    return compares[-1], f"{' and '.join(self.show(t) for t in compares)} cannot all hold"
        return None

    def implies(self, kind: str, p_tests: Iterable[FieldTest], q_tests: Iterable[FieldTest]) -> bool:
        """Does every fact of ``kind`` that passes ``p_tests`` also pass ``q_tests``?"""
        p_tests = list(p_tests)
        by_field: dict[str, list[FieldTest]] = {}
        for t in p_tests:
            by_field.setdefault(t.field, []).append(t)
        return all(self._test_implied(kind, q, by_field.get(q.field, []), p_tests) for q in q_tests)

    def _test_implied(self, kind: str, q: FieldTest, pts: list[FieldTest], all_p: list[FieldTest]) -> bool:
        compares = [t for t in pts if t.op != "exists"]
        if q.op == "exists":
            if q.operand:
                return (
                    bool(compares)
                    or any(t.op == "exists" and t.operand for t in pts)
                    or (kind, q.field) in ALWAYS_SET
                    or kind == "summary"
                )
            return any(t.op == "exists" and not t.operand for t in pts) or (kind, q.field) in NEVER_SET
        if not compares:
            return False
        ftype = self.ftype(kind, q.field)
        if ftype == "number":
            integer = kind == "summary" or (kind, q.field) in INTEGER_FIELDS
            num = self.numeric(compares)
            dom, _ = self.domain(kind, q.field, all_p)
            iv = num.iv & dom
            iv = iv.integers() if integer else iv
            value: Any = self.resolve(q.operand) if not isinstance(q.operand, tuple) else q.operand
            if value is UNKNOWN:
                return False
            if num.points is not None:
                points = [p for p in num.points if iv.has(p) and p not in num.excluded]
                return all(self._number_passes(q.op, value, p) for p in points)
            if q.op == "ne":
                return not iv.has(value) or value in num.excluded
            if q.op in ("eq", "in"):
                return iv.lo == iv.hi and self._number_passes(q.op, value, iv.lo)
            target = self.numeric([q]).iv
            return target.contains(iv)
        if ftype in ("string", "bool"):
            allowed, excluded = self.candidates(compares)
            if q.op == "ne":
                value = self.resolve(q.operand)
                return value in excluded or (allowed is not None and value not in allowed)
            if allowed is None:
                return False
            accepted = set(q.operand) if isinstance(q.operand, tuple) else {self.resolve(q.operand)}
            return (allowed - excluded) <= accepted
        if ftype == "codes" and q.op == "in":
            return any(t.op == "in" and self._vs_subset(t.operand, q.operand) for t in compares)
        return False

    @staticmethod
    def _number_passes(op: str, value: Any, x: float) -> bool:
        if op == "in":
            return x in value
        return {"eq": x == value, "ne": x != value, "gt": x > value, "gte": x >= value, "lt": x < value, "lte": x <= value}[op]

    def _vs_subset(self, a: str, b: str) -> bool:
        """Is every code of value set ``a`` in value set ``b``?"""
        if a == b:
            return True
        va, vb = self.value_sets.get(a), self.value_sets.get(b)
        if va is None or vb is None:
            return False
        for system, codes in va.codes.items():
            if not all(vb.covers(system, c) for c in codes):
                return False
        for system, prefixes in va.prefixes.items():
            if not all(any(p.startswith(q) for q in vb.prefixes.get(system, ())) for p in prefixes):
                return False
        return True

    # -- semantics: alternatives --

    def singleton_key(self, pat: PatternEntry) -> tuple | None:
        """Which single fact a pattern's fact must be, if its kind has one (negated or not)."""
        if pat.kind in SINGLETON_KINDS:
            return (pat.kind,)
        if pat.kind == "observation":
            concept = self.concept_of(pat.tests)
            if concept is not None:
                return ("observation", concept.id)
        return None

    def groups(self, pats: Iterable[PatternEntry]) -> dict[tuple, list[PatternEntry]]:
        """Positive patterns that must match the same fact (the order, the patient, the summary,
        the newest observation of a concept)."""
        out: dict[tuple, list[PatternEntry]] = {}
        for p in pats:
            key = self.singleton_key(p) if not p.negated else None
            if key is not None:
                out.setdefault(key, []).append(p)
        return out

    def alt_conflict(self, pats: list[PatternEntry]) -> tuple[PatternEntry, FieldTest | None, str] | None:
        """Why an alternative (or several rules' alternatives together) can never hold."""
        positives = [p for p in pats if not p.negated]
        for p in positives:
            why = self.unsat(p.kind, p.tests)
            if why is not None:
                return p, why[0], f"{p.alias}: {why[1]}"
        groups = self.groups(positives)
        for key, group in groups.items():
            if len(group) > 1:
                why = self.unsat(group[0].kind, [t for p in group for t in p.tests])
                if why is not None:
                    aliases = " and ".join(p.alias for p in group)
                    return group[-1], why[0], f"{aliases} test the same {' '.join(key)} fact: {why[1]}"
        for n in pats:
            if not n.negated:
                continue
            if not n.tests and n.kind in SINGLETON_KINDS:
                return n, None, f"{n.alias}: there is always a {n.kind} fact, so this negation never holds"
            for p in positives:
                if p.kind == n.kind and self.implies(p.kind, p.tests, n.tests):
                    return (
                        n,
                        None,
                        f"{n.alias} negates what {p.alias} requires: every {n.kind} fact that matches {p.alias} also matches "
                        f"{n.alias}",
                    )
            n_key = self.singleton_key(n)
            if n_key in groups and len(groups[n_key]) > 1:
                merged = [t for p in groups[n_key] for t in p.tests]
                if self.implies(n.kind, merged, n.tests):
                    return n, None, f"{n.alias} negates what {' and '.join(p.alias for p in groups[n_key])} require together"
        return None

    def alt_implies(self, a: list[PatternEntry], b: list[PatternEntry]) -> bool:
        """Whenever alternative ``a`` holds, does ``b`` hold too?"""
        a_pos = [p for p in a if not p.negated]
        a_neg = [p for p in a if p.negated]
        groups = self.groups(a_pos)
        for q in b:
            if not q.negated:
                key = self.singleton_key(q)
                if not q.tests and q.kind in SINGLETON_KINDS:
                    continue
                if any(p.kind == q.kind and self.implies(p.kind, p.tests, q.tests) for p in a_pos):
                    continue
                if key in groups and self.implies(q.kind, [t for p in groups[key] for t in p.tests], q.tests):
                    continue
                return False
            # ``not q`` holds whenever a holds: a forbids everything q matches, or a's own fact
            # of that singleton kind cannot match q.
            if any(m.kind == q.kind and self.implies(q.kind, q.tests, m.tests) for m in a_neg):
                continue
            key = self.singleton_key(q)
            if key in groups and self.unsat(q.kind, [t for p in groups[key] for t in p.tests] + list(q.tests)) is not None:
                continue
            return False
        return True

    def live_alts(self, rule: RuleEntry) -> list[list[PatternEntry]]:
        return [alt for alt in rule.alts if self.alt_conflict(alt) is None]

    def rule_implies(self, r1: RuleEntry, r2: RuleEntry) -> bool:
        """Does ``r2`` fire whenever ``r1`` does? (False when ``r1`` can never fire.)"""
        alts = self.live_alts(r1)
        return bool(alts) and all(any(self.alt_implies(a, b) for b in self.live_alts(r2)) for a in alts)

