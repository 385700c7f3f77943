"""Conversions between the wire (``needlepoint.v1``) and the core, one function per concept.

* :func:`record_from_context`: the typed PatientContext road into a
  :class:`~needlepoint.core.record.PatientRecord`, validated strictly (a bad value raises
  :class:`~needlepoint.core.record.RecordError` naming its request path);
* :func:`context_from_record`: the way back, for callers that hold a record (tools, tests);
* :func:`apply_order_override`: ``EvaluateRequest.order`` merged onto the patient's order;
* :func:`encode_decision`: the core's typed decision into a ``Decision`` (the server's request
  path), each rule's fixed explanation encoded once;
* :func:`decision_to_proto`: a decision's contract JSON into a ``Decision``, by the protobuf
  JSON mapping, which is the contract's JSON (so the two cannot drift apart);
* :func:`ruleset_to_proto`: a loaded rule set into a ``Ruleset``.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import Descriptor

from needlepoint.core import decision as core_decision
from needlepoint.core import record as rec
from needlepoint.core.ruleset import RuleSet
from needlepoint.v1 import decision_pb2, patient_pb2, ruleset_pb2

# Needlepoint's own code systems: a code outside them is bad input on either road (as in the
# FHIR mapper), never a code that silently matches nothing.
OWN_VOCABULARIES: dict[str, Sequence[str]] = {
    "np-target": rec.TARGETS,
    "np-intent": rec.INTENTS,
    "np-injectate": rec.INJECTATE_CATEGORIES,
    "np-flag": rec.FLAGS,
}
ALLERGY_SEVERITIES = ("mild", "moderate", "severe")
ALLERGY_CRITICALITIES = ("low", "high", "unable-to-assess")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


# -- time ---------------------------------------------------------------------------------------


def timestamp_to_datetime(ts: timestamp_pb2.Timestamp, path: str) -> dt.datetime:
    """A Timestamp as a timezone-aware UTC datetime (microsecond precision)."""
    try:
        return ts.ToDatetime(tzinfo=dt.timezone.utc)
    except (ValueError, OverflowError):
        raise rec.RecordError(path, "timestamp out of range (0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z, nanos 0 to 999,999,999)") from None


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
    if system in OWN_VOCABULARIES:
        _term(coding.code, OWN_VOCABULARIES[system], f"{path}.code")
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
            rec.Medication(_codes(m.codes, f"{p}.codes"), source=p, begun=_optional_time(m, "begun", p), ended=_optional_time(m, "ended", p))
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
                severity=_vocabulary(a.severity, ALLERGY_SEVERITIES, f"{p}.severity"),
                criticality=_vocabulary(a.criticality, ALLERGY_CRITICALITIES, f"{p}.criticality"),
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


def apply_order_override(
    record: rec.PatientRecord, override: patient_pb2.InjectionOrder, path: str = "order"
) -> rec.PatientRecord:
    """The record with ``override`` merged onto its order, field by field (see the proto)."""
    given = order_from_proto(override, path)
    base = record.order
    if base is None:
        return record.with_order(given)
    return record.with_order(
        rec.InjectionOrder(
            target=given.target or base.target,
            side=given.side or base.side,
            intent=given.intent or base.intent,
            codes=given.codes or base.codes,
            reasons=given.reasons or base.reasons,
            source=base.source,
        )
    )


# -- a record as a context ------------------------------------------------------------------------

# The URI of each short system name (the first one listed, e.g. ICD-10-CM for "icd10cm").
_SYSTEM_URI: dict[str, str] = {}
for _uri, _short in rec.SYSTEM_URIS.items():
    _SYSTEM_URI.setdefault(_short, _uri)


def _coding(code: rec.Code) -> patient_pb2.Coding:
    system = _SYSTEM_URI.get(code.system, code.system)
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
            patient_pb2.Condition(codes=_codings(c.codes), begun=_timestamp(c.begun), since=_timestamp(c.since), ended=_timestamp(c.ended))
            for c in record.conditions
        ],
        medications=[
            patient_pb2.Medication(codes=_codings(m.codes), begun=_timestamp(m.begun), ended=_timestamp(m.ended)) for m in record.medications
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
            patient_pb2.Allergy(codes=_codings(a.codes), severity=a.severity or "", criticality=a.criticality or "", begun=_timestamp(a.begun))
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
            patient_pb2.PlannedSurgery(codes=_codings(s.codes), date=_timestamp(s.date), side=s.side or "", begun=_timestamp(s.begun))
            for s in record.planned_surgeries
        ],
        order=_order_to_proto(record.order) if record.order else None,
        planned_injectates=[patient_pb2.PlannedInjectate(codes=_codings(j.codes)) for j in record.planned_injectates],
        flags=list(record.flags),
    )


# -- the way out --------------------------------------------------------------------------------


def encode_decision(decision: core_decision.Decision) -> decision_pb2.Decision:
    """The core's typed decision as a Decision message, equal to
    ``decision_to_proto(decision.to_json())`` and about three times as fast (no JSON dict, no
    generic plan: each part is added to the message directly).

    A rule's head (id, version, title, category, rationale, evidence, parameters) is the same
    object in every decision of a rule set, so it is encoded once, in the protobuf wire format
    (:data:`_HEADS`), and merged into each explanation by the protobuf runtime in C. An enum name
    that the proto does not know raises ValueError: a fault of the service, never of the input.
    """
    msg = decision_pb2.Decision(decision_id=decision.decision_id)
    delta = dt.datetime.fromisoformat(decision.as_of.replace("Z", "+00:00")) - _EPOCH
    msg.as_of.seconds, msg.as_of.nanos = delta.days * 86_400 + delta.seconds, delta.microseconds * 1000
    r, ref = decision.ruleset, msg.ruleset
    ref.id, ref.version, ref.digest = r.id, r.version, r.digest
    m = decision.modality
    if m is not None:
        modality = msg.modality
        modality.SetInParent()  # present even if every field were empty, as in the JSON
        if m.preferred:
            modality.preferred = m.preferred  # type: ignore[assignment]  # enums go by name
        modality.acceptable.extend(m.acceptable)  # type: ignore[arg-type]
        modality.avoid.extend(m.avoid)  # type: ignore[arg-type]
        modality.rule_ids.extend(m.rule_ids)
    add: Any = msg.injectates.add
    for i in decision.injectates:
        add(category=i.category, recommendation=i.recommendation, rule_ids=i.rule_ids, message=i.message)
    add = msg.deferrals.add
    for d in decision.deferrals:
        add(reason=d.reason, severity=d.severity, scope=d.scope, rule_ids=d.rule_ids, message=d.message)
    add = msg.cautions.add
    for c in decision.cautions:
        add(code=c.code, rule_ids=c.rule_ids, message=c.message)
    add = msg.missing_data.add
    for md in decision.missing_data:
        add(code=md.code, message=md.message, rule_ids=md.rule_ids)
    add, heads = msg.explanations.add, _HEADS
    for e in decision.explanations:
        head = e.head
        cached = heads.get(id(head))
        if cached is None or cached[0] is not head:
            if len(heads) >= _MAX_HEADS:  # rule sets come and go (hot reload): start again
                heads.clear()
            cached = heads[id(head)] = (head, _head_bytes(head))
        exp = add(outcome=e.outcome, matched=[{"fact": fact, "value": value} for fact, value in e.matched])
        exp.MergeFromString(cached[1])
        if e.overridden_by:
            exp.overridden_by.extend(e.overridden_by)
    return msg


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
# Encoded rule heads by id(): (the head, kept so that its id is not reused; its bytes).
_HEADS: dict[int, tuple[core_decision.RuleHead, bytes]] = {}
_MAX_HEADS = 2_000  # rules of about twenty rule-set versions (a server keeps three loaded)


def _head_bytes(head: core_decision.RuleHead) -> bytes:
    """The fields of an Explanation that come from its rule alone (all but outcome, matched and
    overridden_by), in the wire format (field numbers of decision.proto's Explanation)."""
    parts = [_string(0x0A, head.rule_id), _string(0x12, head.rule_version), _string(0x1A, head.title), _string(0x22, head.category)]
    parts.append(_string(0x32, head.rationale))
    parts += [_message(0x3A, _string(0x0A, x.citation) + _string(0x12, x.strength)) for x in head.evidence]
    parts += [_message(0x4A, _string(0x0A, p.name) + _string(0x12, p.value) + _string(0x1A, p.layer)) for p in head.parameters]
    return b"".join(parts)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _message(tag: int, body: bytes) -> bytes:
    """A length-delimited field (a string's bytes or an embedded message) with a one-byte tag."""
    n = len(body)
    return (bytes((tag, n)) if n < 0x80 else bytes((tag,)) + _varint(n)) + body


def _string(tag: int, text: str) -> bytes:
    """A string field; an empty one is left out, as proto3 does."""
    return _message(tag, text.encode()) if text else b""


def decision_to_proto(decision: Mapping[str, Any]) -> decision_pb2.Decision:
    """A decision's contract JSON (``Evaluator.evaluate``) as a Decision.

    The dict is the contract's JSON, which is the Decision's protobuf JSON mapping, so the result
    equals ``json_format.ParseDict(decision, Decision())``; it is built through the message
    constructors instead, following a per-message plan made once from the descriptors, about 15
    times faster. A key, value or enum name that the proto does not know raises (KeyError,
    TypeError, ValueError): a fault of the service, never of the input.
    """
    return decision_pb2.Decision(**_constructor_args(decision_pb2.Decision.DESCRIPTOR, decision))


# How a JSON member becomes a constructor argument (the third item of a plan entry).
_SCALAR, _TIMESTAMP, _MESSAGE, _REPEATED_MESSAGE = range(4)


@functools.cache
def _plan(message: Descriptor) -> dict[str, tuple[str, int, Descriptor | None]]:
    """For each field of ``message``, by JSON name: (field name, kind, message type)."""
    plan: dict[str, tuple[str, int, Descriptor | None]] = {}
    for f in message.fields:
        sub = f.message_type
        if sub is None:
            plan[f.json_name] = (f.name, _SCALAR, None)  # enums go by name, as in the JSON
        elif sub is timestamp_pb2.Timestamp.DESCRIPTOR:
            plan[f.json_name] = (f.name, _TIMESTAMP, None)
        else:
            plan[f.json_name] = (f.name, _REPEATED_MESSAGE if f.is_repeated else _MESSAGE, sub)
    return plan


def _constructor_args(message: Descriptor, obj: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the message's constructor from its JSON object."""
    plan = _plan(message)
    args: dict[str, Any] = {}
    for key, value in obj.items():
        name, kind, sub = plan[key]
        if kind == _SCALAR:
            args[name] = value
        elif kind == _REPEATED_MESSAGE:
            args[name] = [_constructor_args(sub, v) for v in value]  # type: ignore[arg-type]
        elif kind == _MESSAGE:
            args[name] = _constructor_args(sub, value)  # type: ignore[arg-type]
        else:
            args[name] = ts = timestamp_pb2.Timestamp()
            ts.FromJsonString(value)
    return args


def param_text(value: Any) -> str:
    """A parameter value as text: strings as they are, anything else as JSON; None as empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return orjson.dumps(value, default=str).decode()


def ruleset_to_proto(ruleset: RuleSet, *, full: bool) -> ruleset_pb2.Ruleset:
    """A loaded RuleSet as a Ruleset message; the header only unless ``full``."""
    msg = ruleset_pb2.Ruleset(
        id=ruleset.id,
        version=str(ruleset.version),
        digest=ruleset.digest,
        status=ruleset.status or "",
        title=ruleset.title or "",
    )
    if not full:
        return msg
    for rule in ruleset.rules:
        msg.rules.add(
            id=rule.id,
            version=str(rule.version),
            title=rule.title or "",
            category=rule.category or "",
            rationale=rule.rationale or "",
            parameters=list(rule.params),
            evidence=[decision_pb2.Evidence(citation=e.citation, strength=e.strength or "") for e in rule.evidence],
        )
    for param in ruleset.params.values():
        msg.parameters.add(
            name=param.name,
            value=param_text(param.value),
            default_value=param_text(param.default),
            unit=param.unit or "",
            provenance=param.provenance or "",
            description=param.description or "",
            layer=param.layer or "",
        )
    return msg
