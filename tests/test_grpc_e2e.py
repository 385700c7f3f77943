"""End to end: a real ``needlepoint serve`` process (two workers) on loopback, spoken to over the wire
with plain gRPC stubs, so what is checked is what any integrator's client sees."""

from __future__ import annotations

import os
import queue
import re
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
import orjson
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from needlepoint.fhir.mapper import record_from_bundle
from needlepoint.intake import context_from_record
from needlepoint.v1 import decision_pb2, decision_service_pb2, decision_service_pb2_grpc, patient_pb2

if TYPE_CHECKING:
    from conftest import Sample, ServerProcess

pytestmark = pytest.mark.slow

AS_OF = "2025-06-02T09:00:00Z"
SERVICE = "needlepoint.v1.DecisionService"
TIMEOUT = 10.0
TARGET_URI = "http://needlepoint.dev/fhir/CodeSystem/injection-target"
INTENT_URI = "http://needlepoint.dev/fhir/CodeSystem/injection-intent"
CATEGORY_URI = "http://needlepoint.dev/fhir/CodeSystem/injectate-category"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
CPT = "http://www.ama-assn.org/go/cpt"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
RIGHT = "24028007"


# -- one patient, two roads ----------------------------------------------------------------------
# A woman on warfarin with an INR of 3.4 two days ago, hip osteoarthritis, a steroid injection in
# the same hip three months ago, and a therapeutic intra-articular injection of the right hip ordered.


def _concept(system: str, code: str, *more: tuple[str, str]) -> dict[str, Any]:
    return {"coding": [{"system": s, "code": c} for s, c in ((system, code), *more)]}


def synthetic_bundle(intent: str = "therapeutic") -> dict[str, Any]:
    subject = {"reference": "urn:uuid:p1"}
    site = [_concept(TARGET_URI, "hip-intra-articular", (SNOMED, RIGHT))]
    active = _concept("http://terminology.hl7.org/CodeSystem/condition-clinical", "active")
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": "p1", "birthDate": "1958-04-12", "gender": "female"},
        {"resourceType": "Condition", "clinicalStatus": active, "code": _concept(ICD10, "M16.11"), "subject": subject},
        {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
         "medicationCodeableConcept": _concept(RXNORM, "11289"), "subject": subject},
        {"resourceType": "Observation", "status": "final", "code": _concept(LOINC, "6301-6"),
         "effectiveDateTime": "2025-05-31T08:00:00Z", "subject": subject,
         "valueQuantity": {"value": 3.4, "unit": "INR", "system": "http://unitsofmeasure.org", "code": "{INR}"}},
        {"resourceType": "Procedure", "status": "completed", "code": _concept(CPT, "20610"), "subject": subject,
         "performedDateTime": "2025-03-01T10:00:00Z", "bodySite": site, "usedCode": [_concept(ATC, "H02AB08")]},
        {"resourceType": "MedicationRequest", "status": "draft", "intent": "order",
         "medicationCodeableConcept": _concept(CATEGORY_URI, "corticosteroid"), "subject": subject},
        {"resourceType": "ServiceRequest", "status": "draft", "intent": "order", "code": _concept(CPT, "20610"),
         "bodySite": site, "orderDetail": [_concept(INTENT_URI, intent)], "reasonCode": [_concept(ICD10, "M16.11")],
         "subject": subject},
    ]
    entries = [{"fullUrl": f"urn:uuid:{r.get('id', f'r{i}')}", "resource": r} for i, r in enumerate(resources)]
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _ts(text: str) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromJsonString(text)
    return ts


def synthetic_context() -> patient_pb2.PatientContext:
    def c(system: str, code: str) -> patient_pb2.Coding:
        return patient_pb2.Coding(system=system, code=code)

    return patient_pb2.PatientContext(
        birth_date="1958-04-12",
        sex="female",
        conditions=[patient_pb2.Condition(codes=[c(ICD10, "M16.11")])],
        medications=[patient_pb2.Medication(codes=[c(RXNORM, "11289")])],
        observations=[
            patient_pb2.Observation(
                codes=[c(LOINC, "6301-6")], effective=_ts("2025-05-31T08:00:00Z"), value=3.4, unit="{INR}"
            )
        ],
        prior_injections=[
            patient_pb2.PriorInjection(
                codes=[c(CPT, "20610")],
                performed=_ts("2025-03-01T10:00:00Z"),
                target="hip-intra-articular",
                side="right",
                agents=[c(ATC, "H02AB08")],
            )
        ],
        planned_injectates=[patient_pb2.PlannedInjectate(codes=[c(CATEGORY_URI, "corticosteroid")])],
        order=patient_pb2.InjectionOrder(
            target="hip-intra-articular",
            side="right",
            intent="therapeutic",
            codes=[c(CPT, "20610")],
            reasons=[c(ICD10, "M16.11")],
        ),
    )


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channel(grpc_server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_server.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> decision_service_pb2_grpc.DecisionServiceStub:
    return decision_service_pb2_grpc.DecisionServiceStub(channel)


def request(
    bundle: bytes | dict[str, Any] | None = None,
    *,
    context: patient_pb2.PatientContext | None = None,
    order: dict[str, str] | None = None,
    **fields: Any,
) -> decision_service_pb2.EvaluateRequest:
    msg = decision_service_pb2.EvaluateRequest(as_of=_ts(AS_OF), **fields)
    if context is not None:
        msg.context.CopyFrom(context)
    elif bundle is not None:
        msg.fhir_bundle = bundle if isinstance(bundle, bytes) else orjson.dumps(bundle)
    if order is not None:
        msg.order.CopyFrom(patient_pb2.InjectionOrder(**order))
    return msg


def as_dict(decision: decision_pb2.Decision) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(decision)


def field_violations(details: Any) -> list[tuple[str, str]]:
    """The BadRequest field violations of a google.rpc.Status."""
    found = []
    for detail in details.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.extend((v.field, v.description) for v in bad_request.field_violations)
    return found


def rpc_failure(call: Any) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """Run ``call``; it must fail. Its code, message and BadRequest violations."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    status = rpc_status.from_call(error)
    return error.code(), error.details(), field_violations(status) if status else []


def assert_contract_invariants(decision: dict[str, Any]) -> None:
    """Every ruleIds entry names a rule with an explanation, of the decision's rule set."""
    explained = {e["ruleId"] for e in decision["explanations"]}
    items = [decision.get("modality", {}), *(item for key in ("injectates", "deferrals", "cautions", "missingData")
                                              for item in decision.get(key, []))]
    for item in items:
        assert set(item.get("ruleIds", [])) <= explained, item


# -- the service ---------------------------------------------------------------------------------


def test_health_reports_serving(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", SERVICE):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_and_describes_the_service(channel: grpc.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE),
    ]
    listing, described = list(reflection.ServerReflectionInfo(iter(asks), timeout=TIMEOUT))
    names = {s.name for s in listing.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    from google.protobuf import descriptor_pb2

    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    assert "needlepoint/v1/decision_service.proto" in {f.name for f in files}


def test_evaluate_bundle_defers_for_the_missing_inr(
    stub: decision_service_pb2_grpc.DecisionServiceStub, mafalda: Sample
) -> None:
    decision, call = stub.Evaluate.with_call(
        request(mafalda.bundle, order=mafalda.order, correlation_id="mafalda-1"), timeout=TIMEOUT
    )
    body = as_dict(decision)
    assert body["asOf"] == AS_OF
    assert body["ruleset"]["id"] == "hip-injection"
    deferrals = {(d["reason"], d["severity"], d["scope"]) for d in body["deferrals"]}
    assert ("PENDING_DATA", "HARD", "PROCEDURE") in deferrals
    assert "INR" in {m["code"] for m in body["missingData"]}
    assert_contract_invariants(body)
    assert ("correlation-id", "mafalda-1") in tuple(call.trailing_metadata())


def test_the_same_patient_as_bundle_and_as_context_gets_the_same_decision(
    stub: decision_service_pb2_grpc.DecisionServiceStub,
) -> None:
    by_bundle = stub.Evaluate(request(synthetic_bundle()), timeout=TIMEOUT)
    by_context = stub.Evaluate(request(context=synthetic_context()), timeout=TIMEOUT)
    assert as_dict(by_bundle) == as_dict(by_context)
    assert "BLEEDING_RISK" in {d["reason"] for d in as_dict(by_bundle)["deferrals"]}


def test_every_fixture_gets_the_same_decision_on_both_roads(
    stub: decision_service_pb2_grpc.DecisionServiceStub, synthea_bundles: dict[str, bytes], mafalda: Sample
) -> None:
    for name, bundle in synthea_bundles.items():
        record = record_from_bundle(bundle)
        assert not record.data_issues, f"{name}: a context cannot carry data issues"
        by_bundle = stub.Evaluate(request(bundle, order=mafalda.order), timeout=TIMEOUT)
        by_context = stub.Evaluate(request(context=context_from_record(record), order=mafalda.order), timeout=TIMEOUT)
        assert as_dict(by_bundle) == as_dict(by_context), name
        assert_contract_invariants(as_dict(by_bundle))


def test_stream_answers_in_order_and_isolates_bad_items(
    stub: decision_service_pb2_grpc.DecisionServiceStub, mafalda: Sample
) -> None:
    batch = [
        request(mafalda.bundle, order=mafalda.order, correlation_id="a"),
        request(b'{"resourceType": "Bundle",', correlation_id="b"),
        request(context=synthetic_context(), correlation_id="c"),
        request(mafalda.bundle, correlation_id="d"),  # no order anywhere
        request(synthetic_bundle(), ruleset_id="no-such-rules", correlation_id="e"),
        request(synthetic_bundle(), correlation_id="f"),
    ]
    answers = list(stub.EvaluateStream(iter(batch), timeout=TIMEOUT))
    assert [a.correlation_id for a in answers] == ["a", "b", "c", "d", "e", "f"]
    assert [a.WhichOneof("outcome") for a in answers] == ["decision", "error", "decision", "error", "error", "decision"]
    bad_json, no_order, unknown = answers[1].error, answers[3].error, answers[4].error
    assert bad_json.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [f for f, _ in field_violations(bad_json)] == ["Bundle"]
    assert [f for f, _ in field_violations(no_order)] == ["order"]
    assert unknown.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert as_dict(answers[2].decision) == as_dict(answers[5].decision)


def test_rulesets_are_listed_and_described(
    stub: decision_service_pb2_grpc.DecisionServiceStub, mafalda: Sample
) -> None:
    listed = stub.ListRulesets(decision_service_pb2.ListRulesetsRequest(), timeout=TIMEOUT).rulesets
    assert "hip-injection" in [r.id for r in listed]
    header = next(r for r in listed if r.id == "hip-injection")
    assert header.version and header.digest.startswith("sha256:") and header.title and not header.rules
    full = stub.GetRuleset(decision_service_pb2.GetRulesetRequest(id="hip-injection"), timeout=TIMEOUT)
    assert (full.id, full.version, full.digest) == (header.id, header.version, header.digest)
    names = {p.name for p in full.parameters}
    assert full.rules and names
    assert all(set(rule.parameters) <= names for rule in full.rules)
    assert any(rule.evidence for rule in full.rules)
    assert all(p.layer for p in full.parameters)
    decision = stub.Evaluate(request(mafalda.bundle, order=mafalda.order), timeout=TIMEOUT)
    assert decision.ruleset.digest == full.digest
    assert {e.rule_id for e in decision.explanations} <= {r.id for r in full.rules}


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field"),
    [
        pytest.param(lambda m: request(b'{"resourceType": "Bundle",'), "Bundle", id="malformed-json"),
        pytest.param(lambda m: request(m.bundle), "order", id="no-order"),
        pytest.param(
            lambda m: request(synthetic_bundle(intent="curative")),
            "Bundle.entry[6].resource.orderDetail[0].coding[0].code",
            id="unknown-intent-in-bundle",
        ),
        pytest.param(
            lambda m: request(m.bundle, order={**m.order, "intent": "curative"}), "order.intent",
            id="unknown-intent-override",
        ),
        pytest.param(
            lambda m: request(context=patient_pb2.PatientContext(birth_date="12/04/1958")), "context.birth_date",
            id="bad-context",
        ),
        pytest.param(lambda m: decision_service_pb2.EvaluateRequest(), "patient", id="no-patient"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    stub: decision_service_pb2_grpc.DecisionServiceStub, mafalda: Sample, make: Any, field: str
) -> None:
    code, message, violations = rpc_failure(lambda: stub.Evaluate(make(mafalda), timeout=TIMEOUT))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in violations] == [field]
    assert message == f"{field}: {violations[0][1]}"


def test_unknown_ruleset_is_not_found(stub: decision_service_pb2_grpc.DecisionServiceStub) -> None:
    code, message, _ = rpc_failure(
        lambda: stub.Evaluate(request(synthetic_bundle(), ruleset_id="no-such-rules"), timeout=TIMEOUT)
    )
    assert (code, message.split(":")[0]) == (grpc.StatusCode.NOT_FOUND, "ruleset_id")
    code, _, _ = rpc_failure(
        lambda: stub.GetRuleset(decision_service_pb2.GetRulesetRequest(id="no-such-rules"), timeout=TIMEOUT)
    )
    assert code is grpc.StatusCode.NOT_FOUND


def test_oversized_input_is_rejected(stub: decision_service_pb2_grpc.DecisionServiceStub) -> None:
    padding = {"resourceType": "Bundle", "type": "collection", "entry": [], "pad": ""}
    just_over = orjson.dumps({**padding, "pad": "x" * (8 * 1024 * 1024)})
    code, _, violations = rpc_failure(lambda: stub.Evaluate(request(just_over), timeout=TIMEOUT))
    assert (code, [f for f, _ in violations]) == (grpc.StatusCode.INVALID_ARGUMENT, ["fhir_bundle"])
    far_over = b" " * (10 * 1024 * 1024)
    code, _, _ = rpc_failure(lambda: stub.Evaluate(request(far_over), timeout=TIMEOUT))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


# -- the supervisor (last: it replaces a worker) -------------------------------------------------


def test_sigterm_drains_a_call_in_flight(server_process: type[ServerProcess]) -> None:
    server = server_process(workers=1)
    try:
        server.wait_for(r"serving with 1 worker\(s\)", timeout=60)
        pending: queue.Queue[decision_service_pb2.EvaluateRequest | None] = queue.Queue()
        with grpc.insecure_channel(server.target) as channel:
            stub = decision_service_pb2_grpc.DecisionServiceStub(channel)
            answers = stub.EvaluateStream(iter(pending.get, None), timeout=TIMEOUT)
            pending.put(request(synthetic_bundle(), correlation_id="before"))
            assert next(answers).correlation_id == "before"
            mark = len(server.lines)
            server.process.send_signal(signal.SIGTERM)
            server.wait_for("draining", start=mark, timeout=10)
            pending.put(request(synthetic_bundle(), correlation_id="during"))
            during = next(answers)
            assert (during.correlation_id, during.WhichOneof("outcome")) == ("during", "decision")
            pending.put(None)
            assert list(answers) == []
        assert server.process.wait(10) == 0
    finally:
        server.stop()


def test_a_killed_worker_is_replaced_while_the_other_serves(grpc_server: ServerProcess) -> None:
    before = grpc_server.worker_pids()
    assert len(before) == 2
    slot, victim = next(iter(before.items()))
    survivor = next(pid for s, pid in before.items() if s != slot)
    mark = len(grpc_server.lines)
    os.kill(victim, signal.SIGKILL)
    grpc_server.wait_for(rf"worker {slot} pid {victim} died \(signal SIGKILL\)", start=mark, timeout=10)
    replaced = re.compile(rf"worker {slot} pid \d+ serving")
    deadline = time.monotonic() + 30
    while True:
        # Every new connection lands on a live listener: the survivor answers throughout. (A local
        # subchannel pool makes each channel open its own connection instead of reusing, from
        # gRPC's global pool, one to the killed worker that the client has not yet seen close.)
        with grpc.insecure_channel(grpc_server.target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        if any(replaced.search(line) for line in grpc_server.lines[mark:]):
            break
        assert time.monotonic() < deadline, "no replacement worker within 30 s"
        time.sleep(0.05)
    after = grpc_server.worker_pids()
    assert after[slot] != victim and after[1 - slot] == survivor == before[1 - slot]
    os.kill(after[slot], 0)  # alive


def test_explain_through_the_api(grpc_server) -> None:
    import datetime as dt
    import json as _json
    from pathlib import Path

    from needlepoint_client import NeedlepointClient, make_request

    bundle = _json.loads((Path(__file__).parent / "data" / "fhir" / "hip_injection_order.json").read_text())
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Observation" and resource["code"]["coding"][0]["code"] == "6301-6":
            resource["valueQuantity"]["value"] = 3.4
    request = make_request(fhir_bundle=bundle, as_of=dt.datetime(2025, 6, 2, 9, tzinfo=dt.timezone.utc))
    with NeedlepointClient(grpc_server.target) as client:
        explained = client.explain(request, rule_id="DEF-INR-HIGH")
    assert explained.rule.fired and explained.rule.rule_id == "DEF-INR-HIGH"
    conditions = [c for p in explained.rule.alternatives[0].patterns for cand in p.candidates for c in cand.conditions]
    assert any(
        c.condition == "value > $inr_defer_above" and c.threshold == "3.0" and c.saw == "3.4 {INR}" and c.holds
        for c in conditions
    )
    lifting = [c for c in explained.counterfactuals if c.field == "value" and c.rule_id == "DEF-INR-HIGH"]
    assert lifting and lifting[0].lifts_deferral and lifting[0].deferral == "BLEEDING_RISK/PROCEDURE"
