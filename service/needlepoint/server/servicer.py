"""The gRPC servicer (``grpc.aio``) and the server that hosts it with health and reflection.

Evaluation is pure CPU. A common request takes about a millisecond, so it runs inline in the
coroutine: handing it to an executor would cost more than it saves. A large one (over
``LARGE_REQUEST_BYTES``) runs on a heavy lane, one thread per worker, so that health checks and
small requests keep their latency while it runs; and every evaluation stops at the next stage
boundary once the caller's deadline has passed. Every RPC ends in a decision, a
:class:`ServiceError` status, or, for a fault of the service, ``INTERNAL`` with a generic message
while the fault is logged and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from needlepoint.limits import LARGE_REQUEST_BYTES, MAX_MESSAGE_BYTES, MAX_TRANSPORT_BYTES, MIB
from needlepoint.security.logsafe import correlation_ref
from needlepoint.security.transport import SecurityConfig, bind, interceptors as security_interceptors
from needlepoint.server import wire
from needlepoint.server.decision_log import log_decision
from needlepoint.server.errors import ServiceError, correlation_id_problem
from needlepoint.server.service import Engine, bundle_and_size
from needlepoint.v1 import decision_pb2, decision_service_pb2, decision_service_pb2_grpc, ruleset_pb2

if TYPE_CHECKING:
    from needlepoint.decisionlog import DecisionLog

log = logging.getLogger(__name__)

SERVICE_NAME = decision_service_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
CORRELATION_ID_KEY = "correlation-id"

T = TypeVar("T")


# A request larger than LARGE_REQUEST_BYTES is evaluated on the heavy lane, a thread of its own,
# so that the event loop keeps answering health checks and small requests while it runs (Python
# switches threads every few milliseconds; the engine's C calls, short because alike facts are
# asserted once, are the only stretches that hold the loop). Smaller requests run inline: a thread
# hop would cost them more than the whole evaluation. One lane per worker: heavy requests queue
# behind each other, and one whose deadline passes while it waits costs nothing.

# How far one EvaluateStream reads and evaluates ahead of the answer being sent, while that answer
# waits for its decision-log commit: another item is read only while fewer than STREAM_WINDOW items
# are unanswered, their requests add up to less than STREAM_WINDOW_BYTES, and none of them is large
# (over LARGE_REQUEST_BYTES). So one stream holds at most STREAM_WINDOW_BYTES of requests plus the
# one item read last (itself at most MAX_MESSAGE_BYTES), and always reads at least one item.
STREAM_WINDOW = 64
STREAM_WINDOW_BYTES = 1 * MIB


class DecisionServicer(decision_service_pb2_grpc.DecisionServiceServicer):
    """``needlepoint.v1.DecisionService`` over an :class:`Engine`."""

    def __init__(self, engine: Engine, decision_log: DecisionLog | None = None) -> None:
        self._engine = engine
        self._heavy_lane = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="needlepoint-heavy")
        self._log = decision_log  # every decision is committed to it before it is answered

    async def Evaluate(  # noqa: N802 - the gRPC method's name
        self, request: decision_service_pb2.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> decision_pb2.Decision:
        # An invalid id goes back nowhere: it is refused (INVALID_ARGUMENT) before evaluation.
        valid = request.correlation_id and correlation_id_problem(request.correlation_id) is None
        trailer = ((CORRELATION_ID_KEY, request.correlation_id),) if valid else ()
        bundle, size = bundle_and_size(request)  # (read once: each read copies the bundle)
        outcome = await self._evaluate("Evaluate", request, context, bundle, size)
        if self._log is not None and not isinstance(outcome, ServiceError):
            outcome = await log_decision(self._log, request, outcome, context)
        if isinstance(outcome, ServiceError):
            await outcome.end_call(context, trailer)
            return None  # type: ignore[return-value]  # (see ServiceError.end_call)
        context.set_trailing_metadata(trailer)
        return outcome

    async def EvaluateStream(  # noqa: N802 - the gRPC method's name
        self,
        request_iterator: AsyncIterator[decision_service_pb2.EvaluateRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[decision_service_pb2.EvaluateStreamResponse]:
        """Answers in request order, each only once its decision is committed to the log; but
        items are read and evaluated ahead (within :class:`_ReadAhead`'s window) while earlier ones
        wait for their commit, so that one stream shares group commits instead of paying one per
        item. Once the call's deadline has passed nothing more is evaluated or committed: the
        first item that meets it is answered DEADLINE_EXCEEDED, which ends the stream after the
        answers of every item before it, so an item is answered if and only if it is committed,
        in order (the commits themselves are in request order, one writer taking them as queued).
        But a call cancelled while commits are under way (the client gone, or gRPC ending the call
        at its deadline, which it usually does before this code sees the deadline pass) leaves
        those decisions committed and unanswered: up to one window of them, where Evaluate risks
        one. Every decision answered is logged; a logged decision may not have been answered."""
        pending: asyncio.Queue[tuple[asyncio.Future[decision_service_pb2.EvaluateStreamResponse | ServiceError], int] | None]
        pending = asyncio.Queue()
        window = _ReadAhead()

        async def read() -> None:
            try:
                requests = aiter(request_iterator)
                while True:
                    await window.room()
                    try:
                        request = await anext(requests)
                    except StopAsyncIteration:
                        return
                    bundle, size = (None, 0) if isinstance(request, wire.Rejected) else bundle_and_size(request)
                    window.add(size)
                    pending.put_nowait((asyncio.ensure_future(self._stream_item(request, context, bundle, size)), size))
            finally:
                pending.put_nowait(None)  # (unbounded: never blocks)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await pending.get()) is not None:
                answer = await item[0]
                window.answered(item[1])
                if isinstance(answer, ServiceError):  # a deadline ends the stream
                    await context.abort_with_status(answer.to_grpc_status())
                yield answer
            await reader  # an error reading the requests ends the call with it
        finally:
            reader.cancel()
            while not pending.empty():
                if (item := pending.get_nowait()) is not None:
                    item[0].cancel()

    async def _stream_item(
        self,
        request: decision_service_pb2.EvaluateRequest | wire.Rejected,
        context: grpc.aio.ServicerContext,
        bundle: bytes | None,
        size: int,
    ) -> decision_service_pb2.EvaluateStreamResponse | ServiceError:
        """One EvaluateStream answer, after its decision's commit; or DEADLINE_EXCEEDED, which
        ends the stream: before the evaluation, or after it when the deadline passed meanwhile
        (then the decision is not committed, since it would never be answered)."""
        if isinstance(request, wire.Rejected):  # unreadable or oversized: its own error, go on
            log.info("EvaluateStream %s unreadable item (%d bytes)", request.error.code.name, request.size)
            return decision_service_pb2.EvaluateStreamResponse(error=request.error.to_status_proto())
        outcome = await self._evaluate("EvaluateStream", request, context, bundle, size)
        del bundle  # (not held while the commit is awaited)
        if not isinstance(outcome, ServiceError) and _deadline_passed(context):
            log.info("EvaluateStream DEADLINE_EXCEEDED correlation=%s", correlation_ref(request.correlation_id))
            outcome = ServiceError.deadline_exceeded("during")
        if self._log is not None and not isinstance(outcome, ServiceError):
            outcome = await log_decision(self._log, request, outcome, context)
        if isinstance(outcome, ServiceError):
            if outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return outcome
            # An invalid correlation id is not echoed: the answer's position identifies it.
            echoed = "" if correlation_id_problem(request.correlation_id) else request.correlation_id
            return decision_service_pb2.EvaluateStreamResponse(correlation_id=echoed, error=outcome.to_status_proto())
        return decision_service_pb2.EvaluateStreamResponse(correlation_id=request.correlation_id, decision=outcome)

    async def ListRulesets(  # noqa: N802 - the gRPC method's name
        self, request: decision_service_pb2.ListRulesetsRequest, context: grpc.aio.ServicerContext
    ) -> decision_service_pb2.ListRulesetsResponse:
        outcome = _guard("ListRulesets", "", self._engine.list_rulesets)
        if isinstance(outcome, ServiceError):
            await outcome.end_call(context)
            return None  # type: ignore[return-value]
        return outcome

    async def GetRuleset(  # noqa: N802 - the gRPC method's name
        self, request: decision_service_pb2.GetRulesetRequest, context: grpc.aio.ServicerContext
    ) -> ruleset_pb2.Ruleset:
        outcome = _guard("GetRuleset", "", lambda: self._engine.get_ruleset(request.id, request.version))
        if isinstance(outcome, ServiceError):
            await outcome.end_call(context)
            return None  # type: ignore[return-value]
        return outcome

    async def Explain(  # noqa: N802 - the gRPC method's name
        self, request: decision_service_pb2.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> decision_service_pb2.ExplainResponse:
        call = functools.partial(_guard, "Explain", request.request.correlation_id, lambda: self._engine.explain(request))
        outcome = await self._run(call, heavy=bundle_and_size(request.request)[1] > LARGE_REQUEST_BYTES)
        if isinstance(outcome, ServiceError):
            await outcome.end_call(context)
            return None  # type: ignore[return-value]
        return outcome

    async def _evaluate(
        self,
        method: str,
        request: decision_service_pb2.EvaluateRequest,
        context: grpc.aio.ServicerContext,
        bundle: bytes | None,
        size: int,
    ) -> decision_pb2.Decision | ServiceError:
        """One evaluation, unless the caller's deadline has already passed: inline when small, on
        the heavy lane when large; either way it stops at the next stage once the deadline passes.
        ``bundle`` and ``size``: the request's, as :func:`bundle_and_size` read them (once). A
        correlation id that cannot travel in a trailer or a log line is INVALID_ARGUMENT
        (``correlation_id``)."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            log.info("%s DEADLINE_EXCEEDED correlation=%s", method, correlation_ref(request.correlation_id))
            return ServiceError.deadline_exceeded()
        deadline = time.monotonic() + remaining if remaining is not None else None
        call = functools.partial(
            _guard, method, request.correlation_id, lambda: self._checked_evaluate(request, deadline, (bundle, size))
        )
        return await self._run(call, heavy=size > LARGE_REQUEST_BYTES)

    async def _run(self, call: Callable[[], T], *, heavy: bool) -> T:
        """``call()`` inline, or on the heavy lane while the event loop goes on serving."""
        if not heavy:
            return call()
        return await asyncio.get_running_loop().run_in_executor(self._heavy_lane, call)

    def _checked_evaluate(
        self,
        request: decision_service_pb2.EvaluateRequest,
        deadline: float | None = None,
        read: tuple[bytes | None, int] | None = None,
    ) -> decision_pb2.Decision:
        """The engine's decision, after the correlation id has been checked (``read``: the request's
        bundle and size, as :func:`bundle_and_size` read them)."""
        problem = correlation_id_problem(request.correlation_id)
        if problem is not None:
            raise ServiceError.bad_input("correlation_id", problem)
        if deadline is not None and time.monotonic() >= deadline:  # it waited on the heavy lane too long
            raise ServiceError.deadline_exceeded()
        return self._engine.evaluate(request, deadline=deadline, read=read)


class _ReadAhead:
    """The items of one EvaluateStream read but not yet answered, and whether another may be
    read (see STREAM_WINDOW): always when none is unanswered."""

    def __init__(self, max_items: int = STREAM_WINDOW, max_bytes: int = STREAM_WINDOW_BYTES) -> None:
        self._max_items, self._max_bytes = max_items, max_bytes
        self.items = 0
        self.bytes = 0
        self._large = False  # a large item is unanswered (then it is the last one read)
        self._changed = asyncio.Event()

    def full(self) -> bool:
        return self.items > 0 and (self.items >= self._max_items or self.bytes >= self._max_bytes or self._large)

    async def room(self) -> None:
        """Wait until another item may be read."""
        while self.full():
            self._changed.clear()
            await self._changed.wait()

    def add(self, size: int) -> None:
        self.items += 1
        self.bytes += size
        self._large = self._large or size > LARGE_REQUEST_BYTES

    def answered(self, size: int) -> None:
        """The oldest item (of ``size`` bytes) has been answered."""
        self.items -= 1
        self.bytes -= size
        if self.items == 0:  # nothing is read after a large item until it is answered
            self._large = False
        self._changed.set()


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _guard(method: str, correlation_id: str, call: Callable[[], T]) -> T | ServiceError:
    """``call()``, or the ServiceError it raised, or INTERNAL for anything else (logged). The
    correlation id is logged only as a digest (:func:`correlation_ref`); field paths are capped."""
    try:
        return call()
    except ServiceError as exc:
        fields = ",".join(v.field for v in exc.violations) or "-"
        # An order that is not for us (no order, or not a hip injection) is the common case when
        # an EHR calls for every order: counted in the metrics, logged only at DEBUG.
        level = logging.DEBUG if exc.not_for_us else logging.INFO
        log.log(level, "%s %s correlation=%s fields=%s", method, exc.code.name, correlation_ref(correlation_id), fields)
        return exc
    except Exception:
        log.exception("%s failed with an unexpected error, correlation=%s", method, correlation_ref(correlation_id))
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


MAX_CONNECTION_AGE = 5.0  # seconds a client connection lives before a GOAWAY makes it reconnect
MAX_CONNECTION_AGE_GRACE = 30.0  # seconds the calls on an aged connection get to finish


def server_options(
    *,
    reuse_port: bool,
    max_connection_age: float = MAX_CONNECTION_AGE,
    max_connection_age_grace: float = MAX_CONNECTION_AGE_GRACE,
) -> list[tuple[str, int]]:
    """The channel options of the server: message limits, SO_REUSEPORT, and a maximum connection
    age, so that clients reconnect now and then and the kernel spreads them again across the
    workers, a replaced one included (0 turns the age limit off)."""
    options = [
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_receive_message_length", MAX_TRANSPORT_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]
    if max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace * 1000)),
        ]
    return options


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server: grpc.aio.Server, services: tuple[str, ...]) -> None:
    """Server reflection as ``grpc.reflection.v1`` and ``v1alpha``. grpcio-reflection ships only
    v1alpha; v1 is the same protocol under another package name, so the v1 service is the v1alpha
    servicer behind the v1 method name (and the v1 file is added to the descriptor pool, so that it
    can be described too)."""
    from grpc_reflection.v1alpha import reflection_pb2
    from grpc_reflection.v1alpha._async import ReflectionServicer

    _add_reflection_v1_descriptor()
    names = (*services, reflection.SERVICE_NAME, REFLECTION_V1)
    reflection.enable_server_reflection(names, server)
    servicer = ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),))


def _add_reflection_v1_descriptor() -> None:
    """Add ``grpc/reflection/v1/reflection.proto`` (v1alpha's file renamed) to the default pool once."""
    from google.protobuf import descriptor_pb2, descriptor_pool
    from grpc_reflection.v1alpha import reflection_pb2

    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName("grpc/reflection/v1/reflection.proto")
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    proto.ClearField("options")
    pool.AddSerializedFile(proto.SerializeToString())


async def start_server(
    engine: Engine, address: str, *, reuse_port: bool = True, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    options: Sequence[tuple[str, int]] | None = None, security: SecurityConfig | None = None,
    decision_log: DecisionLog | None = None,
) -> RunningServer:
    """Bind ``address`` (``host:port``; port 0 picks one), start serving the decision service,
    health and reflection (v1 and v1alpha), and report SERVING. Raises RuntimeError if the address
    cannot be bound. ``options`` replace :func:`server_options`' defaults; ``security`` adds TLS and
    the bearer-token check, which runs before the other ``interceptors``; every decision is
    committed to ``decision_log`` before it is answered."""
    server = grpc.aio.server(
        options=list(options) if options is not None else server_options(reuse_port=reuse_port),
        interceptors=[*security_interceptors(security), *interceptors],
    )
    wire.add_decision_service(DecisionServicer(engine, decision_log), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _enable_reflection(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    port = bind(server, address, security)
    if port == 0:
        raise RuntimeError(f"cannot bind {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, health_servicer, port)
