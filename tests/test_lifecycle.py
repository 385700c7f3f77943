"""The server's lifecycle under load, end to end on real ``needlepoint serve`` processes: SIGTERM
drains without a call ending CANCELLED or with any code clients do not retry; a worker killed with
SIGKILL is replaced and, thanks to the maximum connection age, gets traffic within seconds; a
replacement serves the supervisor's validated versions and pins, not what is on disk; reflection
answers as v1 and v1alpha."""

from __future__ import annotations

import collections
import re
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from needlepoint.rulesets import bundled_rulesets_dir
from needlepoint.v1 import decision_service_pb2, decision_service_pb2_grpc

pytestmark = pytest.mark.slow

SYNTHEA = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "synthea"
SMALL_BUNDLE = Path(__file__).parent / "data" / "fhir" / "hip_injection_order.json"
ORDER = {"target": "hip-intra-articular", "side": "right", "intent": "therapeutic"}
RETRYABLE = {"OK", "UNAVAILABLE"}


def _request(bundle: bytes, version: str = "") -> decision_service_pb2.EvaluateRequest:
    request = decision_service_pb2.EvaluateRequest(fhir_bundle=bundle, ruleset_version=version)
    request.as_of.FromJsonString("2025-06-02T09:00:00Z")
    for key, value in ORDER.items():
        setattr(request.order, key, value)
    return request


class Load:
    """Client threads, each on its own channel, keeping ``depth`` Evaluate calls in flight and
    counting the status code every call ends with."""

    def __init__(self, target: str, request: decision_service_pb2.EvaluateRequest, *, threads: int, depth: int) -> None:
        self.codes: collections.Counter[str] = collections.Counter()
        self.details: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(target, request, depth)) for _ in range(threads)]

    def _run(self, target: str, request: decision_service_pb2.EvaluateRequest, depth: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = decision_service_pb2_grpc.DecisionServiceStub(channel)
            while not self._stop.is_set():
                calls = [stub.Evaluate.future(request, timeout=60) for _ in range(depth)]
                for call in calls:
                    try:
                        call.result()
                        code, detail = "OK", ""
                    except grpc.RpcError as exc:
                        code, detail = exc.code().name, exc.details() or ""
                        if code == "UNAVAILABLE":
                            time.sleep(0.01)  # what a retry policy's back-off would do
                    with self._lock:
                        self.codes[code] += 1
                        if code not in RETRYABLE:
                            self.details[f"{code}: {detail}"] += 1

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)

    def count(self, code: str = "OK") -> int:
        with self._lock:
            return self.codes[code]


def _wait(predicate, timeout: float = 60.0, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(step)
    raise AssertionError("condition not reached in time")


def test_sigterm_under_load_ends_no_call_cancelled(server_process) -> None:
    """Calls queue behind running evaluations (the heaviest fixture bundle, 2 workers, 64 calls in
    flight); SIGTERM to the supervisor: every call ends OK or UNAVAILABLE, and it exits 0."""
    heaviest = max(SYNTHEA.glob("*.json"), key=lambda p: p.stat().st_size).read_bytes()
    server = server_process(2)
    try:
        server.wait_for(r"serving with 2 worker\(s\)", timeout=60)
        with Load(server.target, _request(heaviest), threads=8, depth=8) as load:
            _wait(lambda: load.count() >= 100, timeout=60)
            mark = len(server.lines)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(30) == 0, "\n".join(server.lines)
            stopped = time.monotonic() - signalled
            ok_at_exit = load.count()
            time.sleep(0.5)  # calls against the closed port: refused, UNAVAILABLE
        in_flight = [int(m) for m in re.findall(r"draining, grace [\d.]+s \((\d+) call", "\n".join(server.lines[mark:]))]
        print(f"\nSIGTERM under load: {dict(load.codes)}; {ok_at_exit} OK before exit; stopped in {stopped:.2f}s;"
              f" in flight at SIGTERM per worker: {in_flight}")
        assert set(load.codes) <= RETRYABLE, load.details.most_common(5)
        assert load.count() >= 100 and load.count("UNAVAILABLE") > 0
        assert len(in_flight) == 2
    finally:
        server.stop()


def _metric_samples(port: int) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def _worker_calls(port: int) -> dict[int, float]:
    return {int(labels["pid"]): value for name, labels, value in _metric_samples(port) if name == "needlepoint_worker_calls"}


def test_a_killed_worker_is_replaced_and_gets_traffic_within_seconds(server_process, unused_port) -> None:
    """SIGKILL one of two workers under load: the replacement serves, and existing clients'
    connections, aged out after 2 s, reach it within seconds; no call ends other than OK or
    UNAVAILABLE (those in flight on the killed worker)."""
    metrics_port = unused_port()
    server = server_process(2, "--max-connection-age", "2", "--metrics-port", str(metrics_port))
    try:
        server.wait_for(r"serving with 2 worker\(s\)", timeout=60)
        with Load(server.target, _request(SMALL_BUNDLE.read_bytes()), threads=6, depth=2) as load:
            _wait(lambda: load.count() >= 50, timeout=30)
            before = server.worker_pids()
            victim = before[0]
            mark = len(server.lines)
            killed = time.monotonic()
            __import__("os").kill(victim, signal.SIGKILL)
            match = server.wait_for(r"worker 0 pid (\d+) serving", start=mark, timeout=30)
            replacement, serving = int(match[1]), time.monotonic()
            _wait(lambda: _worker_calls(metrics_port).get(replacement, 0) > 0, timeout=30, step=0.05)
            traffic = time.monotonic()
            time.sleep(1.0)
        print(f"\nkill -9: replacement serving after {serving - killed:.2f}s, first calls on it after"
              f" {traffic - killed:.2f}s; calls by pid {_worker_calls(metrics_port)}; codes {dict(load.codes)}")
        assert set(load.codes) <= RETRYABLE, load.details.most_common(5)
        restarts = [v for name, _, v in _metric_samples(metrics_port) if name == "needlepoint_worker_restarts_total"]
        assert restarts == [1.0]
    finally:
        assert server.stop() == 0, "\n".join(server.lines)


def test_a_replacement_worker_serves_the_validated_versions_not_the_disk(tmp_path: Path, server_process) -> None:
    """After an accepted reload (v1) and a rejected one (v2: INR limit 9.0, which its own cases
    refute), SIGKILL the only worker: its replacement serves v1 with base still pinnable and the
    same last reload outcome, although v2 is what is on disk."""
    hip = tmp_path / "rulesets" / "hip-injection"
    shutil.copytree(bundled_rulesets_dir() / "hip-injection", hip)
    base = yaml.safe_load((hip / "ruleset.yaml").read_text(encoding="utf-8"))["version"]
    major, minor, patch = map(int, base.split("."))
    v1, v2 = f"{major}.{minor}.{patch + 1}", f"{major}.{minor}.{patch + 2}"
    server = server_process(1, "--rulesets", str(hip.parent), "--watch", "--watch-interval", "0.2")
    try:
        server.wait_for(r"serving with 1 worker\(s\)", timeout=60)
        channel = grpc.insecure_channel(server.target)
        stub = decision_service_pb2_grpc.DecisionServiceStub(channel)

        def get() -> decision_service_pb2.ruleset__pb2.Ruleset:
            return stub.GetRuleset(decision_service_pb2.GetRulesetRequest(id="hip-injection"), timeout=10, wait_for_ready=True)

        text = (hip / "ruleset.yaml").read_text()
        (hip / "ruleset.yaml").write_text(text.replace(f"version: {base}", f"version: {v1}", 1))
        _wait(lambda: get().last_reload.outcome == "accepted" and get().version == v1)
        v1_digest = get().digest
        text = (hip / "ruleset.yaml").read_text()
        (hip / "ruleset.yaml").write_text(text.replace(f"version: {v1}", f"version: {v2}", 1))
        params = (hip / "parameters.yaml").read_text()
        assert "inr_defer_above:\n  value: 3.0" in params
        (hip / "parameters.yaml").write_text(
            params.replace("inr_defer_above:\n  value: 3.0", "inr_defer_above:\n  value: 9.0", 1)
        )
        _wait(lambda: get().last_reload.outcome == "rejected")
        before = get().last_reload

        victim = server.worker_pids()[0]
        mark = len(server.lines)
        __import__("os").kill(victim, signal.SIGKILL)
        server.wait_for(r"worker 0 pid \d+ serving", start=mark, timeout=30)
        after = get()
        assert (after.version, after.digest, after.serving) == (v1, v1_digest, True)
        assert after.last_reload == before and after.last_reload.version == v2
        listed = stub.ListRulesets(decision_service_pb2.ListRulesetsRequest(), timeout=10).rulesets
        assert [(r.version, r.serving) for r in listed] == [(v1, True), (base, False)]
        assert stub.Evaluate(_request(SMALL_BUNDLE.read_bytes(), base), timeout=10).ruleset.version == base
        assert stub.Evaluate(_request(SMALL_BUNDLE.read_bytes()), timeout=10).ruleset.digest == v1_digest
        channel.close()
    finally:
        assert server.stop() == 0, "\n".join(server.lines)


def test_reflection_answers_as_v1_and_v1alpha(grpc_server) -> None:
    """grpcurl and other clients ask v1 first; v1alpha stays for older ones."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="needlepoint.v1.DecisionService"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection"),
    ]
    with grpc.insecure_channel(grpc_server.target) as channel:
        for version in ("v1", "v1alpha"):
            info = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            listing, described, v1_file = list(info(iter(asks), timeout=10))
            names = {s.name for s in listing.list_services_response.service}
            assert {"needlepoint.v1.DecisionService", "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection", "grpc.health.v1.Health"} <= names
            files = {descriptor_pb2.FileDescriptorProto.FromString(raw).name
                     for raw in described.file_descriptor_response.file_descriptor_proto}
            assert "needlepoint/v1/decision_service.proto" in files
            v1_files = {descriptor_pb2.FileDescriptorProto.FromString(raw).name
                        for raw in v1_file.file_descriptor_response.file_descriptor_proto}
            assert "grpc/reflection/v1/reflection.proto" in v1_files
