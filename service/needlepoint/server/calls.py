"""Every call through one gate: drained on shutdown, counted for the metrics.

:class:`CallGate` is a ``grpc.aio`` server interceptor. While serving it only counts the calls
of the decision service in flight and records each finished call's status and latency, and each
decision's outcome. When the worker drains (:meth:`CallGate.drain`), calls of the decision
service dispatched from then on are answered ``UNAVAILABLE`` at once, which clients retry, while
the calls already dispatched finish; :meth:`CallGate.idle` waits for them. Health and reflection
are neither gated nor waited for.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from needlepoint.server import metrics
from needlepoint.v1 import decision_pb2, decision_service_pb2

SERVICE_PREFIX = "/needlepoint.v1.DecisionService/"
DRAINING_MESSAGE = "the server is shutting down; retry"

_HARD = decision_pb2.Severity.Value("HARD")
_PROCEDURE = decision_pb2.Deferral.Scope.Value("PROCEDURE")


def decision_outcome(decision: decision_pb2.Decision) -> str:
    """``defer`` (a hard deferral of the procedure), ``review`` (a soft one) or ``proceed``."""
    whole = [d for d in decision.deferrals if d.scope == _PROCEDURE]
    if any(d.severity == _HARD for d in whole):
        return "defer"
    return "review" if whole else "proceed"


def _count_decision(response: Any) -> None:
    if isinstance(response, decision_service_pb2.EvaluateStreamResponse):
        if not response.HasField("decision"):
            return
        response = response.decision
    if isinstance(response, decision_pb2.Decision):
        metrics.decision(response.ruleset.id, response.ruleset.version, decision_outcome(response))


def _code_name(context: grpc.aio.ServicerContext, default: str) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else default


class CallGate(grpc.aio.ServerInterceptor):
    """Counts decision-service calls in flight, answers UNAVAILABLE once draining, records metrics."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def drain(self) -> None:
        """From now on, decision-service calls not yet dispatched are answered UNAVAILABLE."""
        self.draining = True

    async def idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the calls in flight to finish; whether they did."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def _admit(self, method: str, gated: bool, context: grpc.aio.ServicerContext) -> float:
        """Let a call in: a gated one is answered UNAVAILABLE once draining, else counted in flight.
        When it started."""
        if gated and self.draining:
            metrics.observe_call(method, "UNAVAILABLE", 0.0)
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        started = time.perf_counter()
        if gated:
            self._enter()
        metrics.call_started()
        return started

    def _finish(self, method: str, gated: bool, code: str, started: float) -> None:
        """A call let in by :meth:`_admit` has ended with ``code``."""
        if gated:
            self._leave()
        metrics.observe_call(method, code, time.perf_counter() - started)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.lstrip("/")
        gated = details.method.startswith(SERVICE_PREFIX)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method, gated), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method, gated), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method, gated), handler.request_deserializer, handler.response_serializer
            )
        assert handler.stream_stream is not None  # a method handler has exactly one of the four behaviours
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.stream_stream, method, gated), handler.request_deserializer, handler.response_serializer
        )

    def _unary(self, behavior: Callable[..., Any], method: str, gated: bool) -> Callable[..., Awaitable[Any]]:
        """Wrap a behaviour with one answer."""

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started, code = await self._admit(method, gated, context), "UNKNOWN"
            try:
                response = behavior(request, context)
                if inspect.isawaitable(response):
                    response = await response
                code = _code_name(context, "OK")
                _count_decision(response)
                return response
            except grpc.aio.AbortError:
                code = _code_name(context, "UNKNOWN")
                raise
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                self._finish(method, gated, code, started)

        return call

    def _stream(self, behavior: Callable[..., Any], method: str, gated: bool) -> Callable[..., AsyncIterator[Any]]:
        """Wrap a behaviour that answers with a stream."""

        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started, code = await self._admit(method, gated, context), "UNKNOWN"
            try:
                answers = behavior(request, context)
                if inspect.isawaitable(answers):  # a behaviour that writes with context.write
                    await answers
                else:
                    async for answer in _aiter(answers):
                        _count_decision(answer)
                        yield answer
                code = _code_name(context, "OK")
            except grpc.aio.AbortError:
                code = _code_name(context, "UNKNOWN")
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            finally:
                self._finish(method, gated, code, started)

        return call


async def _aiter(answers: Any) -> AsyncIterator[Any]:
    """An async iterator over an async or plain iterator."""
    if hasattr(answers, "__aiter__"):
        async for answer in answers:
            yield answer
    else:
        for answer in answers:
            yield answer
