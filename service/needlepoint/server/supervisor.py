"""The supervisor behind ``needlepoint serve``: N worker processes on one port, kept alive.

Every worker binds the same address with ``SO_REUSEPORT``, so the kernel spreads connections
across them. A worker that dies after it started serving (a crash in the rule engine's C
extension, an OOM kill) is replaced while the others keep serving; replacements back off when
crashes repeat. A worker that cannot start during the initial start-up (address in use, a broken
rule set) is a configuration error: the supervisor stops everything and exits 1. SIGTERM or
SIGINT stop the workers gracefully (they drain for ``grace`` seconds) and the supervisor exits 0.
Even one worker runs under the supervisor, so a crash costs the calls in flight, not the service.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from needlepoint.server.worker import WorkerConfig, run_worker

log = logging.getLogger("needlepoint.supervisor")

START_TIMEOUT = 60.0  # seconds the initial workers get to load their rule sets and bind
KILL_MARGIN = 5.0  # seconds past the grace period before a draining worker is killed
CRASH_WINDOW = 60.0  # crashes within this many seconds count towards the back-off
MAX_BACKOFF = 30.0


@dataclass
class _Worker:
    slot: int
    process: BaseProcess
    control: Connection | None
    started: float = field(default_factory=time.monotonic)
    ready: bool = False


class Supervisor:
    """Starts, watches, replaces and stops the worker processes."""

    def __init__(self, config: WorkerConfig, workers: int) -> None:
        if workers < 1:
            raise ValueError("at least one worker is needed")
        self._config = config
        self._count = workers
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._restarts: dict[int, float] = {}  # slot -> when (monotonic) to start it again
        self._crashes: deque[float] = deque()
        self._serving = False  # every initial worker has reported ready
        self._stopping = False

    def run(self) -> int:
        """Serve until signalled; the process exit code."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        previous_fd = signal.set_wakeup_fd(wake_w.fileno())
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        log.info("supervisor starting %d worker(s) on %s", self._count, self._config.address)
        try:
            for slot in range(self._count):
                self._spawn(slot)
            return self._watch(wake_r)
        finally:
            self._stop_all()
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            log.info("supervisor stopped")

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _spawn(self, slot: int) -> None:
        parent_end, child_end = self._ctx.Pipe()
        process = self._ctx.Process(
            target=run_worker, args=(self._config, child_end), name=f"needlepoint-worker-{slot}", daemon=False
        )
        process.start()
        child_end.close()
        self._workers[slot] = _Worker(slot, process, parent_end)
        log.info("worker %d pid %d started", slot, process.pid)

    def _watch(self, wake: socket.socket) -> int:
        start_deadline = time.monotonic() + START_TIMEOUT
        while not self._stopping:
            by_sentinel = {w.process.sentinel: w for w in self._workers.values()}
            by_control = {id(w.control): w for w in self._workers.values() if w.control is not None}
            waitables = [wake, *by_sentinel, *(w.control for w in by_control.values())]
            for ready in mp_connection.wait(waitables, self._timeout(start_deadline)):
                if ready is wake:
                    _drain(wake)
                elif isinstance(ready, int):
                    if not self._reap(by_sentinel[ready]):
                        return 1
                else:
                    self._read(by_control[id(ready)])
            if not self._serving and time.monotonic() > start_deadline:
                log.error("workers did not start within %.0fs; stopping", START_TIMEOUT)
                return 1
            self._restart_due()
        return 0

    def _timeout(self, start_deadline: float) -> float:
        now = time.monotonic()
        due = [*self._restarts.values()] + ([] if self._serving else [start_deadline])
        return max(0.0, min(due) - now) if due else 60.0

    def _read(self, worker: _Worker) -> None:
        if worker.control is None or worker.control.closed:  # reaped in this same round
            return
        try:
            message = worker.control.recv()
        except (EOFError, OSError):  # the worker is exiting; its sentinel will tell
            worker.control.close()
            worker.control = None
            return
        if message[0] == "ready":
            worker.ready = True
            _, pid, port = message
            log.info("worker %d pid %d serving on port %d", worker.slot, pid, port)
            if not self._serving and all(w.ready for w in self._workers.values()):
                self._serving = True
                log.info("serving with %d worker(s)", len(self._workers))

    def _reap(self, worker: _Worker) -> bool:
        """Forget an exited worker and schedule its replacement. False if start-up failed."""
        worker.process.join()
        if worker.control is not None:
            worker.control.close()
        del self._workers[worker.slot]
        how = _exit_description(worker.process.exitcode)
        if self._stopping:
            return True
        if not worker.ready and not self._serving:
            log.error("worker %d pid %d failed to start (%s); stopping", worker.slot, worker.process.pid, how)
            return False
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - CRASH_WINDOW:
            self._crashes.popleft()
        delay = 0.0 if len(self._crashes) <= 1 else min(MAX_BACKOFF, 0.5 * 2 ** (len(self._crashes) - 2))
        self._restarts[worker.slot] = now + delay
        log.error("worker %d pid %d died (%s); replacing it in %.1fs", worker.slot, worker.process.pid, how, delay)
        return True

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, when in list(self._restarts.items()):
            if when <= now:
                del self._restarts[slot]
                self._spawn(slot)

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait for them to drain, kill the ones that overstay."""
        self._stopping = True
        for worker in self._workers.values():
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + self._config.grace + KILL_MARGIN
        for worker in self._workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker %d pid %d did not stop in time; killing it", worker.slot, worker.process.pid)
                worker.process.kill()
                worker.process.join()
            else:
                how = _exit_description(worker.process.exitcode)
                log.info("worker %d pid %d stopped (%s)", worker.slot, worker.process.pid, how)
            if worker.control is not None:
                worker.control.close()
        self._workers.clear()


def _exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except BlockingIOError:
        pass
