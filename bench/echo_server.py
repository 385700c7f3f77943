"""A no-op DecisionService for the benchmark: the same API, server options and payload sizes as
`needlepoint serve`, but Evaluate returns a decision computed once at start-up, so its cost is
pure gRPC.

With ``--work`` it also does one stage of the real evaluation on every request and throws the
result away, to measure what that stage alone costs a server next to the bare echo:

* ``read-bundle``: map the request's FHIR bundle into a patient record (the FHIR road in);
* ``durable-engine``: run the durable-rules engine on the payload's facts, prepared once at
  start-up (assert, drain every action, retract).

``--stack`` chooses the server around it: ``needlepoint`` (the default) is the real worker's
``grpc.aio`` stack (``server.servicer.start_server``: lenient deserializers, health, reflection,
and the worker's call gate, which counts calls and records metrics when
``PROMETHEUS_MULTIPROC_DIR`` is set, as ``needlepoint serve --metrics-port`` does), so that
echo and ``Evaluate`` differ only in the evaluation;
``bare-aio`` and ``bare-sync`` are the generated servicer on a plain ``grpc.aio.server`` and on
a plain ``grpc.server`` with a thread pool, with health, and nothing else: the two gRPC server
flavours side by side, for the benchmark's choice between them.

Run: python bench/echo_server.py --port P --workers N --bundle FILE --as-of T [--work STAGE] [--stack S]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import multiprocessing
import signal
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from needlepoint.fhir.mapper import record_from_bundle
from needlepoint.rulesets import DEFAULT_RULESET
from needlepoint.server import metrics
from needlepoint.server.calls import CallGate
from needlepoint.server.service import Engine
from needlepoint.server.servicer import server_options, start_server
from needlepoint.v1 import decision_service_pb2, decision_service_pb2_grpc

WORK = ("none", "read-bundle", "durable-engine")
STACKS = ("needlepoint", "bare-aio", "bare-sync")


class EchoEngine:
    """Answers every request with one precomputed decision (the real one for the payload),
    after doing the chosen stage of the work, if any."""

    def __init__(self, bundle: bytes, as_of: str, work: str = "none") -> None:
        real = Engine.load()
        instant = dt.datetime.fromisoformat(as_of.replace("Z", "+00:00"))
        request = decision_service_pb2.EvaluateRequest(fhir_bundle=bundle)
        request.as_of.FromDatetime(instant)
        self._decision = real.evaluate(request)
        self._real = real
        self.ruleset_ids = real.ruleset_ids
        evaluator = real.evaluator(DEFAULT_RULESET)
        facts = evaluator.preparer.prepare(record_from_bundle(bundle), instant).facts
        self._work = {
            "none": lambda request: None,
            "read-bundle": lambda request: record_from_bundle(request.fhir_bundle),
            "durable-engine": lambda request: evaluator.engine.run(facts),
        }[work]

    def evaluate(self, request, deadline=None, bundle=None):  # the servicer's call, bundle read once
        self._work(request)
        return self._decision

    def list_rulesets(self):
        return self._real.list_rulesets()

    def get_ruleset(self, ruleset_id, version=""):
        return self._real.get_ruleset(ruleset_id, version)


class _BareEcho(decision_service_pb2_grpc.DecisionServiceServicer):
    """Evaluate alone, on the generated registration; sync or async as the server is."""

    def __init__(self, engine: EchoEngine) -> None:
        self.engine = engine

    def evaluate(self, request, context):
        return self.engine.evaluate(request)


class _BareAioEcho(_BareEcho):
    async def Evaluate(self, request, context):  # noqa: N802 - the gRPC method's name
        return self.evaluate(request, context)


class _BareSyncEcho(_BareEcho):
    def Evaluate(self, request, context):  # noqa: N802 - the gRPC method's name
        return self.evaluate(request, context)


async def _serve(port: int, bundle: bytes, as_of: str, work: str) -> None:
    metrics.setup()  # (only when PROMETHEUS_MULTIPROC_DIR is set)
    running = await start_server(EchoEngine(bundle, as_of, work), f"127.0.0.1:{port}", interceptors=[CallGate()])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await running.stop(1)


async def _serve_bare_aio(port: int, bundle: bytes, as_of: str, work: str) -> None:
    server = grpc.aio.server(options=server_options(reuse_port=True))
    decision_service_pb2_grpc.add_DecisionServiceServicer_to_server(_BareAioEcho(EchoEngine(bundle, as_of, work)), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def _serve_bare_sync(port: int, bundle: bytes, as_of: str, work: str) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=16)
    server = grpc.server(pool, options=server_options(reuse_port=True))
    decision_service_pb2_grpc.add_DecisionServiceServicer_to_server(_BareSyncEcho(EchoEngine(bundle, as_of, work)), server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()


def _worker(port: int, bundle: bytes, as_of: str, work: str, stack: str = "needlepoint") -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if stack == "bare-sync":
        _serve_bare_sync(port, bundle, as_of, work)
    else:
        asyncio.run((_serve_bare_aio if stack == "bare-aio" else _serve)(port, bundle, as_of, work))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--as-of", required=True)
    parser.add_argument("--work", choices=WORK, default="none", help="one stage of the real work to do per request")
    parser.add_argument("--stack", choices=STACKS, default="needlepoint", help="the gRPC server around the echo")
    args = parser.parse_args()
    bundle = args.bundle.read_bytes()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(args.port, bundle, args.as_of, args.work, args.stack)) for _ in range(args.workers)
    ]
    for p in procs:
        p.start()

    def stop(*_):
        for p in procs:
            p.terminate()

    signal.signal(signal.SIGTERM, stop)
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
