"""What one decision log row holds, and how it is built from what a road has in hand.

A road (the gRPC servicer, the CDS Hooks service, the CLI) builds a :class:`DecisionEntry` from
objects it already has (the request, the decision) at almost no cost; everything expensive
(protobuf to JSON, parsing and masking the bundle, hashing, the summary) is done by
:meth:`DecisionEntry.row`, which the log's writer thread calls, off the request's path.

The replay input is stored in a form ``needlepoint rules diff --cases`` reads, so that
``decisions export`` can write it out unchanged:

The decision itself is stored as the serialized ``needlepoint.v1.Decision`` (its contract JSON is
``json_format.MessageToDict`` of it; ``decisions`` readers convert): converting every decision to
JSON on the way in cost more server CPU than the rest of the logging together.

* gRPC and CLI decisions: the ``EvaluateRequest`` in its protobuf JSON mapping, with
  ``fhirBundle`` as the (masked) Bundle object, and ``asOf`` set to the instant the decision was
  made at even when the caller left it to the server, so a replay is at the same instant;
* CDS Hooks decisions: the CDS Hooks request (masked, without ``fhirAuthorization``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from needlepoint.decisionlog.masking import Masker

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

    from needlepoint.v1 import decision_pb2

ROADS = ("grpc", "cds-hooks", "cli")


def utc_text(moment: dt.datetime) -> str:
    """An instant as ISO 8601 UTC with milliseconds and ``Z``: the stored form, which sorts."""
    moment = moment.astimezone(dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True, slots=True)
class CardRef:
    """A card a CDS Hooks response showed: its uuid (what feedback names), the rules behind it,
    and the override reasons it offered."""

    uuid: str
    rule_ids: Sequence[str]
    summary: str = ""
    indicator: str = ""
    override_reasons: Sequence[Mapping[str, Any]] = ()


@dataclass(slots=True)
class DecisionEntry:
    """One decision to log. ``decision`` is a ``needlepoint.v1.Decision`` or the contract's JSON
    object; ``request`` is an ``EvaluateRequest`` (roads grpc and cli) or a CDS Hooks request (its
    parsed JSON object, or its bytes). Build it with :meth:`evaluate` or :meth:`cds_hooks`."""

    road: str
    decision: Any
    request: Any
    caller: str = ""
    correlation_id: str = ""
    service_id: str = ""
    cards: Sequence[CardRef] = ()
    created_at: dt.datetime = field(default_factory=_now)

    @classmethod
    def evaluate(cls, request: Any, decision: Any, *, caller: str = "", road: str = "grpc") -> DecisionEntry:
        """An entry for an ``EvaluateRequest`` answered with ``decision`` (gRPC or CLI)."""
        return cls(road, decision, request, caller=caller, correlation_id=request.correlation_id)

    @classmethod
    def cds_hooks(
        cls,
        request: Mapping[str, Any] | bytes,
        decision: Any,
        *,
        caller: str = "",
        service_id: str = "",
        cards: Sequence[CardRef] = (),
    ) -> DecisionEntry:
        """An entry for a CDS Hooks request (parsed, or its body's bytes) answered from
        ``decision`` with ``cards``. ``caller`` is who asked (e.g. the JWT ``iss`` and the
        context's ``userId``); the correlation id is the request's ``hookInstance``."""
        hook_instance = ""
        if isinstance(request, Mapping):
            hook_instance = str(request.get("hookInstance", ""))
        return cls(
            "cds-hooks", decision, request, caller=caller, correlation_id=hook_instance, service_id=service_id, cards=tuple(cards)
        )

    def decision_message(self) -> decision_pb2.Decision:
        """The decision as a ``needlepoint.v1.Decision`` message."""
        from needlepoint.v1 import decision_pb2

        if isinstance(self.decision, decision_pb2.Decision):
            return self.decision
        from google.protobuf import json_format

        return json_format.ParseDict(dict(self.decision), decision_pb2.Decision(), ignore_unknown_fields=True)

    def row(self, masker: Masker) -> dict[str, Any]:
        """The ``decisions`` row (without ``id``), plus ``fired`` and ``cards`` for the side
        tables. Raises ValueError for an entry that cannot be logged."""
        if self.road not in ROADS:
            raise ValueError(f"unknown road {self.road!r}")
        decision = self.decision_message()
        as_of = decision.as_of.ToJsonString() if decision.HasField("as_of") else ""  # exactly the contract's asOf
        if self.road == "cds-hooks":
            replay_kind = "cds-hooks-request"
            request_hash, replay, masked = _cds_hooks_replay(self.request, masker)
        else:
            replay_kind = "evaluate-request"
            request_hash, replay, masked = _evaluate_replay(self.request, as_of, masker)
        summary = summarize(decision)
        return {
            "decision_id": decision.decision_id,
            "ruleset_id": decision.ruleset.id,
            "ruleset_version": decision.ruleset.version,
            "ruleset_digest": decision.ruleset.digest,
            "as_of": as_of,
            "created_at": utc_text(self.created_at),
            "road": self.road,
            "caller": self.caller,
            "correlation_id": self.correlation_id,
            "request_hash": request_hash,
            "summary": summary,
            "decision": decision.SerializeToString(),
            "replay_kind": replay_kind,
            "replay_input": replay.decode(),
            "masked": masked,
            "fired": summary["fired"],
            "cards": [
                {
                    "card_uuid": card.uuid,
                    "service_id": self.service_id,
                    "rule_ids": list(card.rule_ids),
                    "summary": card.summary,
                    "indicator": card.indicator,
                    "override_reasons": [dict(r) for r in card.override_reasons],
                }
                for card in self.cards
            ],
        }


def _evaluate_replay(request: Any, as_of: str, masker: Masker) -> tuple[str, bytes, list[str]]:
    """(hash of the request as received, masked replay JSON bytes, masked paths) of an
    EvaluateRequest. The bundle is spliced in as masked JSON, never re-encoded as base64."""
    from google.protobuf import json_format

    request_hash = "sha256:" + hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    road = request.WhichOneof("patient")
    head = type(request)()
    head.CopyFrom(request)
    head.ClearField("fhir_bundle")
    replay = json_format.MessageToDict(head)
    masked: list[str] = []
    if road == "context" and "birthDate" in masker.fields:
        birth = replay.get("context", {}).get("birthDate", "")
        if len(birth) > 4:
            replay["context"]["birthDate"] = birth[:4]
            masked = ["context.birthDate"]
    if as_of:
        replay["asOf"] = as_of
    text = orjson.dumps(replay)
    if road == "fhir_bundle":
        bundle, masked = masker.bundle(request.fhir_bundle)
        text = text[:-1] + (b',' if len(text) > 2 else b'') + b'"fhirBundle":' + bundle + b"}"
    return request_hash, text, masked


def _cds_hooks_replay(request: Any, masker: Masker) -> tuple[str, bytes, list[str]]:
    """(hash, masked replay JSON bytes, masked paths) of a CDS Hooks request (bytes or parsed)."""
    if isinstance(request, (bytes, bytearray, memoryview)):
        raw = bytes(request)
    else:
        raw = orjson.dumps(request, option=orjson.OPT_SORT_KEYS)
    replay, masked = masker.cds_hooks_request(request)
    return "sha256:" + hashlib.sha256(raw).hexdigest(), replay, masked


def summarize(decision: decision_pb2.Decision) -> dict[str, Any]:
    """The outcome in brief, from a ``Decision`` message: whether the procedure can go ahead
    (``yes``, ``review``, ``no``), deferrals as ``REASON/SCOPE:SEVERITY``, the preferred modality,
    injectate recommendations, caution and missing-data codes, and every rule that fired (each
    explained rule)."""
    from needlepoint.v1 import decision_pb2 as pb

    def name(enum: EnumTypeWrapper, value: int) -> str:
        return enum.Name(value) if value else ""

    deferrals = [
        (name(pb.DeferralReason, d.reason), name(pb.Deferral.Scope, d.scope) or "PROCEDURE", name(pb.Severity, d.severity))
        for d in decision.deferrals
    ]
    whole = [d for d in deferrals if d[1] == "PROCEDURE"]
    proceed = "no" if any(d[2] == "HARD" for d in whole) else "review" if whole else "yes"
    return {
        "proceed": proceed,
        "deferrals": [f"{reason}/{scope}:{severity}" for reason, scope, severity in deferrals],
        "modality": name(pb.Modality, decision.modality.preferred),
        "injectates": {
            name(pb.InjectateCategory, i.category): name(pb.Recommendation, i.recommendation) for i in decision.injectates
        },
        "cautions": [c.code for c in decision.cautions],
        "missingData": [m.code for m in decision.missing_data],
        "fired": sorted({e.rule_id for e in decision.explanations if e.rule_id}),
    }
