"""Shared fixtures: repository paths, the Synthea bundles, the bundled rule set, and a real
``needlepoint serve`` process; and the summary line of the fast suite (tests marked slow left out).

Test modules use these through fixtures only (never ``from conftest import``: the rule sets'
directory has a conftest of its own, so the module name is ambiguous).
"""

from __future__ import annotations

import copy
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"
SYNTHEA = FIXTURES / "synthea"
CLIENTS = REPO / "clients"

# An editable install made before clients/ existed puts only service/ on the path.
if str(CLIENTS) not in sys.path:
    sys.path.insert(0, str(CLIENTS))


# -- the fast suite ---------------------------------------------------------------------------------
# pyproject.toml deselects the tests marked slow unless -m says otherwise; the summary says how
# many were left out and how to run them, so that a run of the fast suite is never taken for all.

_SLOW_LEFT_OUT = pytest.StashKey[int]()


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        config = items[0].config
        slow = sum(1 for item in items if item.get_closest_marker("slow"))
        config.stash[_SLOW_LEFT_OUT] = config.stash.get(_SLOW_LEFT_OUT, 0) + slow


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    left_out = config.stash.get(_SLOW_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(
            f"fast suite: {left_out} slow tests not run (scripts/test --all runs everything, scripts/test -m slow only those)"
        )


@dataclass(frozen=True)
class Sample:
    """A fixture bundle with the order to evaluate it under, and the instant to evaluate it at."""

    path: Path
    order: dict[str, str]
    as_of: str

    @property
    def bundle(self) -> bytes:
        return self.path.read_bytes()

    @property
    def order_args(self) -> list[str]:
        """The order as ``needlepoint evaluate`` options."""
        return [arg for key, value in self.order.items() for arg in (f"--{key}", value)]


# Servers started by the tests keep their default decision log in a directory of this run, not
# in the user's state directory.
_STATE_DIR = tempfile.mkdtemp(prefix="needlepoint-test-state-")


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CLIENTS), env.get("PYTHONPATH", "")) if p)
    env.setdefault("NEEDLEPOINT_STATE_DIR", _STATE_DIR)
    return env


def _needlepoint_command() -> list[str]:
    script = Path(sys.executable).with_name("needlepoint")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "needlepoint.cli"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``needlepoint serve`` on 127.0.0.1, with its log lines collected as they come."""

    def __init__(self, workers: int, *extra: str) -> None:
        self.port = _free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.workers = workers
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers), "--grace", "2"]
        self.process = subprocess.Popen(
            [*_needlepoint_command(), *args, *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=_subprocess_env(),
        )
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, *, start: int = 0, timeout: float = 30.0) -> re.Match[str]:
        """The first log line from index ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if match := regex.search(line):
                        return match
                start = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._eof:
                    log = "\n".join(self.lines)
                    raise AssertionError(f"no log line matching {pattern!r} within {timeout}s; log:\n{log}")
                self._changed.wait(remaining)

    def worker_pids(self) -> dict[int, int]:
        """The pid serving each worker slot, from the most recent log lines."""
        pids: dict[int, int] = {}
        with self._changed:
            for line in self.lines:
                if match := re.search(r"worker (\d+) pid (\d+) serving", line):
                    pids[int(match[1])] = int(match[2])
        return pids

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then the exit code (SIGKILL if it does not stop in time)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[ServerProcess]:
    """One real server per test module: two workers on a free loopback port. On teardown it must
    drain and exit 0 on SIGTERM."""
    server = ServerProcess(workers=2)
    try:
        server.wait_for(r"serving with 2 worker\(s\)", timeout=60)
    except AssertionError:
        server.stop()
        raise
    yield server
    code = server.stop()
    assert code == 0, "\n".join(server.lines)
    assert any("supervisor stopped" in line for line in server.lines)


@pytest.fixture(scope="session")
def server_process() -> type[ServerProcess]:
    """The ServerProcess class, for a test that needs a server of its own; it must stop it."""
    return ServerProcess


@pytest.fixture(scope="session")
def mafalda() -> Sample:
    """Mafalda Turcotte takes warfarin and has no INR on record: the rules must wait for one. Her
    bundle has no injection order, so it comes from the caller."""
    return Sample(
        path=SYNTHEA / "Mafalda_Turcotte_80833fb2-95c1-4f5b-ab5e-26230287ee61.json",
        order={"target": "hip-intra-articular", "side": "right", "intent": "therapeutic"},
        as_of="2025-06-02T09:00:00Z",
    )


@pytest.fixture(scope="session")
def synthea_bundles() -> dict[str, bytes]:
    """Every Synthea bundle, by the patient's first name."""
    return {path.name.split("_")[0]: path.read_bytes() for path in sorted(SYNTHEA.glob("*.json"))}


@pytest.fixture(scope="session")
def cli_command() -> list[str]:
    """The installed ``needlepoint`` entry point (or its module, if the script is absent)."""
    return _needlepoint_command()


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    """The environment for child processes: ours, with clients/ importable."""
    return _subprocess_env()


@pytest.fixture
def unused_port() -> Callable[[], int]:
    """A function that returns a loopback port nothing listens on (at the time of asking)."""
    return _free_port


@pytest.fixture(scope="session")
def hip_ruleset():
    """The bundled hip-injection rule set, loaded once."""
    from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset

    return load_ruleset(bundled_rulesets_dir() / "hip-injection")


@pytest.fixture(scope="session")
def _hip_documents_as_read() -> dict:
    from needlepoint.rulesets import bundled_rulesets_dir, read_documents

    return read_documents(bundled_rulesets_dir() / "hip-injection")


@pytest.fixture
def hip_documents(_hip_documents_as_read: dict) -> dict:
    """The bundled hip-injection rule set's documents (``read_documents``), for a test to change
    and build: read once per session (parsing the YAML is most of the cost of a build), and a deep
    copy for each test."""
    return copy.deepcopy(_hip_documents_as_read)


@pytest.fixture(scope="session")
def hip_evaluator(hip_ruleset):
    """An in-process evaluator on the bundled rule set, shared by the whole session."""
    from needlepoint.core.evaluator import Evaluator

    evaluator = Evaluator(hip_ruleset)
    yield evaluator
    evaluator.close()


@pytest.fixture(scope="session")
def engine(hip_evaluator):
    """The server's engine (``server.service.Engine``) on the shared evaluator of the bundled rule
    set, as ``Engine.load()`` builds it, shared by the whole session."""
    from needlepoint.server.service import Engine

    return Engine({"hip-injection": hip_evaluator})
