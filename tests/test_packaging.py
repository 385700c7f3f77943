"""`pip install .` gives a working `needlepoint` command: build the real wheel, install it into a
fresh virtual environment, and evaluate a bundle from outside the repository."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "tests" / "data" / "fhir" / "hip_injection_order.json"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("needlepoint-*.whl")
    return built


def test_the_wheel_carries_generated_code_rule_sets_and_the_client(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "needlepoint/v1/decision_service_pb2_grpc.py" in names
    assert "needlepoint/bundled_rulesets/hip-injection/ruleset.yaml" in names
    assert "needlepoint/bundled_rulesets/hip-injection/tests/bleeding.yaml" in names
    assert "needlepoint_client/client.py" in names
    assert "needlepoint/proto/needlepoint/v1/decision_service.proto" in names
    assert not any(n.endswith("conftest.py") for n in names)


def test_an_installed_wheel_evaluates_a_bundle(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    # The dependencies come from this environment (a path entry, so its editable install of
    # needlepoint is not activated); the package itself only from the wheel.
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = subprocess.run(
        [env_dir / "bin" / "needlepoint", "evaluate", str(BUNDLE), "--json", "--as-of", "2025-06-02T09:00:00Z"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    decision = json.loads(result.stdout)
    assert decision["ruleset"]["id"] == "hip-injection"
    assert decision["explanations"]
    where = subprocess.run(
        [python, "-c", "import needlepoint; print(needlepoint.__file__)"], capture_output=True, text=True, check=True
    ).stdout
    assert str(site) in where  # the wheel's copy, not the repository's
