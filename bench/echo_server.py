"""A no-op DecisionService for the benchmark: the same API, server options and payload sizes as
`needlepoint serve`, but Evaluate returns a decision computed once at start-up, so its cost is
pure gRPC. Run: python bench/echo_server.py --port P --workers N --bundle FILE --as-of T"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import signal
from pathlib import Path

from needlepoint.server.engine import Engine
from needlepoint.server.servicer import start_server
from needlepoint.v1 import decision_service_pb2


class EchoEngine:
    """Answers every request with one precomputed decision (the real one for the payload)."""

    def __init__(self, bundle: bytes, as_of: str) -> None:
        real = Engine.load()
        request = decision_service_pb2.EvaluateRequest(fhir_bundle=bundle)
        request.as_of.FromDatetime(dt.datetime.fromisoformat(as_of.replace("Z", "+00:00")))
        self._decision = real.evaluate(request)
        self._real = real
        self.ruleset_ids = real.ruleset_ids

    def evaluate(self, request):
        return self._decision

    def list_rulesets(self):
        return self._real.list_rulesets()

    def get_ruleset(self, ruleset_id):
        return self._real.get_ruleset(ruleset_id)


async def _serve(port: int, bundle: bytes, as_of: str) -> None:
    running = await start_server(EchoEngine(bundle, as_of), f"127.0.0.1:{port}")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await running.stop(1)


def _worker(port: int, bundle: bytes, as_of: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(port, bundle, as_of))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--as-of", required=True)
    args = parser.parse_args()
    bundle = args.bundle.read_bytes()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(args.port, bundle, args.as_of)) for _ in range(args.workers)]
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
