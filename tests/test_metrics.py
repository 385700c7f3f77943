"""The Prometheus endpoint of ``serve --metrics-port``, scraped from a real server: request counts by
method and status, latency histograms, decisions by outcome and rule-set version, reload outcomes
and worker restarts, summed over the worker processes (a killed worker's counts included)."""

from __future__ import annotations

import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from needlepoint.rulesets import bundled_rulesets_dir
from needlepoint.v1 import decision_service_pb2, decision_service_pb2_grpc

pytestmark = pytest.mark.slow

BUNDLE = Path(__file__).parent / "data" / "fhir" / "hip_injection_order.json"
EVALUATE = "needlepoint.v1.DecisionService/Evaluate"


def _request(**fields) -> decision_service_pb2.EvaluateRequest:
    request = decision_service_pb2.EvaluateRequest(fhir_bundle=BUNDLE.read_bytes(), **fields)
    request.as_of.FromJsonString("2025-06-02T09:00:00Z")
    return request


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of the endpoint, by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_metrics_endpoint(tmp_path: Path, server_process, unused_port) -> None:
    hip = tmp_path / "rulesets" / "hip-injection"
    shutil.copytree(bundled_rulesets_dir() / "hip-injection", hip)
    version = yaml.safe_load((hip / "ruleset.yaml").read_text(encoding="utf-8"))["version"]
    port = unused_port()
    server = server_process(1, "--rulesets", str(hip.parent), "--watch", "--watch-interval", "0.2", "--metrics-port", str(port))
    try:
        server.wait_for(r"serving with 1 worker\(s\)", timeout=60)
        server.wait_for(r"metrics on http://127\.0\.0\.1:\d+/metrics", timeout=5)
        with grpc.insecure_channel(server.target) as channel:
            stub = decision_service_pb2_grpc.DecisionServiceStub(channel)
            for _ in range(3):
                stub.Evaluate(_request(), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Evaluate(decision_service_pb2.EvaluateRequest(), timeout=10)
            answers = list(stub.EvaluateStream(iter([_request(correlation_id="a"), _request(correlation_id="b")]), timeout=10))
            assert len(answers) == 2

            # a change that does not load is rejected; then a worker dies and is replaced
            (hip / "rules" / "10-bleeding.yaml").write_text("- id: [not, a, rule\n")
            server.wait_for(r"change rejected", timeout=60)
            victim = server.worker_pids()[0]
            mark = len(server.lines)
            os.kill(victim, signal.SIGKILL)
            server.wait_for(r"worker 0 pid \d+ serving", start=mark, timeout=30)
            stub.Evaluate(_request(), timeout=10, wait_for_ready=True)

        _wait(lambda: _value(_scrape(port), "needlepoint_workers") == 1)
        samples = _scrape(port)
        assert _value(samples, "needlepoint_requests_total", method=EVALUATE, code="OK") == 4  # 3 before the kill, 1 after
        assert _value(samples, "needlepoint_requests_total", method=EVALUATE, code="INVALID_ARGUMENT") == 1
        assert (
            _value(samples, "needlepoint_requests_total", method="needlepoint.v1.DecisionService/EvaluateStream", code="OK") == 1
        )
        assert _value(samples, "needlepoint_request_duration_seconds_count", method=EVALUATE) == 5
        assert _value(samples, "needlepoint_request_duration_seconds_bucket", method=EVALUATE, le="+Inf") == 5
        decisions = {dict(labels)["outcome"]: v for (name, labels), v in samples.items() if name == "needlepoint_decisions_total"
                     and dict(labels)["ruleset"] == "hip-injection" and dict(labels)["version"] == version}
        assert set(decisions) <= {"defer", "review", "proceed"} and sum(decisions.values()) == 6  # 4 Evaluate + 2 stream items
        assert _value(samples, "needlepoint_reloads_total", ruleset="hip-injection", outcome="rejected") == 1
        assert _value(samples, "needlepoint_reloads_total", ruleset="hip-injection", outcome="accepted") == 0
        assert _value(samples, "needlepoint_worker_restarts_total") == 1
    finally:
        assert server.stop() == 0, "\n".join(server.lines)
