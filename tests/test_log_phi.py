"""The server's log never carries patient data.

Every fixture bundle (tests/data/fhir and the Synthea patients in ../shared/fixtures/synthea) goes
through a real ``needlepoint serve`` at DEBUG level, on every road the API has: Evaluate,
EvaluateStream and Explain, good requests and bad ones, with the patient's own identifiers put
where a careless caller might put them (correlation ids, rule-set ids, malformed field values).
Then everything the server wrote is searched for every identifier of every fixture: Patient.id,
names, birth dates, identifier, telecom and address values, and resource ids.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from needlepoint.v1 import decision_service_pb2, decision_service_pb2_grpc, patient_pb2

if TYPE_CHECKING:
    from conftest import ServerProcess

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
SYNTHEA = TESTS.parent.parent / "shared" / "fixtures" / "synthea"
ORDER = patient_pb2.InjectionOrder(target="hip-intra-articular", side="right", intent="therapeutic")
TIMEOUT = 30.0
MIN_LENGTH = 4  # shorter strings ("F", "MA") would match by chance; no identifier here is that short
MIN_NUMBER_LENGTH = 8  # a shorter bare number ("93470") could be a pid or a count in any log line


def fixture_paths() -> list[Path]:
    paths = sorted((TESTS / "data" / "fhir").glob("*.json")) + sorted(SYNTHEA.glob("*.json"))
    assert len(paths) >= 4, "fixtures missing"
    return paths


def _texts(items: Any, *keys: str) -> Iterator[str]:
    """The string values under ``keys`` of every object in ``items`` (lists flattened)."""
    for item in items or []:
        for key in keys:
            value = item.get(key)
            for text in value if isinstance(value, list) else [value]:
                if isinstance(text, str):
                    yield text


def identifiers(bundle: dict[str, Any]) -> set[str]:
    """What identifies the patient of a bundle. Resource ids count when they look like generated
    identifiers (they hold a digit, as UUIDs and numbers do); descriptive ids a fixture author
    invented ("warfarin", "hip-injection") are words of the domain, not identifiers."""
    found: set[str] = set()
    for entry in bundle.get("entry", []):
        url = entry.get("fullUrl", "")
        found.add(url.removeprefix("urn:uuid:"))
        resource = entry.get("resource", {})
        rid = resource.get("id", "")
        if resource.get("resourceType") == "Patient" or any(c.isdigit() for c in rid):
            found.add(rid)
        found.update(_texts(resource.get("identifier"), "value"))
        if resource.get("resourceType") == "Patient":
            names = resource.get("name", [])
            found.update(_texts(names, "given", "family", "text"))
            found.update(" ".join([*n.get("given", []), n.get("family", "")]).strip() for n in names)
            found.add(resource.get("birthDate", ""))
            found.update(_texts(resource.get("telecom"), "value"))
            found.update(_texts(resource.get("address"), "line"))
    return {t for t in found if len(t) >= MIN_LENGTH and (len(t) >= MIN_NUMBER_LENGTH or not t.isdigit())}


def patient_of(bundle: dict[str, Any]) -> dict[str, Any]:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")


def _ts(instant: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(instant)
    return ts


AS_OF = _ts(dt.datetime(2025, 6, 2, 9, tzinfo=dt.timezone.utc))


def requests_for(bundle: dict[str, Any]) -> Iterator[decision_service_pb2.EvaluateRequest]:
    """Good and bad requests about one patient, each carrying the patient's identifiers where a
    caller or a bad record could put them."""
    patient = patient_of(bundle)
    name = " ".join([*patient.get("name", [{}])[0].get("given", []), patient.get("name", [{}])[0].get("family", "")]).strip()
    tags = sorted(identifiers(bundle))
    raw = json.dumps(bundle).encode()

    def request(data: bytes, correlation_id: str, **fields: Any) -> decision_service_pb2.EvaluateRequest:
        return decision_service_pb2.EvaluateRequest(fhir_bundle=data, correlation_id=correlation_id, as_of=AS_OF, **fields)

    yield request(raw, patient["id"], order=ORDER)
    yield request(raw, name or patient["id"])  # the order may be missing: INVALID_ARGUMENT
    yield request(raw, tags[0], order=ORDER, ruleset_id=patient["id"])  # NOT_FOUND
    yield request(raw, tags[-1], order=patient_pb2.InjectionOrder(target=name or "x", side="right", intent=patient["id"]))
    broken = copy.deepcopy(bundle)
    patient_of(broken)["birthDate"] = f"{name} {patient.get('birthDate', '')}"
    yield request(json.dumps(broken).encode(), patient.get("birthDate", "x"), order=ORDER)
    for entry in broken["entry"]:
        if entry["resource"]["resourceType"] == "Observation":
            entry["resource"]["effectiveDateTime"] = patient["id"]
            break
    patient_of(broken)["birthDate"] = patient.get("birthDate", "")
    yield request(json.dumps(broken).encode(), "", order=ORDER)
    yield request(raw[: len(raw) // 2], patient["id"])  # malformed JSON
    context = patient_pb2.PatientContext(birth_date=name or patient["id"], sex=patient["id"], order=ORDER)
    yield decision_service_pb2.EvaluateRequest(context=context, correlation_id=name, as_of=AS_OF)


@pytest.fixture(scope="module")
def logged(server_process: type[ServerProcess]) -> tuple[list[str], set[str]]:
    """Run every fixture through a DEBUG-level server; its whole log (through shutdown), and every
    identifier of every fixture."""
    server = server_process(2, "--log-level", "DEBUG")
    try:
        server.wait_for(r"serving with 2 worker\(s\)", timeout=60)
        bundles = [json.loads(path.read_bytes()) for path in fixture_paths()]
        batch = [request for bundle in bundles for request in requests_for(bundle)]
        outcomes: list[str] = []
        with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = decision_service_pb2_grpc.DecisionServiceStub(channel)
            for request in batch:
                try:
                    stub.Evaluate(request, timeout=TIMEOUT)
                    outcomes.append("OK")
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)
                rule = request.correlation_id or "DEF-INR-HIGH"
                try:
                    stub.Explain(decision_service_pb2.ExplainRequest(request=request, rule_id=rule), timeout=TIMEOUT)
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)
            streamed = list(stub.EvaluateStream(iter(batch), timeout=TIMEOUT * 4))
            assert len(streamed) == len(batch)
            stub.GetRuleset(decision_service_pb2.GetRulesetRequest(id="hip-injection"), timeout=TIMEOUT)
        assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(outcomes), outcomes
    finally:
        code = server.stop()
    assert code == 0, "\n".join(server.lines)
    return server.lines, set().union(*(identifiers(b) for b in bundles))


def test_the_log_has_the_events(logged: tuple[list[str], set[str]]) -> None:
    """The scan below is worth something only if the log recorded the traffic."""
    lines, found = logged
    text = "\n".join(lines)
    assert re.search(r"Evaluate INVALID_ARGUMENT correlation=sha256:[0-9a-f]{16} fields=\S+", text)
    assert re.search(r"Evaluate NOT_FOUND correlation=sha256:[0-9a-f]{16}", text)
    assert "EvaluateStream INVALID_ARGUMENT" in text and "supervisor stopped" in text
    assert len(found) > 500 and {"Mafalda", "Turcotte", "1969-03-05", "999-48-4691", "pat-1"} <= found


def test_no_patient_identifier_appears_in_the_log(logged: tuple[list[str], set[str]]) -> None:
    lines, found = logged
    leaks = sorted({(identifier, line) for line in lines for identifier in found if identifier in line})
    assert not leaks, "patient identifiers in the server log:\n" + "\n".join(f"{i!r}: {line}" for i, line in leaks[:20])
