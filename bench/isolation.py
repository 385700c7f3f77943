"""Small requests and health checks while large ones run, on one server. Not a test; prints figures.

    python bench/isolation.py [--seconds 20] [--workers 1]

Starts ``needlepoint serve`` on a loopback port. One client thread sends large requests back to
back (an 8 MiB bundle of 65,000 conditions, or of 20,000 warfarin prescriptions, alternately);
the main thread meanwhile sends the order-time bundle and a health check in turn, and reports
their latency (p50, p99, max) next to the large requests' own. Also times, in process, the
large bundles and an Explain with 1,001 prior injections.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import heavy  # noqa: E402
from needlepoint.v1 import decision_service_pb2, decision_service_pb2_grpc  # noqa: E402

ORDER_BUNDLE = ROOT / "tests" / "data" / "fhir" / "hip_injection_order.json"
LIMIT = 8 * 1024 * 1024


def compact_bundle(kind: str, n: int) -> bytes:
    """``n`` resources of ``kind``, small enough that 65,000 conditions fit the 8 MiB bundle limit
    (no ids, no subject, no display; the prescriptions carry a long display instead)."""
    base = json.loads(ORDER_BUNDLE.read_text())
    subject = {"reference": "Patient/pat-1"}
    if kind == "conditions":
        extra = [{"resource": {"resourceType": "Condition", "code": {"coding": [
            {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": f"M16.{i % 10}"}]}}} for i in range(n)]
    else:
        extra = [{"resource": {"resourceType": "MedicationRequest", "status": "active", "subject": subject,
                               "authoredOn": heavy._day(i), "medicationCodeableConcept": {"coding": [
                                   {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "855332",
                                    "display": "Warfarin Sodium 5 MG Oral Tablet " + "x" * 120}]}}} for i in range(n)]
    base["entry"] += extra
    data = json.dumps(base, separators=(",", ":")).encode()
    return data


def _percentiles(values: list[float]) -> str:
    values = sorted(values)
    if not values:
        return "none"
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return (
        f"n={len(values)} p50 {statistics.median(values) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {values[-1] * 1000:.1f} ms"
    )


def _request(bundle: bytes) -> decision_service_pb2.EvaluateRequest:
    request = decision_service_pb2.EvaluateRequest(fhir_bundle=bundle)
    request.as_of.FromJsonString("2025-06-02T09:00:00Z")
    return request


def in_process(bundles: dict[str, bytes]) -> None:
    from needlepoint.core.evaluator import Evaluator
    from needlepoint.core.explain import counterfactuals
    from needlepoint.fhir.mapper import record_from_bundle
    from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset
    from needlepoint.server.service import Engine

    engine = Engine.load()  # the request road the server takes: bytes in, Decision message out
    for name, data in bundles.items():
        times = []
        request = _request(data)
        for _ in range(5):
            start = time.perf_counter()
            engine.evaluate(request)
            times.append(time.perf_counter() - start)
        print(
            f"in process: {name} ({len(data) / 1048576:.2f} MiB), request to decision: median "
            f"{statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
        )
    evaluator = Evaluator(load_ruleset(bundled_rulesets_dir() / "hip-injection"))
    record = record_from_bundle(heavy.bundle("injections", 1001))
    start = time.perf_counter()
    decision = evaluator.evaluate(record, heavy.AS_OF)
    changes = counterfactuals(evaluator, record, heavy.AS_OF)
    print(f"in process: explain with 1,001 prior injections: {(time.perf_counter() - start) * 1000:.0f} ms"
          f" ({len(changes)} counterfactuals, {len(decision.get('deferrals', []))} deferral(s))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    bundles = {
        "65,000 conditions": compact_bundle("conditions", 65000),
        "20,000 warfarin prescriptions": compact_bundle("warfarin", 20000),
    }
    for name, data in bundles.items():
        assert len(data) <= LIMIT, (name, len(data))
    in_process(bundles)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "needlepoint.cli", "serve", "--port", str(port), "--workers", str(args.workers)],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        target = f"127.0.0.1:{port}"
        for line in server.stderr:
            if "serving with" in line:
                break
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        stop = threading.Event()
        large_times: list[float] = []

        def large_load() -> None:
            with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 16 << 20)]) as channel:
                stub = decision_service_pb2_grpc.DecisionServiceStub(channel)
                requests = [_request(data) for data in bundles.values()]
                i = 0
                while not stop.is_set():
                    start = time.perf_counter()
                    stub.Evaluate(requests[i % len(requests)], timeout=60)
                    large_times.append(time.perf_counter() - start)
                    i += 1

        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            stub = decision_service_pb2_grpc.DecisionServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            small = _request(ORDER_BUNDLE.read_bytes())
            for _ in range(50):
                stub.Evaluate(small, timeout=10)
            idle = []
            for _ in range(200):
                start = time.perf_counter()
                stub.Evaluate(small, timeout=10)
                idle.append(time.perf_counter() - start)
            thread = threading.Thread(target=large_load, daemon=True)
            thread.start()
            small_times, health_times = [], []
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                start = time.perf_counter()
                stub.Evaluate(small, timeout=10)
                small_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                health_times.append(time.perf_counter() - start)
            stop.set()
            thread.join(120)
        print(f"server ({args.workers} worker): small requests alone: {_percentiles(idle)}")
        print(f"while large requests run back to back ({len(large_times)} done, {_percentiles(large_times)}):")
        print(f"  small requests: {_percentiles(small_times)}")
        print(f"  health checks:  {_percentiles(health_times)}")
    finally:
        server.terminate()
        server.wait(30)
    print(f"({dt.date.today()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
