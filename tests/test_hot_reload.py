"""Hot reload under load (``serve --watch``): a changed rule set that passes its own tests is
swapped in with zero failed requests; a broken one is rejected, the old version keeps serving and
GetRuleset says why; earlier versions can be pinned side by side."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml

from needlepoint.rulesets import bundled_rulesets_dir
from needlepoint.v1 import decision_service_pb2, decision_service_pb2_grpc

BUNDLE = Path(__file__).parent / "data" / "fhir" / "hip_injection_order.json"

pytestmark = pytest.mark.slow


def _request(version: str = "") -> decision_service_pb2.EvaluateRequest:
    request = decision_service_pb2.EvaluateRequest(fhir_bundle=BUNDLE.read_bytes(), ruleset_version=version)
    request.as_of.FromJsonString("2025-06-02T09:00:00Z")
    return request


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("condition not reached in time")


def test_reload_under_load(tmp_path: Path, server_process) -> None:
    rulesets = tmp_path / "rulesets"
    shutil.copytree(bundled_rulesets_dir() / "hip-injection", rulesets / "hip-injection")
    hip = rulesets / "hip-injection"
    base = yaml.safe_load((hip / "ruleset.yaml").read_text(encoding="utf-8"))["version"]
    major, minor, patch = map(int, base.split("."))
    v1, v2 = f"{major}.{minor}.{patch + 1}", f"{major}.{minor}.{patch + 2}"
    server = server_process(1, "--rulesets", str(rulesets), "--watch", "--watch-interval", "0.2")
    try:
        server.wait_for(r"serving with 1 worker\(s\)", timeout=60)
        channel = grpc.insecure_channel(server.target)
        stub = decision_service_pb2_grpc.DecisionServiceStub(channel)

        def serving() -> tuple[str, str]:
            rs = stub.GetRuleset(decision_service_pb2.GetRulesetRequest(id="hip-injection"), timeout=5)
            return rs.version, rs.last_reload.outcome

        failures: list[BaseException] = []
        versions_seen: set[str] = set()
        answered = 0
        stop = threading.Event()

        def load() -> None:
            nonlocal answered
            while not stop.is_set():
                try:
                    versions_seen.add(stub.Evaluate(_request(), timeout=10).ruleset.version)
                    answered += 1
                except grpc.RpcError as exc:  # any failed request fails the test
                    failures.append(exc)

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            # 1. a change that passes lint and the rule set's own cases is swapped in
            _edit(hip / "ruleset.yaml", f"version: {base}", f"version: {v1}")
            _edit(hip / "ruleset.yaml", "title: Image-guided hip injection", "title: Image-guided hip injection (site copy)")
            _wait(lambda: serving() == (v1, "accepted"))
            _wait(lambda: v1 in versions_seen)

            # 2. a threshold change that its own test cases catch is rejected; v1 keeps serving
            _edit(hip / "ruleset.yaml", f"version: {v1}", f"version: {v2}")
            _edit(hip / "parameters.yaml", "inr_defer_above:\n  value: 3.0", "inr_defer_above:\n  value: 2.5")
            _wait(lambda: serving()[1] == "rejected")
            rs = stub.GetRuleset(decision_service_pb2.GetRulesetRequest(id="hip-injection"), timeout=5)
            assert rs.version == v1 and rs.serving
            assert rs.last_reload.version == v2 and "test case(s) fail" in rs.last_reload.message

            # 3. a rule set that does not even load is rejected too
            (hip / "rules" / "10-bleeding.yaml").write_text("- id: [not, a, rule\n")
            _wait(
                lambda: (
                    "does not load"
                    in stub.GetRuleset(decision_service_pb2.GetRulesetRequest(id="hip-injection"), timeout=5).last_reload.message
                )
            )
            time.sleep(0.5)  # requests keep flowing against v1 meanwhile
        finally:
            stop.set()
            for t in threads:
                t.join()

        assert failures == [], failures[:3]
        assert answered > 20 and versions_seen <= {base, v1}
        # both versions stay loaded side by side and can be pinned
        listed = stub.ListRulesets(decision_service_pb2.ListRulesetsRequest(), timeout=5).rulesets
        assert [(r.version, r.serving) for r in listed] == [(v1, True), (base, False)]
        assert stub.Evaluate(_request(base), timeout=10).ruleset.version == base
        with pytest.raises(grpc.RpcError) as caught:
            stub.Evaluate(_request("0.9.0"), timeout=10)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert any("change rejected, previous version keeps serving" in line for line in server.lines)
        channel.close()
    finally:
        assert server.stop() == 0, "\n".join(server.lines)


def test_a_file_saved_during_validation_is_never_served_unvalidated(tmp_path: Path, server_process) -> None:
    """The finding behind issue 8, item 6: a change (v1) is being validated when a second save
    lands (the INR limit raised to 9.0 under the same version, which 12 of the rule set's own cases
    refute). What is served must always be a validated snapshot: the base, then v1 as validated,
    never v1 with 9.0; the second save is judged on its own and rejected."""
    from needlepoint.rulesets import load_ruleset

    hip = tmp_path / "rulesets" / "hip-injection"
    shutil.copytree(bundled_rulesets_dir() / "hip-injection", hip)
    base = yaml.safe_load((hip / "ruleset.yaml").read_text(encoding="utf-8"))["version"]
    major, minor, patch = map(int, base.split("."))
    v1 = f"{major}.{minor}.{patch + 1}"
    expected = tmp_path / "expected" / "hip-injection"  # v1 as it is when validation starts
    shutil.copytree(hip, expected)
    _edit(expected / "ruleset.yaml", f"version: {base}", f"version: {v1}")
    validated = {load_ruleset(hip).digest, load_ruleset(expected).digest}

    server = server_process(1, "--rulesets", str(hip.parent), "--watch", "--watch-interval", "0.2")
    try:
        server.wait_for(r"serving with 1 worker\(s\)", timeout=60)
        channel = grpc.insecure_channel(server.target)
        stub = decision_service_pb2_grpc.DecisionServiceStub(channel)
        served: dict[str, int] = {}
        failures: list[BaseException] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    digest = stub.Evaluate(_request(), timeout=10).ruleset.digest
                    served[digest] = served.get(digest, 0) + 1
                except grpc.RpcError as exc:
                    failures.append(exc)

        def last_reload():
            return stub.GetRuleset(decision_service_pb2.GetRulesetRequest(id="hip-injection"), timeout=5).last_reload

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            mark = len(server.lines)
            _edit(hip / "ruleset.yaml", f"version: {base}", f"version: {v1}")
            server.wait_for(r"rule set changed on disk: .*; validating", start=mark, timeout=30)
            time.sleep(0.2)  # the validation is running: its subprocess is starting or checking
            _edit(hip / "parameters.yaml", "inr_defer_above:\n  value: 3.0", "inr_defer_above:\n  value: 9.0")
            saved_during_validation = not any("now serving" in line or "rejected" in line for line in server.lines[mark:])
            server.wait_for(r"rule set hip-injection .*(now serving|rejected)", start=mark, timeout=60)
            _wait(lambda: last_reload().outcome == "rejected" and last_reload().version == v1)
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert saved_during_validation, "the second save landed after the first verdict; the test proves nothing"
        assert failures == [], failures[:3]
        assert set(served) <= validated, served
        rs = stub.GetRuleset(decision_service_pb2.GetRulesetRequest(id="hip-injection"), timeout=5)
        assert rs.version == v1 and rs.digest == load_ruleset(expected).digest
        assert {p.name: p.value for p in rs.parameters}["inr_defer_above"] == "3.0"
        assert rs.last_reload.version == v1 and rs.last_reload.outcome == "rejected"
        assert "test case(s) fail" in rs.last_reload.message
        channel.close()
    finally:
        assert server.stop() == 0, "\n".join(server.lines)
