"""The ``grpc.aio`` server interceptor that requires ``authorization: Bearer <jwt>`` on every call.

A call without a valid token ends with ``UNAUTHENTICATED`` and the fixed message
:data:`UNAUTHENTICATED_MESSAGE`, whatever the reason: a caller learns nothing about why, as CDS
Hooks asks of its bare 401. The reason (a fixed phrase from :class:`TokenError`, never the token)
and the method are logged at INFO. A refused call is aborted before its request is read or
deserialized, so unauthenticated callers cannot make the server parse a bundle.

Methods under ``open_prefixes`` (the health service) pass without a token.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from needlepoint.security.tokens import TokenError, TokenValidator

log = logging.getLogger("needlepoint.security")

UNAUTHENTICATED_MESSAGE = "authentication required"
AUTHORIZATION_KEY = "authorization"


async def _refuse(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
    """The handler of a refused call: abort at once, without reading a request."""
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


# A stream-stream handler without deserializers works for calls of every kind: it never reads.
_REFUSED: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(_refuse)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The token of the one ``authorization: Bearer <token>`` entry. TokenError when there is none,
    more than one, or another scheme."""
    values = [value for key, value in metadata or () if key == AUTHORIZATION_KEY]
    if not values:
        raise TokenError("no bearer token")
    if len(values) > 1:
        raise TokenError("more than one authorization entry")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("no bearer token")
    return token.strip()


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only with a token the validator accepts (or to an open method)."""

    def __init__(self, validator: TokenValidator, *, open_prefixes: Sequence[str] = ()) -> None:
        self._validator = validator
        self._open = tuple(open_prefixes)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The method's own handler for an authenticated (or open) call; a refusing one otherwise,
        also for unknown methods, so that an unauthenticated caller cannot probe which exist."""
        method = handler_call_details.method
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        try:
            await self._validator.validate_async(bearer_token(handler_call_details.invocation_metadata))
        except TokenError as exc:
            log.info("UNAUTHENTICATED %s: %s", method, exc.reason)
            return _REFUSED
        return await continuation(handler_call_details)
