"""End to end over gRPC: the cheap "not for us" answer. An order that is not a hip injection is
refused ``INVALID_ARGUMENT`` at ``order.target`` and a bundle without any order at ``order``, as
before, but from the draft orders alone; neither is a decision, so neither is logged, while a hip
injection order in the same stream is decided and logged. An order given beside the bundle still
decides."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from grpc_status import rpc_status

from needlepoint.core.record import NO_ORDER_PROBLEM
from needlepoint.fhir.mapper import NOT_HIP_PROBLEM
from needlepoint.v1 import decision_service_pb2, decision_service_pb2_grpc, patient_pb2
from needlepoint_client.errors import error_from_status
from tests.bundles import NOT_FOR_US_ORDERS, not_for_us_bundle, random_bundles
from tests.patients import AS_OF

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def logged_server(tmp_path_factory, server_process) -> Iterator[tuple[object, Path]]:
    database = tmp_path_factory.mktemp("decisions") / "decisions.sqlite3"
    server = server_process(2, "--database", str(database))
    try:
        server.wait_for(r"worker 1 pid \d+ serving", timeout=120)
        yield server, database
    finally:
        assert server.stop() == 0


@pytest.fixture(scope="module")
def stub(logged_server) -> Iterator[decision_service_pb2_grpc.DecisionServiceStub]:
    server, _ = logged_server
    with grpc.insecure_channel(server.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        yield decision_service_pb2_grpc.DecisionServiceStub(channel)


def request(bundle: dict, **fields) -> decision_service_pb2.EvaluateRequest:
    message = decision_service_pb2.EvaluateRequest(fhir_bundle=orjson.dumps(bundle), **fields)
    message.as_of.FromDatetime(AS_OF)
    return message


def violations(status) -> list[str]:
    """The fields a google.rpc.Status names, read as the Python client reads them."""
    return [v.field for v in error_from_status(status).field_violations]


def logged(database: Path) -> int:
    with sqlite3.connect(database) as db:
        return db.execute("select count(*) from decisions").fetchone()[0]


@pytest.mark.parametrize("kind", range(len(NOT_FOR_US_ORDERS)), ids=["knee-injection", "spine-mri", "blood-test"])
def test_an_order_that_is_not_a_hip_injection_is_refused_at_order_target(stub, logged_server, kind: int) -> None:
    _, database = logged_server
    before = logged(database)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(request(not_for_us_bundle(random.Random(kind), kind)), timeout=10)
    error = caught.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"order.target: {NOT_HIP_PROBLEM}"
    assert violations(rpc_status.from_call(error)) == ["order.target"]
    assert logged(database) == before  # not a decision: nothing to log


def test_a_bundle_without_an_order_is_refused_at_order(stub) -> None:
    bundle = random_bundles(1, seed=3)[0]
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"].get("status") != "draft"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.Evaluate(request(bundle), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"order: {NO_ORDER_PROBLEM}"


def test_an_order_beside_the_bundle_still_decides(stub) -> None:
    order = patient_pb2.InjectionOrder(target="hip-intra-articular", side="right", intent="therapeutic")
    decision = stub.Evaluate(request(not_for_us_bundle(random.Random(5), 0), order=order), timeout=10)
    assert decision.ruleset.id == "hip-injection" and decision.decision_id


def test_a_stream_refuses_the_not_for_us_items_and_decides_the_rest(stub, logged_server) -> None:
    _, database = logged_server
    before = logged(database)
    rng = random.Random(9)
    hips = random_bundles(6, seed=9)
    items = []
    for i, bundle in enumerate(hips):
        items.append(request(bundle, correlation_id=f"hip-{i}"))
        items.append(request(not_for_us_bundle(rng, i), correlation_id=f"other-{i}"))
    answers = list(stub.EvaluateStream(iter(items), timeout=30))
    assert [a.correlation_id for a in answers] == [m.correlation_id for m in items]
    for answer in answers:
        if answer.correlation_id.startswith("hip-"):
            assert answer.HasField("decision")
        else:
            assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            assert violations(answer.error) == ["order.target"]
    assert logged(database) == before + len(hips)  # every decision answered is logged, and only those
