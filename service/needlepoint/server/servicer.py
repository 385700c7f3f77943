"""The gRPC servicer (``grpc.aio``) and the server that hosts it with health and reflection.

Evaluation is pure CPU (tens to hundreds of microseconds), so it runs inline in the coroutine:
handing it to an executor would cost more than it saves. Every RPC ends in a decision, a
:class:`ServiceError` status, or, for a fault of the service, ``INTERNAL`` with a generic message
while the fault is logged and the server keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from needlepoint.decisionlog.grpc import log_decision
from needlepoint.server.engine import MAX_MESSAGE_BYTES, Engine
from needlepoint.server.errors import ServiceError
from needlepoint.v1 import decision_pb2, decision_service_pb2, decision_service_pb2_grpc, ruleset_pb2

if TYPE_CHECKING:
    from needlepoint.decisionlog import DecisionLog

log = logging.getLogger(__name__)

SERVICE_NAME = decision_service_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
CORRELATION_ID_KEY = "correlation-id"

T = TypeVar("T")


class DecisionServicer(decision_service_pb2_grpc.DecisionServiceServicer):
    """``needlepoint.v1.DecisionService`` over an :class:`Engine`."""

    def __init__(self, engine: Engine, decision_log: DecisionLog | None = None) -> None:
        self._engine = engine
        self._log = decision_log  # every decision is committed to it before it is answered

    async def Evaluate(
        self, request: decision_service_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> decision_pb2.Decision:
        trailer = ((CORRELATION_ID_KEY, request.correlation_id),) if request.correlation_id else ()
        outcome = self._evaluate("Evaluate", request, context)
        if self._log is not None and not isinstance(outcome, ServiceError):
            outcome = await log_decision(self._log, request, outcome, context)
        if isinstance(outcome, ServiceError):
            await context.abort_with_status(outcome.to_grpc_status(trailer))
        context.set_trailing_metadata(trailer)
        return outcome

    async def EvaluateStream(
        self,
        request_iterator: AsyncIterator[decision_service_pb2.EvaluateRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[decision_service_pb2.EvaluateStreamResponse]:
        async for request in request_iterator:
            outcome = self._evaluate("EvaluateStream", request, context)
            if self._log is not None and not isinstance(outcome, ServiceError):
                outcome = await log_decision(self._log, request, outcome, context)
            if isinstance(outcome, ServiceError):
                if outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED:
                    await context.abort_with_status(outcome.to_grpc_status())
                yield decision_service_pb2.EvaluateStreamResponse(
                    correlation_id=request.correlation_id, error=outcome.to_status_proto()
                )
            else:
                yield decision_service_pb2.EvaluateStreamResponse(
                    correlation_id=request.correlation_id, decision=outcome
                )

    async def ListRulesets(
        self, request: decision_service_pb2.ListRulesetsRequest, context: grpc.aio.ServicerContext
    ) -> decision_service_pb2.ListRulesetsResponse:
        outcome = _guard("ListRulesets", "", self._engine.list_rulesets)
        if isinstance(outcome, ServiceError):
            await context.abort_with_status(outcome.to_grpc_status())
        return outcome

    async def GetRuleset(
        self, request: decision_service_pb2.GetRulesetRequest, context: grpc.aio.ServicerContext
    ) -> ruleset_pb2.Ruleset:
        outcome = _guard("GetRuleset", "", lambda: self._engine.get_ruleset(request.id, request.version))
        if isinstance(outcome, ServiceError):
            await context.abort_with_status(outcome.to_grpc_status())
        return outcome

    async def Explain(
        self, request: decision_service_pb2.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> decision_service_pb2.ExplainResponse:
        outcome = _guard("Explain", request.request.correlation_id, lambda: self._engine.explain(request))
        if isinstance(outcome, ServiceError):
            await context.abort_with_status(outcome.to_grpc_status())
        return outcome

    def _evaluate(
        self, method: str, request: decision_service_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> decision_pb2.Decision | ServiceError:
        """One evaluation, inline, unless the caller's deadline has already passed."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            log.info("%s DEADLINE_EXCEEDED correlation_id=%r", method, request.correlation_id)
            return ServiceError.deadline_exceeded()
        return _guard(method, request.correlation_id, lambda: self._engine.evaluate(request))


def _guard(method: str, correlation_id: str, call: Callable[[], T]) -> T | ServiceError:
    """``call()``, or the ServiceError it raised, or INTERNAL for anything else (logged)."""
    try:
        return call()
    except ServiceError as exc:
        fields = ",".join(v.field for v in exc.violations) or "-"
        log.info("%s %s correlation_id=%r fields=%s", method, exc.code.name, correlation_id, fields)
        return exc
    except Exception:
        log.exception("%s failed with an unexpected error, correlation_id=%r", method, correlation_id)
        return ServiceError.internal()


@dataclass
class RunningServer:
    """A started server, its health servicer and the port it is bound to."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, refuse new calls, and let in-flight calls finish for ``grace`` s."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def server_options(*, reuse_port: bool) -> list[tuple[str, int]]:
    """The channel options of the server: message limits and SO_REUSEPORT."""
    return [
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


async def start_server(engine: Engine, address: str, *, reuse_port: bool = True, decision_log: DecisionLog | None = None) -> RunningServer:
    """Bind ``address`` (``host:port``; port 0 picks one), start serving the decision service,
    health and reflection, and report SERVING. Raises RuntimeError if the address cannot be bound."""
    server = grpc.aio.server(options=server_options(reuse_port=reuse_port))
    decision_service_pb2_grpc.add_DecisionServiceServicer_to_server(DecisionServicer(engine, decision_log), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(services, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, health_servicer, port)
