"""How request bytes become request messages: a deserializer that never raises.

The generated ``add_DecisionServiceServicer_to_server`` registers ``Message.FromString`` as the
request deserializer. When that raises (bytes that are not the message, a message over the size
limit), grpc answers ``UNKNOWN`` naming a Python exception class and logs a traceback for every
such call, and on ``EvaluateStream`` it ends the whole stream. Here the service is registered
with the same methods and serializers, but with a deserializer that turns every failure into a
:class:`Rejected` value carrying the :class:`ServiceError` to answer with:

* more than :data:`~needlepoint.limits.MAX_MESSAGE_BYTES` bytes: ``RESOURCE_EXHAUSTED``;
* bytes that do not decode as the message: ``INVALID_ARGUMENT``;

both with a ``google.rpc.BadRequest`` field violation whose path is the message type, e.g.
``needlepoint.v1.EvaluateRequest``. A unary method answers a Rejected request with its error
(logged on one line, no traceback) before the servicer sees it; ``EvaluateStream`` receives each
Rejected item and answers it in place, and the stream goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from needlepoint.limits import MAX_MESSAGE_BYTES
from needlepoint.server.errors import ServiceError
from needlepoint.v1 import decision_pb2, decision_service_pb2, ruleset_pb2

log = logging.getLogger("needlepoint.server.servicer")

SERVICE_NAME = decision_service_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request message that could not be read, and the error to answer it with."""

    error: ServiceError
    size: int  # bytes received


def lenient_deserializer(message_type: type[Message], limit: int = MAX_MESSAGE_BYTES) -> Callable[[bytes], Any]:
    """A request deserializer for ``message_type`` that returns the message, or a
    :class:`Rejected` for bytes over ``limit`` or bytes that do not decode; it never raises."""
    name = message_type.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Message | Rejected:
        size = len(data)
        if size > limit:
            problem = f"the message is {size} bytes; the limit is {limit} bytes"
            return Rejected(ServiceError.too_large(name, problem), size)
        try:
            return message_type.FromString(data)
        except Exception:  # noqa: BLE001 - DecodeError, and whatever else the decoder may raise on hostile bytes
            problem = "the bytes are not a valid message of this type (protobuf decoding failed)"
            return Rejected(ServiceError.bad_input(name, problem), size)

    return deserialize


UnaryMethod = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _unary(method_name: str, method: UnaryMethod) -> UnaryMethod:
    """``method``, answering a Rejected request with its error instead of calling it."""

    async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Rejected):
            log.info("%s %s unreadable request (%d bytes)", method_name, request.error.code.name, request.size)
            await request.error.end_call(context)
            return None
        return await method(request, context)

    return handle


def add_decision_service(servicer: Any, server: grpc.aio.Server) -> None:
    """Register ``servicer`` (a DecisionServiceServicer) on ``server`` as the generated code does,
    with lenient request deserializers. ``servicer.EvaluateStream`` must accept Rejected items."""
    requests = decision_service_pb2
    handlers = {
        "Evaluate": grpc.unary_unary_rpc_method_handler(
            _unary("Evaluate", servicer.Evaluate),
            request_deserializer=lenient_deserializer(requests.EvaluateRequest),
            response_serializer=decision_pb2.Decision.SerializeToString,
        ),
        "EvaluateStream": grpc.stream_stream_rpc_method_handler(
            servicer.EvaluateStream,
            request_deserializer=lenient_deserializer(requests.EvaluateRequest),
            response_serializer=requests.EvaluateStreamResponse.SerializeToString,
        ),
        "ListRulesets": grpc.unary_unary_rpc_method_handler(
            _unary("ListRulesets", servicer.ListRulesets),
            request_deserializer=lenient_deserializer(requests.ListRulesetsRequest),
            response_serializer=requests.ListRulesetsResponse.SerializeToString,
        ),
        "GetRuleset": grpc.unary_unary_rpc_method_handler(
            _unary("GetRuleset", servicer.GetRuleset),
            request_deserializer=lenient_deserializer(requests.GetRulesetRequest),
            response_serializer=ruleset_pb2.Ruleset.SerializeToString,
        ),
        "Explain": grpc.unary_unary_rpc_method_handler(
            _unary("Explain", servicer.Explain),
            request_deserializer=lenient_deserializer(requests.ExplainRequest),
            response_serializer=requests.ExplainResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
