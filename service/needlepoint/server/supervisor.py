"""The supervisor behind ``needlepoint serve``: N worker processes on one port, kept alive, all
serving the same validated rule-set versions.

Every worker binds the same address with ``SO_REUSEPORT``, so the kernel spreads connections
across them. A worker that dies after it started serving (a crash in the rule engine's C
extension, an OOM kill) is replaced while the others keep serving; replacements back off when
crashes repeat. A worker that cannot start during the initial start-up (address in use, a broken
rule set) is a configuration error: the supervisor stops everything and exits 1. SIGTERM or
SIGINT stop the workers gracefully (they drain for ``grace`` seconds) and the supervisor exits 0.
Even one worker runs under the supervisor, so a crash costs the calls in flight, not the service.

The supervisor owns the rule sets: it reads them once at start-up into a :class:`Catalog` and
starts every worker, replacements included, from the current catalog (the same versions, the same
serving choice, the same pins). With ``--watch`` its one :class:`Watcher` thread validates changes
in a subprocess; an accepted version goes into the catalog, which is sent to every worker. With a
metrics port it also serves the Prometheus metrics of all processes (see ``metrics``).
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing import connection as mp_connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from needlepoint.rulesets import bundled_rulesets_dir
from needlepoint.server import metrics
from needlepoint.server.reload import Catalog, ReloadOutcome, Snapshot, Watcher, id_of, load_catalog
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
    generation: int = 0  # the catalog generation the worker has (or was started with)
    outbox: queue.SimpleQueue[bytes | None] = field(default_factory=queue.SimpleQueue)

    def start_sender(self) -> None:
        """Send the outbox's messages from a thread of their own: a worker stuck in the C engine
        (it can hang holding the GIL) must not block the supervisor's loop on a full pipe."""
        threading.Thread(target=self._send_all, name=f"needlepoint-send-{self.slot}", daemon=True).start()

    def close_control(self) -> None:
        """Close the control pipe and end the sender thread."""
        self.outbox.put(None)
        if self.control is not None:
            self.control.close()

    def _send_all(self) -> None:
        control = self.control
        while control is not None and (data := self.outbox.get()) is not None:
            try:
                control.send_bytes(data)
            except (OSError, ValueError):  # the worker is gone; its sentinel will tell
                return


class Supervisor:
    """Starts, watches, replaces and stops the worker processes."""

    def __init__(self, config: WorkerConfig, workers: int, *, metrics_address: tuple[str, int] | None = None) -> None:
        if workers < 1:
            raise ValueError("at least one worker is needed")
        self._config = config
        self._count = workers
        self._metrics_address = metrics_address
        self._catalog = Catalog()
        self._verdicts: queue.SimpleQueue[tuple[Snapshot, dict]] = queue.SimpleQueue()
        self._wake_w: socket.socket | None = None
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, _Worker] = {}
        self._restarts: dict[int, float] = {}  # slot -> when (monotonic) to start it again
        self._crashes: deque[float] = deque()
        self._serving = False  # every initial worker has reported ready
        self._stopping = False

    def run(self) -> int:
        """Serve until signalled; the process exit code."""
        # Workers run several threads (the event loop, the heavy lane, the decision log's writer,
        # gRPC's own); glibc gives each thread that allocates a heap of its own, and those heaps
        # keep what they once held. Two arenas bound that: a worker's memory after 10,000 mixed
        # requests stayed within 3–5 % of its size after the first 1,000 (10.3 % without), and
        # 8 % lower. Read by glibc when a worker starts; an operator's own setting wins.
        os.environ.setdefault("MALLOC_ARENA_MAX", "2")
        metrics_dir = metrics.prepare_directory() if self._metrics_address else None
        try:
            return self._run()
        finally:
            if metrics_dir:
                metrics.remove_directory(metrics_dir)

    def _run(self) -> int:
        directory = self._config.rulesets_dir or bundled_rulesets_dir()
        try:
            self._catalog, seen = load_catalog(directory)
        except Exception as exc:  # noqa: BLE001 - a broken rule set at start-up is a configuration error
            log.error("cannot load rule sets: %s", exc)
            return 1
        if self._metrics_address:
            metrics.setup()
            host, port = self._metrics_address
            try:
                bound = metrics.serve_http(host, port)
            except OSError as exc:
                log.error("cannot serve metrics on %s:%d: %s", host, port, exc)
                return 1
            log.info("metrics on http://%s:%d/metrics", host if ":" not in host.strip("[]") else f"[{host.strip('[]')}]", bound)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w
        previous_fd = signal.set_wakeup_fd(wake_w.fileno())
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        watcher = None
        if self._config.watch:
            watcher = Watcher(directory, seen, self._config.watch_interval, self._post_verdict)
            watcher.start()
            log.info("watching %s for rule-set changes every %.1fs", directory, self._config.watch_interval)
        log.info("supervisor starting %d worker(s) on %s", self._count, self._config.address)
        try:
            for slot in range(self._count):
                self._spawn(slot)
            return self._watch(wake_r)
        finally:
            if watcher is not None:
                watcher.stop(timeout=2.0)
            self._stop_all()
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._wake_w = None
            wake_r.close()
            wake_w.close()
            log.info("supervisor stopped")

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def _post_verdict(self, snapshot: Snapshot, verdict: dict) -> None:
        """From the watcher's thread: hand a verdict to the supervisor's loop and wake it."""
        self._verdicts.put((snapshot, verdict))
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"v")
        except OSError:  # full or closed: the loop looks at the queue on every turn anyway
            pass

    def _apply_verdicts(self) -> None:
        """Record every verdict waiting: an accepted version joins the catalog (unless it reuses a
        loaded version number for other content), and every ready worker gets the new catalog."""
        changed = False
        while True:
            try:
                snapshot, verdict = self._verdicts.get_nowait()
            except queue.Empty:
                break
            accepted = verdict.get("accepted") if verdict.get("ok") else None
            ruleset_id = accepted.ruleset_id if accepted else verdict.get("id") or id_of(snapshot)
            message = verdict["message"]
            if accepted is not None and (problem := self._catalog.conflict(accepted)):
                accepted, message = None, problem
            if accepted is not None:
                self._catalog.add(accepted)
            outcome = ReloadOutcome(
                "accepted" if accepted else "rejected", message, dt.datetime.now(dt.timezone.utc),
                verdict.get("version", ""), verdict.get("digest", ""),
            )
            self._catalog.record(ruleset_id, outcome)
            metrics.reload(ruleset_id, outcome.outcome)
            changed = True
            if accepted:
                log.info("rule set %s %s now serving (%s; files %s)", ruleset_id, outcome.version, message, accepted.files_digest)
            else:
                log.warning("rule set %s change rejected, previous version keeps serving: %s", ruleset_id, message)
        if changed:
            for worker in self._workers.values():
                if worker.ready:
                    self._send_catalog(worker)

    def _send_catalog(self, worker: _Worker) -> None:
        """Send the current catalog to a worker that lacks it."""
        if worker.control is None or worker.generation == self._catalog.generation:
            return
        worker.outbox.put(pickle.dumps(("catalog", self._catalog)))  # pickled now: the catalog changes later
        worker.generation = self._catalog.generation

    def _spawn(self, slot: int) -> None:
        parent_end, child_end = self._ctx.Pipe()
        process = self._ctx.Process(
            target=run_worker, args=(self._config, child_end, self._catalog), name=f"needlepoint-worker-{slot}", daemon=False
        )
        process.start()
        child_end.close()
        self._workers[slot] = worker = _Worker(slot, process, parent_end, generation=self._catalog.generation)
        worker.start_sender()
        log.info("worker %d pid %d started", slot, process.pid)

    def _watch(self, wake: socket.socket) -> int:
        start_deadline = time.monotonic() + START_TIMEOUT
        while not self._stopping:
            by_sentinel = {w.process.sentinel: w for w in self._workers.values()}
            by_control = {id(w.control): w for w in self._workers.values() if w.control is not None}
            controls = [w.control for w in by_control.values() if w.control is not None]
            waitables: list[socket.socket | int | Connection] = [wake, *by_sentinel, *controls]
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
            self._apply_verdicts()
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
            worker.close_control()
            worker.control = None
            return
        if message[0] == "ready":
            worker.ready = True
            _, pid, port = message
            log.info("worker %d pid %d serving on port %d", worker.slot, pid, port)
            self._send_catalog(worker)  # a reload accepted while it started
            metrics.workers_serving(sum(w.ready for w in self._workers.values()))
            if not self._serving and all(w.ready for w in self._workers.values()):
                self._serving = True
                log.info("serving with %d worker(s)", len(self._workers))
        elif message[0] == "installed":
            _, generation, error = message
            if error:
                log.error("worker %d pid %d could not install rule sets generation %d: %s",
                          worker.slot, worker.process.pid, generation, error)

    def _reap(self, worker: _Worker) -> bool:
        """Forget an exited worker and schedule its replacement. False if start-up failed."""
        worker.process.join()
        worker.close_control()
        del self._workers[worker.slot]
        assert worker.process.pid is not None  # the process was started, so it has a pid
        metrics.process_gone(worker.process.pid)
        metrics.workers_serving(sum(w.ready for w in self._workers.values()))
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
        metrics.worker_restart()
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
            worker.close_control()
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
