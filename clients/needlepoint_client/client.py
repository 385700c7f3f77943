"""A typed, blocking client for ``needlepoint.v1.DecisionService``.

TLS (``tls_ca``, and ``tls_cert``/``tls_key`` for mutual TLS) and a bearer token (``token``: a
string, or a function called for every call, e.g. one that mints a single-use JWT) are options of
the client. Every call has a deadline. Calls that fail with UNAVAILABLE (server starting, restarting a
worker, draining) are retried with exponential back-off by the channel's retry policy; nothing
else is retried, and every method of the service is free of side effects, so a retry is safe.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, Union

import grpc
import orjson
from google.protobuf import json_format, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from needlepoint.v1 import decision_pb2, decision_service_pb2, decision_service_pb2_grpc, patient_pb2, ruleset_pb2

from .errors import NeedlepointError, error_from_rpc, error_from_status

SERVICE_NAME = decision_service_pb2.DESCRIPTOR.services_by_name["DecisionService"].full_name
DEFAULT_TIMEOUT = 10.0  # seconds, per unary call
DEFAULT_STREAM_TIMEOUT = 300.0  # seconds, for a whole EvaluateStream batch
MAX_RETRY_ATTEMPTS = 5  # gRPC's own ceiling on retryPolicy.maxAttempts

T = TypeVar("T")
PemSource = Union[str, "os.PathLike[str]", bytes]  # a PEM file's path, or its bytes


def make_request(
    *,
    fhir_bundle: bytes | str | Mapping[str, Any] | None = None,
    context: patient_pb2.PatientContext | None = None,
    as_of: dt.datetime | None = None,
    order: patient_pb2.InjectionOrder | None = None,
    ruleset_id: str | None = None,
    correlation_id: str = "",
) -> decision_service_pb2.EvaluateRequest:
    """An EvaluateRequest for a bundle (bytes, str or parsed JSON) or a context (exactly one).
    ``as_of`` must be timezone-aware; None means "now" on the server."""
    if (fhir_bundle is None) == (context is None):
        raise ValueError("give exactly one of fhir_bundle and context")
    request = decision_service_pb2.EvaluateRequest(ruleset_id=ruleset_id or "", correlation_id=correlation_id)
    if context is not None:
        request.context.CopyFrom(context)
    elif isinstance(fhir_bundle, bytes):
        request.fhir_bundle = fhir_bundle
    elif isinstance(fhir_bundle, str):
        request.fhir_bundle = fhir_bundle.encode()
    else:
        request.fhir_bundle = orjson.dumps(fhir_bundle)
    if as_of is not None:
        if as_of.tzinfo is None:
            raise ValueError("as_of needs a time zone")
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(as_of)
        request.as_of.CopyFrom(ts)
    if order is not None:
        request.order.CopyFrom(order)
    return request


def decision_to_dict(decision: decision_pb2.Decision) -> dict[str, Any]:
    """The decision as the contract's JSON object (protobuf JSON mapping, empty lists omitted)."""
    return json_format.MessageToDict(decision)


def decision_to_json(decision: decision_pb2.Decision) -> str:
    """The decision as the contract's JSON text, indented by 2."""
    return json.dumps(decision_to_dict(decision), indent=2, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class StreamResult:
    """One answer of :meth:`NeedlepointClient.evaluate_stream`: a decision or an error."""

    correlation_id: str
    decision: decision_pb2.Decision | None
    error: NeedlepointError | None

    @property
    def ok(self) -> bool:
        return self.error is None


def _service_config(retries: int) -> str:
    attempts = min(retries + 1, MAX_RETRY_ATTEMPTS)
    method: dict[str, Any] = {"name": [{"service": SERVICE_NAME}, {"service": "grpc.health.v1.Health"}]}
    if attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": attempts,
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method]})


class NeedlepointClient:
    """A connection to a Needlepoint server at ``target`` (``host:port``).

    ``timeout`` is the deadline of each unary call in seconds, ``stream_timeout`` that of a whole
    batch; ``retries`` is how often a call failing with UNAVAILABLE is tried again (at most 4, the
    ceiling of gRPC's retry policy).

    Security: ``tls_ca`` (a PEM file's path, or PEM bytes) makes the connection TLS and trusts that
    CA; ``tls_cert`` and ``tls_key`` add a client certificate (mutual TLS). For TLS trusting the
    system's CAs pass ``credentials=grpc.ssl_channel_credentials()``. ``token`` is sent as
    ``authorization: Bearer <token>`` with every call: a string, or a function returning one, called
    per call (a server that checks ``jti`` accepts each token once). A server that refuses the
    token answers UNAUTHENTICATED (a NeedlepointError). Use as a context manager, or call
    :meth:`close`. Failed calls
    raise :class:`~needlepoint_client.errors.EvaluationError` for input the server cannot evaluate
    and :class:`~needlepoint_client.errors.NeedlepointError` for everything else.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        stream_timeout: float = DEFAULT_STREAM_TIMEOUT,
        retries: int = 3,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls_ca: PemSource | None = None,
        tls_cert: PemSource | None = None,
        tls_key: PemSource | None = None,
        token: str | Callable[[], str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        self._token = token
        channel_options = [("grpc.enable_retries", 1), ("grpc.service_config", _service_config(retries)), *options]
        if tls_ca is not None or tls_cert is not None or tls_key is not None:
            if credentials is not None:
                raise ValueError("give credentials or tls_ca/tls_cert/tls_key, not both")
            credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        self._stub = decision_service_pb2_grpc.DecisionServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> NeedlepointClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of one call: the bearer token, if any (a token function is called now)."""
        if self._token is None:
            return ()
        token = self._token() if callable(self._token) else self._token
        return (("authorization", f"Bearer {token}"),)

    def evaluate(
        self, request: decision_service_pb2.EvaluateRequest, *, timeout: float | None = None
    ) -> decision_pb2.Decision:
        """The decision for a prepared request (see :func:`make_request`)."""
        return _call(lambda: self._stub.Evaluate(request, timeout=timeout or self.timeout, metadata=self._metadata()))

    def evaluate_bundle(
        self,
        bundle: bytes | str | Mapping[str, Any],
        *,
        as_of: dt.datetime | None = None,
        order: patient_pb2.InjectionOrder | None = None,
        ruleset_id: str | None = None,
        correlation_id: str = "",
        timeout: float | None = None,
    ) -> decision_pb2.Decision:
        """The decision for a FHIR R4 Bundle (JSON bytes or text, or parsed JSON)."""
        request = make_request(
            fhir_bundle=bundle, as_of=as_of, order=order, ruleset_id=ruleset_id, correlation_id=correlation_id
        )
        return self.evaluate(request, timeout=timeout)

    def evaluate_context(
        self,
        context: patient_pb2.PatientContext,
        *,
        as_of: dt.datetime | None = None,
        order: patient_pb2.InjectionOrder | None = None,
        ruleset_id: str | None = None,
        correlation_id: str = "",
        timeout: float | None = None,
    ) -> decision_pb2.Decision:
        """The decision for a typed patient context."""
        request = make_request(
            context=context, as_of=as_of, order=order, ruleset_id=ruleset_id, correlation_id=correlation_id
        )
        return self.evaluate(request, timeout=timeout)

    def evaluate_stream(
        self, requests: Iterable[decision_service_pb2.EvaluateRequest], *, timeout: float | None = None
    ) -> Iterator[StreamResult]:
        """One result per request, in request order. A request that cannot be evaluated yields a
        result with ``error`` set; only a failure of the whole call (deadline, server gone) raises."""
        responses = self._stub.EvaluateStream(
            iter(requests), timeout=timeout or self.stream_timeout, metadata=self._metadata()
        )
        try:
            for response in responses:
                if response.WhichOneof("outcome") == "decision":
                    yield StreamResult(response.correlation_id, response.decision, None)
                else:
                    yield StreamResult(response.correlation_id, None, error_from_status(response.error))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            responses.cancel()

    def list_rulesets(self, *, timeout: float | None = None) -> list[ruleset_pb2.Ruleset]:
        """The loaded rule sets (header fields only)."""
        request = decision_service_pb2.ListRulesetsRequest()
        return list(
            _call(lambda: self._stub.ListRulesets(request, timeout=timeout or self.timeout, metadata=self._metadata())).rulesets
        )

    def get_ruleset(self, ruleset_id: str, *, version: str = "", timeout: float | None = None) -> ruleset_pb2.Ruleset:
        """One rule set (the version serving, or ``version``) with its rules, evidence, parameters
        in force, and the outcome of its last hot reload."""
        request = decision_service_pb2.GetRulesetRequest(id=ruleset_id, version=version)
        return _call(lambda: self._stub.GetRuleset(request, timeout=timeout or self.timeout, metadata=self._metadata()))

    def explain(
        self, request: decision_service_pb2.EvaluateRequest, *, rule_id: str = "", timeout: float | None = None
    ) -> decision_service_pb2.ExplainResponse:
        """Why ``rule_id`` did or did not fire for this evaluation, and what would change each deferral."""
        explain_request = decision_service_pb2.ExplainRequest(request=request, rule_id=rule_id)
        return _call(lambda: self._stub.Explain(explain_request, timeout=timeout or self.timeout, metadata=self._metadata()))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health status name, e.g. ``SERVING`` (``service`` "" is the server as a
        whole; ``needlepoint.v1.DecisionService`` the decision service)."""
        request = health_pb2.HealthCheckRequest(service=service)
        check = self._health.Check  # type: ignore[attr-defined]  # types-grpcio-health-checking's HealthStub omits its methods
        response = _call(lambda: check(request, timeout=timeout or self.timeout, metadata=self._metadata()))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def tls_credentials(
    ca: PemSource | None = None, cert: PemSource | None = None, key: PemSource | None = None
) -> grpc.ChannelCredentials:
    """Channel credentials for TLS: trust ``ca`` (None: the system's CAs) and, for mutual TLS,
    present ``cert`` with ``key`` (both or neither). Each is a PEM file's path or PEM bytes."""
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(ca), private_key=_pem(key), certificate_chain=_pem(cert)
    )


def _pem(source: PemSource | None) -> bytes | None:
    """PEM bytes from bytes or from a file's path."""
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as handle:
        return handle.read()


def _call(invoke: Callable[[], T]) -> T:
    try:
        return invoke()
    except grpc.RpcError as exc:
        raise error_from_rpc(exc) from None
