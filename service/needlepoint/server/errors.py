"""Error mapping: the one place where a failure becomes a gRPC status.

Bad input (:class:`~needlepoint.core.record.RecordError`) becomes ``INVALID_ARGUMENT`` whose
message is ``<path>: <problem>`` and whose ``google.rpc.BadRequest`` detail names the same path.
An unknown rule set is ``NOT_FOUND``. Anything unexpected is ``INTERNAL`` with a generic message;
the caller logs the fault. The CLI prints :attr:`ServiceError.message` for in-process evaluations,
so local and remote runs fail with the same words.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from needlepoint.core.record import RecordError

INTERNAL_MESSAGE = "internal error: the fault is logged on the server"
# The trailer that carries the serialized google.rpc.Status (read by grpc_status.rpc_status).
GRPC_DETAILS_METADATA_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One offending field of a request: its path and what is wrong with it."""

    field: str
    description: str


class ServiceError(Exception):
    """A failure with a gRPC status code, a message and the fields at fault."""

    def __init__(self, code: grpc.StatusCode, message: str, violations: Sequence[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = tuple(violations)

    @classmethod
    def bad_input(cls, path: str, problem: str) -> ServiceError:
        """``INVALID_ARGUMENT`` for one field."""
        return cls(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: {problem}", [FieldViolation(path, problem)])

    @classmethod
    def from_record_error(cls, error: RecordError) -> ServiceError:
        return cls.bad_input(error.path, error.message)

    @classmethod
    def not_found(cls, path: str, problem: str) -> ServiceError:
        return cls(grpc.StatusCode.NOT_FOUND, f"{path}: {problem}")

    @classmethod
    def internal(cls) -> ServiceError:
        return cls(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)

    @classmethod
    def deadline_exceeded(cls) -> ServiceError:
        return cls(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before evaluation")

    def to_status_proto(self) -> status_pb2.Status:
        """The ``google.rpc.Status``, with a BadRequest detail when fields are at fault."""
        status = status_pb2.Status(code=_code_number(self.code), message=self.message)
        if self.violations:
            violations = [
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.BadRequest(field_violations=violations))
            status.details.append(detail)
        return status

    def to_grpc_status(self, trailing_metadata: Sequence[tuple[str, str]] = ()) -> grpc.Status:
        """The status to abort an RPC with. The google.rpc.Status travels in the
        ``grpc-status-details-bin`` trailer (as ``grpc_status.rpc_status.to_status`` does), beside
        any other ``trailing_metadata``."""
        details = (GRPC_DETAILS_METADATA_KEY, self.to_status_proto().SerializeToString())
        return _Status(self.code, self.message, (*trailing_metadata, details))


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    """A concrete grpc.Status."""


def _code_number(code: grpc.StatusCode) -> int:
    number = code.value[0]
    assert number != code_pb2.OK, "an error status cannot be OK"
    return number
