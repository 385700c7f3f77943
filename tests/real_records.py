"""A measuring stick for real records: the Synthea bundles, evaluated the way the issue's "Done when" asks.

This module is shared by ``tests/test_real_records.py`` and ``bench/real_records.py``. It holds:

* :func:`truncate_bundle`: the contract's time section ("what exists at the instant") written
  again, independently, at the FHIR level. It never calls the service's mapper or core, so that
  "evaluating the full Bundle at T gives the same decision as evaluating the truncated Bundle at
  T" compares the product against a second reading of the contract, not against itself.
* :func:`decision_invariants`: everything a decision must satisfy whatever the patient, as
  readable violation strings.
* the per-bullet checks (stale pregnancy deferrals, deceased patients, missing data about values
  no rule could use, truncation mismatches) and :class:`Corpus`, which evaluates every bundle at
  every instant once and keeps only the small results, so that many parametrised tests and the
  report share one pass over some 80 MB of JSON.

Tests use this through ``from .real_records import ...`` (never through conftest).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from needlepoint.core.conditions import ParamRef

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the repository, as everywhere in the project; NEEDLEPOINT_SHARED overrides it
# for a checkout that lives elsewhere (a git worktree, say).
SHARED = Path(os.environ.get("NEEDLEPOINT_SHARED") or REPO.parent / "shared")
FIXTURES = SHARED / "fixtures"
SYNTHEA_DIRS = (FIXTURES / "synthea", FIXTURES / "synthea-r4-sample")

UTC = dt.timezone.utc
EVALUATION_INSTANT = dt.datetime(2025, 6, 2, 9, 0, tzinfo=UTC)
# The order the issue supplies for bundles that carry none (Synthea never does).
ORDER = {"target": "hip-intra-articular", "side": "right", "intent": "therapeutic"}
# The pregnancy window when the rule set does not (yet) name one: about 42 weeks.
PREGNANCY_PARAMETER = "pregnancy_episode_max_days"
DEFAULT_PREGNANCY_DAYS = 294

# Instants by label. The first two are "the instants" of the Done-when; truncation is proved at all.
MAIN_INSTANTS = ("2025-06-02", "last-encounter")
TRUNCATION_INSTANTS = ("2025-06-02", "last-encounter", "2019-01-01", "2004-01-01", "midpoint")
FIXED_INSTANTS = {
    "2025-06-02": EVALUATION_INSTANT,
    "2019-01-01": dt.datetime(2019, 1, 1, tzinfo=UTC),
    "2004-01-01": dt.datetime(2004, 1, 1, tzinfo=UTC),
}

# The vocabularies of the contract (section 2). PATIENT_DECEASED is named there even while the
# rule set's own vocabulary may not have it yet.
MODALITIES = ("FLUOROSCOPY", "ULTRASOUND", "LANDMARK")
CATEGORIES = (
    "LOCAL_ANESTHETIC",
    "CORTICOSTEROID",
    "HYALURONIC_ACID",
    "PLATELET_RICH_PLASMA",
    "IODINATED_CONTRAST",
    "GADOLINIUM_CONTRAST",
)
RECOMMENDATIONS = ("SUGGESTED", "CAUTION", "NOT_SUGGESTED", "AVOID")  # in increasing restriction
SEVERITIES = ("HARD", "SOFT")
SCOPES = ("PROCEDURE",) + CATEGORIES
DECEASED = "PATIENT_DECEASED"
PENDING_DATA = "PENDING_DATA"
PREGNANCY = "PREGNANCY"
# A contrast agent and the only guidance modality that uses it (to confirm needle position).
CONTRAST_NEEDS_MODALITY = {"IODINATED_CONTRAST": "FLUOROSCOPY"}
# Markers the resolver writes when it cannot fill a placeholder.
UNRENDERED_MARKERS = ("(not matched)", "(absent)")


# --- FHIR dates -----------------------------------------------------------------------------------

_FHIR_DATE_TIME = re.compile(
    r"(?P<year>[0-9]{4})(?:-(?P<month>[0-9]{2})(?:-(?P<day>[0-9]{2})"
    r"(?:T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})(?::(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?)?"
    r"(?P<zone>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?"
)


def fhir_instant(value: Any) -> dt.datetime | None:
    """The earliest UTC instant a FHIR ``date``, ``dateTime`` or ``instant`` allows, or None.

    A partial date (``2014``, ``2014-03``, ``2014-03-05``) starts at its first moment, in UTC; a
    time without a zone is read as UTC. Anything unreadable is None: such a record is treated as
    undated, which keeps its status-based meaning (the contract's rule for undated records).
    """
    if not isinstance(value, str):
        return None
    match = _FHIR_DATE_TIME.fullmatch(value.strip())
    if match is None:
        return None
    parts = match.groupdict()
    try:
        when = dt.datetime(
            int(parts["year"]),
            int(parts["month"] or 1),
            int(parts["day"] or 1),
            int(parts["hour"] or 0),
            int(parts["minute"] or 0),
            int(parts["second"] or 0),
            int((parts["fraction"] or "0")[:6].ljust(6, "0")),
        )
    except ValueError:
        return None
    zone = parts["zone"]
    if zone is None or zone == "Z":
        return when.replace(tzinfo=UTC)
    sign = 1 if zone[0] == "+" else -1
    offset = dt.timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    return (when - sign * offset).replace(tzinfo=UTC)


def as_instant(value: str | dt.datetime | dt.date) -> dt.datetime:
    """An evaluation instant from an aware datetime, a date (its midnight UTC) or an ISO/FHIR text."""
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=UTC)
    parsed = fhir_instant(value)
    if parsed is None:
        raise ValueError(f"not an instant: {value!r}")
    return parsed


def _field_instant(resource: dict, key: str, sub: str | None) -> dt.datetime | None:
    value = resource.get(key)
    if sub is not None:
        if not isinstance(value, dict):
            return None
        # a Period without a start began no later than its end
        return fhir_instant(value.get(sub)) or fhir_instant(value.get("end"))
    return fhir_instant(value)


# Where each record type says when it began or was written (the contract's time section). A record
# of these types exists at T when any of its dates is at or before T.
EXISTENCE_FIELDS: dict[str, tuple[tuple[str, str | None], ...]] = {
    "MedicationRequest": (("authoredOn", None),),
    "MedicationStatement": (("effectiveDateTime", None), ("effectivePeriod", "start"), ("dateAsserted", None)),
    "Condition": (("onsetDateTime", None), ("onsetPeriod", "start"), ("recordedDate", None)),
    "AllergyIntolerance": (("recordedDate", None), ("onsetDateTime", None), ("onsetPeriod", "start")),
    "Procedure": (("performedDateTime", None), ("performedPeriod", "start")),
    "ServiceRequest": (("authoredOn", None),),
    "Observation": (("effectiveDateTime", None), ("effectivePeriod", "start"), ("effectiveInstant", None), ("issued", None)),
}


def existence_dates(resource: dict) -> list[dt.datetime]:
    """Every readable date on which ``resource`` began or was written (empty when undated or of a
    type the time section does not name)."""
    fields = EXISTENCE_FIELDS.get(resource.get("resourceType"), ())
    return [when for key, sub in fields if (when := _field_instant(resource, key, sub)) is not None]


def _is_the_request(resource: dict) -> bool:
    """A draft ServiceRequest or MedicationRequest is the order being asked about (or its planned
    injectate), not part of the history: it is kept whatever its date."""
    return resource.get("resourceType") in ("ServiceRequest", "MedicationRequest") and resource.get("status") == "draft"


def exists_at(resource: dict, instant: dt.datetime) -> bool:
    """Had ``resource`` begun or been written by ``instant``?

    Undated records, records of types the time section does not name, and the request's own
    draft order and injectates exist at every instant.
    """
    if _is_the_request(resource):
        return True
    dates = existence_dates(resource)
    return not dates or min(dates) <= instant


def truncate_bundle(bundle: dict, instant: str | dt.datetime | dt.date) -> dict:
    """The same Bundle with every record that did not yet exist at ``instant`` removed.

    Written from the contract alone ("Time: what exists and what is current at the instant"):

    * MedicationRequest (``authoredOn``), MedicationStatement (``effective[x]``, ``dateAsserted``),
      Condition (``onset[x]``, ``recordedDate``), AllergyIntolerance (``recordedDate``,
      ``onset[x]``), Procedure (``performed[x]``), ServiceRequest (``authoredOn``) and Observation
      (``effective[x]``, ``issued``) are kept when any of those dates is at or before the instant:
      a Condition with a later onset but an earlier ``recordedDate`` had been written, so it stays;
    * a ``Patient.deceasedDateTime`` after the instant is removed (the death had not happened);
    * undated records, unreadable dates, resource types the section does not name (Encounter,
      Claim, Medication...) and the draft order with its planned injectates are kept as they are.

    Nothing else is rewritten: a record that existed keeps its status and its end dates, since
    the contract judges whether it is current from those. The input is not modified; unchanged
    entries are shared with it.
    """
    when = as_instant(instant)
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return dict(bundle)
    kept: list[Any] = []
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            kept.append(entry)
            continue
        if resource.get("resourceType") == "Patient" and "deceasedDateTime" in resource:
            died = fhir_instant(resource["deceasedDateTime"])
            if died is not None and died > when:
                resource = {k: v for k, v in resource.items() if k != "deceasedDateTime"}
                entry = {**entry, "resource": resource}
        if exists_at(resource, when):
            kept.append(entry)
    return {**bundle, "entry": kept}


# --- what a bundle says, read independently of the product -----------------------------------------


def resources(bundle: dict, resource_type: str | None = None) -> Iterator[dict]:
    """The resources of a Bundle's entries, optionally of one type."""
    for entry in bundle.get("entry") or ():
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and (resource_type is None or resource.get("resourceType") == resource_type):
            yield resource


def patient_of(bundle: dict) -> dict:
    """The bundle's Patient resource (an empty mapping when there is none)."""
    return next(resources(bundle, "Patient"), {})


def last_encounter_start(bundle: dict) -> dt.datetime | None:
    """The latest ``Encounter.period.start`` (the patient's last encounter), or None."""
    starts = [when for enc in resources(bundle, "Encounter") if (when := _field_instant(enc, "period", "start")) is not None]
    return max(starts, default=None)


def record_span(bundle: dict) -> tuple[dt.datetime, dt.datetime] | None:
    """The first and last date the record speaks of: every existence date and encounter start."""
    dates = [d for r in resources(bundle) for d in existence_dates(r)]
    dates += [when for enc in resources(bundle, "Encounter") if (when := _field_instant(enc, "period", "start")) is not None]
    return (min(dates), max(dates)) if dates else None


def study_instants(bundle: dict, labels: Iterable[str] = TRUNCATION_INSTANTS) -> dict[str, dt.datetime]:
    """The instant each label stands for in this bundle. ``last-encounter`` falls back to the end of
    the record's span, and ``midpoint`` is the middle of that span (to the second)."""
    span = record_span(bundle)
    out: dict[str, dt.datetime] = {}
    for label in labels:
        if label in FIXED_INSTANTS:
            out[label] = FIXED_INSTANTS[label]
        elif label == "last-encounter":
            out[label] = last_encounter_start(bundle) or (span[1] if span else EVALUATION_INSTANT)
        elif label == "midpoint":
            if span is None:
                out[label] = EVALUATION_INSTANT
            else:
                middle = span[0] + (span[1] - span[0]) / 2
                out[label] = middle.replace(microsecond=0)
        else:
            out[label] = as_instant(label)
    return out


def deceased_at(bundle: dict, instant: dt.datetime) -> bool:
    """Does the record say the patient had died at or before ``instant``?

    ``deceasedBoolean`` true counts whatever the instant (it has no date); a ``deceasedDateTime``
    counts when it is at or before the instant, and an unreadable one counts (the record does say
    the patient died).
    """
    patient = patient_of(bundle)
    if patient.get("deceasedBoolean") is True:
        return True
    if "deceasedDateTime" in patient:
        died = fhir_instant(patient["deceasedDateTime"])
        return died is None or died <= instant
    return False


_SHORT_SYSTEMS = {
    "http://snomed.info/sct": "snomed",
    "http://hl7.org/fhir/sid/icd-10-cm": "icd10cm",
    "http://hl7.org/fhir/sid/icd-10": "icd10cm",
    "http://loinc.org": "loinc",
    "http://needlepoint.dev/fhir/CodeSystem/observation": "np-obs",
}


def _codings(concept: Any) -> Iterator[tuple[str, str]]:
    """(short system, code) for each coding of a CodeableConcept."""
    if not isinstance(concept, dict):
        return
    for coding in concept.get("coding") or ():
        if isinstance(coding, dict) and isinstance(coding.get("code"), str):
            system = _SHORT_SYSTEMS.get(coding.get("system"), coding.get("system"))
            yield system, coding["code"]


def _in_value_set(value_set, system: str, code: str) -> bool:
    """Value-set membership, with ICD-10-CM codes read with or without the dot."""
    if value_set.contains(system, code):
        return True
    if system == "icd10cm" and "." not in code and len(code) > 3:
        return value_set.contains(system, f"{code[:3]}.{code[3:]}")
    return False


def _status(resource: dict, key: str) -> set[str]:
    """The codes of a status element, whether a CodeableConcept or a plain code."""
    concept = resource.get(key)
    if isinstance(concept, str):  # R4 MedicationStatement-style plain codes
        return {concept}
    return {code for _, code in _codings(concept)}


def _label(resource: dict) -> str:
    """``Type/id system#code`` of a resource, to name it in a finding."""
    first = next(_codings(resource.get("code")), ("?", "?"))
    return f"{resource.get('resourceType')}/{resource.get('id', '?')} {first[0]}#{first[1]}"


@dataclass(frozen=True)
class Evidence:
    """A record that could support a pregnancy deferral, and how old it is at the instant."""

    what: str
    age_days: float | None  # None when undated


def pregnancy_evidence(bundle: dict, ruleset, instant: dt.datetime) -> list[Evidence]:
    """Every record existing at ``instant`` that could say the patient is pregnant, read leniently.

    Conditions in the rule set's ``pregnancy-conditions`` value set (whatever their clinical
    status, unless refuted or entered in error: a product that judges currency by dates may count
    one that ended after the instant), and pregnancy-status or hCG observations of any value. The
    age of each is measured from its newest date at or before the instant (onset, recording,
    effective or issued), so a deferral is called stale only when every reading makes it so.
    """
    value_set = ruleset.value_sets.get("pregnancy-conditions")
    concepts = [
        ruleset.observations[c] for c in ("pregnancy-status", "hcg-qualitative", "hcg-quantitative") if c in ruleset.observations
    ]
    test_codes = {code for c in concepts for code in c.codes}
    out: list[Evidence] = []
    for resource in resources(bundle):
        rtype = resource.get("resourceType")
        if rtype == "Condition" and value_set is not None:
            if _status(resource, "verificationStatus") & {"refuted", "entered-in-error"}:
                continue
            if not any(_in_value_set(value_set, s, c) for s, c in _codings(resource.get("code"))):
                continue
        elif rtype == "Observation":
            if resource.get("status") not in ("final", "amended", "corrected"):
                continue
            if not any(f"{s}#{c}" in test_codes for s, c in _codings(resource.get("code"))):
                continue
        else:
            continue
        if not exists_at(resource, instant):
            continue
        dates = [d for d in existence_dates(resource) if d <= instant]
        age = (instant - max(dates)).total_seconds() / 86400 if dates else None
        out.append(Evidence(_label(resource), age))
    return out


def pregnancy_window_days(ruleset) -> float:
    """How long a pregnancy counts without newer evidence: the rule set's parameter, if it has one."""
    param = ruleset.params.get(PREGNANCY_PARAMETER)
    return float(param.value) if param is not None else float(DEFAULT_PREGNANCY_DAYS)


# --- the rule set's own limits on observation ages ---------------------------------------------------


def _patterns(ruleset) -> Iterator:
    """Every pattern of every rule alternative (negations included) and of every aggregate."""
    for rule in ruleset.rules:
        for alternative in rule.alternatives:
            yield from alternative
    for aggregate in ruleset.aggregates:
        yield from aggregate.patterns


def _operand(operand: Any, params: dict) -> Any:
    """A test's operand with a parameter reference replaced by the value in force."""
    return params[operand.name] if isinstance(operand, ParamRef) else operand


def observation_max_age_days(ruleset) -> dict[str, float]:
    """For each observation concept some rule or aggregate pattern tests: the oldest value any of
    them could use, in days. A pattern without an upper bound on ``age_days`` can use any age
    (``math.inf``); the concept's limit is the largest over its patterns. Concepts no pattern names
    are absent (no rule can use them at any age)."""
    params = ruleset.param_values()
    limits: dict[str, float] = {}
    for pattern in _patterns(ruleset):
        if pattern.kind != "observation":
            continue
        concepts: set[str] = set()
        bound = math.inf
        for test in pattern.tests:
            value = _operand(test.operand, params)
            if test.field == "concept" and test.op == "eq":
                concepts.add(value)
            elif test.field == "concept" and test.op == "in" and isinstance(value, tuple):
                concepts.update(value)
            elif test.field == "age_days" and test.op in ("lte", "lt", "eq") and isinstance(value, (int, float)):
                bound = min(bound, float(value))
        for concept in concepts:
            limits[concept] = max(limits.get(concept, -math.inf), bound)
    return limits


_DATE_PROBLEMS = ("date-missing", "unparseable-date", "imprecise-date")


def observation_ages(bundle: dict, ruleset, instant: dt.datetime) -> dict[str, list[float]]:
    """Per observation concept: the age in days at ``instant`` of every dated, final (or amended,
    corrected) observation of it that exists at the instant."""
    concept_of = {tuple(code.split("#", 1)): cid for cid, c in ruleset.observations.items() for code in c.codes}
    ages: dict[str, list[float]] = {}
    for obs in resources(bundle, "Observation"):
        if obs.get("status") not in ("final", "amended", "corrected"):
            continue
        concept = next((concept_of[k] for k in _codings(obs.get("code")) if k in concept_of), None)
        if concept is None or not exists_at(obs, instant):
            continue
        taken = None
        for key, sub in EXISTENCE_FIELDS["Observation"]:  # the first present: when it was taken
            taken = _field_instant(obs, key, sub)
            if taken is not None:
                break
        if taken is not None and taken <= instant:
            ages.setdefault(concept, []).append((instant - taken).total_seconds() / 86400)
    return ages


# --- per-bullet checks ------------------------------------------------------------------------------


def _deferrals(decision: dict) -> list[dict]:
    """A decision's deferrals (empty lists may be omitted in the contract's JSON)."""
    return decision.get("deferrals") or []


def stale_pregnancy_deferrals(decision: dict, evidence: list[Evidence], window_days: float) -> list[str]:
    """A PREGNANCY deferral needs some pregnancy evidence no older than the window (undated evidence
    keeps its status-based meaning and counts as current)."""
    if not any(d.get("reason") == PREGNANCY for d in _deferrals(decision)):
        return []
    if any(e.age_days is None or e.age_days <= window_days for e in evidence):
        return []
    if not evidence:
        return ["PREGNANCY deferral, but no pregnancy condition or test exists at the instant"]
    newest = min(evidence, key=lambda e: e.age_days)
    return [f"PREGNANCY deferral on evidence {newest.age_days:.0f} days old (window {window_days:g} days): {newest.what}"]


def deceased_findings(decision: dict, deceased: bool) -> list[str]:
    """A patient dead at the instant gets PATIENT_DECEASED (HARD, PROCEDURE) and nothing pending;
    a patient alive at the instant is never deferred as deceased."""
    reasons = [d.get("reason") for d in _deferrals(decision)]
    problems = []
    if deceased:
        if DECEASED not in reasons:
            problems.append(f"deceased at the instant, but no {DECEASED} deferral (deferrals: {', '.join(reasons) or 'none'})")
        if PENDING_DATA in reasons:
            problems.append(f"deceased at the instant, yet a {PENDING_DATA} deferral asks for data")
        codes = [m.get("code") for m in decision.get("missingData") or []]
        if codes:
            problems.append(f"deceased at the instant, yet missingData asks for {', '.join(map(str, codes))}")
    elif DECEASED in reasons:
        problems.append(f"{DECEASED} deferral, but the patient was alive at the instant")
    return problems


def stale_missing_data(decision: dict, ages: dict[str, list[float]], limits: dict[str, float]) -> list[str]:
    """No ``kind:concept`` missing-data entry about an observation concept when no rule could use any
    of the concept's values at the instant: every dated value is older than the largest age any
    pattern allows, or no pattern names the concept at all. Entries about undated values are about
    the date, not the age, and are left alone."""
    problems = []
    for entry in decision.get("missingData") or []:
        code = entry.get("code") or ""
        kind, sep, concept = code.partition(":")
        if not sep or kind in _DATE_PROBLEMS or concept not in ages:
            continue
        limit = limits.get(concept)
        youngest = min(ages[concept])
        if limit is None:
            problems.append(f"missingData {code}: no rule uses {concept} at any age")
        elif youngest > limit:
            problems.append(
                f"missingData {code}: the newest {concept} value is {youngest:.0f} days old; "
                f"no rule uses one older than {limit:g} days"
            )
    return problems


# --- outcomes and their comparison ----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What one evaluation gave: a decision, or the error it raised (type and message)."""

    decision: dict | None = None
    error: str | None = None

    def comparable(self) -> Any:
        """The decision without its id (content-addressed over the input, so it differs whenever
        the input does), or the error text."""
        if self.decision is None:
            return ("error", self.error)
        return {k: v for k, v in self.decision.items() if k != "decisionId"}


def _summary(decision: dict) -> dict[str, Any]:
    """A decision's parts, each as a sorted tuple of short strings, for describing differences."""
    m = decision.get("modality") or {}
    return {
        "modality": (
            f"preferred={m.get('preferred')}",
            f"acceptable={'/'.join(m.get('acceptable', []))}",
            f"avoid={'/'.join(m.get('avoid', []))}",
        ),
        "injectates": tuple(sorted(f"{i.get('category')}:{i.get('recommendation')}" for i in decision.get("injectates") or [])),
        "deferrals": tuple(sorted(f"{d.get('reason')}/{d.get('scope')}/{d.get('severity')}" for d in _deferrals(decision))),
        "cautions": tuple(sorted(str(c.get("code")) for c in decision.get("cautions") or [])),
        "missingData": tuple(sorted(str(m.get("code")) for m in decision.get("missingData") or [])),
        "rules": tuple(sorted(str(e.get("ruleId")) for e in decision.get("explanations") or [])),
    }


def _texts(decision: dict) -> dict[str, Any]:
    """The people-facing texts of a decision by where they stand, and each explanation's matched facts."""
    out: dict[str, Any] = {}
    for part, key in (("injectate", "category"), ("deferral", "reason"), ("caution", "code"), ("missingData", "code")):
        section = "missingData" if part == "missingData" else part + "s"
        for item in decision.get(section) or []:
            out[f"{part} {item.get(key)}{'/' + str(item.get('scope')) if part == 'deferral' else ''} message"] = item.get(
                "message"
            )
    for exp in decision.get("explanations") or []:
        out[f"explanation {exp.get('ruleId')} matched"] = sorted(
            f"{m.get('fact')} = {m.get('value')}" for m in exp.get("matched") or []
        )
        for key in ("outcome", "overriddenBy", "parameters"):
            out[f"explanation {exp.get('ruleId')} {key}"] = exp.get(key)
    return out


def describe_difference(full: Outcome, truncated: Outcome) -> list[str]:
    """How the full Bundle's outcome differs from the truncated Bundle's; empty when they agree."""
    if full.comparable() == truncated.comparable():
        return []
    if full.decision is None or truncated.decision is None:
        return [f"full: {full.error or 'a decision'}; truncated: {truncated.error or 'a decision'}"]
    a, b = _summary(full.decision), _summary(truncated.decision)
    out = []
    for part in a:
        if a[part] != b[part]:
            only_full = sorted(set(a[part]) - set(b[part]))
            only_trunc = sorted(set(b[part]) - set(a[part]))
            out.append(f"{part}: full only {only_full or '-'}, truncated only {only_trunc or '-'}")
    if out:
        return out
    ta, tb = _texts(full.decision), _texts(truncated.decision)
    for where in sorted(set(ta) | set(tb)):
        if ta.get(where) != tb.get(where):
            if where.endswith(" matched"):
                only_full = sorted(set(ta.get(where) or ()) - set(tb.get(where) or ()))
                only_trunc = sorted(set(tb.get(where) or ()) - set(ta.get(where) or ()))
                out.append(f"{where}: full only {only_full or '-'}, truncated only {only_trunc or '-'}")
            else:
                out.append(f"{where}: full {ta.get(where)!r}, truncated {tb.get(where)!r}")
    return out or ["the decisions differ (asOf or rule set)"]


# --- invariants of every decision -----------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{\$?[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?\}")
_TEMPLATE = re.compile(r"\{([^{}]+)\}")


def unit_annotations(ruleset) -> frozenset[str]:
    """UCUM annotations (``{INR}``) that rendered values legitimately carry: every ``{...}`` in the
    rule set's units, so that they are not taken for unrendered placeholders."""
    units: list[str] = []
    for concept in ruleset.observations.values():
        units += [concept.unit or "", *concept.units]
    units += [p.unit for p in ruleset.params.values() if isinstance(p.unit, str)]
    return frozenset(m.group(0) for unit in units for m in re.finditer(r"\{[^{}]*\}", unit))


def unrendered(text: Any, annotations: frozenset[str] = frozenset()) -> list[str]:
    """The template placeholders and fill-in markers left in a text meant for people."""
    if not isinstance(text, str):
        return []
    found = [m.group(0) for m in _PLACEHOLDER.finditer(text) if m.group(0) not in annotations]
    return found + [marker for marker in UNRENDERED_MARKERS if marker in text]


def _preferred(rule, params: dict) -> str | None:
    """The modality a rule prefers, with a ``$parameter`` resolved to the value in force."""
    pref = (rule.then.modality or {}).get("preferred")
    if isinstance(pref, str) and pref.startswith("$"):
        return params.get(pref[1:])
    return pref


def _contribution(rule, params: dict) -> tuple[str | None, set[str], set[str]]:
    """What a modality rule's then-block makes preferred, acceptable and avoided (a modality it
    prefers is not also acceptable, and one it avoids is neither)."""
    m = rule.then.modality or {}
    pref = _preferred(rule, params)
    avoid = set(m.get("avoid", ()))
    acceptable = {x for x in m.get("acceptable", ()) if x != pref and x not in avoid}
    return pref, acceptable, avoid


def _modality_list(text: str, word: str) -> list[str]:
    """The modalities an outcome text names after ``word`` (``acceptable FLUOROSCOPY/ULTRASOUND``)."""
    names = []
    for match in re.finditer(rf"\b{word}\b:?\s+((?:[A-Z_]+)(?:\s*(?:/|,|and)\s*[A-Z_]+)*)", text):
        names += [n for n in re.split(r"\s*(?:/|,|and)\s*", match.group(1)) if n in MODALITIES]
    return names


def _bound_levels(rule, category: str, bound: dict) -> list[str]:
    """What a modality rule says about an injectate bound to modalities (ruleset.yaml
    ``modality_bound_injectates``): a rule that decides the modality may hold back an injectate
    only used with a modality the decision leaves out, so it counts as NOT_SUGGESTED for it."""
    modality = rule.then.modality or {}
    if category not in bound or not modality or any(i["category"] == category for i in rule.then.injectates):
        return []
    avoids = set(modality.get("avoid", ())) & set(bound[category])
    preferred = modality.get("preferred")
    prefers_other = isinstance(preferred, str) and not preferred.startswith("$") and preferred not in bound[category]
    return ["NOT_SUGGESTED"] if avoids or prefers_other or (isinstance(preferred, str) and preferred.startswith("$")) else []


def outcome_problems(outcome: Any, rule, params: dict, bound: dict | None = None) -> list[str]:
    """Where an explanation's ``outcome`` text says something the rule's then-block does not
    (a modality rule may also hold back an injectate bound to a modality, see _bound_levels)."""
    if not isinstance(outcome, str) or not outcome.strip():
        return ["has no outcome text"]
    problems = []
    pref, acceptable, avoid = _contribution(rule, params)
    said_pref = _modality_list(outcome, "prefer") + _modality_list(outcome, "preferred")
    said_acceptable = _modality_list(outcome, "acceptable")
    said_avoid = _modality_list(outcome, "avoid")
    for mod in said_pref:
        if mod != pref:
            problems.append(f"outcome says prefer {mod}, but the rule prefers {pref or 'nothing'}")
    for mod in said_acceptable:
        if mod not in acceptable:
            made = "preferred" if mod == pref else "avoided" if mod in avoid else "not named"
            problems.append(f"outcome says {mod} is acceptable, but the rule makes it {made}")
    for mod in said_avoid:
        if mod not in avoid:
            problems.append(f"outcome says avoid {mod}, but the rule does not avoid it")
    wanted = {(i["category"], i["recommendation"]) for i in rule.then.injectates}
    wanted |= {(category, level) for category in bound or {} for level in _bound_levels(rule, category, bound or {})}
    for category, recommendation in re.findall(
        rf"\b({'|'.join(CATEGORIES)})\b:?\s+({'|'.join(sorted(RECOMMENDATIONS, key=len, reverse=True))})\b", outcome
    ):
        if (category, recommendation) not in wanted:
            problems.append(f"outcome says {category} {recommendation}, which the rule does not recommend")
    deferral = rule.then.deferral
    for reason in re.findall(r"\bdefer(?:ral)?:?\s+([A-Z_]+)", outcome):
        if deferral is None or reason != deferral["reason"]:
            problems.append(f"outcome says defer {reason}, but the rule defers {deferral['reason'] if deferral else 'nothing'}")
    for severity in re.findall(r"\b(HARD|SOFT)\b", outcome):
        if deferral is None or severity != deferral["severity"]:
            problems.append(
                f"outcome says {severity}, but the rule's deferral is {deferral['severity'] if deferral else 'absent'}"
            )
    for scope in re.findall(r"\bscope:?\s+([A-Z_]+)", outcome):
        if deferral is None or scope != deferral["scope"]:
            problems.append(f"outcome says scope {scope}, but the rule's scope is {deferral['scope'] if deferral else 'absent'}")
    for code in re.findall(r"\bcaution:?\s+([A-Z_]+)", outcome):
        if code != rule.then.caution:
            problems.append(f"outcome says caution {code}, but the rule's caution is {rule.then.caution or 'none'}")
    return problems


def _code_pattern(template: str) -> re.Pattern:
    """A missing-data code template (``{issue.kind}:{issue.concept}``) as a regex for its renderings."""
    parts = _TEMPLATE.split(template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else ".+" for i, p in enumerate(parts)))


def _rule_ids(item: dict) -> list:
    """An entry's ``ruleIds``, or an empty list when it has none (or not a list)."""
    ids = item.get("ruleIds")
    return ids if isinstance(ids, list) else []


def decision_invariants(decision: dict, ruleset) -> list[str]:
    """Every way ``decision`` breaks what any decision must satisfy, as readable strings.

    * it names the rule set it was made under, and every ``ruleIds`` entry has an explanation whose
      rule and version exist in that rule set;
    * no text meant for people (explanation outcomes, messages, missing-data codes) keeps a
      template placeholder such as ``{issue.kind}`` or a marker such as ``(not matched)``;
    * each explanation's outcome says only what its rule's then-block says (a modality the rule
      prefers is not also called acceptable), and each fired rule that was not overridden shows
      its contribution in the decision;
    * modality: values from the vocabulary, no repeats, preferred never avoided, acceptable never
      the preferred or an avoided one, and each backed by a rule listed in ``ruleIds``;
    * injectates, deferrals, cautions and missing data: vocabulary values, no duplicates, each
      consistent with the rules it lists (the most restrictive recommendation wins; a deferral is
      HARD exactly when one of its rules says HARD);
    * no contradiction: contrast that only fluoroscopy uses is not suggested or cautioned unless
      fluoroscopy is preferred or acceptable, and a pregnancy deferral never comes with
      fluoroscopy preferred or iodinated contrast suggested;
    * a PATIENT_DECEASED deferral is HARD, PROCEDURE, and comes with no other deferral and no
      missing data.
    """
    v: list[str] = []
    rules = {r.id: r for r in ruleset.rules}
    params = ruleset.param_values()
    annotations = unit_annotations(ruleset)

    named = decision.get("ruleset") or {}
    if named.get("id") != ruleset.id or named.get("version") != ruleset.version:
        v.append(
            f"decision names rule set {named.get('id')} {named.get('version')}, evaluated under {ruleset.id} {ruleset.version}"
        )
    if "digest" in named and named["digest"] != ruleset.digest:
        v.append("decision's rule set digest is not the digest of the rule set in force")
    if not decision.get("asOf"):
        v.append("decision has no asOf")

    bound = dict(getattr(ruleset, "modality_bound_injectates", {}) or {})
    # explanations
    explained: dict[str, dict] = {}
    for exp in decision.get("explanations") or []:
        rid = exp.get("ruleId")
        if rid in explained:
            v.append(f"explanation {rid} appears twice")
        explained[rid] = exp
        if bad := unrendered(exp.get("outcome"), annotations):
            v.append(f"explanation {rid} outcome keeps {', '.join(bad)}: {exp.get('outcome')!r}")
        rule = rules.get(rid)
        if rule is None:
            v.append(f"explanation {rid} names no rule of {ruleset.id} {ruleset.version}")
            continue
        if exp.get("ruleVersion") != rule.version:
            v.append(f"explanation {rid} is at version {exp.get('ruleVersion')}, the rule set has {rule.version}")
        v += [f"explanation {rid}: {p}" for p in outcome_problems(exp.get("outcome"), rule, params, bound)]
    for exp in explained.values():
        for other in exp.get("overriddenBy") or []:
            if other not in explained:
                v.append(f"explanation {exp.get('ruleId')} is overridden by {other}, which has no explanation")

    def rule_of(rid: str, where: str):
        """The rule a ``ruleIds`` entry names (None if unknown); notes one that is not explained."""
        if rid not in explained:
            v.append(f"{where} lists {rid}, which has no explanation")
        return rules.get(rid)

    def text_ok(text: Any, where: str) -> None:
        """Notes a people-facing text that keeps a placeholder or a fill-in marker."""
        if bad := unrendered(text, annotations):
            v.append(f"{where} keeps {', '.join(bad)}: {text!r}")

    # modality
    modality = decision.get("modality") or {}
    preferred = modality.get("preferred")
    acceptable = list(modality.get("acceptable") or [])
    avoid = list(modality.get("avoid") or [])
    for mod in ([preferred] if preferred else []) + acceptable + avoid:
        if mod not in MODALITIES:
            v.append(f"modality {mod!r} is not in the vocabulary")
    for name, values in (("acceptable", acceptable), ("avoid", avoid)):
        if len(set(values)) != len(values):
            v.append(f"modality.{name} repeats a modality: {values}")
    if preferred and preferred in avoid:
        v.append(f"modality {preferred} is both preferred and avoided")
    if preferred and preferred in acceptable:
        v.append(f"modality {preferred} is both preferred and acceptable")
    for mod in set(acceptable) & set(avoid):
        v.append(f"modality {mod} is both acceptable and avoided")
    mod_rules = [r for rid in _rule_ids(modality) if (r := rule_of(rid, "modality")) is not None]
    if modality and not _rule_ids(modality):
        v.append("modality names no rule")
    contributions = {r.id: _contribution(r, params) for r in mod_rules if r.then.modality}
    for r in mod_rules:
        if not r.then.modality:
            v.append(f"modality lists {r.id}, which says nothing about modality")
    if preferred and mod_rules and not any(c[0] == preferred for c in contributions.values()):
        v.append(f"modality {preferred} is preferred, but none of its rules prefers it")
    for mod in acceptable:
        if mod_rules and not any(mod == c[0] or mod in c[1] for c in contributions.values()):
            v.append(f"modality {mod} is acceptable, but none of its rules names it")
    for mod in avoid:
        if mod_rules and not any(mod in c[2] for c in contributions.values()):
            v.append(f"modality {mod} is avoided, but none of its rules avoids it")

    # injectates
    recommendation_of: dict[str, str] = {}
    for inj in decision.get("injectates") or []:
        category, rec = inj.get("category"), inj.get("recommendation")
        where = f"injectate {category}"
        if category not in CATEGORIES:
            v.append(f"{where}: category not in the vocabulary")
        if rec not in RECOMMENDATIONS:
            v.append(f"{where}: recommendation {rec!r} not in the vocabulary")
            continue
        if category in recommendation_of:
            v.append(f"{where} appears twice")
        recommendation_of[category] = rec
        text_ok(inj.get("message"), f"{where} message")
        if not _rule_ids(inj):
            v.append(f"{where} names no rule")
        levels = []
        for rid in _rule_ids(inj):
            rule = rule_of(rid, where)
            if rule is None:
                continue
            said = [i["recommendation"] for i in rule.then.injectates if i["category"] == category] + _bound_levels(
                rule, category, bound
            )
            if not said:
                v.append(f"{where} lists {rid}, which says nothing about {category}")
            levels += [RECOMMENDATIONS.index(s) for s in said]
        if levels and RECOMMENDATIONS.index(rec) != max(levels):
            v.append(f"{where} is {rec}, but the most restrictive of its rules says {RECOMMENDATIONS[max(levels)]}")

    # deferrals
    deferrals = _deferrals(decision)
    seen_deferrals: set[tuple] = set()
    for d in deferrals:
        reason, scope, severity = d.get("reason"), d.get("scope"), d.get("severity")
        where = f"deferral {reason}/{scope}"
        if severity not in SEVERITIES:
            v.append(f"{where}: severity {severity!r} is neither HARD nor SOFT")
        if scope not in SCOPES:
            v.append(f"{where}: scope {scope!r} not in the vocabulary")
        if (reason, scope) in seen_deferrals:
            v.append(f"{where} appears twice")
        seen_deferrals.add((reason, scope))
        text_ok(d.get("message"), f"{where} message")
        if not _rule_ids(d):
            v.append(f"{where} names no rule")
        hard, matching = False, 0
        for rid in _rule_ids(d):
            rule = rule_of(rid, where)
            if rule is None:
                continue
            then = rule.then.deferral
            if then is None or then["reason"] != reason or then["scope"] != scope:
                v.append(f"{where} lists {rid}, which defers {then['reason'] + '/' + then['scope'] if then else 'nothing'}")
            else:
                matching += 1
                hard = hard or then["severity"] == "HARD"
        if severity in SEVERITIES and matching and (severity == "HARD") != hard:
            v.append(f"{where} is {severity}, but {'none' if severity == 'HARD' else 'one'} of its rules says HARD")

    # cautions
    seen_cautions: set[str] = set()
    for c in decision.get("cautions") or []:
        code = c.get("code")
        where = f"caution {code}"
        if not code:
            v.append("a caution has no code")
        if code in seen_cautions and code != "REQUESTED_MODALITY_CONFLICT":
            v.append(f"{where} appears twice")
        seen_cautions.add(code)
        text_ok(c.get("message"), f"{where} message")
        if not _rule_ids(c):
            v.append(f"{where} names no rule")
        for rid in _rule_ids(c):
            rule = rule_of(rid, where)
            if rule is None:
                continue
            if code == "REQUESTED_MODALITY_CONFLICT" and not rule.then.modality:
                v.append(f"{where} lists {rid}, which is not a modality rule")
            elif code != "REQUESTED_MODALITY_CONFLICT" and rule.then.caution != code:  # noqa: PLR1714 - two questions, not one
                v.append(f"{where} lists {rid}, whose caution is {rule.then.caution or 'none'}")

    # missing data
    missing = decision.get("missingData") or []
    seen_missing: set[str] = set()
    for m in missing:
        code = m.get("code")
        where = f"missingData {code!r}"
        if not isinstance(code, str) or not code.strip():
            v.append("a missingData entry has an empty code")
            continue
        if code in seen_missing:
            v.append(f"{where} appears twice")
        seen_missing.add(code)
        text_ok(code, f"{where} code")
        text_ok(m.get("message"), f"{where} message")
        if not _rule_ids(m):
            v.append(f"{where} names no rule")
        for rid in _rule_ids(m):
            rule = rule_of(rid, where)
            if rule is None:
                continue
            template = rule.then.missing_data
            if not template or not _code_pattern(template).fullmatch(code):
                v.append(f"{where} lists {rid}, whose missing-data code is {template or 'none'}")

    # every fired rule that was not overridden shows its contribution
    for rid, exp in explained.items():
        rule = rules.get(rid)
        if rule is None or exp.get("overriddenBy"):
            continue
        then = rule.then
        if then.deferral and not any(
            d.get("reason") == then.deferral["reason"] and d.get("scope") == then.deferral["scope"] and rid in _rule_ids(d)
            for d in deferrals
        ):
            v.append(f"{rid} fired and defers {then.deferral['reason']}/{then.deferral['scope']}, but no such deferral lists it")
        if then.caution and not any(
            c.get("code") == then.caution and rid in _rule_ids(c) for c in decision.get("cautions") or []
        ):
            v.append(f"{rid} fired with caution {then.caution}, but no such caution lists it")
        for inj in then.injectates:
            if not any(i.get("category") == inj["category"] and rid in _rule_ids(i) for i in decision.get("injectates") or []):
                v.append(
                    f"{rid} fired and recommends {inj['category']} {inj['recommendation']}, but that injectate does not list it"
                )
        if then.missing_data and not any(rid in _rule_ids(m) for m in missing):
            v.append(f"{rid} fired and reports missing data, but no missingData entry lists it")
        if then.modality and rid not in _rule_ids(modality):
            v.append(f"{rid} fired with a modality but is neither in modality.ruleIds nor overridden")

    # contradictions
    for category, needed in CONTRAST_NEEDS_MODALITY.items():
        rec = recommendation_of.get(category)
        if rec not in ("SUGGESTED", "CAUTION"):
            continue
        if needed in avoid:
            v.append(f"{category} is {rec} while {needed}, the only modality that uses it, is avoided")
        elif needed != preferred and needed not in acceptable:
            v.append(f"{category} is {rec} while {needed}, the only modality that uses it, is neither preferred nor acceptable")
    if any(d.get("reason") == PREGNANCY for d in deferrals):
        if preferred == "FLUOROSCOPY":
            v.append("a PREGNANCY deferral, yet FLUOROSCOPY is preferred")
        if recommendation_of.get("IODINATED_CONTRAST") in ("SUGGESTED", "CAUTION"):
            v.append(f"a PREGNANCY deferral, yet IODINATED_CONTRAST is {recommendation_of['IODINATED_CONTRAST']}")

    # a deceased patient: one reason, nothing asked
    dead = [d for d in deferrals if d.get("reason") == DECEASED]
    if dead:
        for d in dead:
            if d.get("severity") != "HARD" or d.get("scope") != "PROCEDURE":
                v.append(f"{DECEASED} deferral is {d.get('severity')}/{d.get('scope')}, not HARD/PROCEDURE")
        others = sorted({str(d.get("reason")) for d in deferrals if d.get("reason") != DECEASED})
        if others:
            v.append(f"{DECEASED} comes with other deferrals: {', '.join(others)}")
        if missing:
            v.append(f"{DECEASED} comes with missing data: {', '.join(str(m.get('code')) for m in missing)}")
    return v


# --- evaluating the corpus once ----------------------------------------------------------------------------


def bundle_paths() -> list[Path]:
    """Every Synthea bundle of both shared folders, in a stable order."""
    return [path for folder in SYNTHEA_DIRS if folder.is_dir() for path in sorted(folder.glob("*.json"))]


def bundle_id(path: Path) -> str:
    """A short, unique test id: the folder, the first name and the first block of the patient's
    uuid (three patients are in both folders, as identical files)."""
    stem = unicodedata.normalize("NFKD", path.stem).encode("ascii", "ignore").decode()  # "Ángela" -> "Angela"
    name, _, uuid = stem.rpartition("_")
    folder = "r4" if path.parent.name == "synthea-r4-sample" else path.parent.name
    return f"{folder}:{name.split('_')[0]}-{uuid[:8]}" if uuid else f"{folder}:{stem}"


def default_order():
    """The issue's order (hip-intra-articular, right, therapeutic) as the core's InjectionOrder."""
    from needlepoint.core.record import InjectionOrder

    return InjectionOrder(target=ORDER["target"], side=ORDER["side"], intent=ORDER["intent"])


def _map(bundle: dict, order):
    """The product's record of ``bundle``, with the supplied order when the bundle has none."""
    from needlepoint.fhir.mapper import record_from_bundle

    record = record_from_bundle(bundle)
    return record if record.order is not None else record.with_order(order)


def _error_text(error: BaseException) -> str:
    """An exception as ``Type: message``, the form errors are compared and reported in."""
    return f"{type(error).__name__}: {error}"


def evaluate(evaluator, record_or_error, instant: dt.datetime) -> Outcome:
    """One evaluation as an :class:`Outcome`; any exception is an error, never a crash of the run."""
    if isinstance(record_or_error, str):
        return Outcome(error=record_or_error)
    try:
        return Outcome(decision=evaluator.evaluate(record_or_error, instant))
    except Exception as error:  # noqa: BLE001 - every exception is a finding of the measurement
        return Outcome(error=_error_text(error))


@dataclass
class InstantStudy:
    """One bundle at one instant: both outcomes and what each Done-when check found."""

    label: str
    instant: dt.datetime
    full: Outcome
    truncated: Outcome
    removed: int  # records the truncation removed
    deceased: bool
    pregnancy: list[Evidence]
    findings: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class BundleStudy:
    """Everything measured about one bundle (the parsed JSON itself is not kept)."""

    path: Path
    instants: dict[str, InstantStudy]
    born: str | None = None  # Patient.birthDate as written
    died: str | None = None  # Patient.deceasedDateTime as written, or "true" for deceasedBoolean

    @property
    def id(self) -> str:
        """The bundle's short test id (see :func:`bundle_id`)."""
        return bundle_id(self.path)

    @property
    def folder(self) -> str:
        """Which shared folder the bundle came from."""
        return self.path.parent.name


BULLETS = ("errors", "pregnancy", "deceased", "stale-missing-data", "truncation", "invariants")


def study_bundle(path: Path, evaluator, labels: Iterable[str] = TRUNCATION_INSTANTS, order=None) -> BundleStudy:
    """Evaluate one bundle at each labelled instant, in full and truncated, and run every check.

    The full bundle is mapped once; a truncated one only when the truncation removed something
    (otherwise it is the same input). Checks: ``errors`` (the full bundle raised), ``pregnancy``,
    ``deceased`` (both directions), ``stale-missing-data``, ``truncation`` (full vs truncated) and
    ``invariants`` (:func:`decision_invariants`)."""
    ruleset = evaluator.ruleset
    order = order or default_order()
    bundle = orjson.loads(path.read_bytes())
    try:
        full_record = _map(bundle, order)
    except Exception as error:  # noqa: BLE001
        full_record = _error_text(error)
    limits = observation_max_age_days(ruleset)
    window = pregnancy_window_days(ruleset)
    out: dict[str, InstantStudy] = {}
    for label, instant in study_instants(bundle, labels).items():
        full = evaluate(evaluator, full_record, instant)
        truncated_bundle = truncate_bundle(bundle, instant)
        removed = len(bundle.get("entry") or []) - len(truncated_bundle.get("entry") or [])
        changed = removed or patient_of(truncated_bundle) is not patient_of(bundle)
        if changed:
            try:
                truncated_record = _map(truncated_bundle, order)
            except Exception as error:  # noqa: BLE001
                truncated_record = _error_text(error)
            truncated = evaluate(evaluator, truncated_record, instant)
        else:
            truncated = full
        study = InstantStudy(
            label, instant, full, truncated, removed, deceased_at(bundle, instant), pregnancy_evidence(bundle, ruleset, instant)
        )
        decision = full.decision
        study.findings["errors"] = [full.error] if full.error else []
        study.findings["truncation"] = describe_difference(full, truncated)
        if decision is not None:
            study.findings["pregnancy"] = stale_pregnancy_deferrals(decision, study.pregnancy, window)
            study.findings["deceased"] = deceased_findings(decision, study.deceased)
            study.findings["stale-missing-data"] = stale_missing_data(
                decision, observation_ages(bundle, ruleset, instant), limits
            )
            study.findings["invariants"] = decision_invariants(decision, ruleset)
        else:
            for bullet in ("pregnancy", "deceased", "stale-missing-data", "invariants"):
                study.findings[bullet] = []
        out[label] = study
    patient = patient_of(bundle)
    died = patient.get("deceasedDateTime") or ("true" if patient.get("deceasedBoolean") is True else None)
    return BundleStudy(path, out, born=patient.get("birthDate"), died=died)


class Corpus:
    """Studies of every bundle, each computed once on first use and then kept (results only)."""

    def __init__(self, evaluator, labels: Iterable[str] = TRUNCATION_INSTANTS):
        self.evaluator = evaluator
        self.labels = tuple(labels)
        self._studies: dict[Path, BundleStudy] = {}

    def study(self, path: Path) -> BundleStudy:
        """The study of one bundle, computed on first use."""
        if path not in self._studies:
            self._studies[path] = study_bundle(path, self.evaluator, self.labels)
        return self._studies[path]

    def at(self, path: Path, label: str) -> InstantStudy:
        """One bundle at one labelled instant."""
        return self.study(path).instants[label]
