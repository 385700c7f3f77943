"""Python client for Needlepoint's gRPC API (``needlepoint.v1.DecisionService``).

    from needlepoint_client import InjectionOrder, NeedlepointClient, decision_to_json

    with NeedlepointClient("localhost:50051") as client:
        decision = client.evaluate_bundle(
            bundle_bytes,
            order=InjectionOrder(target="hip-intra-articular", side="right", intent="therapeutic"),
        )
        print(decision_to_json(decision))

Over TLS with a bearer token: ``NeedlepointClient(target, tls_ca="ca.pem", token=jwt)``
(``tls_cert``/``tls_key`` for mutual TLS; ``token`` may be a function, called for every call).
"""

from needlepoint.v1.decision_pb2 import Decision
from needlepoint.v1.decision_service_pb2 import EvaluateRequest
from needlepoint.v1.patient_pb2 import Coding, InjectionOrder, PatientContext
from needlepoint.v1.ruleset_pb2 import Ruleset

from .client import (
    NeedlepointClient,
    StreamResult,
    decision_to_dict,
    decision_to_json,
    make_request,
    tls_credentials,
)
from .errors import EvaluationError, FieldViolation, NeedlepointError

__all__ = [
    "Coding",
    "Decision",
    "EvaluateRequest",
    "EvaluationError",
    "FieldViolation",
    "InjectionOrder",
    "NeedlepointClient",
    "NeedlepointError",
    "PatientContext",
    "Ruleset",
    "StreamResult",
    "decision_to_dict",
    "decision_to_json",
    "make_request",
    "tls_credentials",
]
