"""Lint's checks: what is lint, on the rule set the builder built.

Rules that can never fire (NP007, including a value outside a field's vocabulary), shadowed and
conflicting modality or injectate rules (NP008, NP009), gaps and overlaps between threshold bands
(NP010), rules without evidence (NP011), hard-coded thresholds (NP012), unused value sets and
parameters (NP013), malformed codes (NP006), duplicate YAML keys (NP015) and files the loader
ignores (NP001 warnings).
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

from needlepoint.core.conditions import FieldTest, ParamRef
from needlepoint.core.ruleset import RECOMMENDATIONS
from needlepoint.rulesets.builder import Built, PatternEntry, Reporter, RuleEntry
from needlepoint.rulesets.diagnostics import ERROR, WARNING, Diagnostic, suggest
from needlepoint.rulesets.format import VOCABULARIES, VOCABULARY_NAMES, number

from .codes import article, check_code
from .logic import INTEGER_FIELDS, Interval, Numeric, Semantics, fmt


class Linter(Semantics, Reporter):
    def __init__(self, built: Built) -> None:
        Reporter.__init__(self, built.sources)
        self.built = built
        self.values = built.values
        self.params = built.params
        self.concepts = built.concepts
        self.value_sets = built.value_sets
        self.aggregates = built.aggregates
        self.rules = built.rules
        self.used_params = built.used_params
        self.used_value_sets = built.used_value_sets

    def file_warning(self, code: str, file: str, message: str) -> None:
        self.diagnostics.append(Diagnostic(code, WARNING, file, 1, 1, file, "", message))

    # -- the run --

    def run(self) -> list[Diagnostic]:
        self.check_files()
        if self.sources.meta is not None:
            self.check_codes()
            self.check_evidence()
            self.check_vocabularies()
            self.check_never_fire()
            self.check_bands()
            self.check_modality_conflicts()
            self.check_injectate_shadowing()
            self.check_hard_coded()
            self.check_unused()
        return self.diagnostics

    # -- NP015 duplicate keys, NP001 ignored files --

    def check_files(self) -> None:
        for doc in self.sources.all_documents():
            for dup in doc.duplicates:
                self.diagnostics.append(
                    Diagnostic(
                        "NP015",
                        ERROR,
                        doc.file,
                        dup.line,
                        dup.column,
                        doc.rel,
                        "",
                        f"duplicate key {dup.path[-1]!r}: it is already given at line {dup.earlier_line}, "
                        "and YAML keeps only the last one",
                    )
                )
        for file, message in self.sources.ignored:
            self.file_warning("NP001", file, message)

    # -- NP006 --

    def check_codes(self) -> None:
        for vs in self.value_sets.values():
            what = f"value set {vs.id}"
            for lpath, system, prefix in vs.code_lists:
                items = vs.doc.value
                for part in lpath:
                    items = items[part]
                group = lpath[2] if len(lpath) > 2 and lpath[1] == "groups" else None
                shown = f"{what} group {group}" if group is not None else what
                for i, raw in enumerate(items):
                    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
                        continue  # the builder refuses it
                    path = lpath + (i,)
                    code = str(raw)
                    text = vs.doc.scalar_text(path)
                    if not isinstance(raw, str) and text is not None and text != code:
                        self.error(
                            "NP006",
                            vs.doc,
                            path,
                            f"{shown}: {system} code {text} is read by YAML as the number {code}; quote it: '{text}'",
                            key=False,
                        )
                        continue
                    problem = check_code(system, code, prefix=prefix)
                    if problem is not None:
                        self.add(
                            "NP006",
                            problem[0],
                            vs.doc,
                            path,
                            f"{shown}: {system} {'prefix' if prefix else 'code'} {code!r}: {problem[1]}",
                            key=False,
                        )
        for concept in self.concepts.values():
            codes = concept.spec.get("codes") if isinstance(concept.spec, dict) else None
            for i, item in enumerate(codes if isinstance(codes, list) else []):
                if not isinstance(item, str) or "#" not in item:
                    continue  # the builder refuses it
                system, _, code = item.partition("#")
                problem = check_code(system, code)
                if problem is not None:
                    self.add(
                        "NP006",
                        problem[0],
                        concept.doc,
                        concept.path + ("codes", i),
                        f"observation concept {concept.id}: {system} code {code!r}: {problem[1]}",
                        key=False,
                    )

    # -- NP011: every rule cites evidence --

    def check_evidence(self) -> None:
        for doc in self.sources.rules:
            if not doc.loaded or not isinstance(doc.value, list):
                continue
            for i, raw in enumerate(doc.value):
                if not isinstance(raw, dict):
                    continue
                evidence = raw.get("evidence")
                if evidence is None or evidence == []:
                    rid = raw.get("id") if isinstance(raw.get("id"), str) else None
                    what = rid or f"the rule at line {doc.pos((i,), key=False)[0]}"
                    has = "evidence" in raw
                    self.error(
                        "NP011",
                        doc,
                        (i, "evidence") if has else (i,),
                        f"{what} cites no evidence: add evidence: [{{citation: ..., strength: ...}}] (a local convention is "
                        "cited as such)",
                        key=has,
                    )

    # -- NP007: a value outside a field's vocabulary never matches --

    def check_vocabularies(self) -> None:
        pats = [p for r in self.rules for alt in r.alts for p in alt] + [p for a in self.aggregates.values() for p in a.patterns]
        for pat in pats:
            for test in pat.tests:
                vocabulary = VOCABULARIES.get((pat.kind, test.field))
                if vocabulary is None or test.op not in ("eq", "in"):
                    continue
                if test.op == "in":
                    for i, value in enumerate(test.operand):
                        self._term(pat, pat.body + (test.field, "in", i), vocabulary, test.field, value)
                elif isinstance(test.operand, ParamRef):
                    value = self.values.get(test.operand.name)
                    self._term(pat, pat.test_path(test), vocabulary, test.field, value, param=test.operand.name)
                else:
                    self._term(pat, pat.test_path(test), vocabulary, test.field, test.operand)

    def _term(self, pat: PatternEntry, path: tuple, vocabulary: tuple, fld: str, value: Any, param: str | None = None) -> None:
        if value in vocabulary:
            return
        shown = f"${param} = {value!r}" if param else repr(value)
        name = VOCABULARY_NAMES[(pat.kind, fld)]
        self.error(
            "NP007",
            pat.doc,
            path,
            f"{pat.owner}: {shown} is not {article(name)} ({', '.join(vocabulary)}){suggest(value, vocabulary)}, so it can "
            "never match",
            key=False,
        )

    # -- NP007 --

    def check_never_fire(self) -> None:
        for rule in self.rules:
            dead = [(i, why) for i, alt in enumerate(rule.alts) if (why := self.alt_conflict(alt)) is not None]
            single = len(rule.alts) == 1
            for i, (pat, test, message) in dead:
                if single:
                    prefix = f"{rule.id} can never fire: "
                elif len(dead) == len(rule.alts):
                    prefix = f"{rule.id} can never fire (no alternative can hold); alternative {i}: "
                else:
                    prefix = f"{rule.id}: alternative {i} can never hold: "
                self.error("NP007", pat.doc, pat.test_path(test), prefix + message)
        for agg in self.aggregates.values():
            for pat in agg.patterns:
                unsat = self.unsat(pat.kind, pat.tests)
                if unsat is not None:
                    self.error("NP007", pat.doc, pat.test_path(unsat[0]), f"{pat.owner} can never match: {unsat[1]}")

    # -- NP010 --

    def check_bands(self) -> None:
        axes: dict[tuple, list[tuple[RuleEntry, PatternEntry, Numeric, Interval]]] = {}
        for rule in self.rules:
            if not (rule.deferral or rule.caution):
                continue
            for alt in self.live_alts(rule):
                for pat in alt:
                    if pat.negated:
                        continue
                    context = tuple(sorted(self._context_term(t) for t in pat.tests if self.ftype(pat.kind, t.field) != "number"))
                    fields = dict.fromkeys(
                        t.field
                        for t in pat.tests
                        if self.ftype(pat.kind, t.field) == "number" and t.op in ("eq", "gt", "gte", "lt", "lte")
                    )
                    for fld in fields:
                        integer = pat.kind == "summary" or (pat.kind, fld) in INTEGER_FIELDS
                        num = self.numeric(t for t in pat.tests if t.field == fld)
                        if num.points is not None or num.excluded or num.iv.empty():
                            continue
                        iv = num.iv.integers() if integer else num.iv
                        entries = axes.setdefault((pat.kind, context, fld, integer), [])
                        if not any(r is rule and e == iv for r, _, _, e in entries):
                            entries.append((rule, pat, num, iv))
        for (kind, context, fld, integer), entries in axes.items():
            for x, y in combinations(entries, 2):
                if x[0] is y[0]:
                    continue
                a, b = sorted((x, y), key=lambda e: (e[3].lo, not e[3].lo_in))
                ia, ib = a[3], b[3]
                if ia.contains(ib) or ib.contains(ia):
                    continue  # nested: a stricter threshold inside a wider one (caution, then deferral)
                if integer:
                    relation = "meet" if ib.lo == ia.hi + 1 else ("gap" if ib.lo > ia.hi + 1 else "overlap")
                    between = (
                        Interval(ia.hi + 1, True, ib.lo - 1, True) if relation == "gap" else Interval(ib.lo, True, ia.hi, True)
                    )
                elif ia.hi < ib.lo or (ia.hi == ib.lo and not ia.hi_in and not ib.lo_in):
                    relation, between = "gap", Interval(ia.hi, not ia.hi_in, ib.lo, not ib.lo_in)
                elif ia.hi == ib.lo and ia.hi_in != ib.lo_in:
                    relation, between = "meet", Interval()
                else:
                    relation, between = "overlap", Interval(ib.lo, ib.lo_in, ia.hi, ia.hi_in)
                if relation == "meet":
                    continue
                if relation == "gap":
                    if not (ia.two_sided() or ib.two_sided()):
                        continue  # two one-sided thresholds with a deliberate range between them
                    if any(e is not a and e is not b and not (e[3] & between).empty() for e in entries):
                        continue  # another band covers the gap
                # Report at the bound that breaks the half-open [lower, upper) convention, else at
                # the band that should fit against the other.
                if a[2].hi_test is not None and a[2].hi_test.op == "lte":
                    here, there = a, b
                elif (b[2].lo_test is not None and b[2].lo_test.op == "gt") or ib.two_sided() or not ia.two_sided():
                    here, there = b, a
                else:
                    here, there = a, b
                here_test = here[2].lo_test if here is b else here[2].hi_test
                there_test = there[2].hi_test if here is b else there[2].lo_test
                # bands that do not nest have finite facing bounds, and numeric() notes the test of each
                assert here_test is not None and there_test is not None
                axis = " ".join(
                    [kind] + [shown.split(" = ", 1)[1] for f, shown in context if f == "concept" and " = " in shown] + [fld]
                )
                qualifiers = [shown for f, shown in context if not (f == "concept" and " = " in shown)]
                if qualifiers:
                    axis += f" ({', '.join(qualifiers)})"
                values = f"{axis} = {fmt(between.lo)}" if between.lo == between.hi else f"{axis} in {between}"
                edge = "starts at" if here is b else "ends at"
                other_edge = "ends at" if here is b else "starts at"
                head = (
                    f"{here[0].id} {edge} {self.show(here_test)}, but {there[0].id} ({there[0].where}) {other_edge} "
                    f"{self.show(there_test)}"
                )
                if relation == "gap":
                    self.error(
                        "NP010",
                        here[1].doc,
                        here[1].test_path(here_test),
                        f"{head}: {values} matches neither band; adjacent bands must meet exactly (the same parameter, gte on "
                        "one side and lt on the other)",
                    )
                else:
                    self.warn(
                        "NP010",
                        here[1].doc,
                        here[1].test_path(here_test),
                        f"{head}: {values} matches both bands; adjacent bands should meet, not overlap (gte on one side, lt on "
                        "the other)",
                    )

    def _context_term(self, t: FieldTest) -> tuple[str, str]:
        """A non-numeric test, as part of the key of a band axis and as shown in messages."""
        value = self.resolve(t.operand)
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, tuple):
            value = "[" + ", ".join(map(str, value)) + "]"
        symbol = {"eq": "=", "ne": "≠", "in": "in", "exists": "exists:"}.get(t.op, t.op)
        return t.field, f"{t.field} {symbol} {value}"

    # -- NP008 / NP009 --

    def check_modality_conflicts(self) -> None:
        modal = [r for r in self.rules if r.preferred is not None or r.avoid or r.acceptable]
        for r1, r2 in combinations(modal, 2):
            clash = self._modality_clash(r1, r2)
            if r1.precedence == r2.precedence and clash:
                pair = next(
                    (
                        (i, j)
                        for i, a in enumerate(self.live_alts(r1))
                        for j, b in enumerate(self.live_alts(r2))
                        if self.alt_conflict(a + b) is None
                    ),
                    None,
                )
                if pair is not None:
                    later, earlier = (r2, r1)
                    at = (
                        later.path + ("precedence",) if (later.path + ("precedence",)) in later.doc.keys else later.path + ("id",)
                    )
                    self.error(
                        "NP009",
                        later.doc,
                        at,
                        f"{later.id} and {earlier.id} ({earlier.where}) both have precedence {later.precedence} and can fire "
                        f"together, but {clash}: the outcome then depends on file order; give one of them a higher precedence",
                    )
        for low in modal:
            if low.preferred is None:
                continue
            for high in modal:
                if high.precedence <= low.precedence:
                    continue
                wins = high.preferred not in (None, low.preferred) and not any(
                    high.preferred in r.avoid and r.precedence >= high.precedence for r in modal
                )
                if (wins or low.preferred in high.avoid) and self.rule_implies(low, high):
                    does = f"avoids {low.preferred}" if low.preferred in high.avoid else f"prefers {high.preferred}"
                    self.warn(
                        "NP008",
                        low.doc,
                        low.path + ("then", "modality", "preferred"),
                        f"{low.id}'s preferred {low.preferred} never takes effect: whenever it fires, {high.id} "
                        f"({high.where}, precedence {high.precedence} > {low.precedence}) fires too and {does}",
                    )
                    break

    @staticmethod
    def _modality_clash(r1: RuleEntry, r2: RuleEntry) -> str:
        if r1.preferred and r2.preferred and r1.preferred != r2.preferred:
            return f"{r1.id} prefers {r1.preferred} and {r2.id} prefers {r2.preferred}"
        if r1.preferred and r1.preferred in r2.avoid:
            return f"{r1.id} prefers {r1.preferred}, which {r2.id} avoids"
        if r2.preferred and r2.preferred in r1.avoid:
            return f"{r2.id} prefers {r2.preferred}, which {r1.id} avoids"
        return ""

    def check_injectate_shadowing(self) -> None:
        rank = {rec: i for i, rec in enumerate(RECOMMENDATIONS)}
        for rule in self.rules:
            if (
                not rule.injectates
                or rule.deferral
                or rule.caution
                or rule.missing_data
                or rule.preferred
                or rule.avoid
                or rule.acceptable
            ):
                continue
            for other in self.rules:
                if other is rule:
                    continue
                stronger = dict(other.injectates)
                if all(cat in stronger and rank[stronger[cat]] > rank[rec] for cat, rec in rule.injectates) and self.rule_implies(
                    rule, other
                ):
                    shown = ", ".join(f"{cat} {stronger[cat]}" for cat, _ in rule.injectates)
                    self.warn(
                        "NP008",
                        rule.doc,
                        rule.path + ("then", "injectates"),
                        f"{rule.id} never decides: whenever it fires, {other.id} ({other.where}) fires too and recommends "
                        f"{shown}, which is more restrictive",
                    )
                    break

    # -- NP012 --

    def check_hard_coded(self) -> None:
        pats = [(p, p.owner) for r in self.rules for alt in r.alts for p in alt]
        pats += [(p, p.owner) for agg in self.aggregates.values() for p in agg.patterns]
        seen: set[tuple] = set()
        for pat, owner in pats:
            for t in pat.tests:
                if t.op not in ("eq", "ne", "gt", "gte", "lt", "lte") or isinstance(t.operand, ParamRef) or not number(t.operand):
                    continue
                if self.ftype(pat.kind, t.field) != "number":
                    continue
                if t.operand == 0 or (pat.kind == "summary" and t.operand in (1, 2)):
                    continue  # a domain bound, or a count such as "at least one" or "several"
                path = pat.test_path(t)
                if (pat.doc.file, path) in seen:
                    continue
                seen.add((pat.doc.file, path))
                same = [f"${n}" for n, v in self.values.items() if number(v) and v == t.operand]
                hint = f" ({', '.join(same[:3])} has this value)" if same else ""
                self.warn(
                    "NP012",
                    pat.doc,
                    path,
                    f"{owner}: {pat.kind} {t.field} {t.op}: {fmt(t.operand)} is a hard-coded threshold; define it in "
                    f"parameters.yaml with unit, provenance and source, and write $name{hint}",
                )

    # -- NP013 --

    def check_unused(self) -> None:
        if any(d.code == "NP000" for d in self.built.diagnostics):
            return  # what an unreadable file uses is unknown
        for name, param in self.params.items():
            if name not in self.used_params:
                self.warn("NP013", param.doc, param.path, f"parameter {name} is not used by any rule, aggregate or message")
        for vs_id, vs in self.value_sets.items():
            if vs_id not in self.used_value_sets:
                self.warn("NP013", vs.doc, vs.path, f"value set {vs_id} is not used by any rule, aggregate or requested_modality")

