"""The gRPC servicer's one call into the decision log (on the server's side: the decision log
itself knows nothing of gRPC statuses).

:func:`log_decision` queues the decision and waits (without blocking the event loop) for its
group commit, so that the answer a caller receives is always a committed row. If the log cannot
commit, the caller gets ``UNAVAILABLE`` instead of a decision nobody could audit or replay.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from needlepoint.decisionlog.entries import DecisionEntry
from needlepoint.decisionlog.writer import DecisionLog, LogUnavailable
from needlepoint.server.errors import ServiceError
from needlepoint.v1 import decision_pb2, decision_service_pb2

log = logging.getLogger(__name__)


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who asked: the client certificate's common name when there is one, and the peer address."""
    peer = context.peer() or ""
    try:
        names = context.auth_context().get("x509_common_name") or []
    except Exception:  # noqa: BLE001 - no auth context on an insecure channel in some grpc versions
        names = []
    name = b",".join(names).decode(errors="replace") if names else ""
    return f"{name} {peer}".strip()


async def log_decision(
    decision_log: DecisionLog,
    request: decision_service_pb2.EvaluateRequest,
    decision: decision_pb2.Decision,
    context: grpc.aio.ServicerContext,
) -> decision_pb2.Decision | ServiceError:
    """``decision`` once it is committed to the log, or a ServiceError (UNAVAILABLE) if it cannot be."""
    entry = DecisionEntry.evaluate(request, decision, caller=caller_of(context), road="grpc")
    try:
        await asyncio.wrap_future(decision_log.record(entry))
    except LogUnavailable as exc:
        log.error("decision %s not answered: %s", decision.decision_id, exc)
        return ServiceError(grpc.StatusCode.UNAVAILABLE, "the decision log cannot record decisions now; try again")
    return decision
