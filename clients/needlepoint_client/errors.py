"""Typed errors of the Needlepoint client, built from the server's google.rpc.Status."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

_CODES = {code.value[0]: code for code in grpc.StatusCode}
# The codes that mean "your request cannot be evaluated" rather than "the call failed".
_REQUEST_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND})


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One offending field: its path (e.g. ``order.intent``, ``Bundle.entry[3].resource``) and
    what is wrong with it."""

    field: str
    description: str


class NeedlepointError(Exception):
    """A failed call: the gRPC status code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class EvaluationError(NeedlepointError):
    """The request cannot be evaluated (INVALID_ARGUMENT, NOT_FOUND): fix the input, do not retry.
    ``field_violations`` name the fields at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, field_violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(code, message)
        self.field_violations = field_violations


def error_from_status(status: status_pb2.Status) -> NeedlepointError:
    """The typed error of a google.rpc.Status (as in an EvaluateStream item)."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    if code not in _REQUEST_CODES:
        return NeedlepointError(code, status.message)
    violations: list[FieldViolation] = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return EvaluationError(code, status.message, tuple(violations))


def error_from_rpc(error: grpc.RpcError) -> NeedlepointError:
    """The typed error of a failed call, with the details of its status trailer if any."""
    assert isinstance(error, grpc.Call), "a failed call's RpcError is also a grpc.Call"
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # a status trailer that contradicts the call's status
        status = None
    if status is None:
        status = status_pb2.Status(code=error.code().value[0], message=error.details() or "")
    return error_from_status(status)
