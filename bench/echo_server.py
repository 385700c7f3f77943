"""A no-op DecisionService for the benchmark: the same API, server options and payload sizes as
`needlepoint serve`, but Evaluate returns a decision computed once at start-up, so its cost is
pure gRPC.

With ``--work`` it also does one stage of the real evaluation on every request and throws the
result away, to measure what that stage alone costs a server next to the bare echo:

* ``read-bundle``: map the request's FHIR bundle into a patient record (the FHIR road in);
* ``durable-engine``: run the durable-rules engine on the payload's facts, prepared once at
  start-up (assert, drain every action, retract).

Run: python bench/echo_server.py --port P --workers N --bundle FILE --as-of T [--work STAGE]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import signal
from pathlib import Path

from needlepoint.fhir.mapper import record_from_bundle
from needlepoint.rulesets import DEFAULT_RULESET
from needlepoint.server.engine import Engine
from needlepoint.server.servicer import start_server
from needlepoint.v1 import decision_service_pb2

WORK = ("none", "read-bundle", "durable-engine")


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

    def evaluate(self, request):
        self._work(request)
        return self._decision

    def list_rulesets(self):
        return self._real.list_rulesets()

    def get_ruleset(self, ruleset_id, version=""):
        return self._real.get_ruleset(ruleset_id, version)


async def _serve(port: int, bundle: bytes, as_of: str, work: str) -> None:
    running = await start_server(EchoEngine(bundle, as_of, work), f"127.0.0.1:{port}")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await running.stop(1)


def _worker(port: int, bundle: bytes, as_of: str, work: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(port, bundle, as_of, work))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--as-of", required=True)
    parser.add_argument("--work", choices=WORK, default="none", help="one stage of the real work to do per request")
    args = parser.parse_args()
    bundle = args.bundle.read_bytes()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(args.port, bundle, args.as_of, args.work)) for _ in range(args.workers)]
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
