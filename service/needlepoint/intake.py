"""Every road in, one patient record: the request -> :class:`~needlepoint.core.record.PatientRecord`
road for gRPC, CDS Hooks, batch and the rule-author tools, written once.

* :func:`record_from_request`: an ``EvaluateRequest`` (typed context or FHIR bundle, plus its
  ``order``) as the server, ``needlepoint evaluate`` and ``needlepoint rules diff`` read it;
  :func:`request_from_json` reads one exported as JSON (the protobuf JSON mapping), and
  :func:`record_from_json` any JSON input: a Bundle, a CDS Hooks request or an exported request;
* :func:`record_from_context`: the typed PatientContext, validated strictly (a bad value raises
  :class:`~needlepoint.core.record.RecordError` naming its request path), and
  :func:`context_from_record`, the way back;
* :func:`record_from_bundle_bytes`: a FHIR Bundle within the size limit; FHIR Bundles and CDS
  Hooks requests are read by the one FHIR parser, :mod:`needlepoint.fhir.mapper`, and rule-set
  test cases by :mod:`needlepoint.casefile`;
* :func:`apply_order`: **the** order semantics of every road, "supply or override".

**The order.** An order given beside the patient (the gRPC ``EvaluateRequest.order``, the command
line's ``--target/--side/--intent``, a batch row's ``target``/``side``/``intent``) supplies or
overrides the patient's injection order field by field: each non-empty field it carries replaces
the record's, the record keeps the fields it leaves empty, and a record without an order takes it
whole. Where several are given they apply from the most general to the most specific (the command
line, then a batch row), so the more specific one wins.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import timestamp_pb2

from needlepoint.core import record as rec
from needlepoint.core.record import ObservationCodes
from needlepoint.fhir.mapper import (
    record_from_bundle,
    record_from_bundle_with_hip_order,
    record_from_cds_hooks_request,
)
from needlepoint.limits import MAX_BUNDLE_BYTES
from needlepoint.v1 import decision_service_pb2, patient_pb2

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")

# Where an order made of --target/--side/--intent says it came from.
COMMAND_LINE_ORDER = "--target/--side/--intent"


# -- the order ----------------------------------------------------------------------------------


def apply_order(record: rec.PatientRecord, order: rec.InjectionOrder | None) -> rec.PatientRecord:
    """The record with ``order`` supplying or overriding its injection order, field by field (see
    the module's docstring); the record itself when ``order`` is None. The merged order keeps the
    record's ``source``; a record without an order takes ``order`` whole, its ``source`` with it."""
    if order is None:
        return record
    base = record.order
    if base is None:
        return record.with_order(order)
    return record.with_order(
        dataclasses.replace(
            base,
            target=order.target or base.target,
            side=order.side or base.side,
            intent=order.intent or base.intent,
            codes=order.codes or base.codes,
            reasons=order.reasons or base.reasons,
        )
    )


def order_from_fields(
    target: str | None, side: str | None, intent: str | None, source: str = COMMAND_LINE_ORDER
) -> rec.InjectionOrder | None:
    """An order made of a target, side and intent (the command line's, a batch row's), or None
    when all three are empty. The values are taken as checked by the caller (a click choice, a
    row check)."""
    if not (target or side or intent):
        return None
    return rec.InjectionOrder(target=target or None, side=side or None, intent=intent or None, source=source)


# -- the request road ---------------------------------------------------------------------------


def record_from_request(
    request: decision_service_pb2.EvaluateRequest,
    bundle: Any = None,
    *,
    refuse_early: bool = False,
    observation_codes: ObservationCodes | None = None,
) -> rec.PatientRecord:
    """The patient record of an ``EvaluateRequest``, with its ``order`` applied. ``bundle``, when
    given, is the request's FHIR Bundle already read: its bytes (``request.fhir_bundle``, which
    a server reads once to measure the request: each read copies them out of the message), or
    the Bundle already parsed (an exported request may carry it so). Raises RecordError naming
    the request field.

    ``refuse_early`` is the server's cheap answer for orders that are not for us: a bundle sent
    with no order beside it must order a hip injection itself, and one that does not is refused
    (at ``order`` or ``order.target``, as the full mapping would) before the rest of it is mapped.
    Tools that apply an order of their own after this (``rules diff``, batch) leave it off.

    ``observation_codes``: a bundle's Observations of other codes are not mapped (see
    :func:`~needlepoint.fhir.mapper.record_from_bundle`); a caller that only decides passes its
    evaluator's ``observation_codes``."""
    road = request.WhichOneof("patient")
    own_order = refuse_early and not request.HasField("order")
    if type(bundle) is bytes:
        record = record_from_bundle_bytes(bundle, own_order=own_order, observation_codes=observation_codes)
    elif bundle is not None:
        record = record_from_bundle(bundle, observation_codes=observation_codes)
    elif road == "context":
        record = record_from_context(request.context)
    elif road == "fhir_bundle":
        record = record_from_bundle_bytes(request.fhir_bundle, own_order=own_order, observation_codes=observation_codes)
    else:
        raise rec.RecordError("patient", "one of context or fhir_bundle is required")
    if request.HasField("order"):
        record = apply_order(record, order_from_proto(request.order, "order"))
    return record


def request_from_json(obj: dict) -> tuple[decision_service_pb2.EvaluateRequest, Any]:
    """An exported ``EvaluateRequest`` (the protobuf JSON mapping), and its FHIR Bundle when the
    export carries it as a Bundle object or its JSON text rather than base64 (None otherwise).
    Raises RecordError at ``request`` when it is not an evaluate request."""
    from google.protobuf import json_format

    rest = dict(obj)
    bundle = rest.get("fhirBundle")
    if isinstance(bundle, dict) or (isinstance(bundle, str) and bundle.lstrip().startswith("{")):
        del rest["fhirBundle"]  # a Bundle object or its JSON text; base64 is left to the mapping
    else:
        bundle = None
    try:
        request = json_format.ParseDict(rest, decision_service_pb2.EvaluateRequest(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise rec.RecordError("request", f"not an evaluate request: {exc}") from None
    return request, bundle


def request_kind(obj: Any) -> str | None:
    """What a parsed JSON value is: ``bundle`` (a FHIR Bundle), ``cds-hooks`` (a CDS Hooks
    request), ``request`` (an exported EvaluateRequest) or None."""
    if type(obj) is not dict:
        return None
    if obj.get("resourceType") == "Bundle":
        return "bundle"
    if "hook" in obj and "context" in obj:
        return "cds-hooks"
    if "fhirBundle" in obj or "context" in obj:
        return "request"
    return None


def record_from_json(
    obj: Any, observation_codes: ObservationCodes | None = None
) -> tuple[rec.PatientRecord, dt.datetime | None, str]:
    """A parsed JSON input of any kind (:func:`request_kind`): a FHIR Bundle, a CDS Hooks request or
    an exported ``EvaluateRequest`` (its order applied), as (record, the instant it carries or None,
    its correlation id or ""). ``observation_codes``: see :func:`record_from_request`. Raises
    RecordError naming what is wrong."""
    kind = request_kind(obj)
    if kind == "bundle":
        return record_from_bundle(obj, observation_codes=observation_codes), None, ""
    if kind == "cds-hooks":
        return record_from_cds_hooks_request(obj, observation_codes=observation_codes), None, ""
    if kind == "request":
        request, bundle = request_from_json(obj)
        as_of = timestamp_to_datetime(request.as_of, "asOf") if request.HasField("as_of") else None
        return record_from_request(request, bundle, observation_codes=observation_codes), as_of, request.correlation_id
    raise rec.RecordError("line", "not a FHIR Bundle, a CDS Hooks request or an evaluate request")


def record_from_bundle_bytes(
    data: bytes, own_order: bool = False, observation_codes: ObservationCodes | None = None
) -> rec.PatientRecord:
    """A FHIR Bundle (JSON bytes) as a PatientRecord; the size is checked here
    (:data:`needlepoint.limits.MAX_BUNDLE_BYTES`), the rest by the mapper (malformed JSON is a
    RecordError at ``Bundle``). With ``own_order`` (no order is given beside the bundle), a bundle
    without a hip injection order is refused before it is mapped
    (:func:`~needlepoint.fhir.mapper.record_from_bundle_with_hip_order`). ``observation_codes``:
    see :func:`record_from_request`."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise rec.RecordError("fhir_bundle", f"the bundle is {len(data)} bytes; the limit is {MAX_BUNDLE_BYTES} bytes")
    if own_order:
        return record_from_bundle_with_hip_order(data, observation_codes=observation_codes)
    return record_from_bundle(data, observation_codes=observation_codes)


# -- time ---------------------------------------------------------------------------------------


def timestamp_to_datetime(ts: timestamp_pb2.Timestamp, path: str) -> dt.datetime:
    """A Timestamp as a timezone-aware UTC datetime (microsecond precision)."""
    try:
        return ts.ToDatetime(tzinfo=dt.timezone.utc)
    except (ValueError, OverflowError):
        raise rec.RecordError(
            path, "timestamp out of range (0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z, nanos 0 to 999,999,999)"
        ) from None


# The evaluation instants accepted: from year 1000 (the decision's ``asOf`` is written with a
# four-digit year) to the last instant a Timestamp can hold.
EARLIEST_AS_OF = dt.datetime(1000, 1, 1, tzinfo=dt.timezone.utc)


def as_of_to_datetime(ts: timestamp_pb2.Timestamp, path: str) -> dt.datetime:
    """An evaluation instant (``as_of``) as a UTC datetime: a valid Timestamp no earlier than
    :data:`EARLIEST_AS_OF`. Raises RecordError naming ``path`` otherwise."""
    instant = timestamp_to_datetime(ts, path)
    if instant < EARLIEST_AS_OF:
        raise rec.RecordError(path, f"the evaluation instant must not be before {EARLIEST_AS_OF:%Y-%m-%d} (UTC)")
    return instant


def datetime_to_timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """A timezone-aware datetime as a Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def _optional_time(msg: Any, name: str, path: str) -> dt.datetime | None:
    return timestamp_to_datetime(getattr(msg, name), f"{path}.{name}") if msg.HasField(name) else None


# -- the typed road in --------------------------------------------------------------------------


def _code(coding: patient_pb2.Coding, path: str) -> rec.Code:
    if not coding.system:
        raise rec.RecordError(f"{path}.system", "a coding needs a system URI")
    if not coding.code:
        raise rec.RecordError(f"{path}.code", "a coding needs a code")
    system = rec.system_short_name(coding.system)
    if system in rec.OWN_VOCABULARIES:
        _term(coding.code, rec.OWN_VOCABULARIES[system], f"{path}.code")
    return rec.Code(system, coding.code, coding.display or None)


def _codes(codings: Sequence[patient_pb2.Coding], path: str, *, required: bool = True) -> list[rec.Code]:
    if required and not codings:
        raise rec.RecordError(path, "at least one coding is required")
    return [_code(c, f"{path}[{i}]") for i, c in enumerate(codings)]


def _vocabulary(value: str, allowed: Sequence[str], path: str) -> str | None:
    """``value`` if it is one of ``allowed``, None if empty; anything else is bad input."""
    if not value:
        return None
    return _term(value, allowed, path)


def _term(value: str, allowed: Sequence[str], path: str) -> str:
    """``value``, which must be one of ``allowed``."""
    if value not in allowed:
        raise rec.RecordError(path, f"unknown code {value!r}; expected one of {', '.join(allowed)}")
    return value


def _birth_date(value: str, path: str) -> tuple[dt.date | None, tuple[dt.date, dt.date] | None]:
    """An exact birth date, or a partial one (``YYYY-MM``, ``YYYY``) as the range it allows."""
    if not value:
        return None, None
    try:
        if _DATE.fullmatch(value):
            return dt.date.fromisoformat(value), None
        allowed = rec.partial_date_range(value)
        if allowed is None:
            raise ValueError
        return None, allowed
    except ValueError:  # the value is a birth date: the message names the field, never the value
        raise rec.RecordError(path, "not a date YYYY-MM-DD (or a partial YYYY-MM, YYYY)") from None


def order_from_proto(order: patient_pb2.InjectionOrder, path: str) -> rec.InjectionOrder:
    """An InjectionOrder message as the core's order (vocabulary checked)."""
    return rec.InjectionOrder(
        target=_vocabulary(order.target, rec.TARGETS, f"{path}.target"),
        side=_vocabulary(order.side, rec.SIDES, f"{path}.side"),
        intent=_vocabulary(order.intent, rec.INTENTS, f"{path}.intent"),
        codes=_codes(order.codes, f"{path}.codes", required=False),
        reasons=_codes(order.reasons, f"{path}.reasons", required=False),
        source=path,
    )


def record_from_context(ctx: patient_pb2.PatientContext, path: str = "context") -> rec.PatientRecord:
    """The typed patient context as a PatientRecord. Raises RecordError naming the field."""

    def each(items: Iterable[Any], name: str) -> Iterable[tuple[str, Any]]:
        return ((f"{path}.{name}[{i}]", item) for i, item in enumerate(items))

    birth_date, birth_range = _birth_date(ctx.birth_date, f"{path}.birth_date")
    return rec.PatientRecord(
        birth_date=birth_date,
        birth_range=birth_range,
        sex=_vocabulary(ctx.sex, rec.SEXES, f"{path}.sex"),
        deceased=ctx.deceased or ctx.HasField("deceased_at"),
        deceased_at=_optional_time(ctx, "deceased_at", path),
        conditions=[
            rec.Condition(
                _codes(c.codes, f"{p}.codes"),
                source=p,
                begun=_optional_time(c, "begun", p),
                since=_optional_time(c, "since", p),
                ended=_optional_time(c, "ended", p),
            )
            for p, c in each(ctx.conditions, "conditions")
        ],
        medications=[
            rec.Medication(
                _codes(m.codes, f"{p}.codes"), source=p, begun=_optional_time(m, "begun", p), ended=_optional_time(m, "ended", p)
            )
            for p, m in each(ctx.medications, "medications")
        ],
        observations=[
            rec.Observation(
                codes=_codes(o.codes, f"{p}.codes"),
                effective=_optional_time(o, "effective", p),
                value=o.value if o.HasField("value") else None,
                unit=o.unit or None,
                value_code=_code(o.value_code, f"{p}.value_code") if o.HasField("value_code") else None,
                source=p,
                unit_display=o.unit_display or None,
            )
            for p, o in each(ctx.observations, "observations")
        ],
        allergies=[
            rec.Allergy(
                codes=_codes(a.codes, f"{p}.codes"),
                severity=_vocabulary(a.severity, rec.ALLERGY_SEVERITIES, f"{p}.severity"),
                criticality=_vocabulary(a.criticality, rec.ALLERGY_CRITICALITIES, f"{p}.criticality"),
                source=p,
                begun=_optional_time(a, "begun", p),
            )
            for p, a in each(ctx.allergies, "allergies")
        ],
        prior_injections=[
            rec.PriorInjection(
                codes=_codes(j.codes, f"{p}.codes"),
                performed=_optional_time(j, "performed", p),
                target=_vocabulary(j.target, rec.TARGETS, f"{p}.target"),
                side=_vocabulary(j.side, rec.SIDES, f"{p}.side"),
                agents=_codes(j.agents, f"{p}.agents", required=False),
                source=p,
            )
            for p, j in each(ctx.prior_injections, "prior_injections")
        ],
        planned_surgeries=[
            rec.PlannedSurgery(
                codes=_codes(s.codes, f"{p}.codes"),
                date=_optional_time(s, "date", p),
                side=_vocabulary(s.side, rec.SIDES, f"{p}.side"),
                source=p,
                begun=_optional_time(s, "begun", p),
            )
            for p, s in each(ctx.planned_surgeries, "planned_surgeries")
        ],
        order=order_from_proto(ctx.order, f"{path}.order") if ctx.HasField("order") else None,
        planned_injectates=[
            rec.PlannedInjectate(_codes(j.codes, f"{p}.codes"), source=p)
            for p, j in each(ctx.planned_injectates, "planned_injectates")
        ],
        flags=[_term(f, rec.FLAGS, p) for p, f in each(ctx.flags, "flags")],
    )


# -- a record as a context ------------------------------------------------------------------------


def _coding(code: rec.Code) -> patient_pb2.Coding:
    system = rec.SYSTEM_URI_OF.get(code.system, code.system)
    return patient_pb2.Coding(system=system, code=code.code, display=code.display or "")


def _codings(codes: Iterable[rec.Code]) -> list[patient_pb2.Coding]:
    return [_coding(c) for c in codes]


def _timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    return datetime_to_timestamp(value) if value is not None else None


def _order_to_proto(order: rec.InjectionOrder) -> patient_pb2.InjectionOrder:
    return patient_pb2.InjectionOrder(
        target=order.target or "",
        side=order.side or "",
        intent=order.intent or "",
        codes=_codings(order.codes),
        reasons=_codings(order.reasons),
    )


def _birth_text(record: rec.PatientRecord) -> str:
    """The birth date as the context carries it: exact, or the partial date its range stands for."""
    if record.birth_date is not None:
        return record.birth_date.isoformat()
    if record.birth_range is None:
        return ""
    first, last = record.birth_range
    return f"{first.year:04d}" if (first.month, last.month) == (1, 12) else f"{first.year:04d}-{first.month:02d}"


def context_from_record(record: rec.PatientRecord) -> patient_pb2.PatientContext:
    """A PatientRecord as a PatientContext: the inverse of :func:`record_from_context` up to
    ``source`` locators. ``data_issues`` have no place in a context and are dropped: a context
    carries only values that could be read."""
    return patient_pb2.PatientContext(
        birth_date=_birth_text(record),
        sex=record.sex or "",
        deceased=record.deceased,
        deceased_at=_timestamp(record.deceased_at),
        conditions=[
            patient_pb2.Condition(
                codes=_codings(c.codes), begun=_timestamp(c.begun), since=_timestamp(c.since), ended=_timestamp(c.ended)
            )
            for c in record.conditions
        ],
        medications=[
            patient_pb2.Medication(codes=_codings(m.codes), begun=_timestamp(m.begun), ended=_timestamp(m.ended))
            for m in record.medications
        ],
        observations=[
            patient_pb2.Observation(
                codes=_codings(o.codes),
                effective=_timestamp(o.effective),
                value=o.value,
                unit=o.unit or "",
                value_code=_coding(o.value_code) if o.value_code else None,
                unit_display=o.unit_display or "",
            )
            for o in record.observations
        ],
        allergies=[
            patient_pb2.Allergy(
                codes=_codings(a.codes), severity=a.severity or "", criticality=a.criticality or "", begun=_timestamp(a.begun)
            )
            for a in record.allergies
        ],
        prior_injections=[
            patient_pb2.PriorInjection(
                codes=_codings(j.codes),
                performed=_timestamp(j.performed),
                target=j.target or "",
                side=j.side or "",
                agents=_codings(j.agents),
            )
            for j in record.prior_injections
        ],
        planned_surgeries=[
            patient_pb2.PlannedSurgery(
                codes=_codings(s.codes), date=_timestamp(s.date), side=s.side or "", begun=_timestamp(s.begun)
            )
            for s in record.planned_surgeries
        ],
        order=_order_to_proto(record.order) if record.order else None,
        planned_injectates=[patient_pb2.PlannedInjectate(codes=_codings(j.codes)) for j in record.planned_injectates],
        flags=list(record.flags),
    )
