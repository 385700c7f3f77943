"""Needlepoint soak: a mixed load held for N minutes against a real server; failures, latency, RSS.

    scripts/soak                       10 minutes against a fresh two-worker server
    scripts/soak --minutes 60 --concurrency 8
    scripts/soak --target host:port    against a running server (RSS then unknown)

The load mixes, per request: valid bundles (the order-time test bundle; a Synthea patient with
an order override), valid typed contexts, EvaluateStream batches of valid requests, and hostile
requests from the fuzzer's generators (``bench/fuzz.py``), from ``--concurrency`` threads on one
channel each. A failure is a valid request that gets anything but a decision, a hostile one that
gets anything but a decision or a clean rejection (see ``fuzz.check_status``), or a stream that
does not answer every item. Every ``--interval`` seconds it prints the throughput so far and the
resident memory of each worker; at the end, per kind of request: count, failures, p50, p99 and
maximum latency, and the RSS of each worker at the start, at its peak and at the end. Exit code 1
on any failure, or when the server's log shows a traceback or a worker death.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzz  # bench/fuzz.py: generators, runner, server

# Shares of the load.
MIX = {"bundle": 30, "synthea": 5, "context": 30, "stream": 5, "hostile": 30}


@dataclass
class Stats:
    """Latencies and failures by kind of request, shared by the load threads."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    failures: dict[str, int] = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, seconds: float, problem: str | None) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)
            if problem is not None:
                self.failures[kind] += 1
                if len(self.examples) < 20:
                    self.examples.append(f"{kind}: {problem}")

    @property
    def count(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.latencies.values())


def rss_kib(pid: int) -> int | None:
    """The resident set size of a process in KiB (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def worker_pids(log_text: str) -> dict[int, int]:
    """The pid serving each worker slot, from the supervisor's log lines (the latest wins)."""
    return {int(m[1]): int(m[2]) for m in re.finditer(r"worker (\d+) pid (\d+) serving", log_text)}


def one_request(runner: Any, corpus: Any, rng: random.Random, kind: str) -> str | None:
    """Send one request of ``kind``; the problem with its answer, or None."""
    if kind == "bundle":
        outcome = runner.evaluate(fuzz.request_bytes(bundle=corpus.bundles[0]))
    elif kind == "synthea":
        outcome = runner.evaluate(fuzz.request_bytes(bundle=rng.choice(corpus.bundles[1:] or corpus.bundles), order=True))
    elif kind == "context":
        outcome = runner.evaluate(fuzz.request_bytes(context=rng.choice(corpus.contexts), order=True))
    elif kind == "stream":
        items = [fuzz.request_bytes(context=rng.choice(corpus.contexts), order=True, correlation_id=f"s{i}") for i in range(8)]
        call, answers = runner.evaluate_stream(items)
        if call.problem is not None:
            return call.problem
        bad = [a for a in answers if a.code != "OK"]
        return f"{len(bad)} stream items not answered with a decision" if bad else None
    else:
        generator = rng.choice([k for k in fuzz.GENERATORS if k != "oversized"])
        outcome = runner.evaluate(fuzz.GENERATORS[generator](corpus, rng))
        return outcome.problem
    if outcome.code != "OK":
        return f"a valid {kind} request got {outcome.code}"
    return None


def load_thread(target: str, corpus: Any, seed: int, stop: threading.Event, stats: Stats) -> None:
    """Send the mix until ``stop`` is set."""
    rng = random.Random(seed)
    runner = fuzz.GrpcRunner(target)
    kinds, weights = list(MIX), list(MIX.values())
    try:
        while not stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            started = time.perf_counter()
            try:
                problem = one_request(runner, corpus, rng, kind)
            except Exception as exc:  # noqa: BLE001 - a client-side failure is a failure too, and the load goes on
                problem = f"{type(exc).__name__}: {exc}"
            stats.add(kind, time.perf_counter() - started, problem)
    finally:
        runner.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4, help="client threads (default 4)")
    parser.add_argument("--workers", type=int, default=2, help="server workers when this script starts one")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between progress lines")
    parser.add_argument("--target", help="host:port of a running server (default: start one)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    corpus = fuzz.Corpus.load()
    server = None
    target = args.target
    if target is None:
        server = fuzz.Server(Path(tempfile.gettempdir()) / f"needlepoint-soak-server-{os.getpid()}.log", workers=args.workers)
        server.wait_serving()
        target = server.target
    stats, stop = Stats(), threading.Event()
    threads = [threading.Thread(target=load_thread, args=(target, corpus, args.seed + i, stop, stats), daemon=True)
               for i in range(args.concurrency)]
    rss: dict[int, list[int]] = collections.defaultdict(list)

    def sample_rss() -> str:
        if server is None:
            return "RSS unknown (a server of its own only)"
        pids = worker_pids(server.log_path.read_text(errors="replace"))
        shown = []
        for slot, pid in sorted(pids.items()):
            kib = rss_kib(pid)
            if kib is not None:
                rss[pid].append(kib)
                shown.append(f"worker {slot} {kib / 1024:.0f} MiB")
        return ", ".join(shown)

    print(f"soak: {args.minutes:g} min against {target}, {args.concurrency} threads, mix {MIX}", file=sys.stderr)
    start = time.monotonic()
    sample_rss()
    for thread in threads:
        thread.start()
    try:
        while (elapsed := time.monotonic() - start) < args.minutes * 60:
            time.sleep(min(args.interval, args.minutes * 60 - elapsed))
            count = stats.count
            print(f"  {time.monotonic() - start:5.0f} s  {count:,} requests ({count / (time.monotonic() - start):.0f}/s), "
                  f"{sum(stats.failures.values())} failures; {sample_rss()}", file=sys.stderr, flush=True)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        elapsed = time.monotonic() - start
        code = server.stop() if server is not None else 0

    print(f"\n{stats.count:,} requests in {elapsed:.0f} s ({stats.count / elapsed:.0f}/s), {args.concurrency} threads")
    print(f"{'kind':10} {'requests':>9} {'failures':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind in MIX:
        values = stats.latencies.get(kind, [])
        if values:
            print(f"{kind:10} {len(values):9,} {stats.failures.get(kind, 0):8} {statistics.median(values) * 1e3:8.1f} "
                  f"{percentile(values, 0.99) * 1e3:8.1f} {max(values) * 1e3:8.1f}")
    everything = [v for values in stats.latencies.values() for v in values]
    print(f"{'all':10} {len(everything):9,} {sum(stats.failures.values()):8} {statistics.median(everything) * 1e3:8.1f} "
          f"{percentile(everything, 0.99) * 1e3:8.1f} {max(everything) * 1e3:8.1f}")
    for pid, samples in rss.items():
        print(
            f"RSS pid {pid}: start {samples[0] / 1024:.0f} MiB, peak {max(samples) / 1024:.0f} MiB, end "
            f"{samples[-1] / 1024:.0f} MiB"
        )
    problems: dict[str, int] = {}
    if server is not None:
        problems = fuzz.log_problems(server.log_path.read_text(errors="replace"))
        problems["server exit code not 0"] = int(code != 0)
        print("server log: " + ", ".join(f"{name} {count}" for name, count in problems.items()) + f" ({server.log_path})")
    for example in stats.examples:
        print(f"  {example}")
    return 1 if stats.failures or any(problems.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
