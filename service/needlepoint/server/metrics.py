"""Prometheus metrics of a ``needlepoint serve`` (``--metrics-port``).

The server is several processes, so the metrics use prometheus-client's multiprocess mode: the
supervisor makes a private directory, names it in ``PROMETHEUS_MULTIPROC_DIR`` before anything
imports prometheus-client, and its workers (spawned, so they inherit the environment) write their
samples there. The supervisor serves ``/metrics`` over HTTP, summing every process's files.
Counters of a worker that died keep counting in the totals; live gauges drop it.

Metrics (all prefixed ``needlepoint_``):

- ``requests_total{method, code}``: finished calls by gRPC method and status code name.
- ``request_duration_seconds{method}``: histogram of call latency, from dispatch to the last answer.
- ``decisions_total{ruleset, version, outcome}``: decisions made (Evaluate and every EvaluateStream
  item), ``outcome`` being ``defer`` (a hard deferral of the procedure), ``review`` (a soft one:
  clinician review first) or ``proceed``.
- ``reloads_total{ruleset, outcome}``: hot-reload verdicts, ``accepted`` or ``rejected``.
- ``worker_restarts_total``: workers replaced after dying.
- ``workers``: worker processes serving now.
- ``worker_calls``: calls started by each live worker, by ``pid`` (how connections spread).

Without ``--metrics-port`` nothing here is set up and every recording function does nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_m: dict[str, Any] = {}  # metric objects once set up; empty means metrics are off


def prepare_directory() -> str:
    """Make the multiprocess directory and name it in the environment (supervisor, before any
    worker is spawned and before prometheus-client is imported). Returns its path."""
    directory = tempfile.mkdtemp(prefix="needlepoint-metrics-")
    os.environ[ENV] = directory
    return directory


def remove_directory(directory: str) -> None:
    """Remove the multiprocess directory at the supervisor's exit."""
    if os.environ.get(ENV) == directory:
        del os.environ[ENV]
    shutil.rmtree(directory, ignore_errors=True)


def setup() -> bool:
    """Create the metric objects in this process if the multiprocess directory is set; whether
    metrics are on."""
    if _m:
        return True
    if not os.environ.get(ENV):
        return False
    from prometheus_client import Counter, Gauge, Histogram

    _m["requests"] = Counter("needlepoint_requests", "Finished gRPC calls by method and status code.", ["method", "code"])
    _m["latency"] = Histogram(
        "needlepoint_request_duration_seconds", "gRPC call latency in seconds, by method.", ["method"], buckets=LATENCY_BUCKETS
    )
    _m["decisions"] = Counter(
        "needlepoint_decisions",
        "Decisions made, by rule set, version and outcome (defer, review, proceed).",
        ["ruleset", "version", "outcome"],
    )
    _m["reloads"] = Counter(
        "needlepoint_reloads", "Hot-reload verdicts by rule set and outcome (accepted, rejected).", ["ruleset", "outcome"]
    )
    _m["restarts"] = Counter("needlepoint_worker_restarts", "Worker processes replaced after dying.")
    _m["workers"] = Gauge("needlepoint_workers", "Worker processes serving now.", multiprocess_mode="livesum")
    _m["worker_calls"] = Gauge(
        "needlepoint_worker_calls", "Calls started by each live worker process.", multiprocess_mode="liveall"
    )
    return True


def enabled() -> bool:
    return bool(_m)


def observe_call(method: str, code: str, seconds: float) -> None:
    """One finished call."""
    if _m:
        _m["requests"].labels(method, code).inc()
        _m["latency"].labels(method).observe(seconds)


def call_started() -> None:
    """One call dispatched in this worker."""
    if _m:
        _m["worker_calls"].inc()


def decision(ruleset: str, version: str, outcome: str) -> None:
    if _m:
        _m["decisions"].labels(ruleset, version, outcome).inc()


def reload(ruleset: str, outcome: str) -> None:
    if _m:
        _m["reloads"].labels(ruleset, outcome).inc()


def worker_restart() -> None:
    if _m:
        _m["restarts"].inc()


def workers_serving(count: int) -> None:
    if _m:
        _m["workers"].set(count)


def process_gone(pid: int) -> None:
    """A worker exited: its live gauges leave the totals (its counters stay)."""
    if _m:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve_http(host: str, port: int) -> int:
    """Serve ``/metrics`` (every process's samples, summed) on ``host:port`` from a daemon thread;
    the bound port."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    server, _ = start_http_server(port, addr=host.strip("[]"), registry=registry)
    return server.server_port
