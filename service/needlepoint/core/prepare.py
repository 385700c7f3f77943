"""Turn a :class:`PatientRecord` into the flat facts the engine matches, at one instant.

Everything that depends on the evaluation instant or on the order is derived here, so the rules
stay declarative: ages, intervals in days, the newest value of each observation concept in its
canonical unit, whether a prior injection was into the same target and side, whether a planned
surgery is ipsilateral, value-set membership tags, and the rule set's aggregates.

Missing or unusable data is never read as normal. A value that cannot be used (no unit, an
unknown unit, an implausible number, no date) becomes a ``data_issue`` fact that the rule set's
data rules turn into ``missingData``; the value itself is not asserted, so no threshold is ever
applied to it. Where an unknown side could hide a same-side risk, the same side is assumed and
the gap is named.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field

from .compiler import negated_patterns
from .conditions import Pattern, compile_matcher
from .record import Code, DataIssue, PatientRecord, RecordError
from .ruleset import ObservationConcept, RuleSet

FUTURE_TOLERANCE = dt.timedelta(minutes=10)  # clock skew between an EHR and us
INJECTATE_SYSTEM = "np-injectate"


@dataclass(slots=True)
class FactInfo:
    """What explanations need to show about one asserted fact."""

    label: str  # e.g. "observation inr (loinc#6301-6, 2025-05-30)"
    source: str  # locator in the caller's input
    units: dict[str, str] = field(default_factory=dict)  # field -> unit, for display
    codes: dict[str, list[Code]] = field(default_factory=dict)  # coded field -> codes
    notes: dict[str, str] = field(default_factory=dict)  # field -> how a derived value came about


@dataclass(slots=True)
class PreparedFacts:
    facts: list[dict]
    info: list[FactInfo]


class TagIndex:
    """Value-set membership as tags, with lookups indexed once per rule set.

    For each (fact kind, coded field) the rule set tests, exact codes map straight to the value
    sets holding them, and hierarchical codes (ICD-10-CM, ATC) are matched by looking up each
    prefix length that occurs in those value sets.
    """

    def __init__(self, ruleset: RuleSet):
        wanted: dict[tuple[str, str], list[str]] = {}
        patterns: list[Pattern] = [p for r in ruleset.rules for alt in r.alternatives for p in alt]
        patterns += [p for a in ruleset.aggregates for p in a.patterns]
        for p in patterns:
            for t in p.tests:
                if t.op == "in" and isinstance(t.operand, str):
                    sets = wanted.setdefault((p.kind, t.field), [])
                    if t.operand not in sets:
                        sets.append(t.operand)
        for vs_id in ruleset.requested_modality.values():
            if vs_id not in wanted.setdefault(("order", "code"), []):
                wanted[("order", "code")].append(vs_id)
        self._exact: dict[tuple[str, str], dict[tuple[str, str], tuple[str, ...]]] = {}
        self._prefix: dict[tuple[str, str], dict[str, dict[str, tuple[str, ...]]]] = {}
        self._lengths: dict[tuple[str, str], dict[str, tuple[int, ...]]] = {}
        for key, vs_ids in wanted.items():
            exact: dict[tuple[str, str], list[str]] = {}
            prefix: dict[str, dict[str, list[str]]] = {}
            for vs_id in vs_ids:
                vs = ruleset.value_sets[vs_id]
                for system, codes in vs.codes.items():
                    for code in codes:
                        exact.setdefault((system, code), []).append(vs_id)
                for system, prefixes in vs.prefixes.items():
                    for pre in prefixes:
                        prefix.setdefault(system, {}).setdefault(pre, []).append(vs_id)
            self._exact[key] = {k: tuple(v) for k, v in exact.items()}
            self._prefix[key] = {sys: {p: tuple(v) for p, v in d.items()} for sys, d in prefix.items()}
            self._lengths[key] = {sys: tuple(sorted({len(p) for p in d})) for sys, d in prefix.items()}

    def tags(self, kind: str, fld: str, codes: list[Code]) -> list[str]:
        key = (kind, fld)
        exact = self._exact.get(key)
        if exact is None:
            return []
        found: dict[str, None] = {}
        prefix, lengths = self._prefix[key], self._lengths[key]
        for c in codes:
            for vs_id in exact.get((c.system, c.code), ()):
                found[vs_id] = None
            by_prefix = prefix.get(c.system)
            if by_prefix:
                for n in lengths[c.system]:
                    for vs_id in by_prefix.get(c.code[:n], ()):
                        found[vs_id] = None
        return [f"{fld}@{vs_id}" for vs_id in found]


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def completed_years(born: dt.date, on: dt.date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def _sides_overlap(a: str | None, b: str | None) -> bool:
    """Same side, or either side unknown (assumed the same), or either is bilateral."""
    return a is None or b is None or a == b or "both" in (a, b)


def convert(value: float, unit: str, concept: ObservationConcept) -> float | None:
    """``value`` in ``unit`` expressed in the concept's canonical unit, or None if not accepted."""
    conversion = concept.units.get(unit)
    if conversion is None:
        return None
    if conversion == "fahrenheit_to_celsius":
        return (value - 32.0) * 5.0 / 9.0
    if conversion == "ifcc_to_ngsp":  # HbA1c mmol/mol -> %, the IFCC-NGSP master equation
        return 0.09148 * value + 2.152
    return value * float(conversion)


class Preparer:
    """Prepares records for one rule set. Build once; ``prepare`` is pure and thread-safe."""

    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset
        self.params = ruleset.param_values()
        self.index = TagIndex(ruleset)
        self.concept_of_code = {tuple(code.split("#", 1)): c for c in ruleset.observations.values() for code in c.codes}
        self.negations = [(prop, p.kind, compile_matcher(p, self.params)) for prop, p in negated_patterns(ruleset).items()]
        self.aggregates = [(agg, [(p.kind, compile_matcher(p, self.params)) for p in agg.patterns]) for agg in ruleset.aggregates]

    def prepare(self, record: PatientRecord, as_of: dt.datetime) -> PreparedFacts:
        as_of = _utc(as_of)
        out = PreparedFacts([], [])
        issues: list[DataIssue] = list(record.data_issues)
        order = record.order
        if order is None:
            raise RecordError("order", "no injection order: add a draft ServiceRequest for the injection, or give the target, side and intent")
        if not order.target:
            raise RecordError("order.target", "the injection order names no target (bodySite), so there is nothing to evaluate")

        def add(fact: dict, info: FactInfo) -> None:
            fact["_fid"] = len(out.facts)
            out.facts.append(fact)
            out.info.append(info)

        # patient
        patient: dict = {"t": "patient", "sex": record.sex or "unknown"}
        if record.birth_date is not None:
            if record.birth_date > as_of.date():
                raise RecordError("patient.birthDate", f"{record.birth_date} is after the evaluation instant {as_of:%Y-%m-%d}")
            patient["age_years"] = completed_years(record.birth_date, as_of.date())
        else:
            issues.append(DataIssue("value-missing", "patient.birthDate", "The patient's birth date is not recorded, so age-based rules cannot apply.", "patient"))
        add(patient, FactInfo("patient", "patient", {"age_years": "years"}))

        # the order
        order_fact: dict = {"t": "order", "target": order.target, "intra_articular": order.target == "hip-intra-articular"}
        if order.side:
            order_fact["side"] = order.side
        if order.intent:
            order_fact["intent"] = order.intent
        tags = self.index.tags("order", "code", order.codes) + self.index.tags("order", "reason", order.reasons)
        if tags:
            order_fact["_tags"] = tags
        add(order_fact, FactInfo(f"order {order.target} {order.side or '(side?)'} {order.intent or '(intent?)'}", order.source or "order", codes={"code": order.codes, "reason": order.reasons}))

        for kind, items in (("condition", record.conditions), ("medication", record.medications)):
            for item in items:
                tags = self.index.tags(kind, "code", item.codes)
                if tags:
                    add({"t": kind, "_tags": tags}, FactInfo(f"{kind} {_codes_label(item.codes)}", item.source, codes={"code": item.codes}))

        for allergy in record.allergies:
            tags = self.index.tags("allergy", "code", allergy.codes)
            if tags:
                fact = {"t": "allergy", "_tags": tags, "severity": allergy.severity or "unknown"}
                if allergy.criticality:
                    fact["criticality"] = allergy.criticality
                add(fact, FactInfo(f"allergy {_codes_label(allergy.codes)}", allergy.source, codes={"code": allergy.codes}))

        self._observations(record, as_of, add, issues)

        for inj in record.prior_injections:
            if inj.performed is None:
                issues.append(DataIssue("date-missing", f"prior injection {_codes_label(inj.codes)}", "A prior injection has no date, so intervals cannot be measured.", inj.source))
                continue
            performed = _utc(inj.performed)
            if performed > as_of + FUTURE_TOLERANCE:
                continue  # not yet known at the evaluation instant
            fact = {"t": "prior_injection", "days_ago": (as_of.date() - performed.date()).days}
            if inj.target:
                fact["target"] = inj.target
                fact["same_target"] = inj.target == order.target
            else:
                issues.append(DataIssue("value-missing", "prior injection target", f"A prior injection on {performed:%Y-%m-%d} has no recorded target, so it cannot be matched to this joint.", inj.source))
                fact["same_target"] = False
            fact["same_side"] = _sides_overlap(inj.side, order.side)
            if inj.side is None and inj.target == order.target:
                issues.append(DataIssue("value-missing", "prior injection side", f"A prior injection on {performed:%Y-%m-%d} has no recorded side; it is treated as the same side.", inj.source))
            tags = self.index.tags("prior_injection", "code", inj.codes) + self.index.tags("prior_injection", "agents", inj.agents)
            if tags:
                fact["_tags"] = tags
            add(fact, FactInfo(f"prior injection {inj.target or '(target?)'} {inj.side or '(side?)'} on {performed:%Y-%m-%d}", inj.source, {"days_ago": "days"}, {"code": inj.codes, "agents": inj.agents}))

        for surgery in record.planned_surgeries:
            tags = self.index.tags("planned_surgery", "code", surgery.codes)
            if surgery.date is None:
                if tags:  # an undated surgery matters only if a rule could be about it
                    issues.append(DataIssue("date-missing", f"planned surgery {_codes_label(surgery.codes)}", "A planned surgery has no date, so the interval to it cannot be measured.", surgery.source))
                continue
            fact = {"t": "planned_surgery", "days_until": (_utc(surgery.date).date() - as_of.date()).days, "ipsilateral": _sides_overlap(surgery.side, order.side)}
            if tags:
                fact["_tags"] = tags
            add(fact, FactInfo(f"planned surgery {_codes_label(surgery.codes)} on {_utc(surgery.date):%Y-%m-%d} ({surgery.side or 'side?'})", surgery.source, {"days_until": "days"}, {"code": surgery.codes}))

        for injectate in record.planned_injectates:
            tags = self.index.tags("injectate", "code", injectate.codes)
            if tags:
                add({"t": "injectate", "_tags": tags}, FactInfo(f"planned injectate {_codes_label(injectate.codes)}", injectate.source, codes={"code": injectate.codes}))

        for flag in dict.fromkeys(record.flags):
            add({"t": "flag", "name": flag}, FactInfo(f"clinician flag {flag}", "flags"))

        for issue in issues:
            add({"t": "data_issue", "kind": issue.kind, "concept": issue.concept, "detail": issue.detail}, FactInfo(f"data issue ({issue.kind}) {issue.concept}", issue.source))

        self.derive(out)
        return out

    def derive(self, out: PreparedFacts) -> None:
        """Append the derived facts, the ``summary`` (aggregates) and the ``absent`` fact
        (negations), to facts prepared from a record. Split out so that a changed fact (a
        counterfactual) can be re-derived the same way."""

        def add(fact: dict, info: FactInfo) -> None:
            fact["_fid"] = len(out.facts)
            out.facts.append(fact)
            out.info.append(info)

        by_kind: dict[str, list[dict]] = {}
        for f in out.facts:
            by_kind.setdefault(f["t"], []).append(f)
        summary: dict = {"t": "summary"}
        notes: dict[str, str] = {}
        for agg, matchers in self.aggregates:
            hits = [[f for f in by_kind.get(kind, ()) if match(f)] for kind, match in matchers]
            if agg.mode == "criteria":
                met = [p for p, h in zip(agg.patterns, hits, strict=True) if h]
                summary[agg.name] = len(met)
                notes[agg.name] = "; ".join(f"{p.kind} with " + " and ".join(t.describe() for t in p.tests) for p in met) or "no criterion met"
            elif agg.mode == "distinct_groups":
                groups = self.ruleset.value_sets[agg.distinct_groups_of].groups
                codes = [c for f in hits[0] for c in out.info[f["_fid"]].codes.get("code", [])]
                met_groups = [name for name, g in groups.items() if any(g.contains(c.system, c.code) for c in codes)]
                summary[agg.name] = len(met_groups)
                notes[agg.name] = ", ".join(met_groups) or "none"
            else:
                summary[agg.name] = len(hits[0])
                notes[agg.name] = "; ".join(out.info[f["_fid"]].label for f in hits[0]) or "none"
        add(summary, FactInfo("summary", "derived from the record", notes=notes))

        by_kind["summary"] = [summary]
        absent: dict = {"t": "absent"}
        for prop, kind, match in self.negations:
            if not any(match(f) for f in by_kind.get(kind, ())):
                absent[prop] = True
        add(absent, FactInfo("absences", "derived from the record"))

    def _observations(self, record: PatientRecord, as_of: dt.datetime, add, issues: list[DataIssue]) -> None:
        newest: dict[str, tuple[dt.datetime, object, ObservationConcept]] = {}
        for obs in record.observations:
            concept = None
            for c in obs.codes:
                concept = self.concept_of_code.get((c.system, c.code))
                if concept is not None:
                    break
            if concept is None:
                continue
            if obs.value is not None and not math.isfinite(obs.value):
                raise RecordError(obs.source or "observation", f"{concept.title} value is not a finite number")
            if obs.effective is None:
                kind, why = obs.problem or ("date-missing", "it has no date, so its age cannot be judged")
                issues.append(DataIssue(kind, concept.id, f"A {concept.title} result was set aside: {why}", obs.source))
                continue
            when = _utc(obs.effective)
            if when > as_of + FUTURE_TOLERANCE:
                continue
            if concept.id not in newest or when > newest[concept.id][0]:
                newest[concept.id] = (when, obs, concept)
        for cid in sorted(newest):
            when, obs, concept = newest[cid]
            label = f"observation {cid} ({_codes_label(obs.codes)}, {when:%Y-%m-%d %H:%M}Z)"
            fact: dict = {"t": "observation", "concept": cid, "age_days": round(max(0.0, (as_of - when).total_seconds() / 86400.0), 4)}
            info = FactInfo(label, obs.source, {"age_days": "days"})
            if obs.problem is not None:
                issues.append(DataIssue(obs.problem[0], cid, f"The newest {concept.title} result was set aside: {obs.problem[1]}", obs.source))
                continue
            if concept.unit is None:  # a coded result, e.g. pregnancy status
                if obs.value_code is None:
                    issues.append(DataIssue("value-missing", cid, f"The newest {concept.title} result carries no coded value; it was set aside.", obs.source))
                    continue
                tags = self.index.tags("observation", "value_code", [obs.value_code])
                if tags:
                    fact["_tags"] = tags
                info.codes["value_code"] = [obs.value_code]
            else:
                problem = self._numeric_problem(obs, concept)
                if problem:
                    issues.append(DataIssue(problem[0], cid, problem[1], obs.source))
                    continue
                fact["value"] = round(convert(obs.value, obs.unit, concept), 4)
                info.units["value"] = concept.unit
            add(fact, info)

    @staticmethod
    def _numeric_problem(obs, concept: ObservationConcept) -> tuple[str, str] | None:
        if obs.value is None:
            return "value-missing", f"The newest {concept.title} result has no numeric value; it was set aside."
        if obs.value < 0:
            raise RecordError(obs.source or "observation", f"{concept.title} value {obs.value} is negative")
        if not obs.unit:
            return "unit-missing", f"The newest {concept.title} result ({obs.value:g}) has no unit; no threshold was applied to it."
        converted = convert(obs.value, obs.unit, concept)
        if converted is None:
            accepted = ", ".join(concept.units)
            return "unit-unknown", f"The newest {concept.title} result is in {obs.unit!r}, which is not an accepted unit ({accepted}); no threshold was applied to it."
        if concept.plausible and not concept.plausible[0] <= converted <= concept.plausible[1]:
            hint = ""
            for unit in concept.units:
                alt = convert(obs.value, unit, concept)
                if unit != obs.unit and alt is not None and concept.plausible[0] <= alt <= concept.plausible[1]:
                    hint = f" It would be plausible in {unit} ({alt:.1f} {concept.unit}); please confirm the unit."
                    break
            return "implausible", f"The newest {concept.title} result, {obs.value:g} {obs.unit}, is outside the plausible range {concept.plausible[0]:g}–{concept.plausible[1]:g} {concept.unit}; it was set aside.{hint}"
        return None


def _codes_label(codes: list[Code]) -> str:
    if not codes:
        return "(uncoded)"
    first = codes[0]
    return f"{first.system}#{first.code}" + (f" {first.display}" if first.display else "")


__all__ = ["Preparer", "PreparedFacts", "FactInfo", "convert", "completed_years"]
