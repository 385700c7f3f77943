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

Time is applied here, once, for every kind of record alike (:func:`in_force`): at the instant a
record exists only if it had begun or been written by then, and is current only if it had not
ended by then. Nothing dated after the instant reaches a fact, a data issue or an aggregate, so
evaluating a record at T gives the same decision as evaluating it with every later item
removed. Records that cannot be true (begun before the patient was born) are named and not used.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from .compiler import negated_patterns
from .conditions import FACT_FIELDS, FieldTest, Pattern, compile_matcher, compile_signature, resolve_operand, tag, test_holds
from .record import (
    NO_ORDER_PROBLEM,
    Code,
    Condition,
    DataIssue,
    Observation,
    ObservationCodes,
    OrderNotForUs,
    PatientRecord,
    RecordError,
    RecordItem,
)
from .ruleset import Aggregate, ObservationConcept, RuleSet, ValueSet, match_key


@dataclass(slots=True)
class FactInfo:
    """What explanations need to show about one asserted fact."""

    label: str  # e.g. "observation inr (loinc#6301-6, 2025-05-30)"
    source: str  # locator in the caller's input
    units: dict[str, str] = field(default_factory=dict)  # field -> unit, for display
    codes: dict[str, list[Code]] = field(default_factory=dict)  # coded field -> codes
    notes: dict[str, str] = field(default_factory=dict)  # field -> how a derived value came about
    what: str = ""  # what it is, for people: "Warfarin Sodium 5 MG Oral Tablet", "INR"
    when: dt.datetime | None = None  # its clinical instant: taken, performed, began, planned for
    alike: int = 0  # how many other facts every rule treats exactly like this one (see Preparer.distinct)


@dataclass(slots=True)
class PreparedFacts:
    facts: list[dict]
    info: list[FactInfo]


class _CodeIndex:
    """Codes to the labels of the code sets that hold them, indexed once.

    Exact codes map straight to their labels; hierarchical codes (ICD-10-CM, ATC) are matched by
    looking up each prefix length that occurs in the sets, which is what ``ValueSet.contains``
    does one set at a time. Labels come out in first-found order, each once.

    Value sets hold their codes already keyed by :func:`match_key` (dotless ICD-10-CM); a record's
    code is keyed the same way here, once per lookup, so ``L03.115`` and ``L03115`` find the same
    labels, exactly and by prefix.
    """

    def __init__(self, members: list[tuple[str, ValueSet]]):
        exact: dict[tuple[str, str], dict[str, None]] = {}
        prefix: dict[str, dict[str, dict[str, None]]] = {}
        for label, vs in members:
            for system, codes in vs.codes.items():
                for code in codes:
                    exact.setdefault((system, code), {})[label] = None
            for system, prefixes in vs.prefixes.items():
                for pre in prefixes:
                    prefix.setdefault(system, {}).setdefault(pre, {})[label] = None
        self._exact = {k: tuple(v) for k, v in exact.items()}
        # system -> (the prefix lengths to try, shortest first; prefix -> labels)
        self._prefix = {
            sys: (tuple(sorted({len(p) for p in d})), {p: tuple(v) for p, v in d.items()}) for sys, d in prefix.items()
        }

    def labels(self, codes: list[Code]) -> list[str]:
        exact, prefix = self._exact, self._prefix
        found: list[str] = []
        for c in codes:
            # only ICD-10-CM has more than one spelling; the test keeps other codes off that path
            code = match_key("icd10cm", c.code) if c.system == "icd10cm" else c.code
            found += exact.get((c.system, code), ())
            by_prefix = prefix.get(c.system)
            if by_prefix is not None:
                lengths, labels_of = by_prefix
                for n in lengths:
                    found += labels_of.get(code[:n], ())
        # one hit (the common case) needs no de-duplication; several may repeat a label
        return list(dict.fromkeys(found)) if len(found) > 1 else found


class TagIndex:
    """Value-set membership as tags, with lookups indexed once per rule set.

    For each (fact kind, coded field) the rule set tests, a :class:`_CodeIndex` maps codes
    straight to the tags (``field@value-set``) of the value sets holding them.
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
        self._by_field = {
            key: _CodeIndex([(tag(key[1], vs_id), ruleset.value_sets[vs_id]) for vs_id in vs_ids])
            for key, vs_ids in wanted.items()
        }

    def tags(self, kind: str, fld: str, codes: list[Code]) -> list[str]:
        index = self._by_field.get((kind, fld))
        return index.labels(codes) if index is not None else []


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


# Labels show dates as ``f"{t:%Y-%m-%d}"`` would, but strftime is slow (several µs a call, for
# every dated fact). ISO dates read the same from year 1000 on; earlier years keep strftime,
# which does not pad them to four digits.
def _day(t: dt.datetime) -> str:
    return t.date().isoformat() if t.year >= 1000 else f"{t:%Y-%m-%d}"


def _minute(t: dt.datetime) -> str:
    return f"{t.date().isoformat()} {t.hour:02d}:{t.minute:02d}" if t.year >= 1000 else f"{t:%Y-%m-%d %H:%M}"


def completed_years(born: dt.date, on: dt.date) -> int:
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def _sides_overlap(a: str | None, b: str | None) -> bool:
    """Same side, or either side unknown (assumed the same), or either is bilateral."""
    return a is None or b is None or a == b or "both" in (a, b)


def unit_conversion(unit: str | None, display: str | None, concept: ObservationConcept) -> float | str | None:
    """How a value with UCUM code ``unit`` and display text ``display`` converts to the concept's
    canonical unit (a factor or a named conversion), or None if its unit is not accepted.

    A UCUM code decides alone and must be one of the concept's ``units`` exactly: UCUM is
    case-sensitive, and a code that is not listed (``K/uL``, kelvin per microlitre) is refused
    even when its display text would pass. Without a UCUM code, the display text (spaces around
    it ignored) is accepted if the concept lists it under ``display_units``, or if it is exactly
    one of its UCUM codes written as text."""
    if unit:
        return concept.units.get(unit)
    text = display.strip() if display else ""
    if not text:
        return None
    conversion = concept.display_units.get(text)
    return conversion if conversion is not None else concept.units.get(text)


def apply_conversion(value: float, conversion: float | str) -> float:
    """``value`` converted by a factor or a named conversion (see ``UNIT_CONVERSIONS``)."""
    if conversion == "fahrenheit_to_celsius":
        return (value - 32.0) * 5.0 / 9.0
    if conversion == "ifcc_to_ngsp":  # HbA1c mmol/mol -> %, the IFCC-NGSP master equation
        return 0.09148 * value + 2.152
    return value * float(conversion)


def convert(value: float, unit: str | None, concept: ObservationConcept, display: str | None = None) -> float | None:
    """``value`` expressed in the concept's canonical unit, or None if its unit is not accepted.
    ``unit`` is the UCUM code (None when the sender gave none) and ``display`` the free-text unit;
    see :func:`unit_conversion` for which is trusted when."""
    conversion = unit_conversion(unit, display, concept)
    return None if conversion is None else apply_conversion(value, conversion)


# Which facts a pattern of an aggregate or a negation can match at all: those of its kind, or for an
# observation pattern that pins the concept (as nearly all do), those of that concept. ``derive``
# groups the facts the same way, so each pattern is only tried on the facts it could match.
Scope = str | tuple[str, object]


def _scope(pattern: Pattern, params: dict) -> Scope:
    if pattern.kind == "observation":
        for t in pattern.tests:
            if t.field == "concept" and t.op == "eq":
                return ("observation", resolve_operand(t.operand, params))
    return pattern.kind


@dataclass(frozen=True, slots=True)
class _AggregatePlan:
    """One aggregate, with what depends only on the rule set worked out once."""

    name: str
    mode: str  # "count" | "distinct_groups" | "criteria"
    # per pattern: its _scope, its predicate, and how it reads in the notes when it is met
    matchers: tuple[tuple[Scope, Callable[[dict], bool], str], ...]
    groups: tuple[str, ...] = ()  # distinct_groups: the value set's group names, in its order
    group_index: _CodeIndex | None = None  # distinct_groups: codes -> the groups holding them


def in_force(item: RecordItem, as_of: dt.datetime) -> bool:
    """Whether a record item exists and is current at ``as_of`` (UTC): it had begun or been
    written by then, and had not ended by then. An undated item keeps its status-based meaning
    (the adapter left out items whose status says they ended), so it is taken as in force.
    The one test of time for every kind of record, and for the data issues about them."""
    begun = item.begun
    if begun is not None and _utc(begun) > as_of:
        return False
    ended = item.ended
    return ended is None or _utc(ended) > as_of


def _days_between(earlier: dt.datetime, later: dt.datetime) -> float:
    return (later - earlier).total_seconds() / 86400.0


class Preparer:
    """Prepares records for one rule set. Build once; ``prepare`` is pure and thread-safe."""

    def __init__(self, ruleset: RuleSet):
        self.ruleset = ruleset
        self.params = ruleset.param_values()
        self.index = TagIndex(ruleset)
        self.concept_of_code = {tuple(code.split("#", 1)): c for c in ruleset.observations.values() for code in c.codes}
        self.negations = [
            (prop, _scope(p, self.params), compile_matcher(p, self.params)) for prop, p in negated_patterns(ruleset).items()
        ]
        self.aggregates = [_aggregate_plan(agg, ruleset, self.params) for agg in ruleset.aggregates]
        patterns = _all_patterns(ruleset)
        self.usable_days = _usable_days(patterns, ruleset, self.params)
        # The concepts some rule reads (-1: no pattern names it), and the (system, code) pairs of
        # their Observations: a record's other Observations never become facts, so an adapter need
        # not map them at all (Evaluator.observation_codes).
        self.read_concepts = frozenset(cid for cid, usable in self.usable_days.items() if usable is None or usable >= 0)
        self.observation_codes: ObservationCodes = frozenset(
            (system, code) for (system, code), concept in self.concept_of_code.items() if concept.id in self.read_concepts
        )
        self.age_tests = [
            t for p in patterns if p.kind == "patient" for t in p.tests if t.field == "age_years" and t.op in _COMPARISONS
        ]
        self.signatures = _signature_plans(ruleset, self.params)

    def distinct(self, out: PreparedFacts) -> list[dict]:
        """The facts the engine needs: one of each class of facts that every rule treats alike.

        Two facts of a kind are alike when they carry the same value-set tags, give the same
        answer to every other test any rule makes of that kind, and show the same values in
        every message. No rule can tell them apart, so the engine sees one of them, the most
        recent, and its explanation says how many more there are (``FactInfo.alike``). This
        keeps the engine's work, and the decision's size, bounded by what the rules can
        distinguish rather than by the length of the record: 20,000 copies of a prescription
        cost what one does. Aggregates and absences were derived from every fact beforehand."""
        signatures = self.signatures
        kept: dict[tuple, list] = {}  # signature -> [representative, how many alike]
        facts: list[dict | tuple] = []
        for fact in out.facts:
            signature = signatures.get(fact["t"])
            if signature is None:
                facts.append(fact)
                continue
            key = (fact["t"], signature(fact))
            held = kept.get(key)
            if held is None:
                kept[key] = [fact, 0]
                facts.append(key)
                continue
            held[1] += 1
            if _recency(fact) < _recency(held[0]):
                held[0] = fact
        result = []
        for item in facts:
            if type(item) is tuple:
                fact, alike = kept[item]
                out.info[fact["_fid"]].alike = alike
                result.append(fact)
            else:
                result.append(item)
        return result

    def prepare(self, record: PatientRecord, as_of: dt.datetime) -> PreparedFacts:
        as_of = _utc(as_of)
        today = as_of.date()
        out = PreparedFacts([], [])
        # what the adapter had to set aside, about records that exist and are current at the instant
        issues: list[DataIssue] = [issue for issue in record.data_issues if in_force(issue, as_of)]
        tags_of = self.index.tags
        order = record.order
        # no order, or one that names no hip injection target: nothing this service decides on
        if order is None:
            raise OrderNotForUs("order", NO_ORDER_PROBLEM)
        if not order.target:
            raise OrderNotForUs("order.target", "the injection order names no target (bodySite), so there is nothing to evaluate")

        facts, infos = out.facts, out.info

        def add(fact: dict, info: FactInfo) -> None:
            fact["_fid"] = len(facts)
            facts.append(fact)
            infos.append(info)

        # patient
        patient: dict = {"t": "patient", "sex": record.sex or "unknown"}
        born = self._age(record, as_of, patient, issues)  # the earliest day the patient can have been born
        notes = {"age_years": patient.pop("_age_note")} if "_age_note" in patient else {}
        if record.deceased and (record.deceased_at is None or _utc(record.deceased_at) <= as_of):
            patient["deceased"] = True
            when = f" on {_day(_utc(record.deceased_at))}" if record.deceased_at is not None else ""
            notes["deceased"] = f"the record says the patient died{when}"
        else:
            patient["deceased"] = False
        add(patient, FactInfo("patient", "patient", {"age_years": "years"}, notes=notes, what="the patient"))

        def exists(item: RecordItem, what: str) -> bool:
            """In force at the instant, and possible: a record that began before the patient
            was born is named and not used."""
            if not in_force(item, as_of):
                return False
            begun = item.begun
            if born is not None and begun is not None and _utc(begun).date() < born:
                issues.append(
                    DataIssue(
                        "impossible-date",
                        what,
                        f"A {what} record is dated {_day(_utc(begun))}, before the patient was born ({born}); it was not used.",
                        item.source,
                    )
                )
                return False
            return True

        # the order
        order_fact: dict = {"t": "order", "target": order.target, "intra_articular": order.target == "hip-intra-articular"}
        if order.side:
            order_fact["side"] = order.side
        if order.intent:
            order_fact["intent"] = order.intent
        tags = tags_of("order", "code", order.codes) + tags_of("order", "reason", order.reasons)
        if tags:
            order_fact["_tags"] = tags
        add(
            order_fact,
            FactInfo(
                f"order {order.target} {order.side or '(side?)'} {order.intent or '(intent?)'}",
                order.source or "order",
                codes={"code": order.codes, "reason": order.reasons},
                what="the injection order",
            ),
        )

        # A long record repeats the same codes: their tags, label and name are worked out once.
        coded: dict[tuple, tuple[list[str], str, str]] = {}

        def described(kind: str, codes: list[Code]) -> tuple[list[str], str, str]:
            key = (kind, *[(c.system, c.code, c.display) for c in codes])
            found = coded.get(key)
            if found is None:
                found = coded[key] = (tags_of(kind, "code", codes), f"{kind} {_codes_label(codes)}", _plain(codes))
            return found

        for kind, items in (("condition", record.conditions), ("medication", record.medications)):
            for item in items:
                tags, label, what = described(kind, item.codes)
                if not tags or not exists(item, kind):
                    continue
                fact: dict = {"t": kind, "_tags": tags}
                # an episode is timed from its onset (else its recording); a medication from its start
                since = item.since if isinstance(item, Condition) else item.begun
                if since is not None:
                    since = _utc(since)
                    fact["days_ago"] = round(_days_between(since, as_of), 4)
                    label += f" since {_day(since)}"
                add(fact, FactInfo(label, item.source, _IN_DAYS, codes={"code": item.codes}, what=what, when=since))

        for allergy in record.allergies:
            tags = tags_of("allergy", "code", allergy.codes)
            if tags and exists(allergy, "allergy"):
                fact = {"t": "allergy", "_tags": tags, "severity": allergy.severity or "unknown"}
                if allergy.criticality:
                    fact["criticality"] = allergy.criticality
                add(
                    fact,
                    FactInfo(
                        f"allergy {_codes_label(allergy.codes)}",
                        allergy.source,
                        codes={"code": allergy.codes},
                        what=_plain(allergy.codes),
                    ),
                )

        self._observations(record, as_of, add, issues, exists)

        for inj in record.prior_injections:
            if inj.performed is None:
                issues.append(
                    DataIssue(
                        "date-missing",
                        f"prior injection {_codes_label(inj.codes)}",
                        "A prior injection has no date, so intervals cannot be measured.",
                        inj.source,
                    )
                )
                continue
            if not exists(inj, "prior injection"):
                continue  # not yet done at the evaluation instant
            performed = _utc(inj.performed)
            day = _day(performed)
            fact = {"t": "prior_injection", "days_ago": (today - performed.date()).days}
            if inj.target:
                fact["target"] = inj.target
                fact["same_target"] = inj.target == order.target
            else:
                issues.append(
                    DataIssue(
                        "value-missing",
                        "prior injection target",
                        f"A prior injection on {day} has no recorded target, so it cannot be matched to this joint.",
                        inj.source,
                    )
                )
                fact["same_target"] = False
            fact["same_side"] = _sides_overlap(inj.side, order.side)
            if inj.side is None and inj.target == order.target:
                issues.append(
                    DataIssue(
                        "value-missing",
                        "prior injection side",
                        f"A prior injection on {day} has no recorded side; it is treated as the same side.",
                        inj.source,
                    )
                )
            tags = tags_of("prior_injection", "code", inj.codes) + tags_of("prior_injection", "agents", inj.agents)
            if tags:
                fact["_tags"] = tags
            add(
                fact,
                FactInfo(
                    f"prior injection {inj.target or '(target?)'} {inj.side or '(side?)'} on {day}",
                    inj.source,
                    {"days_ago": "days"},
                    {"code": inj.codes, "agents": inj.agents},
                    what=_plain(inj.agents or inj.codes),
                    when=performed,
                ),
            )

        for surgery in record.planned_surgeries:
            tags = tags_of("planned_surgery", "code", surgery.codes)
            if not exists(surgery, "planned surgery"):
                continue  # not yet ordered at the evaluation instant
            if surgery.date is None:
                if tags:  # an undated surgery matters only if a rule could be about it
                    issues.append(
                        DataIssue(
                            "date-missing",
                            f"planned surgery {_codes_label(surgery.codes)}",
                            "A planned surgery has no date, so the interval to it cannot be measured.",
                            surgery.source,
                        )
                    )
                continue
            planned = _utc(surgery.date)
            fact = {
                "t": "planned_surgery",
                "days_until": (planned.date() - today).days,
                "ipsilateral": _sides_overlap(surgery.side, order.side),
            }
            if tags:
                fact["_tags"] = tags
            add(
                fact,
                FactInfo(
                    f"planned surgery {_codes_label(surgery.codes)} on {_day(planned)} ({surgery.side or 'side?'})",
                    surgery.source,
                    {"days_until": "days"},
                    {"code": surgery.codes},
                    what=_plain(surgery.codes),
                    when=planned,
                ),
            )

        for injectate in record.planned_injectates:
            tags = tags_of("injectate", "code", injectate.codes)
            if tags:
                add(
                    {"t": "injectate", "_tags": tags},
                    FactInfo(
                        f"planned injectate {_codes_label(injectate.codes)}",
                        injectate.source,
                        codes={"code": injectate.codes},
                        what=_plain(injectate.codes),
                    ),
                )

        for flag in dict.fromkeys(record.flags):
            add({"t": "flag", "name": flag}, FactInfo(f"clinician flag {flag}", "flags", what=flag.replace("-", " ")))

        for issue in _bounded_issues(issues):
            add(
                {"t": "data_issue", "kind": issue.kind, "concept": issue.concept, "detail": issue.detail},
                FactInfo(f"data issue ({issue.kind}) {issue.concept}", issue.source, what=issue.concept),
            )

        self.derive(out)
        return out

    def _age(self, record: PatientRecord, as_of: dt.datetime, patient: dict, issues: list[DataIssue]) -> dt.date | None:
        """Set ``age_years`` on the patient fact, and return the earliest possible birth day.

        A partial birth date (``2014-03``) allows a range of ages. Every age test of the rule set
        is a comparison with a threshold, so if each gives the same answer at both ends of the
        range, it gives that answer for every age in it: the youngest age then stands for the
        range. If a threshold falls inside the range, the age is unknown for this rule set; it
        is named, never guessed."""
        today = as_of.date()
        if record.birth_date is not None:
            earliest = latest = record.birth_date
        elif record.birth_range is not None:
            earliest, latest = record.birth_range
        else:
            issues.append(
                DataIssue(
                    "value-missing",
                    "patient.birthDate",
                    "The patient's birth date is not recorded, so age-based rules cannot apply.",
                    "patient",
                )
            )
            return None
        shown = str(record.birth_date) if record.birth_date is not None else _partial_date(earliest, latest)
        if earliest > today:
            issues.append(
                DataIssue(
                    "impossible-date",
                    "patient.birthDate",
                    f"The birth date {shown} is after the evaluation instant {today}; age-based rules cannot apply.",
                    "patient",
                )
            )
            return None
        youngest, oldest = completed_years(latest, today), completed_years(earliest, today)
        if youngest == oldest:
            patient["age_years"] = youngest
            return earliest
        straddled = sorted(
            {
                f"{t.describe()}"
                for t in self.age_tests
                if test_holds(t, {"age_years": youngest}, self.params) != test_holds(t, {"age_years": oldest}, self.params)
                or _inside(t, youngest, oldest, self.params)
            }
        )
        if straddled:
            tests = "; ".join(s.replace("age_years", "age") for s in straddled)
            issues.append(
                DataIssue(
                    "age-uncertain",
                    "patient.birthDate",
                    f"The birth date is given only as {shown}, so the patient is {youngest} or {oldest} years old, "
                    f"and the rules' age limits ({tests}) fall in between; record the full birth date.",
                    "patient",
                )
            )
            return earliest
        patient["age_years"] = youngest
        patient["_age_note"] = f"born {shown}: {youngest} to {oldest}, the same for every age limit of the rules"
        return earliest

    def derive(self, out: PreparedFacts) -> None:
        """Append the derived facts, the ``summary`` (aggregates) and the ``absent`` fact
        (negations), to facts prepared from a record. Split out so that a changed fact (a
        counterfactual) can be re-derived the same way."""

        def add(fact: dict, info: FactInfo) -> None:
            fact["_fid"] = len(out.facts)
            out.facts.append(fact)
            out.info.append(info)

        by_scope: dict[Scope, list[dict]] = {}  # see _scope
        for f in out.facts:
            by_scope.setdefault(f["t"], []).append(f)
            if f["t"] == "observation":
                by_scope.setdefault(("observation", f.get("concept")), []).append(f)
        summary: dict = {"t": "summary"}
        notes: dict[str, str] = {}
        for agg in self.aggregates:
            if agg.mode == "criteria":
                # a criterion counts once however many facts meet it, so stop at the first
                met = [text for scope, match, text in agg.matchers if scope in by_scope and any(map(match, by_scope[scope]))]
                summary[agg.name] = len(met)
                notes[agg.name] = "; ".join(met) or "no criterion met"
                continue
            ((scope, match, _),) = agg.matchers  # count and distinct_groups have one pattern
            hits = list(filter(match, by_scope.get(scope, ())))
            if agg.mode == "distinct_groups":
                codes = [c for f in hits for c in out.info[f["_fid"]].codes.get("code", [])]
                group_index = cast(_CodeIndex, agg.group_index)  # (set for distinct_groups)
                met_groups = sorted(group_index.labels(codes), key=agg.groups.index)  # in the value set's order
                summary[agg.name] = len(met_groups)
                notes[agg.name] = ", ".join(met_groups) or "none"
            else:
                summary[agg.name] = len(hits)
                notes[agg.name] = _listed([out.info[f["_fid"]].label for f in hits]) or "none"
        add(summary, FactInfo("summary", "derived from the record", notes=notes))

        by_scope["summary"] = [summary]
        absent: dict = {"t": "absent"}
        for prop, scope, match in self.negations:
            if scope not in by_scope or not any(map(match, by_scope[scope])):
                absent[prop] = True
        add(absent, FactInfo("absences", "derived from the record"))

    def _observations(
        self,
        record: PatientRecord,
        as_of: dt.datetime,
        add: Callable[[dict, FactInfo], None],
        issues: list[DataIssue],
        exists: Callable[[RecordItem, str], bool],
    ) -> None:
        """The newest result of each concept at the instant, in its canonical unit.

        A problem with a result older than the longest window any rule puts on its concept
        (``usable_days``) is not reported: no rule would use the value whatever its unit. A
        readable old result is still asserted, so that an explanation can show it is too old."""
        concept_of_code, read_concepts = self.concept_of_code, self.read_concepts
        usable_days = self.usable_days
        newest: dict[str, tuple[dt.datetime, Observation, ObservationConcept]] = {}
        for obs in record.observations:
            concept = None
            for c in obs.codes:
                concept = concept_of_code.get((c.system, c.code))
                if concept is not None:
                    break
            if concept is None or concept.id not in read_concepts:
                continue  # a concept no rule reads
            if obs.value is not None and not math.isfinite(obs.value):
                raise RecordError(obs.source or "observation", f"{concept.title} value is not a finite number")
            if obs.effective is None:
                kind, why = obs.problem or ("date-missing", "it has no date, so its age cannot be judged")
                issues.append(DataIssue(kind, concept.id, f"A {concept.title} result was set aside: {why}", obs.source))
                continue
            if not exists(obs, f"{concept.title} result"):
                continue
            when = _utc(obs.effective)
            held = newest.get(concept.id)
            if held is None or when > held[0]:
                newest[concept.id] = (when, obs, concept)
        for cid in sorted(newest):
            when, obs, concept = newest[cid]
            age_days = max(0.0, _days_between(when, as_of))
            limit = usable_days.get(cid)
            too_old = limit is not None and age_days > limit  # for every rule: a problem is not worth naming
            # a result that is set aside becomes a data issue; its fact and label are never built
            if obs.problem is not None:
                if too_old:
                    continue
                issues.append(
                    DataIssue(
                        obs.problem[0], cid, f"The newest {concept.title} result was set aside: {obs.problem[1]}", obs.source
                    )
                )
                continue
            if concept.unit is None:  # a coded result, e.g. pregnancy status
                if obs.value_code is None:
                    issues.append(
                        DataIssue(
                            "value-missing",
                            cid,
                            f"The newest {concept.title} result carries no coded value; it was set aside.",
                            obs.source,
                        )
                    )
                    continue
            else:
                value, problem = self._canonical_value(obs, concept)
                if problem:
                    if not too_old:
                        issues.append(DataIssue(problem[0], cid, problem[1], obs.source))
                    continue
            label = f"observation {cid} ({_codes_label(obs.codes)}, {_minute(when)}Z)"
            fact: dict = {"t": "observation", "concept": cid, "age_days": round(age_days, 4)}
            if concept.unit is None:
                value_code = cast(Code, obs.value_code)  # (a result without one was set aside above)
                tags = self.index.tags("observation", "value_code", [value_code])
                if tags:
                    fact["_tags"] = tags
                info = FactInfo(
                    label, obs.source, {"age_days": "days"}, {"value_code": [value_code]}, what=concept.title, when=when
                )
            else:
                fact["value"] = round(cast(float, value), 4)  # (None only with a problem, set aside above)
                info = FactInfo(label, obs.source, {"age_days": "days", "value": concept.unit}, what=concept.title, when=when)
            add(fact, info)

    @staticmethod
    def _canonical_value(obs: Observation, concept: ObservationConcept) -> tuple[float | None, tuple[str, str] | None]:
        """The value in the concept's canonical unit, or why it cannot be used: ``(value, None)``
        or ``(None, (kind, detail))``."""
        if obs.value is None:
            return None, ("value-missing", f"The newest {concept.title} result has no numeric value; it was set aside.")
        if obs.value < 0:
            raise RecordError(obs.source or "observation", f"{concept.title} value {obs.value} is negative")
        display = obs.unit_display.strip() if obs.unit_display else ""
        shown = obs.unit or display  # the unit as the sender gave it, for messages
        if not shown:
            return None, (
                "unit-missing",
                f"The newest {concept.title} result ({obs.value:g}) has no unit; no threshold was applied to it.",
            )
        conversion = unit_conversion(obs.unit, display, concept)
        if conversion is None:
            accepted = ", ".join(concept.units)
            if obs.unit:
                # the display text is never a fallback for a wrong code, but saying so helps the sender
                hint = (
                    f" Its display text {display!r} would be accepted without the code; please send the right UCUM code."
                    if unit_conversion(None, display, concept) is not None
                    else ""
                )
                return None, (
                    "unit-unknown",
                    f"The newest {concept.title} result is in {obs.unit!r}, which is not an accepted unit ({accepted}); "
                    f"no threshold was applied to it.{hint}",
                )
            also = f"; as display text also {', '.join(concept.display_units)}" if concept.display_units else ""
            return None, (
                "unit-unknown",
                f"The newest {concept.title} result is in {display!r} (display text, no UCUM code), "
                f"which is not an accepted unit ({accepted}{also}); no threshold was applied to it.",
            )
        converted = apply_conversion(obs.value, conversion)
        if concept.plausible and not concept.plausible[0] <= converted <= concept.plausible[1]:
            hint = ""
            for unit, other in concept.units.items():
                alt = apply_conversion(obs.value, other)
                if unit != shown and concept.plausible[0] <= alt <= concept.plausible[1]:
                    hint = f" It would be plausible in {unit} ({alt:.1f} {concept.unit}); please confirm the unit."
                    break
            return None, (
                "implausible",
                f"The newest {concept.title} result, {obs.value:g} {shown}, is outside the plausible range "
                f"{concept.plausible[0]:g}–{concept.plausible[1]:g} {concept.unit}; it was set aside.{hint}",
            )
        return converted, None


def _aggregate_plan(agg: Aggregate, ruleset: RuleSet, params: dict) -> _AggregatePlan:
    matchers = tuple(
        (_scope(p, params), compile_matcher(p, params), f"{p.kind} with " + " and ".join(t.describe() for t in p.tests))
        for p in agg.patterns
    )
    if agg.mode == "distinct_groups":
        assert agg.distinct_groups_of is not None  # the rule-set builder sets it for this mode
        groups = ruleset.value_sets[agg.distinct_groups_of].groups
        return _AggregatePlan(agg.name, agg.mode, matchers, groups=tuple(groups), group_index=_CodeIndex(list(groups.items())))
    return _AggregatePlan(agg.name, agg.mode, matchers)


_COMPARISONS = ("eq", "ne", "gt", "gte", "lt", "lte")
_IN_DAYS = {"days_ago": "days"}  # FactInfo.units of dated conditions and medications (shared, never changed)
_SINGLETONS = ("patient", "order", "summary", "absent", "observation")  # one each (observations: per concept)
_TEMPLATE_FIELD = re.compile(r"\{([a-z][a-z0-9_]*)\.?([a-z_]*)\}")


MAX_ISSUES_PER_CONCEPT = 5  # data issues of one kind about one concept named one by one; the rest counted
MAX_NOTE_ITEMS = 10  # facts named in an aggregate's note; the rest counted
MAX_DISPLAY = 160  # characters of a code's display shown in a label


def _bounded_issues(issues: list[DataIssue]) -> list[DataIssue]:
    """The data issues, at most ``MAX_ISSUES_PER_CONCEPT`` of each (kind, concept), then one
    that counts the rest: a record with 60,000 uncoded problems is named, not recited."""
    counts: dict[tuple[str, str], int] = {}
    kept: list[DataIssue] = []
    for issue in issues:
        key = (issue.kind, issue.concept)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] <= MAX_ISSUES_PER_CONCEPT:
            kept.append(issue)
    for (kind, concept), n in counts.items():
        if n > MAX_ISSUES_PER_CONCEPT:
            more = n - MAX_ISSUES_PER_CONCEPT
            kept.append(
                DataIssue(
                    kind, concept, f"{more:,} more {concept} values were set aside for the same reason ({kind}).", "the record"
                )
            )
    return kept


def _listed(labels: list[str]) -> str:
    """Labels joined for a note, the first ``MAX_NOTE_ITEMS`` by name and the rest counted."""
    if len(labels) <= MAX_NOTE_ITEMS:
        return "; ".join(labels)
    return "; ".join(labels[:MAX_NOTE_ITEMS]) + f"; and {len(labels) - MAX_NOTE_ITEMS:,} more"


def _recency(fact: dict) -> float:
    """How far from the instant a fact lies (smaller is more recent): the representative of
    facts that are alike is the most recent, which is what a message should name."""
    for field_name in ("days_ago", "age_days", "days_until"):
        value = fact.get(field_name)
        if value is not None:
            return abs(value)
    return math.inf


def _signature_plans(ruleset: RuleSet, params: dict) -> dict[str, Callable[[dict], tuple]]:
    """Per fact kind, a function giving what the rules can see of a fact: its tags, the answer to
    every test a rule's positive pattern makes on another field, and the values of the
    non-numeric fields its messages show. Kinds that occur once per evaluation have none."""
    # Per kind, each distinct test once, with the alias of a pattern making it (a dict keeps their
    # first order): rules repeat the same tests (eleven condition tests are three), and a repeated
    # answer cannot tell facts apart.
    tests: dict[str, dict[FieldTest, str]] = {}
    shown: dict[str, set[str]] = {}
    for rule in ruleset.rules:
        templates = rule.then.message + (rule.then.missing_data or "")
        for alternative in rule.alternatives:
            kinds = {p.alias: p.kind for p in alternative}
            for pattern in alternative:
                if pattern.negated:
                    continue  # absences are derived in Python from every fact
                for test in pattern.tests:
                    if not (test.op == "in" and isinstance(test.operand, str)):  # a tag test is answered by the tags
                        tests.setdefault(pattern.kind, {}).setdefault(test, pattern.alias)
            for alias, field_name in _TEMPLATE_FIELD.findall(templates):
                if alias in kinds and field_name not in ("", "display"):
                    shown.setdefault(kinds[alias], set()).add(field_name)
    plans: dict[str, Callable[[dict], tuple]] = {}
    for kind, kind_fields in FACT_FIELDS.items():
        if kind in _SINGLETONS:
            continue
        # a number a message shows (days ago, a value) is the representative's: the most recent
        fields = sorted(f for f in shown.get(kind, ()) if kind_fields.get(f) != "number")
        plans[kind] = compile_signature([(alias, test) for test, alias in tests.get(kind, {}).items()], fields, params)
    plans["data_issue"] = lambda f: (f["kind"], f["concept"], f["detail"])
    return plans


def _all_patterns(ruleset: RuleSet) -> list[Pattern]:
    """Every pattern of the rule set: of its rules (negated ones included) and its aggregates."""
    return [p for r in ruleset.rules for alt in r.alternatives for p in alt] + [p for a in ruleset.aggregates for p in a.patterns]


def _usable_days(patterns: list[Pattern], ruleset: RuleSet, params: dict) -> dict[str, float | None]:
    """Per observation concept, the age in days beyond which no pattern can match a result:
    the widest ``age_days`` bound among the patterns on that concept; None when one of them
    has no bound (any age can matter); -1 for a concept no pattern names."""
    usable: dict[str, float | None] = dict.fromkeys(ruleset.observations, -1.0)
    for pattern in patterns:
        if pattern.kind != "observation":
            continue
        concepts = [resolve_operand(t.operand, params) for t in pattern.tests if t.field == "concept" and t.op == "eq"]
        bounds = [
            float(resolve_operand(t.operand, params)) for t in pattern.tests if t.field == "age_days" and t.op in ("lt", "lte")
        ]
        bound = min(bounds) if bounds else None
        for cid in concepts or list(usable):  # a pattern that names no concept may match any
            held = usable.get(cid, -1.0)
            if held is not None:
                usable[cid] = None if bound is None else max(held, bound)
    return usable


def _inside(test: FieldTest, low: int, high: int, params: dict) -> bool:
    """Whether an eq/ne test's value lies strictly inside the range (ends agree, middle differs)."""
    if test.op not in ("eq", "ne"):
        return False
    value = resolve_operand(test.operand, params)
    return isinstance(value, (int, float)) and low < value < high


def _partial_date(earliest: dt.date, latest: dt.date) -> str:
    """A partial date as it was written: ``2014`` or ``2014-03``."""
    if earliest.month == 1 and earliest.day == 1 and latest.month == 12 and latest.day == 31:
        return f"{earliest.year:04d}"
    return f"{earliest.year:04d}-{earliest.month:02d}"


def _plain(codes: list[Code]) -> str:
    """What a coded item is, in words: the first display, else the first code."""
    for code in codes:
        if code.display:
            return _capped(code.display)
    return str(codes[0]) if codes else "(uncoded)"


def _codes_label(codes: list[Code]) -> str:
    if not codes:
        return "(uncoded)"
    first = codes[0]
    return f"{first.system}#{first.code}" + (f" {_capped(first.display)}" if first.display else "")


def _capped(text: str) -> str:
    """A display as shown in labels: at most ``MAX_DISPLAY`` characters."""
    return text if len(text) <= MAX_DISPLAY else text[: MAX_DISPLAY - 1] + "…"


__all__ = [
    "Preparer",
    "PreparedFacts",
    "FactInfo",
    "convert",
    "unit_conversion",
    "apply_conversion",
    "completed_years",
    "in_force",
]
