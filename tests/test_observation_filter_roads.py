"""Every road that decides maps only the Observations its rule set reads (``Evaluator.observation_codes``).

The probe is a malformed Observation (``"status": 5``) of a code no rule reads (LOINC 8867-4, heart
rate). A road that passes its evaluator's ``observation_codes`` to the FHIR mapper never looks at
it, and decides as usual; the same Observation coded as an INR (LOINC 6301-6, read) is mapped, and
refused naming its ``status``. A road whose wiring is lost maps the heart rate too, and refuses the
first request: each test below then fails.

Roads: CDS Hooks (the real ASGI app, both hooks), batch (``needlepoint batch`` on a folder of
Bundles and on a Bulk Data export) and the service (``Engine.evaluate``, the gRPC and in-process
road) with a Bundle large enough to be read lazily.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from pathlib import Path

import grpc
import httpx
import orjson
import pytest
from click.testing import CliRunner
from google.protobuf import timestamp_pb2

from needlepoint.batch import bulk, output
from needlepoint.cdshooks.app import DECISION_HEADER, create_app
from needlepoint.cdshooks.discovery import prefetch_templates
from needlepoint.cli import main
from needlepoint.core.record import RecordError
from needlepoint.fhir import mapper
from needlepoint.server.errors import ServiceError
from needlepoint.server.service import Engine
from needlepoint.v1 import decision_pb2, decision_service_pb2

from .test_cdshooks_http import checked, full_prefetch, hip_order, hook_request, outcome
from .test_lazy_bundle import padded

HAND_MADE = Path(__file__).resolve().parent / "data" / "fhir" / "hip_injection_order.json"
LOINC = "http://loinc.org"
HEART_RATE, INR = "8867-4", "6301-6"
AS_OF = dt.datetime(2025, 6, 2, 9, 0, tzinfo=dt.timezone.utc)  # the hand-made bundle's INR (30 May) is current
AS_OF_TEXT = "2025-06-02T09:00:00Z"
BROKEN_ID = "broken-probe"


@pytest.fixture(scope="module")
def read_codes(engine: Engine) -> frozenset[tuple[str, str]]:
    return engine.evaluator("hip-injection").observation_codes


def test_the_probe_codes_are_one_unread_and_one_read(read_codes: frozenset[tuple[str, str]]) -> None:
    assert ("loinc", HEART_RATE) not in read_codes
    assert ("loinc", INR) in read_codes


def broken_observation(code: str, patient: str = "Patient/pat-1") -> dict:
    """An Observation the mapping refuses (a number for ``status``), coded ``code``."""
    return {
        "resourceType": "Observation",
        "id": BROKEN_ID,
        "status": 5,
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": patient},
        "effectiveDateTime": "2025-06-01T08:00:00Z",
        "valueQuantity": {"value": 72, "unit": "/min", "system": "http://unitsofmeasure.org", "code": "/min"},
    }


def hand_made() -> dict:
    return orjson.loads(HAND_MADE.read_bytes())


def with_broken(code: str) -> dict:
    """The hand-made hip injection bundle plus the broken Observation coded ``code``."""
    bundle = hand_made()
    bundle["entry"].append({"fullUrl": "urn:uuid:0b6e2a1c-5f3d-4c59-9a0e-0000000000ff", "resource": broken_observation(code)})
    return bundle


def entry_index(bundle: dict) -> int:
    return next(i for i, e in enumerate(bundle["entry"]) if e["resource"].get("id") == BROKEN_ID)


# --- CDS Hooks: the real ASGI app ------------------------------------------------------------------


def cds_request(hook: str, code: str, templates: dict[str, str]) -> dict:
    """A call for a hip injection whose prefetch comes from the hand-made record (as a FHIR server
    would answer each template), with the broken Observation coded ``code`` among the INR search's
    results (a server that ignored the code filter)."""
    resources = [
        e["resource"]
        for e in hand_made()["entry"]
        if not (e["resource"]["resourceType"] == "ServiceRequest" and e["resource"].get("status") == "draft")
    ]
    prefetch = full_prefetch(templates, "pat-1", resources)
    assert prefetch["patient"] is not None and prefetch["observations-inr"]["entry"], "the prefetch carries the record"
    prefetch["observations-inr"]["entry"].append({"resource": broken_observation(code)})
    return hook_request(hook, "pat-1", hip_order("pat-1"), prefetch)


def post_cds(engine: Engine, request: dict) -> httpx.Response:
    app = create_app(engine, insecure_dev=True, clock=lambda: AS_OF)

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://np") as http:
            return await http.post("/cds-services/hip-injection", json=request)

    return asyncio.run(go())


@pytest.mark.parametrize("hook", ["order-select", "order-sign"])
def test_cds_hooks_does_not_map_an_observation_no_rule_reads(engine: Engine, hook: str) -> None:
    templates = prefetch_templates(engine.registry.get("hip-injection").ruleset)

    answer = post_cds(engine, cds_request(hook, HEART_RATE, templates))
    body = checked(answer)  # 200, and valid to the CDS Hooks spec
    assert body["cards"], "a hip injection order always gets guidance"
    assert answer.headers[DECISION_HEADER]

    # the same call with the broken Observation coded as an INR: read, and refused naming its status
    issues = outcome(post_cds(engine, cds_request(hook, INR, templates)), 400)
    assert len(issues) == 1
    (path,) = issues[0]["expression"]
    assert path.startswith("prefetch.observations-inr.entry[") and path.endswith("].resource.status"), path
    assert "expected a string" in issues[0]["diagnostics"]


# --- batch: needlepoint batch on Bundle files and on a Bulk Data export ----------------------------------


def batch(source: Path, out: Path) -> dict[str, dict]:
    result = CliRunner().invoke(main, ["batch", str(source), str(out), "--as-of", AS_OF_TEXT])
    assert result.exit_code == 0, result.output
    return {row["referralId"]: row for row in output.read_rows(out)}


def test_batch_bundle_files_do_not_map_an_observation_no_rule_reads(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "plain.json").write_bytes(HAND_MADE.read_bytes())
    (folder / "unread.json").write_bytes(orjson.dumps(with_broken(HEART_RATE)))
    read = with_broken(INR)
    (folder / "read.json").write_bytes(orjson.dumps(read))

    rows = batch(folder, tmp_path / "out")
    assert set(rows) == {"plain.json", "unread.json", "read.json"}
    plain, unread = rows["plain.json"], rows["unread.json"]
    assert unread["error"] is None and unread["status"] != "error" and unread["decisionId"], unread["error"]
    assert unread["decision"] == plain["decision"]  # the heart rate is no fact: the same decision
    refused = rows["read.json"]
    assert refused["status"] == "error" and refused["decision"] is None
    assert f"Bundle.entry[{entry_index(read)}].resource.status" in refused["error"]
    assert "expected a string" in refused["error"]


def test_batch_bulk_export_does_not_map_an_observation_no_rule_reads(tmp_path: Path) -> None:
    rows = {}
    for code in (HEART_RATE, INR):
        export = tmp_path / f"export-{code}"
        bulk.write_export([with_broken(code)], export)
        rows[code] = batch(export, tmp_path / f"out-{code}")
        assert set(rows[code]) == {"pat-1"}, rows[code]
    unread, read = rows[HEART_RATE]["pat-1"], rows[INR]["pat-1"]
    assert unread["error"] is None and unread["status"] != "error" and unread["decisionId"], unread["error"]
    assert read["status"] == "error" and read["decision"] is None
    # the grouped Bundle's entry is named by its export line
    lines = (tmp_path / f"export-{INR}" / "Observation.ndjson").read_bytes().splitlines()
    line = next(n for n, raw in enumerate(lines, 1) if BROKEN_ID.encode() in raw)
    assert f"Observation.ndjson:{line}.status" in read["error"], read["error"]
    assert "expected a string" in read["error"]


# --- the service road (gRPC, in-process): a Bundle read lazily -------------------------------------------


def evaluate(engine: Engine, raw: bytes) -> decision_pb2.Decision:
    as_of = timestamp_pb2.Timestamp()
    as_of.FromDatetime(AS_OF)
    return engine.evaluate(decision_service_pb2.EvaluateRequest(fhir_bundle=raw, as_of=as_of))


def test_the_service_does_not_map_an_observation_no_rule_reads_in_a_large_bundle(engine: Engine) -> None:
    decision = evaluate(engine, padded(with_broken(HEART_RATE)))
    assert isinstance(decision, decision_pb2.Decision) and decision.decision_id
    assert decision.decision_id == evaluate(engine, padded(hand_made())).decision_id  # the heart rate is no fact

    read = with_broken(INR)
    with pytest.raises(ServiceError) as refused:
        evaluate(engine, padded(read))
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    (violation,) = refused.value.violations
    assert violation.field == f"Bundle.entry[{entry_index(read)}].resource.status"
    assert refused.value.message.startswith(violation.field + ": expected a string")


def test_the_large_bundle_is_refused_when_every_observation_is_mapped(engine: Engine) -> None:
    """The control: mapped without the rule set's codes, the heart rate is refused too (what a road
    that lost its wiring would answer)."""
    raw = padded(with_broken(HEART_RATE))
    with pytest.raises(RecordError) as refused:
        mapper.record_from_bundle_with_hip_order(raw)
    assert refused.value.path == f"Bundle.entry[{entry_index(with_broken(HEART_RATE))}].resource.status"
    assert mapper.record_from_bundle_with_hip_order(raw, observation_codes=engine.evaluator("hip-injection").observation_codes)


def test_the_probe_bundles_differ_only_in_the_code() -> None:
    unread, read = with_broken(HEART_RATE), with_broken(INR)
    assert unread != read
    fixed = copy.deepcopy(read)
    fixed["entry"][entry_index(read)]["resource"]["code"]["coding"][0]["code"] = HEART_RATE
    assert fixed == unread


# --- explaining a decision that was served -----------------------------------------------------


def test_a_decision_served_can_be_explained(engine: Engine) -> None:
    """Explain reads the request as Evaluate did: what Evaluate answered, Explain explains."""
    as_of = timestamp_pb2.Timestamp()
    as_of.FromDatetime(AS_OF)
    for raw in (orjson.dumps(with_broken(HEART_RATE)), padded(with_broken(HEART_RATE))):
        request = decision_service_pb2.EvaluateRequest(fhir_bundle=raw, as_of=as_of)
        assert engine.evaluate(request).decision_id
        explained = engine.explain(decision_service_pb2.ExplainRequest(request=request, rule_id="DEF-INR-HIGH"))
        assert explained.HasField("rule")
    refused = decision_service_pb2.EvaluateRequest(fhir_bundle=orjson.dumps(with_broken(INR)), as_of=as_of)
    with pytest.raises(ServiceError, match="expected a string"):
        engine.explain(decision_service_pb2.ExplainRequest(request=refused))


def test_the_command_line_explains_what_the_service_decided(tmp_path: Path) -> None:
    unread, read = tmp_path / "unread.json", tmp_path / "read.json"
    unread.write_bytes(orjson.dumps(with_broken(HEART_RATE)))
    read.write_bytes(orjson.dumps(with_broken(INR)))
    runner = CliRunner()
    explained = runner.invoke(main, ["explain", str(unread), "--as-of", AS_OF.isoformat(), "--json"])
    assert explained.exit_code == 0, explained.output
    refused = runner.invoke(main, ["explain", str(read), "--as-of", AS_OF.isoformat(), "--json"])
    assert refused.exit_code == 2 and "expected a string" in refused.output
