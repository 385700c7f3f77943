"""Deadlines and isolation: a request past its deadline stops costing CPU, a large request runs
off the event loop while health checks and small requests keep being answered, and a rule set
retired while a thread evaluates on it stays alive until that evaluation ends."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from needlepoint.core.durable import CompiledRules, EngineError
from needlepoint.server.errors import ServiceError
from needlepoint.server.service import Engine
from needlepoint.v1 import decision_service_pb2, decision_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import heavy  # bench/heavy.py builds the large records

ORDER_BUNDLE = Path(__file__).parent / "data" / "fhir" / "hip_injection_order.json"


def _request(bundle: bytes) -> decision_service_pb2.EvaluateRequest:
    request = decision_service_pb2.EvaluateRequest(fhir_bundle=bundle)
    request.as_of.FromJsonString("2025-06-02T09:00:00Z")
    return request


def test_an_evaluation_past_its_deadline_stops_at_the_next_stage() -> None:
    engine = Engine.load()
    request = _request(heavy.bundle("conditions", 2000))
    assert engine.evaluate(request, deadline=time.monotonic() + 60).ruleset.id == "hip-injection"
    with pytest.raises(ServiceError) as caught:  # already past once the record is mapped
        engine.evaluate(request, deadline=time.monotonic() - 1)
    assert caught.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "during evaluation" in caught.value.message


def test_the_core_calls_its_checkpoint_between_stages_and_stops_when_it_raises(hip_evaluator) -> None:
    from needlepoint.fhir.mapper import record_from_bundle

    record = record_from_bundle(ORDER_BUNDLE.read_bytes())
    seen: list[int] = []

    def count() -> None:
        seen.append(1)

    decision = hip_evaluator.evaluate(record, heavy.AS_OF, count)
    assert decision["ruleset"]["id"] == "hip-injection" and len(seen) >= 2

    def stop() -> None:
        raise TimeoutError("the caller gave up")

    with pytest.raises(TimeoutError):
        hip_evaluator.evaluate(record, heavy.AS_OF, stop)


def test_a_rule_set_closed_during_an_evaluation_lives_until_it_ends(monkeypatch) -> None:
    engine = CompiledRules({"r": {"all": [{"m": {"k": "good"}}]}}, pool_size=1)
    entered, release = threading.Event(), threading.Event()
    real_run = CompiledRules._run

    def slow_run(self, facts):
        entered.set()
        release.wait(10)
        return real_run(self, facts)

    monkeypatch.setattr(CompiledRules, "_run", slow_run)
    results: list = []
    worker = threading.Thread(target=lambda: results.append(engine.run([{"k": "good", "_fid": 0}])))
    worker.start()
    assert entered.wait(10)
    engine.close()  # the version is retired while the thread is mid-evaluation
    assert not engine._deleted
    release.set()
    worker.join(10)
    assert [name for name, _ in results[0]] == ["r"]  # the evaluation finished on a live rule set
    assert engine._deleted  # and the last one out deleted it
    with pytest.raises(EngineError, match="closed"):
        engine.run([{"k": "good", "_fid": 0}])


@pytest.mark.slow
def test_small_requests_and_health_checks_are_answered_while_a_large_one_runs(server_process) -> None:
    server = server_process(1)  # one worker: the large request and the small ones share its event loop
    try:
        server.wait_for(r"serving with 1 worker\(s\)", timeout=60)
        large = _request(heavy.bundle("conditions", 25000))  # about 7.4 MB, under the 8 MiB bundle limit
        small = _request(ORDER_BUNDLE.read_bytes())
        with grpc.insecure_channel(server.target) as big_channel, grpc.insecure_channel(
            server.target, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = decision_service_pb2_grpc.DecisionServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            stub.Evaluate(small, timeout=30)  # warm
            finished: list[float] = []
            big = decision_service_pb2_grpc.DecisionServiceStub(big_channel).Evaluate.future(large, timeout=120)
            started = time.monotonic()
            answered_during = 0
            while not big.done():
                assert stub.Evaluate(small, timeout=30).ruleset.id == "hip-injection"
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status
                assert status == health_pb2.HealthCheckResponse.SERVING
                if not big.done():
                    answered_during += 1
            finished.append(time.monotonic() - started)
            assert big.result().ruleset.id == "hip-injection"
            # the large one took a while, and the loop kept answering the others meanwhile
            assert answered_during >= 3, (answered_during, finished)
    finally:
        assert server.stop() == 0
