"""Does a worker's memory come back after large requests? Not a test; prints figures.

    python bench/memory.py [--requests 10000] [--large-every 50] [--synthea-every 0]

Starts ``needlepoint serve`` with one worker on a loopback port and sends REQUESTS evaluations
from one client: the order-time bundle, and every LARGE_EVERY-th request an 8 MiB record (65,000
conditions, or 20,000 warfarin prescriptions with long displays, in turn). With SYNTHEA_EVERY,
every such request (that is not an 8 MiB one) is the next Synthea bundle of ``../shared/fixtures``
(0.1 to 3 MB: large requests, whose freed memory is given back only once they add up to
``needlepoint.limits.RETURN_MEMORY_BYTES``). Prints the worker's resident memory after the first
1,000 requests and at the end, and their ratio (issue 8: within 10 %).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from isolation import ORDER_BUNDLE, _request, compact_bundle  # noqa: E402
from needlepoint.v1 import decision_service_pb2_grpc  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.real_records import FIXTURES, ORDER, bundle_paths  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--large-every", type=int, default=50)
    parser.add_argument("--synthea-every", type=int, default=0, help="every Nth request a Synthea bundle (default 0: none)")
    parser.add_argument("--database", default=None, help="the server's decision log (default: serve's default; 'none': no log)")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "needlepoint.cli", "serve", "--port", str(port), "--workers", "1"]
    if args.database:
        command += ["--database", args.database]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    worker = 0
    try:
        for line in server.stderr:
            if match := re.search(r"worker \d+ pid (\d+) serving", line):
                worker = int(match[1])
            if "serving with" in line:
                break
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        large = [_request(compact_bundle("conditions", 65000)), _request(compact_bundle("warfarin", 20000))]
        small = _request(ORDER_BUNDLE.read_bytes())
        synthea = [_request(path.read_bytes()) for path in bundle_paths()]
        if args.synthea_every and not synthea:
            raise SystemExit(f"no Synthea bundles under {FIXTURES}")
        for request in synthea:
            request.order.target, request.order.side, request.order.intent = ORDER["target"], ORDER["side"], ORDER["intent"]
        marks: dict[int, float] = {}
        started = time.monotonic()
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 16 << 20)]) as channel:
            stub = decision_service_pb2_grpc.DecisionServiceStub(channel)
            for i in range(1, args.requests + 1):
                if i % args.large_every == 0:
                    request = large[(i // args.large_every) % 2]
                elif args.synthea_every and i % args.synthea_every == 0:
                    request = synthea[(i // args.synthea_every) % len(synthea)]
                else:
                    request = small
                stub.Evaluate(request, timeout=60)
                if i in (1000, args.requests) or i % 2000 == 0:
                    marks[i] = rss_mib(worker)
                    print(
                        f"after {i:>6} requests: worker RSS {marks[i]:.1f} MiB ({time.monotonic() - started:.0f} s)", flush=True
                    )
        first, last = marks[1000], marks[args.requests]
        print(f"RSS after {args.requests:,} / after 1,000: {last / first:.3f} ({(last / first - 1) * 100:+.1f} %)")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
