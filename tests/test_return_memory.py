"""Large requests on the server's road: the bundle read out of the request once, and the memory
they free given back once they add up to ``limits.RETURN_MEMORY_BYTES`` (server/service.py)."""

from __future__ import annotations

import gc
from pathlib import Path

import orjson
import pytest

from needlepoint.cdshooks.discovery import prefetch_templates
from needlepoint.core.record import RecordError
from needlepoint.intake import record_from_request
from needlepoint.limits import LARGE_REQUEST_BYTES, MAX_BUNDLE_BYTES, RETURN_MEMORY_BYTES
from needlepoint.server import service as engine
from needlepoint.v1 import decision_service_pb2, patient_pb2

from .test_observation_filter_roads import HEART_RATE, cds_request, post_cds

ORDER_BUNDLE = Path(__file__).parent / "data" / "fhir" / "hip_injection_order.json"


@pytest.fixture
def returns(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each return of freed memory, counted instead of made (the count starts from nothing)."""
    calls: list[int] = []
    monkeypatch.setattr(engine, "_malloc_trim", calls.append)
    monkeypatch.setattr(engine, "_unreturned", 0)
    return calls


def _large_request(size: int | None) -> None:
    with engine.collector_paused(True, size):
        assert not gc.isenabled()  # the collector is paused while a large request runs
    assert gc.isenabled()


def test_freed_memory_is_given_back_once_large_requests_add_up(returns: list[int]) -> None:
    tenth = RETURN_MEMORY_BYTES // 10 + 1  # a tenth of the mark, and a little more
    for _ in range(9):
        _large_request(tenth)
    assert returns == []
    _large_request(tenth)  # the tenth brings them over the mark
    assert returns == [0]
    for _ in range(9):
        _large_request(tenth)
    assert returns == [0], "the count starts again after a return"


def test_a_request_as_large_as_the_mark_gives_memory_back_at_once(returns: list[int]) -> None:
    _large_request(RETURN_MEMORY_BYTES)
    assert returns == [0]
    _large_request(LARGE_REQUEST_BYTES + 1)
    assert returns == [0]


def test_a_caller_that_cannot_say_how_large_gives_memory_back_each_time(returns: list[int]) -> None:
    _large_request(None)
    _large_request(None)
    assert returns == [0, 0]


def test_small_requests_neither_pause_the_collector_nor_give_memory_back(returns: list[int]) -> None:
    with engine.collector_paused(False, 10 * RETURN_MEMORY_BYTES):
        assert gc.isenabled()
    assert returns == []


def test_a_bundle_read_once_is_mapped_and_limited_as_the_request_is() -> None:
    order = patient_pb2.InjectionOrder(side="left")
    request = decision_service_pb2.EvaluateRequest(fhir_bundle=ORDER_BUNDLE.read_bytes(), order=order)
    once = record_from_request(request, request.fhir_bundle)
    assert once == record_from_request(request)
    assert once.order is not None and once.order.side == "left"  # the request's order applied
    too_big = decision_service_pb2.EvaluateRequest(fhir_bundle=b" " * (MAX_BUNDLE_BYTES + 1))
    with pytest.raises(RecordError, match=r"^fhir_bundle: the bundle is \d+ bytes; the limit is"):
        record_from_request(too_big, too_big.fhir_bundle)


def test_cds_hooks_gives_memory_back_as_the_grpc_road_does(returns: list[int], hip_evaluator) -> None:
    """A large CDS Hooks call (a whole record in its prefetch) counts its declared size, as a gRPC
    request does: two such calls far below the mark give nothing back."""
    engine_ = engine.Engine({"hip-injection": hip_evaluator})
    request = cds_request("order-sign", HEART_RATE, prefetch_templates(hip_evaluator.ruleset))
    results = request["prefetch"]["observations-inr"]["entry"]
    filler = {key: value for key, value in results[-1]["resource"].items() if key != "id"} | {"status": "final"}
    results += [{"resource": {**filler, "id": f"hr-{i}"}} for i in range(LARGE_REQUEST_BYTES // 300)]
    assert len(orjson.dumps(request)) > LARGE_REQUEST_BYTES
    for _ in range(2):
        assert post_cds(engine_, request).status_code == 200
    assert returns == []
