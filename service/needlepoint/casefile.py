"""Rule-set test cases: small readable YAML files beside each rule set (``rulesets/<id>/tests/``).

A file holds a list of cases. Each case gives a patient in shorthand, an instant, and what the
decision must (and must not) contain::

    - name: INR above the limit on warfarin defers
      as_of: 2025-06-02T09:00:00Z
      patient:
        birth_date: 1961-04-12
        sex: female
        medications: [rxnorm#855332]
        observations:
          - {code: loinc#6301-6, value: 3.1, unit: "{INR}", days_before: 1}
        order: {target: hip-intra-articular, side: right, intent: therapeutic}
      expect:
        fired: [DEF-INR-HIGH]
        not_fired: [DATA-INR-CURRENT]
        deferrals: [BLEEDING_RISK]
        modality: {preferred: FLUOROSCOPY}
        injectates: {CORTICOSTEROID: SUGGESTED}

Codes are ``system#code`` with the short system names of :mod:`needlepoint.core.record`. Dates
are ISO dates or instants, or ``days_before`` / ``days_after`` relative to ``as_of``. A condition
or medication may be a plain code or a mapping with its times: ``{code: snomed#72892002,
onset_days_before: 400}`` (``started_days_before`` for a medication), ``recorded`` /
``recorded_days_before``, ``ended`` / ``ended_days_before`` (each also ``..._days_after``); an
allergy or planned surgery takes ``recorded_days_before`` / ``ordered_days_before``. The patient
may be ``deceased: true`` or ``deceased_days_before: N``, and ``birth_date`` may be partial
(``2014-03``).
``deferrals`` lists ``REASON`` or ``REASON/SCOPE`` and must match the decision's deferrals
exactly; ``cautions`` and ``missing`` likewise (use ``*_include`` keys for a subset check).
``severities`` maps a deferral (same key form) to HARD or SOFT; ``messages_include`` lists texts
that some message of the decision must contain.

An observation's ``unit`` is its UCUM code, matched exactly; ``unit_display`` is a free-text unit
as a lab report shows it (FHIR ``Quantity.unit``), for a result that carries no UCUM code::

    - {code: loinc#777-3, value: 25, unit_display: K/uL, days_before: 1}
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core.record import (
    Allergy,
    Code,
    Condition,
    InjectionOrder,
    Medication,
    Observation,
    PatientRecord,
    PlannedInjectate,
    PlannedSurgery,
    PriorInjection,
    RecordError,
    partial_date_range,
)
from .rulesets.reader import load_yaml

EXPECT_KEYS = {
    "fired",
    "not_fired",
    "deferrals",
    "deferrals_include",
    "cautions",
    "cautions_include",
    "missing",
    "missing_include",
    "modality",
    "injectates",
    "injectates_absent",
    "severities",
    "messages_include",
}


@dataclass
class Case:
    name: str
    source: str  # file:index
    as_of: dt.datetime
    record: PatientRecord
    expect: dict[str, Any]
    tags: list[str] = field(default_factory=list)


def _instant(value: Any, where: str) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone.utc)
    try:
        parsed = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise RecordError(where, f"not an ISO date or instant: {value!r}") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _when(item: dict, key: str, as_of: dt.datetime, where: str) -> dt.datetime | None:
    if "days_before" in item:
        return as_of - dt.timedelta(days=float(item["days_before"]))
    if "days_after" in item:
        return as_of + dt.timedelta(days=float(item["days_after"]))
    if key in item:
        return _instant(item[key], f"{where}.{key}")
    return None


def _prefixed(item: Any, prefix: str, as_of: dt.datetime, where: str) -> dt.datetime | None:
    """``{prefix}`` (an ISO date or instant) or ``{prefix}_days_before`` / ``{prefix}_days_after``."""
    if not isinstance(item, dict):
        return None
    if f"{prefix}_days_before" in item:
        return as_of - dt.timedelta(days=float(item[f"{prefix}_days_before"]))
    if f"{prefix}_days_after" in item:
        return as_of + dt.timedelta(days=float(item[f"{prefix}_days_after"]))
    if prefix in item:
        return _instant(item[prefix], f"{where}.{prefix}")
    return None


def _begun(*instants: dt.datetime | None) -> dt.datetime | None:
    known = [t for t in instants if t is not None]
    return min(known) if known else None


def _birth(record: PatientRecord, value: Any, where: str) -> None:
    """An exact birth date, or a partial one (``2014``, ``2014-03``) as the range it allows."""
    allowed = partial_date_range(str(value))
    if allowed is None:
        record.birth_date = _instant(value, where).date()
    else:
        record.birth_range = allowed


def parse_code(text: Any, where: str) -> Code:
    system, sep, code = str(text).partition("#")
    if not sep or not system or not code:
        raise RecordError(where, f"codes are written system#code, e.g. rxnorm#855332; got {text!r}")
    return Code(system, code)


def _codes(item: Any, where: str) -> list[Code]:
    if isinstance(item, dict):
        raw = item.get("codes", item.get("code"))
    else:
        raw = item
    raw = raw if isinstance(raw, list) else [raw]
    return [parse_code(c, f"{where}.code") for c in raw]


def record_from_shorthand(patient: dict, as_of: dt.datetime, where: str = "patient") -> PatientRecord:
    """Build a PatientRecord from the test-case shorthand."""
    allowed = {
        "birth_date", "age", "sex", "conditions", "medications", "observations", "allergies",
        "prior_injections", "planned_surgeries", "order", "injectates", "flags", "deceased",
        "deceased_days_before", "deceased_at",
    }  # fmt: skip
    unknown = set(patient) - allowed
    if unknown:
        raise RecordError(where, f"unknown key(s) {', '.join(sorted(unknown))}")
    rec = PatientRecord(sex=patient.get("sex"))
    if "deceased_days_before" in patient:
        rec.deceased_at = as_of - dt.timedelta(days=float(patient["deceased_days_before"]))
    elif "deceased_at" in patient:
        rec.deceased_at = _instant(patient["deceased_at"], f"{where}.deceased_at")
    rec.deceased = bool(patient.get("deceased")) or rec.deceased_at is not None
    if "birth_date" in patient:
        _birth(rec, patient["birth_date"], f"{where}.birth_date")
    elif "age" in patient:  # the birthday is half a year away from as_of, so the age is exact
        born = as_of - dt.timedelta(days=365.25 * float(patient["age"]) + 182)
        rec.birth_date = born.date()
    for i, c in enumerate(patient.get("conditions", [])):
        path = f"{where}.conditions[{i}]"
        onset = _prefixed(c, "onset", as_of, path)
        recorded = _prefixed(c, "recorded", as_of, path)
        rec.conditions.append(
            Condition(
                _codes(c, path),
                source=path,
                begun=_begun(onset, recorded),
                since=onset or recorded,
                ended=_prefixed(c, "ended", as_of, path),
            )
        )
    for i, m in enumerate(patient.get("medications", [])):
        path = f"{where}.medications[{i}]"
        started = _prefixed(m, "started", as_of, path)
        rec.medications.append(Medication(_codes(m, path), source=path, begun=started, ended=_prefixed(m, "ended", as_of, path)))
    for i, o in enumerate(patient.get("observations", [])):
        path = f"{where}.observations[{i}]"
        rec.observations.append(
            Observation(
                codes=_codes(o, path),
                effective=_when(o, "at", as_of, path),
                value=o.get("value"),
                unit=o.get("unit"),
                unit_display=o.get("unit_display"),
                value_code=parse_code(o["value_code"], f"{path}.value_code") if "value_code" in o else None,
                source=path,
            )
        )
    for i, a in enumerate(patient.get("allergies", [])):
        path = f"{where}.allergies[{i}]"
        a = a if isinstance(a, dict) else {"code": a}
        rec.allergies.append(
            Allergy(
                _codes(a, path),
                severity=a.get("severity"),
                criticality=a.get("criticality"),
                source=path,
                begun=_prefixed(a, "recorded", as_of, path),
            )
        )
    for i, p in enumerate(patient.get("prior_injections", [])):
        path = f"{where}.prior_injections[{i}]"
        rec.prior_injections.append(
            PriorInjection(
                codes=_codes(p, path) if ("code" in p or "codes" in p) else [Code("cpt", "20610")],
                performed=_when(p, "at", as_of, path),
                target=p.get("target"),
                side=p.get("side"),
                agents=[parse_code(a, f"{path}.agents") for a in p.get("agents", [])],
                source=path,
            )
        )
    for i, s in enumerate(patient.get("planned_surgeries", [])):
        path = f"{where}.planned_surgeries[{i}]"
        rec.planned_surgeries.append(
            PlannedSurgery(
                _codes(s, path),
                date=_when(s, "at", as_of, path),
                side=s.get("side"),
                source=path,
                begun=_prefixed(s, "ordered", as_of, path),
            )
        )
    if "order" in patient:
        o = patient["order"] or {}
        rec.order = InjectionOrder(
            target=o.get("target"),
            side=o.get("side"),
            intent=o.get("intent"),
            codes=[parse_code(c, f"{where}.order.codes") for c in o.get("codes", [])],
            reasons=[parse_code(c, f"{where}.order.reasons") for c in o.get("reasons", [])],
            source=f"{where}.order",
        )
    for i, inj in enumerate(patient.get("injectates", [])):
        rec.planned_injectates.append(
            PlannedInjectate(_codes(inj, f"{where}.injectates[{i}]"), source=f"{where}.injectates[{i}]")
        )
    rec.flags = list(patient.get("flags", []))
    return rec


def load_cases(path: Path, *, shown: str | Path | None = None) -> list[Case]:
    """The cases of a test file; its errors name it ``shown`` when given (a private copy's file
    by the one it was copied from)."""
    content = load_yaml(Path(path), shown=shown) or []  # the rule-set reader (libyaml)
    if not isinstance(content, list):
        raise RecordError(str(shown or path), "a test file is a list of cases")
    cases = []
    for i, raw in enumerate(content):
        where = f"{Path(path).name}[{i}]"
        if not isinstance(raw, dict) or "name" not in raw or "expect" not in raw:
            raise RecordError(where, "a case needs name, as_of, patient and expect")
        unknown = set(raw["expect"]) - EXPECT_KEYS
        if unknown:
            raise RecordError(f"{where}.expect", f"unknown key(s) {', '.join(sorted(unknown))}")
        as_of = _instant(raw.get("as_of", "2025-06-02T09:00:00Z"), f"{where}.as_of")
        cases.append(
            Case(
                raw["name"],
                where,
                as_of,
                record_from_shorthand(raw.get("patient") or {}, as_of, f"{where}.patient"),
                raw["expect"],
                raw.get("tags", []),
            )
        )
    return cases


def _deferral_keys(decision: dict) -> set[str]:
    keys = set()
    for d in decision.get("deferrals", []):
        keys.add(d["reason"] if d["scope"] == "PROCEDURE" else f"{d['reason']}/{d['scope']}")
    return keys


def check(case: Case, decision: dict) -> list[str]:
    """Differences between the decision and the case's expectations, one line each."""
    exp = case.expect
    problems: list[str] = []
    fired = {e["ruleId"] for e in decision.get("explanations", [])}
    for rid in exp.get("fired", []):
        if rid not in fired:
            problems.append(f"expected {rid} to fire; fired: {', '.join(sorted(fired)) or 'nothing'}")
    for rid in exp.get("not_fired", []):
        if rid in fired:
            problems.append(f"expected {rid} not to fire, but it did")

    def compare(label: str, actual: set[str], key: str) -> None:
        if key in exp:
            want = set(exp[key])
            if want != actual:
                problems.append(f"{label}: expected {sorted(want)}, got {sorted(actual)}")
        if f"{key}_include" in exp:
            missing = set(exp[f"{key}_include"]) - actual
            if missing:
                problems.append(f"{label}: expected to include {sorted(missing)}, got {sorted(actual)}")

    compare("deferrals", _deferral_keys(decision), "deferrals")
    compare("cautions", {c["code"] for c in decision.get("cautions", [])}, "cautions")
    compare("missingData", {m["code"] for m in decision.get("missingData", [])}, "missing")
    if "modality" in exp:
        actual = decision.get("modality", {})
        for key, want in exp["modality"].items():
            got = actual.get(key)
            if isinstance(want, list):
                if sorted(want) != sorted(got or []):
                    problems.append(f"modality.{key}: expected {sorted(want)}, got {sorted(got or [])}")
            elif got != want:
                problems.append(f"modality.{key}: expected {want}, got {got}")
    recs = {i["category"]: i["recommendation"] for i in decision.get("injectates", [])}
    for category, want in (exp.get("injectates") or {}).items():
        if recs.get(category) != want:
            problems.append(f"injectate {category}: expected {want}, got {recs.get(category, 'nothing')}")
    by_key = {
        (d["reason"] if d["scope"] == "PROCEDURE" else f"{d['reason']}/{d['scope']}"): d["severity"]
        for d in decision.get("deferrals", [])
    }
    for key, want in (exp.get("severities") or {}).items():
        if by_key.get(key) != want:
            problems.append(f"deferral {key}: expected severity {want}, got {by_key.get(key, 'no such deferral')}")
    messages = [
        m.get("message", "") for part in ("injectates", "deferrals", "cautions", "missingData") for m in decision.get(part, [])
    ]
    for text in exp.get("messages_include", []):
        if not any(text in m for m in messages):
            problems.append(f"no message contains {text!r}")
    for category in exp.get("injectates_absent", []):
        if category in recs:
            problems.append(f"injectate {category}: expected no recommendation, got {recs[category]}")
    return problems
