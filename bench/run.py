"""Needlepoint benchmark: one command, this machine's figures. Not a test; it checks every answer.

    scripts/bench                 (or: python bench/run.py [--quick] [--rounds N] [--out FILE])

What it measures (the README's "Benchmarks" section defines each figure):

1. **Payloads.** A seeded set of distinct FHIR order bundles (``tests/bundles.py``, 1,000 by
   default), each an ``EvaluateRequest`` at a fixed instant, and as many distinct "not for us"
   bundles (a knee injection, a spine MRI, a blood test: no hip injection order).
2. **Checked answers.** Before any load, every hip request is sent once to the server with a
   Python gRPC client: each answer must be a decision carrying the bundled rule set's digest, and
   every "not for us" request must be refused ``INVALID_ARGUMENT`` at ``order.target``. During the
   load the load generator sees only HTTP statuses (a gRPC error is HTTP 200 with a
   ``grpc-status`` trailer), so the server's own request counter (``--metrics-port``) is read
   before and after every run: every request must have ended with the expected code.
3. **Load.** ``h2load`` (Debian's ``nghttp2-client``, installed here when missing), POSTing gRPC
   frames to ``/needlepoint.v1.DecisionService/Evaluate``. h2load sends one body per process, so
   a run is a rotation: ``SLOTS`` h2load processes at a time, each sending one distinct request
   some number of times on its own connection, then the next. Connections of three lengths:
   * **4 requests** (``PER_BODY``), through every body: the CPU runs. Server CPU per request
     (user + system of every process of the server, from /proc) for ``needlepoint serve``
     (``Evaluate``) and the echo server (``bench/echo_server.py``: the same API answering a
     precomputed decision) on the same payloads in the same round, and their difference, the
     CPU a decision adds; "not for us" requests against echo; the two gRPC server flavours
     (bare ``grpc.aio`` and bare sync ``grpc.server``, echo only).
   * **50 requests** (``LATENCY_PER_BODY``): the capacity (closed loop, ``SLOTS`` connections x
     ``STREAMS`` requests in flight, ``CAPACITY_BODIES`` bodies, Evaluate and echo), and
     latency p50 / p99 / p99.9 at fixed offered loads (25 / 50 / 75 / 90 % of that 50-request
     capacity, h2load ``--rps``, ``LATENCY_BODIES`` bodies each, another slice of them in every
     run and round), with the highest load served within the stated p99. Starting a process and
     a connection every 4 requests costs the load generator, on the server's own two cores, more
     CPU than the server spends, so a capacity measured that way is the load generator's; 50 is
     a compromise between that cost (about 0.15 ms per request) and the number of distinct
     bodies a run can send. The earlier latency setting (50 % of the 4-request capacity, a
     quarter of the bodies, 8 requests per connection) is still measured once a round, for
     comparison.
   * **One body for the whole run** (about 500 requests per connection): echo, and "not for us"
     against echo on the same body, free of connection set-up; and what the 4-request rotation
     itself costs the server (echo rotating, minus echo on one body).
   Every run also reports the load generator's own CPU per request (the benchmark process and
   its h2load children). Without h2load, a Python ``grpc.aio`` client sends the same requests
   over ``SLOTS`` channels kept for the whole run (about 0.18 ms of its own CPU per request): it
   does not model connection length, so the rows that compare lengths mean nothing then, and
   the report says so.
4. **In-process** decisions/s per core from order bundles, mapped records and Synthea bundles:
   ``bench/inprocess.py --json``, in a process of its own.

Runs are interleaved over servers in every round; figures are medians over the rounds with
their spread (min–max). The report is a Markdown table, dated, with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the seeded generators live with the tests

import grpc  # noqa: E402
import orjson  # noqa: E402
from bench.inprocess import machine  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from needlepoint.rulesets import DEFAULT_RULESET, bundled_rulesets_dir, load_ruleset  # noqa: E402
from needlepoint.v1 import decision_pb2, decision_service_pb2  # noqa: E402
from tests.bundles import not_for_us_bundle, random_bundles  # noqa: E402
from tests.patients import AS_OF  # noqa: E402

ORDER_BUNDLE = ROOT / "tests" / "data" / "fhir" / "hip_injection_order.json"
AS_OF_TEXT = "2025-06-02T09:00:00Z"
EVALUATE_PATH = "/needlepoint.v1.DecisionService/Evaluate"
SLOTS = 8  # h2load processes at a time, one connection each (SO_REUSEPORT spreads connections)
STREAMS = 2  # requests in flight per connection: SLOTS x STREAMS = 16 in flight at capacity
PER_BODY = 4  # requests per body and h2load process
LATENCY_PER_BODY = 50  # requests per body and connection in the fixed-load runs (and their capacity)
LATENCY_BODIES = 40  # bodies per fixed-load run: 2,000 requests
CAPACITY_BODIES = 160  # bodies per capacity run on such connections: 8,000 requests
LOADS = (0.25, 0.50, 0.75, 0.90)  # offered loads, as shares of the measured capacity
P99_BOUND_MS = 50.0  # "the highest load served within p99 <= this"


# -- payloads ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Payloads:
    """Serialized EvaluateRequests, and the same as gRPC frames in files for h2load."""

    hip: list[bytes]
    not_for_us: list[bytes]
    directory: Path
    hip_files: list[Path] = dataclasses.field(default_factory=list)
    not_for_us_files: list[Path] = dataclasses.field(default_factory=list)

    @classmethod
    def make(cls, n: int, seed: int, directory: Path) -> Payloads:
        def request(bundle: dict) -> bytes:
            message = decision_service_pb2.EvaluateRequest(fhir_bundle=orjson.dumps(bundle))
            message.as_of.FromDatetime(AS_OF)
            return message.SerializeToString()

        rng = random.Random(seed + 1)
        payloads = cls(
            hip=[request(b) for b in random_bundles(n, seed=seed)],
            not_for_us=[request(not_for_us_bundle(rng, i)) for i in range(n)],
            directory=directory,
        )
        assert len(set(payloads.hip)) == n and len(set(payloads.not_for_us)) == n, "the payloads must be distinct"
        payloads.hip_files = payloads._write("hip", payloads.hip)
        payloads.not_for_us_files = payloads._write("other", payloads.not_for_us)
        return payloads

    def _write(self, name: str, messages: list[bytes]) -> list[Path]:
        files = []
        for i, message in enumerate(messages):
            path = self.directory / f"{name}-{i:05d}.grpc"
            path.write_bytes(grpc_frame(message))
            files.append(path)
        return files


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed (0), then the length, big-endian."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


# -- servers -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise RuntimeError(f"the server on port {port} did not become healthy")


@dataclasses.dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    metrics_port: int | None = None

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process in the server's process group."""
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # the process group; fields 11 and 12: utime, stime
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def codes(self) -> dict[str, float]:
        """Finished Evaluate calls by status code, from the server's metrics (empty without). A
        call is counted just after its answer is sent: read until two readings agree."""
        if self.metrics_port is None:
            return {}
        previous, now = None, self._codes()
        while now != previous:
            time.sleep(0.2)
            previous, now = now, self._codes()
        return now

    def _codes(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        found: dict[str, float] = {}
        for match in re.finditer(r'needlepoint_requests_total\{([^}]*)\} ([0-9.e+]+)', text):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            if labels.get("method") == EVALUATE_PATH.lstrip("/"):
                found[labels["code"]] = found.get(labels["code"], 0) + float(match.group(2))
        return found

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_needlepoint(workers: int) -> Server:
    port, metrics_port = free_port(), free_port()
    cmd = [
        str(Path(sys.executable).with_name("needlepoint")), "serve", "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(workers), "--database", "none", "--metrics-port", str(metrics_port),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_healthy(port)
    return Server("Evaluate", port, proc, metrics_port)


def start_echo(workers: int, stack: str = "needlepoint", name: str = "echo", metrics_dir: Path | None = None) -> Server:
    """The echo server; with ``metrics_dir`` its workers record metrics as ``serve --metrics-port``'s do."""
    port = free_port()
    cmd = [
        sys.executable, str(ROOT / "bench" / "echo_server.py"), "--port", str(port), "--workers", str(workers),
        "--bundle", str(ORDER_BUNDLE), "--as-of", AS_OF_TEXT, "--stack", stack,
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "PROMETHEUS_MULTIPROC_DIR"}
    if metrics_dir is not None:
        metrics_dir.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    wait_healthy(port)
    return Server(name, port, proc)


# -- checking every answer -----------------------------------------------------------------------


def check_answers(server: Server, messages: Sequence[bytes], digest: str, *, expect_decision: bool) -> None:
    """Send every request once; each answer must be a decision with ``digest`` (or, for the "not
    for us" requests, INVALID_ARGUMENT at ``order.target``). Raises AssertionError naming the first
    request that is answered otherwise."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary(EVALUATE_PATH, request_serializer=None, response_deserializer=decision_pb2.Decision.FromString)
        for i, message in enumerate(messages):
            try:
                decision = call(message, timeout=30)
            except grpc.RpcError as error:
                if expect_decision:
                    raise AssertionError(f"{server.name}: request {i} answered {error.code().name}: {error.details()}") from None
                status = rpc_status.from_call(error)
                fields = [v.field for d in (status.details if status else []) for v in _violations(d)]
                assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and fields == ["order.target"], (
                    f"{server.name}: 'not for us' request {i} answered {error.code().name} {fields}"
                )
                continue
            assert expect_decision, f"{server.name}: 'not for us' request {i} got a decision"
            assert decision.ruleset.digest == digest and decision.decision_id, (
                f"{server.name}: request {i}: wrong rule set digest"
            )


def _violations(detail) -> list:
    from google.rpc import error_details_pb2

    bad = error_details_pb2.BadRequest()
    return list(bad.field_violations) if detail.Unpack(bad) else []


# -- load ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Load:
    """One run: requests sent, answered with HTTP 200, wall time, per-request latencies (µs),
    the server's CPU seconds and the load generator's (this process and its children)."""

    sent: int
    ok: int
    wall: float
    latencies: list[float]
    server_cpu: float
    client_cpu: float
    offered: float | None  # requests/s asked for (None: closed loop)

    @property
    def rate(self) -> float:
        return self.ok / self.wall

    def pct(self, p: float) -> float:
        return pct(self.latencies, p)


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else float("nan")


class H2load:
    """The rotation over bodies with h2load (see the module docstring)."""

    name = "h2load"

    def __init__(self, binary: str) -> None:
        self.binary = binary

    def run(
        self, port: int, bodies: Sequence[Path], *, per_body: int, rate: float | None, streams: int = STREAMS
    ) -> tuple[int, int, list[float], float]:
        queue = list(reversed(bodies))
        lock = threading.Lock()
        latencies: list[float] = []
        sent = ok = 0
        url = f"http://127.0.0.1:{port}{EVALUATE_PATH}"

        def slot(k: int) -> None:
            """One h2load process after another. At a fixed rate, each slot's processes should start
            ``period`` apart; the start-up, connection and last answer of each (``overhead``,
            measured) come out of the time over which it spreads its requests."""
            nonlocal sent, ok
            period = per_body / (rate / SLOTS) if rate else 0.0
            overhead = min(0.02, period / 4)  # a first guess: process start and connection
            log = Path(tempfile.gettempdir()) / f"needlepoint-h2load-{os.getpid()}-{k}.log"
            while True:
                with lock:
                    if not queue:
                        return
                    body = queue.pop()
                cmd = [
                    self.binary, "-n", str(per_body), "-c", "1", "-m", str(streams if rate is None else 4),
                    "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body), "--log-file", str(log),
                ]  # fmt: skip
                if rate is not None:  # h2load paces one connection; the gap between processes is made up
                    spacing = min(max(period - overhead, period / 4), 4 * period)  # first request to last
                    cmd += ["--rps", f"{(per_body - 1) / spacing if per_body > 1 else rate / SLOTS:.3f}"]
                log.unlink(missing_ok=True)  # h2load appends
                began = time.perf_counter()
                out = subprocess.run([*cmd, url], capture_output=True, text=True, check=False).stdout
                if rate is not None and per_body > 1:
                    overhead = 0.7 * overhead + 0.3 * (time.perf_counter() - began - spacing)  # (h2load may also run early)
                lines = log.read_text().splitlines() if log.exists() else []
                mine = [float(x.split("\t")[2]) for x in lines if x.count("\t") == 2 and x.split("\t")[1] == "200"]
                done = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", out)
                with lock:
                    sent += int(done.group(1)) if done else per_body
                    ok += len(mine)
                    latencies.extend(mine)
            log.unlink(missing_ok=True)

        start = time.perf_counter()
        threads = [threading.Thread(target=slot, args=(k,)) for k in range(SLOTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sent, ok, latencies, time.perf_counter() - start


class PythonLoad:
    """The same requests from a grpc.aio client, when h2load cannot be had, over ``SLOTS`` channels
    kept for the whole run (connection length is not modelled), and the client's own CPU competes
    with the server on a small machine: the figures are lower."""

    name = "Python grpc.aio client (h2load unavailable; its channels last the whole run, whatever the connection length)"

    def run(
        self, port: int, bodies: Sequence[Path], *, per_body: int, rate: float | None, streams: int = STREAMS
    ) -> tuple[int, int, list[float], float]:
        messages = [p.read_bytes()[5:] for p in bodies for _ in range(per_body)]
        return asyncio.run(self._run(port, messages, rate, streams))

    async def _run(
        self, port: int, messages: list[bytes], rate: float | None, streams: int
    ) -> tuple[int, int, list[float], float]:
        channels = [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(SLOTS)
        ]
        calls = [c.unary_unary(EVALUATE_PATH, request_serializer=None, response_deserializer=None) for c in channels]
        latencies: list[float] = []
        ok = 0
        start = time.perf_counter()
        todo = iter(enumerate(messages))

        async def one(k: int, message: bytes) -> None:
            nonlocal ok
            t0 = time.perf_counter()
            try:
                await calls[k % SLOTS](message, timeout=30)
            except grpc.RpcError as error:
                if error.code() is not grpc.StatusCode.INVALID_ARGUMENT:  # "not for us" is still an answer
                    return
            latencies.append((time.perf_counter() - t0) * 1e6)
            ok += 1

        async def closed(k: int) -> None:
            for i, message in todo:
                await one(i + k, message)

        if rate is None:
            await asyncio.gather(*(closed(k) for k in range(SLOTS * streams)))
        else:
            tasks = []
            for i, message in todo:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.ensure_future(one(i, message)))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        for channel in channels:
            await channel.close()
        return len(messages), ok, latencies, wall


def load_generator(allow_install: bool) -> H2load | PythonLoad:
    """h2load, installed from Debian's nghttp2-client when missing (as scripts/setup-browser
    installs chromium), else the Python client."""
    found = shutil.which("h2load")
    if found is None and allow_install and shutil.which("apt-get"):
        sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
        if sudo is not None:
            print("bench: installing h2load (Debian's nghttp2-client)", file=sys.stderr)
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
            install = [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", "nghttp2-client"]
            if subprocess.run(install, check=False, **quiet).returncode != 0:
                subprocess.run([*sudo, "apt-get", "update", "-qq"], check=False, **quiet)
                subprocess.run(install, check=False, **quiet)
            found = shutil.which("h2load")
    return H2load(found) if found else PythonLoad()


def measure(
    generator, server: Server, bodies: Sequence[Path], *, per_body: int, rate: float | None, expect: str, streams: int = STREAMS
) -> Load:
    """One run against ``server``; every request must have ended ``expect`` (by the server's
    metrics, when it has them) and been answered HTTP 200."""
    before_codes, cpu0, client0 = server.codes(), server.cpu_seconds(), client_cpu_seconds()
    sent, ok, latencies, wall = generator.run(server.port, bodies, per_body=per_body, rate=rate, streams=streams)
    client = client_cpu_seconds() - client0  # (before the scan of /proc, which is the benchmark's own work)
    cpu = server.cpu_seconds() - cpu0
    if server.metrics_port is not None:
        after = server.codes()
        delta = {code: after.get(code, 0) - before_codes.get(code, 0) for code in after}
        wrong = {code: n for code, n in delta.items() if code != expect and n}
        assert not wrong and delta.get(expect, 0) == sent, f"{server.name}: {sent} requests sent, server answered {delta}"
    assert ok == sent, f"{server.name}: {sent} requests sent, {ok} answered HTTP 200"
    return Load(sent, ok, wall, latencies, cpu, client, rate)


def client_cpu_seconds() -> float:
    """User + system CPU of this process (its threads drive the load) and of its finished children
    (every h2load process has been waited for when a run returns)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# -- in-process ----------------------------------------------------------------------------------


def in_process(quick: bool) -> tuple[str, dict[str, dict[str, float]]]:
    """Decisions per CPU second per road, from bench/inprocess.py (in a process of its own)."""
    args = [sys.executable, str(ROOT / "bench" / "inprocess.py"), "--json"]
    args += ["--repeats", "3", "--scale", "0.3"] if quick else []
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    results = json.loads(out)["results"]["this tree"]
    return "bench/inprocess.py", {road: {k: v[k] for k in ("median", "min", "max")} for road, v in results.items()}


# -- the report ----------------------------------------------------------------------------------





def spread(values: Sequence[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 bodies, one round")
    parser.add_argument("--bodies", type=int, default=1000, help="distinct requests of each kind (default 1,000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="server processes (default: one per core)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--p99-ms",
        type=float,
        default=P99_BOUND_MS,
        help=f"the p99 bound for the highest load served (default {P99_BOUND_MS:g} ms)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never install h2load; use the Python client when it is missing"
    )
    parser.add_argument("--python-client", action="store_true", help="use the Python client even when h2load is there")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the report to this file")
    args = parser.parse_args()
    bodies, rounds = (min(args.bodies, 200), 1) if args.quick else (args.bodies, args.rounds)
    started = time.monotonic()
    generator = PythonLoad() if args.python_client else load_generator(not args.no_install)
    digest = load_ruleset(bundled_rulesets_dir() / DEFAULT_RULESET).digest
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    load_avg = os.getloadavg()[0]
    say(
        f"Needlepoint benchmark, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {machine()}; load average "
        f"{load_avg:.2f} at the start"
    )
    say(
        f"Load generator: {generator.name}; {args.workers} server processes; {bodies:,} distinct requests of each kind, "
        f"{PER_BODY} times each per CPU run; {CAPACITY_BODIES} of them {LATENCY_PER_BODY} times each per capacity run and "
        f"{LATENCY_BODIES} of them {LATENCY_PER_BODY} times each per fixed-load run; {SLOTS} connections at a time; "
        f"{rounds} interleaved round(s); medians (min–max)."
    )
    say()

    with tempfile.TemporaryDirectory(prefix="needlepoint-bench-") as tmp:
        payloads = Payloads.make(bodies, args.seed, Path(tmp))
        sizes = [len(m) for m in payloads.hip]
        say(
            f"Payloads: order bundles of {min(sizes):,}–{max(sizes):,} bytes (median {statistics.median(sizes):,.0f}); "
            f"seed {args.seed}."
        )
        servers: dict[str, Server] = {}
        try:
            servers["Evaluate"] = start_needlepoint(args.workers)
            servers["echo"] = start_echo(args.workers, metrics_dir=Path(tmp) / "echo-metrics")
            servers["bare aio echo"] = start_echo(args.workers, "bare-aio", "bare aio echo")
            servers["bare sync echo"] = start_echo(args.workers, "bare-sync", "bare sync echo")
            for server in servers.values():
                check_answers(server, payloads.hip, digest, expect_decision=True)
            check_answers(servers["Evaluate"], payloads.not_for_us, digest, expect_decision=False)
            say(
                f"Checked: every one of the {bodies:,} requests answered with a decision "
                f"of rule set digest {digest[:19]}… by every server; "
                f"every 'not for us' request refused INVALID_ARGUMENT at order.target by Evaluate."
            )
            say()
            runs: dict[str, list[Load]] = {}
            capacity: list[Load] = []
            capacity_long: list[Load] = []  # on connections as long as the fixed-load runs'
            at_load: dict[float, list[Load]] = {share: [] for share in LOADS}
            at_half_rotating: list[Load] = []  # the earlier setting, for comparison
            files = payloads.hip_files

            def add(label: str, load: Load) -> None:
                runs.setdefault(label, []).append(load)

            for r in range(rounds):
                evaluate = measure(generator, servers["Evaluate"], payloads.hip_files, per_body=PER_BODY, rate=None, expect="OK")
                capacity.append(evaluate)
                add("Evaluate (order bundles)", evaluate)
                add(
                    "echo, same payloads",
                    measure(generator, servers["echo"], payloads.hip_files, per_body=PER_BODY, rate=None, expect="OK"),
                )
                add(
                    "Evaluate, 'not for us' orders",
                    measure(
                        generator,
                        servers["Evaluate"],
                        payloads.not_for_us_files,
                        per_body=PER_BODY,
                        rate=None,
                        expect="INVALID_ARGUMENT",
                    ),
                )
                add(
                    "echo, 'not for us' payloads",
                    measure(generator, servers["echo"], payloads.not_for_us_files, per_body=PER_BODY, rate=None, expect="OK"),
                )
                add(
                    "bare grpc.aio echo",
                    measure(generator, servers["bare aio echo"], payloads.hip_files, per_body=PER_BODY, rate=None, expect="OK"),
                )
                add(
                    "bare sync grpc.server echo",
                    measure(generator, servers["bare sync echo"], payloads.hip_files, per_body=PER_BODY, rate=None, expect="OK"),
                )
                long = bodies * PER_BODY // SLOTS  # requests per connection when one body is sent throughout
                add(
                    "echo, one body, long connections",
                    measure(generator, servers["echo"], [payloads.hip_files[0]] * SLOTS, per_body=long, rate=None, expect="OK"),
                )
                add(
                    "Evaluate, one 'not for us' body, long connections",
                    measure(
                        generator,
                        servers["Evaluate"],
                        [payloads.not_for_us_files[0]] * SLOTS,
                        per_body=long,
                        rate=None,
                        expect="INVALID_ARGUMENT",
                    ),
                )
                add(
                    "echo, the same 'not for us' body, long connections",
                    measure(
                        generator, servers["echo"], [payloads.not_for_us_files[0]] * SLOTS, per_body=long, rate=None, expect="OK"
                    ),
                )
                # the server's capacity, on connections of 50 requests
                start = len(files) - (r + 1) * CAPACITY_BODIES
                some = [files[(start + i) % len(files)] for i in range(CAPACITY_BODIES)]
                long_run = measure(generator, servers["Evaluate"], some, per_body=LATENCY_PER_BODY, rate=None, expect="OK")
                capacity_long.append(long_run)
                add(f"Evaluate, {LATENCY_PER_BODY} requests per connection", long_run)
                add(
                    f"echo, {LATENCY_PER_BODY} requests per connection, same payloads",
                    measure(generator, servers["echo"], some, per_body=LATENCY_PER_BODY, rate=None, expect="OK"),
                )
                cap = statistics.median(load.rate for load in capacity_long)
                for k, share in enumerate(LOADS):  # another slice of the bodies in every run and round
                    start = (r * len(LOADS) + k) * LATENCY_BODIES
                    bodies_now = [files[(start + i) % len(files)] for i in range(LATENCY_BODIES)]
                    at_load[share].append(
                        measure(
                            generator, servers["Evaluate"], bodies_now, per_body=LATENCY_PER_BODY, rate=share * cap, expect="OK"
                        )
                    )
                part = r % 4 * len(files) // 4  # the earlier setting: a quarter of the bodies, 8 per connection
                at_half_rotating.append(
                    measure(
                        generator,
                        servers["Evaluate"],
                        files[part : part + len(files) // 4],
                        per_body=8,
                        rate=0.5 * statistics.median(load.rate for load in capacity),
                        expect="OK",
                    )
                )
                print(f"  (round {r + 1} of {rounds} done, {time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        finally:
            for server in servers.values():
                server.stop()

    def cpu_ms(loads: list[Load]) -> list[float]:
        return [load.server_cpu / load.sent * 1000 for load in loads]

    def client_ms(loads: list[Load]) -> str:
        return spread([load.client_cpu / load.sent * 1000 for load in loads], "{:.3f}")

    def offered(loads: list[Load]) -> str:
        """The offered rate, the median over the rounds (each paced at the median capacity so far)."""
        return f"{statistics.median(load.offered or 0.0 for load in loads):,.0f}/s"

    def latency_cells(loads: list[Load]) -> str:
        """requests/s achieved | p50 | p99 | p99.9 | the load generator's CPU per request"""
        percentiles = [spread([load.pct(p) / 1000 for load in loads], "{:.2f}") for p in (50, 99, 99.9)]
        return " | ".join([spread([load.rate for load in loads]), *percentiles, client_ms(loads)])

    say(
        "| Run (closed loop, 16 in flight) | requests/s | p50 ms | p99 ms | server CPU ms per request "
        "| load generator CPU ms per request |"
    )
    say("|---|---|---|---|---|---|")
    for label, loads in runs.items():
        say(
            f"| {label} | {spread([load.rate for load in loads])} | {spread([load.pct(50) / 1000 for load in loads], '{:.2f}')} "
            f"| {spread([load.pct(99) / 1000 for load in loads], '{:.2f}')} | {spread(cpu_ms(loads), '{:.3f}')} "
            f"| {client_ms(loads)} |"
        )
    say()
    echo = cpu_ms(runs["echo, same payloads"])
    added = [e - c for e, c in zip(cpu_ms(runs["Evaluate (order bundles)"]), echo, strict=True)]
    added_long = [
        e - c
        for e, c in zip(
            cpu_ms(runs[f"Evaluate, {LATENCY_PER_BODY} requests per connection"]),
            cpu_ms(runs[f"echo, {LATENCY_PER_BODY} requests per connection, same payloads"]),
            strict=True,
        )
    ]
    cheap = [
        n / c
        for n, c in zip(cpu_ms(runs["Evaluate, 'not for us' orders"]), cpu_ms(runs["echo, 'not for us' payloads"]), strict=True)
    ]
    cheap_long = [
        n / c
        for n, c in zip(
            cpu_ms(runs["Evaluate, one 'not for us' body, long connections"]),
            cpu_ms(runs["echo, the same 'not for us' body, long connections"]),
            strict=True,
        )
    ]
    flavour = [a - s for a, s in zip(cpu_ms(runs["bare grpc.aio echo"]), cpu_ms(runs["bare sync grpc.server echo"]), strict=True)]
    rotation = [a - b for a, b in zip(echo, cpu_ms(runs["echo, one body, long connections"]), strict=True)]
    say("| Derived (per request, same round) | median (min–max) |")
    say("|---|---|")
    say(f"| Added server CPU of a decision: Evaluate − echo | {spread(added, '{:.3f}')} ms |")
    say(f"| The same on connections of {LATENCY_PER_BODY} requests | {spread(added_long, '{:.3f}')} ms |")
    say(f"| 'Not for us' order: server CPU ÷ echo's on the same payloads | {spread(cheap, '{:.2f}')}× |")
    say(f"| The same on one body's long connections (no connection set-up in either) | {spread(cheap_long, '{:.2f}')}× |")
    say(f"| gRPC flavour: bare grpc.aio − bare sync server CPU | {spread(flavour, '{:.3f}')} ms |")
    say(f"| The rotation's own cost: echo rotating bodies − echo on long connections | {spread(rotation, '{:.3f}')} ms |")
    say()
    cap = statistics.median(load.rate for load in capacity_long)
    say(
        f"Latency of Evaluate at fixed offered loads ({LATENCY_PER_BODY} requests per connection; "
        f"the capacity on such connections: {cap:,.0f} requests/s; open loop, "
        f"{'h2load --rps' if isinstance(generator, H2load) else 'paced Python client'}):"
    )
    say()
    say("| Offered load | requests/s achieved | p50 ms | p99 ms | p99.9 ms | load generator CPU ms per request |")
    say("|---|---|---|---|---|---|")
    best = None
    for share, loads in at_load.items():
        p99 = statistics.median(load.pct(99) / 1000 for load in loads)
        achieved = statistics.median(load.rate for load in loads)
        if p99 <= args.p99_ms:  # (open loop: a server that cannot keep up has an unbounded p99)
            best = (share, achieved, p99)
        say(f"| {share:.0%} ({offered(loads)}) | {latency_cells(loads)} |")
    say(
        f"| for comparison, the earlier setting: 50 % of the 4-request capacity ({offered(at_half_rotating)}), "
        f"8 requests per connection | {latency_cells(at_half_rotating)} |"
    )
    say()
    if best is None:
        say(f"No offered load was served within p99 ≤ {args.p99_ms:g} ms.")
    else:
        say(
            f"Highest load served within p99 ≤ {args.p99_ms:g} ms: {best[1]:,.0f} requests/s "
            f"({best[0]:.0%} of capacity, p99 {best[2]:.1f} ms)."
        )
    if not args.skip_in_process:
        say()
        source, roads = in_process(args.quick)
        say(f"In-process decisions/s per core ({source}; CPU time of one process):")
        say()
        say("| Road | decisions/s per core |")
        say("|---|---|")
        names = {"order": "order bundle → Decision", "record": "mapped record → Decision", "synthea": "Synthea bundle → Decision"}
        for road, figures in roads.items():
            say(f"| {names.get(road, road)} | {figures['median']:,.0f} ({figures['min']:,.0f}–{figures['max']:,.0f}) |")
    say()
    say(f"Run time: {time.monotonic() - started:.0f} s; load average at the end {os.getloadavg()[0]:.2f}.")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
