"""CDS Hooks benchmark: order-sign with a ~1 MB prefetch, against gRPC Evaluate of the same record.

    python bench/cdshooks.py [--requests 300] [--workers 2] [--concurrency 1]

Starts ``needlepoint serve --http-port ... --insecure-dev`` (the real server: supervisor, workers,
gRPC and HTTP in each worker's event loop), then in the same run and from the same process sends

* CDS Hooks ``POST /cds-services/hip-injection`` (order-sign): a hip injection draft order, the
  prefetch keys answered from the largest sample Synthea patient's record as a FHIR server would
  answer the templates, plus the rest of that record under one more key (an EHR that sends its
  whole patient summary), about 1.2 MB of JSON indented as the Synthea files are;
* gRPC ``Evaluate`` with the same resources as one FHIR Bundle (the same record, the same order).

Requests alternate in blocks so both see the same machine noise; bodies are encoded once, so the
client's cost per request is sending bytes and reading the answer. Prints p50 / p99 / max latency
and requests/s for each. Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "fixtures" / "synthea-r4-sample"
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx  # noqa: E402
import orjson  # noqa: E402
from bench.run import pct  # noqa: E402

from needlepoint.cdshooks.discovery import prefetch_templates  # noqa: E402
from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset  # noqa: E402
from needlepoint.v1 import decision_service_pb2  # noqa: E402
from tests.test_cdshooks_http import fhir_search, hip_order  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def payloads() -> tuple[str, bytes, bytes, int]:
    """(patient file, CDS Hooks body, gRPC request bytes, prefetch bytes) for the sample patient
    with the largest record. JSON is sent indented by 2, as the Synthea files are written: no
    sample record reaches 1 MB as compact JSON (the largest is about 0.6 MB), indented it does."""
    path = max(SAMPLE.glob("*.json"), key=lambda p: p.stat().st_size)
    resources = [e["resource"] for e in json.loads(path.read_text())["entry"]]
    patient_id = next(r["id"] for r in resources if r["resourceType"] == "Patient")
    templates = prefetch_templates(load_ruleset(bundled_rulesets_dir() / "hip-injection"))
    prefetch = {key: fhir_search(resources, t.replace("{{context.patientId}}", patient_id)) for key, t in templates.items()}
    answered = {id(e["resource"]) for v in prefetch.values() if v and v.get("resourceType") == "Bundle" for e in v["entry"]}
    rest = [r for r in resources if id(r) not in answered and r["resourceType"] != "Patient"]
    prefetch["patientSummary"] = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in rest]}
    order = hip_order(patient_id)
    request = {
        "hook": "order-sign",
        "hookInstance": str(uuid.uuid4()),
        "context": {"userId": "Practitioner/bench", "patientId": patient_id,
                    "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": order}]}},
        "prefetch": prefetch,
    }
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in [*resources, order]]}
    indent = orjson.OPT_INDENT_2
    grpc_request = decision_service_pb2.EvaluateRequest(fhir_bundle=orjson.dumps(bundle, option=indent)).SerializeToString()
    return path.name, orjson.dumps(request, option=indent), grpc_request, len(orjson.dumps(prefetch, option=indent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="measured requests per protocol")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight per protocol")
    parser.add_argument(
        "--database", default=None, help="the server's decision log (default: serve's default, a SQLite file; 'none': no log)"
    )
    args = parser.parse_args()

    name, cds_body, grpc_body, prefetch_bytes = payloads()
    grpc_port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "needlepoint.cli", "serve", "--host", "127.0.0.1", "--port", str(grpc_port),
               "--workers", str(args.workers), "--http-port", str(http_port), "--insecure-dev", "--log-level", "WARNING"]
    if args.database:
        command += ["--database", args.database]
    server = subprocess.Popen(command, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        url = f"http://127.0.0.1:{http_port}/cds-services/hip-injection"
        deadline = time.monotonic() + 90
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{http_port}/cds-services", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=[("grpc.max_send_message_length", 64 << 20)])
        grpc_call = channel.unary_unary(
            "/needlepoint.v1.DecisionService/Evaluate", request_serializer=None, response_deserializer=None
        )
        clients = [httpx.Client(timeout=30) for _ in range(args.concurrency)]
        headers = {"Content-Type": "application/json"}

        def cds(i: int) -> float:
            started = time.perf_counter()
            response = clients[i % len(clients)].post(url, content=cds_body, headers=headers)
            elapsed = time.perf_counter() - started
            assert response.status_code == 200 and response.json()["cards"], response.text[:300]
            return elapsed

        def rpc(i: int) -> float:
            started = time.perf_counter()
            grpc_call(grpc_body, timeout=30)
            return time.perf_counter() - started

        timings: dict[str, list[float]] = {"cds": [], "grpc": []}
        spent = {"cds": 0.0, "grpc": 0.0}
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            for fn in (cds, rpc):
                list(pool.map(fn, range(30)))  # warm up: connections, sessions, caches
            block = 50
            for start in range(0, args.requests, block):
                for key, fn in (("cds", cds), ("grpc", rpc)):
                    began = time.perf_counter()
                    timings[key] += pool.map(fn, range(start, min(start + block, args.requests)))
                    spent[key] += time.perf_counter() - began
        print(
            f"needlepoint CDS Hooks benchmark: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        )
        print(
            f"patient {name}: prefetch {prefetch_bytes / 1e6:.2f} MB, CDS Hooks body {len(cds_body) / 1e6:.2f} MB, "
            f"gRPC request {len(grpc_body) / 1e6:.2f} MB; "
            f"{args.workers} workers, {args.concurrency} in flight, {args.requests} requests each"
        )
        for key, label in (("cds", "CDS Hooks order-sign"), ("grpc", "gRPC Evaluate (same record)")):
            ms = [t * 1000 for t in timings[key]]
            print(
                f"  {label:<30} p50 {pct(ms, 50):6.1f} ms   p99 {pct(ms, 99):6.1f} ms   max {max(ms):6.1f} ms   "
                f"{len(ms) / spent[key]:6.1f} req/s"
            )
        for c in clients:
            c.close()
        channel.close()
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
