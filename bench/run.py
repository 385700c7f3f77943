"""Needlepoint benchmark: prints figures for this machine. Not a test; nothing here asserts.

    scripts/bench            (or: python bench/run.py [--quick])

1. In-process: decisions/s and p50/p99 latency of ``Evaluator.evaluate`` on the bundled rule
   set, over the Synthea patients and seeded random patients (records already mapped), and of
   the whole FHIR road (bytes -> record -> decision) for the order-time bundle.
2. gRPC unary ``Evaluate`` against ``needlepoint serve`` and, in the same run with the same
   client and payload, against a no-op echo server with the same API (bench/echo_server.py):
   throughput and p99 for each, and their ratio. Also the echo server doing one stage of the
   real work per request (reading the FHIR bundle; running the durable-rules engine on prepared
   facts): the ratio each stage alone allows, a ceiling for the whole. For every server, the CPU
   time per request of the server processes and of this client.
3. gRPC ``EvaluateStream``: decisions/s.
4. Memory: RSS before and after 100,000 in-process decisions.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the seeded patient generator lives with the tests

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from needlepoint.core.evaluator import Evaluator  # noqa: E402
from needlepoint.core.record import InjectionOrder  # noqa: E402
from needlepoint.fhir.mapper import record_from_bundle  # noqa: E402
from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset  # noqa: E402
from needlepoint.v1 import decision_service_pb2, decision_service_pb2_grpc  # noqa: E402
from tests.patients import AS_OF, random_patients  # noqa: E402

SYNTHEA = ROOT.parent / "shared" / "fixtures" / "synthea"
ORDER_BUNDLE = ROOT / "tests" / "data" / "fhir" / "hip_injection_order.json"
AS_OF_TEXT = "2025-06-02T09:00:00Z"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def line(label: str, value: str) -> None:
    print(f"  {label:<46} {value}")


def in_process(evaluator: Evaluator, n: int) -> None:
    order = InjectionOrder("hip-intra-articular", "right", "therapeutic")
    records = [record_from_bundle(p.read_bytes()).with_order(order) for p in sorted(SYNTHEA.glob("*.json"))]
    records += random_patients(200, seed=99)
    for r in records:  # warm-up
        evaluator.evaluate(r, AS_OF)
    latencies = []
    start = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter_ns()
        evaluator.evaluate(records[i % len(records)], AS_OF)
        latencies.append((time.perf_counter_ns() - t0) / 1000)
    elapsed = time.perf_counter() - start
    print("In-process evaluation (records already mapped; Synthea + seeded random patients)")
    line("decisions/s (one thread)", f"{n / elapsed:,.0f}")
    line("latency p50 / p99 / max", f"{pct(latencies, 50):.0f} / {pct(latencies, 99):.0f} / {max(latencies):.0f} µs")

    bundle = ORDER_BUNDLE.read_bytes()
    latencies = []
    for _ in range(max(1000, n // 10)):
        t0 = time.perf_counter_ns()
        evaluator.evaluate(record_from_bundle(bundle), AS_OF)
        latencies.append((time.perf_counter_ns() - t0) / 1000)
    line("FHIR order bundle -> decision p50 / p99", f"{pct(latencies, 50):.0f} / {pct(latencies, 99):.0f} µs ({len(bundle):,} bytes)")
    synthea = (SYNTHEA / "Mafalda_Turcotte_80833fb2-95c1-4f5b-ab5e-26230287ee61.json").read_bytes()
    latencies = []
    for _ in range(200):
        t0 = time.perf_counter_ns()
        evaluator.evaluate(record_from_bundle(synthea).with_order(order), AS_OF)
        latencies.append((time.perf_counter_ns() - t0) / 1000)
    line("Synthea bundle (818 KB) -> decision p50 / p99", f"{pct(latencies, 50) / 1000:.1f} / {pct(latencies, 99) / 1000:.1f} ms")


def memory(evaluator: Evaluator, n: int) -> None:
    records = random_patients(500, seed=123)
    for r in records[:200]:
        evaluator.evaluate(r, AS_OF)
    before = rss_mib()
    for i in range(n):
        evaluator.evaluate(records[i % len(records)], AS_OF)
    after = rss_mib()
    print(f"Memory over {n:,} in-process decisions")
    line("RSS before / after", f"{before:.1f} / {after:.1f} MiB ({(after - before) / before * 100:+.1f}%)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise RuntimeError(f"server on {port} did not become healthy")


def start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_healthy(port)
    return proc


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


CHANNELS = 8  # SO_REUSEPORT balances connections, not requests: use several, as EHR integrations do


def _channels(port: int) -> list[grpc.aio.Channel]:
    # A local subchannel pool gives each channel its own connection.
    return [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)]


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every live process in the process group (a server and its workers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[2] is the process group; 11, 12 are utime, stime
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def unary_load(port: int, request, total: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    channels = _channels(port)
    try:
        stubs = [decision_service_pb2_grpc.DecisionServiceStub(c) for c in channels]
        for i in range(200):
            await stubs[i % len(stubs)].Evaluate(request, timeout=10)
        remaining = total

        async def worker(stub) -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter_ns()
                await stub.Evaluate(request, timeout=10)
                latencies.append((time.perf_counter_ns() - t0) / 1000)

        start_t = time.perf_counter()
        await asyncio.gather(*(worker(stubs[i % len(stubs)]) for i in range(concurrency)))
        return time.perf_counter() - start_t, latencies
    finally:
        for channel in channels:
            await channel.close()


async def stream_load(port: int, request, total: int) -> float:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = decision_service_pb2_grpc.DecisionServiceStub(channel)

        async def requests():
            for i in range(total):
                request.correlation_id = str(i)
                yield request

        start_t = time.perf_counter()
        count = 0
        async for response in stub.EvaluateStream(requests(), timeout=600):
            assert response.WhichOneof("outcome") == "decision"
            count += 1
        assert count == total
        return total / (time.perf_counter() - start_t)


SERVERS = (  # name, echo_server.py --work (None: the real server)
    ("Evaluate", None),
    ("echo", "none"),
    ("echo + read bundle", "read-bundle"),
    ("echo + durable engine", "durable-engine"),
)


@dataclass
class Run:
    elapsed: float
    latencies: list[float]
    server_cpu: float
    client_cpu: float


def measure(proc: subprocess.Popen, port: int, request, total: int, concurrency: int) -> Run:
    server0, client0 = group_cpu_seconds(proc.pid), time.process_time()
    elapsed, latencies = asyncio.run(unary_load(port, request, total, concurrency))
    return Run(elapsed, latencies, group_cpu_seconds(proc.pid) - server0, time.process_time() - client0)


def grpc_section(workers: int, total: int, concurrency: int, rounds: int) -> None:
    bundle = ORDER_BUNDLE.read_bytes()
    request = decision_service_pb2.EvaluateRequest(fhir_bundle=bundle)
    request.as_of.FromDatetime(dt.datetime(2025, 6, 2, 9, 0, tzinfo=dt.timezone.utc))
    needlepoint = str(Path(sys.executable).with_name("needlepoint"))
    servers: dict[str, tuple[int, subprocess.Popen]] = {}
    try:
        for name, work in SERVERS:
            port = free_port()
            if work is None:
                cmd = [needlepoint, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--log-level", "warning"]
            else:
                cmd = [sys.executable, str(ROOT / "bench" / "echo_server.py"), "--port", str(port), "--workers", str(workers)]
                cmd += ["--bundle", str(ORDER_BUNDLE), "--as-of", AS_OF_TEXT, "--work", work]
            servers[name] = port, start(cmd, port)
        results: dict[str, list[Run]] = {name: [] for name in servers}
        for _ in range(rounds):  # interleaved, so drift in machine load hits all alike
            for name, (port, proc) in servers.items():
                results[name].append(measure(proc, port, request, total, concurrency))
        print(f"gRPC unary over loopback ({workers} server processes each, {CHANNELS} connections, {concurrency} requests in flight, {total:,} requests x {rounds} rounds, {len(bundle):,}-byte FHIR bundle)")
        print(f"  {'':<24}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'server CPU':>12}{'client CPU':>12}{'÷ echo':>8}")
        echo_rate = statistics.median(total / r.elapsed for r in results["echo"])
        for name, runs in results.items():
            rate = statistics.median(total / r.elapsed for r in runs)  # median of rounds
            lat = [x for r in runs for x in r.latencies]
            server_ms = sum(r.server_cpu for r in runs) / (total * len(runs)) * 1000
            client_ms = sum(r.client_cpu for r in runs) / (total * len(runs)) * 1000
            print(
                f"  {name:<24}{rate:>8,.0f}{pct(lat, 50) / 1000:>9.2f}{pct(lat, 99) / 1000:>9.2f}"
                f"{server_ms:>9.2f} ms{client_ms:>9.2f} ms{rate / echo_rate:>8.2f}"
            )
        print("  (CPU: per request, all server processes / this client; ÷ echo: throughput over the echo server's)")
        port, _ = servers["Evaluate"]
        rate = asyncio.run(stream_load(port, request, total * 2))
        print("gRPC EvaluateStream (one stream, in order)")
        line("decisions/s", f"{rate:,.0f}")
    finally:
        for _, proc in servers.values():
            stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--grpc-only", action="store_true", help="only the gRPC section")
    args = parser.parse_args()
    n_eval, n_mem, n_grpc, rounds = (2_000, 10_000, 1_000, 1) if args.quick else (20_000, 100_000, 4_000, 3)
    print(f"Needlepoint benchmark, {dt.date.today()}, {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}")
    evaluator = Evaluator(load_ruleset(bundled_rulesets_dir() / "hip-injection"))
    print(f"rule set {evaluator.ruleset.id} {evaluator.ruleset.version}: {len(evaluator.ruleset.rules)} rules\n")
    if not args.grpc_only:
        in_process(evaluator, n_eval)
        print()
        memory(evaluator, n_mem)
        print()
    grpc_section(args.workers, n_grpc, concurrency=16, rounds=rounds)


if __name__ == "__main__":
    main()
