"""One server process: load the rule sets, serve until told to stop, then drain.

A worker stops on SIGTERM, or when its supervisor goes away (end of file on the control
pipe), so that a killed supervisor never leaves orphans bound to the port. It tells the
supervisor ``("ready", pid, port)`` once it serves.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from needlepoint.rulesets import bundled_rulesets_dir
from needlepoint.server.engine import Engine
from needlepoint.server.reload import Watcher
from needlepoint.server.servicer import start_server

log = logging.getLogger("needlepoint.worker")

LOG_FORMAT = "%(asctime)s %(levelname)s needlepoint[%(process)d] %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """One line per event, to stderr."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How a worker serves. Picklable: it crosses the process boundary."""

    host: str = "[::]"
    port: int = 50051
    rulesets_dir: Path | None = None
    grace: float = 10.0  # seconds in-flight calls get to finish on shutdown
    log_level: str = "INFO"
    watch: bool = False  # hot-reload rule sets that change on disk
    watch_interval: float = 2.0  # seconds between looks at the rule-sets directory
    database: str | None = None  # decision log URL (migrated by the caller); None: no log
    mask: str = "default"  # the decision log's masked identifiers (needlepoint.decisionlog.masking)

    @property
    def address(self) -> str:
        """``host:port``, an IPv6 host in brackets."""
        return format_address(self.host, self.port)


def format_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def run_worker(config: WorkerConfig, control: Connection | None = None) -> None:
    """Process entry point. Exits 1 if the worker cannot start."""
    # A terminal's Ctrl-C reaches the whole process group; the supervisor answers it for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(config.log_level)
    try:
        asyncio.run(serve(config, control))
    except Exception as exc:  # start-up failure: bad rule set, address in use...
        log.error("worker cannot serve: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        sys.exit(1)


async def serve(config: WorkerConfig, control: Connection | None = None) -> None:
    """Serve until SIGTERM or end of file on ``control``; then drain for ``grace`` s."""
    engine = Engine.load(config.rulesets_dir)
    decision_log = _open_decision_log(config)
    running = await start_server(engine, config.address, decision_log=decision_log)
    watcher_task = None
    if config.watch:
        directory = config.rulesets_dir or bundled_rulesets_dir()
        watcher_task = asyncio.create_task(Watcher(directory, engine.registry, config.watch_interval).run())
        log.info("watching %s for rule-set changes every %.1fs", directory, config.watch_interval)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if control is not None:
        loop.add_reader(control.fileno(), _on_control, loop, control, stop)
        control.send(("ready", os.getpid(), running.port))
    address = format_address(config.host, running.port)
    log.info("serving on %s (rule sets: %s)", address, ", ".join(engine.ruleset_ids))
    await stop.wait()
    if watcher_task is not None:
        watcher_task.cancel()
    log.info("draining, grace %.1fs", config.grace)
    await running.stop(config.grace)
    if decision_log is not None:
        decision_log.close()
    log.info("stopped")


def _open_decision_log(config: WorkerConfig):
    """The worker's decision log writer, or None when serving without one."""
    if not config.database:
        return None
    from needlepoint.decisionlog import DecisionLog, Masker
    from needlepoint.decisionlog.database import redacted
    from needlepoint.decisionlog.masking import parse_fields

    decision_log = DecisionLog(config.database, masker=Masker(parse_fields(config.mask)))
    log.info("decision log: %s", redacted(config.database))
    return decision_log


def _on_control(loop: asyncio.AbstractEventLoop, control: Connection, stop: asyncio.Event) -> None:
    """Any message, or the supervisor's end of the pipe closing, means stop."""
    try:
        control.recv()
    except (EOFError, OSError):
        log.warning("supervisor gone; stopping")
    loop.remove_reader(control.fileno())
    stop.set()
