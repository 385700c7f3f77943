"""One server process: serve the rule sets the supervisor hands over, until told to stop, then drain.

A worker never reads rule sets from disk. It starts from the supervisor's :class:`Catalog` (the
versions accepted so far, the serving one first, and the last reload outcomes) and installs every
newer catalog the supervisor sends on the control pipe: it builds the versions it lacks in a
thread (parsing happened in the supervisor and the validation subprocess) and swaps them in on the
event loop in one step, between requests.

A worker stops on SIGTERM, or when its supervisor goes away (end of file on the control pipe), so
that a killed supervisor never leaves orphans bound to the port. Stopping: health reports
NOT_SERVING, decision-service calls dispatched from then on are answered UNAVAILABLE (clients
retry), the calls already dispatched get up to ``grace`` seconds to finish, and then the process
exits without the gRPC core's shutdown, which would end the calls still queued in the core
CANCELLED (a status clients do not retry); its closing sockets end them UNAVAILABLE instead.

Messages: the worker sends ``("ready", pid, port)`` once it serves and ``("installed", generation,
error)`` after each catalog; the supervisor sends ``("catalog", Catalog)`` or ``("stop",)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from needlepoint.core.evaluator import Evaluator
from needlepoint.core.ruleset import RuleSet
from needlepoint.security import logsafe
from needlepoint.security.transport import SecurityConfig
from needlepoint.server import metrics
from needlepoint.server.calls import CallGate
from needlepoint.server.reload import Accepted, Catalog, Registry
from needlepoint.server.service import Engine
from needlepoint.server.servicer import MAX_CONNECTION_AGE, MAX_CONNECTION_AGE_GRACE, server_options, start_server

if TYPE_CHECKING:  # imported where it is used: SQLAlchemy loads only when there is a decision log
    from needlepoint.decisionlog import DecisionLog

log = logging.getLogger("needlepoint.worker")

LOG_FORMAT = "%(asctime)s %(levelname)s needlepoint[%(process)d] %(name)s: %(message)s"
FLUSH_PAUSE = 0.1  # seconds after the last call so its answer leaves the socket before the exit


def setup_logging(level: str = "INFO") -> None:
    """One line per event, to stderr; tracebacks without exception messages (no patient data)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    logsafe.install(LOG_FORMAT)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    """How a worker serves. Picklable: it crosses the process boundary."""

    host: str = "127.0.0.1"
    port: int = 50051
    rulesets_dir: Path | None = None
    grace: float = 10.0  # seconds in-flight calls get to finish on shutdown
    log_level: str = "INFO"
    watch: bool = False  # hot-reload rule sets that change on disk
    watch_interval: float = 2.0  # seconds between looks at the rule-sets directory
    security: SecurityConfig | None = None  # TLS and token authentication (none: plaintext, open)
    http_port: int | None = None  # also serve CDS Hooks over HTTP on this port (needlepoint.cdshooks)
    insecure_dev: bool = False  # CDS Hooks without client authentication, CORS open: development only
    http_base_url: str | None = None  # the CDS Hooks public base URL (token audiences, links); None: derived
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call CDS Hooks (CORS)
    worklist_dir: Path | None = None  # the folder the worklist page (/worklist on the HTTP port) may read
    max_connection_age: float = MAX_CONNECTION_AGE  # seconds; 0 = connections live for ever
    max_connection_age_grace: float = MAX_CONNECTION_AGE_GRACE
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


def run_worker(config: WorkerConfig, control: Connection | None = None, catalog: Catalog | None = None) -> None:
    """Process entry point. Exits 1 if the worker cannot start, 0 once drained."""
    # A terminal's Ctrl-C reaches the whole process group; the supervisor answers it for us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(config.log_level)
    metrics.setup()
    try:
        asyncio.run(serve(config, control, catalog))  # returns only if it cannot start
    except Exception as exc:  # start-up failure: bad rule set, address in use...
        log.error("worker cannot serve: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        sys.exit(1)


def _exit_now() -> None:
    """Leave the process at once, with the server and every call task as they are: no gRPC core
    shutdown (it would end queued calls CANCELLED), no cancelling of the event loop's tasks (a
    cancelled call task answers CANCELLED too). The kernel closes the sockets; clients see
    UNAVAILABLE for whatever was still queued."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


class Installer:
    """Turns catalogs into the registry's evaluators, reusing those already compiled."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._built: dict[tuple[str, str, str], Evaluator] = {}

    def build(self, catalog: Catalog) -> dict[str, list[Evaluator]]:
        """Every version of the catalog as an evaluator, newest first, compiling only what is new.
        May run in a thread: it reads nothing the event loop changes (installs are sequential)."""
        versions: dict[str, list[Evaluator]] = {}
        for ruleset_id, accepted in catalog.versions.items():
            versions[ruleset_id] = [self._built.get(_key(a)) or a.evaluator() for a in accepted]
        return versions

    def install(self, catalog: Catalog, versions: dict[str, list[Evaluator]]) -> None:
        """Swap the built versions in (on the event loop, between requests); the registry closes
        the evaluators it no longer holds."""
        self.registry.install(versions, catalog.last_reload)
        self._built = {_key(e.ruleset): e for evaluators in versions.values() for e in evaluators}


def _key(item: Accepted | RuleSet) -> tuple[str, str, str]:
    """A version's identity: id, version and rule-set digest."""
    if isinstance(item, Accepted):
        return item.ruleset_id, item.version, item.digest
    return item.id, item.version, item.digest


async def serve(config: WorkerConfig, control: Connection | None = None, catalog: Catalog | None = None) -> None:
    """Serve until SIGTERM or end of file on ``control``; then drain for ``grace`` s. Without a
    catalog (a worker run on its own) the rule sets are loaded from ``config.rulesets_dir``."""
    if catalog is None:
        from needlepoint.rulesets import bundled_rulesets_dir
        from needlepoint.server.reload import load_catalog

        catalog, _ = load_catalog(config.rulesets_dir or bundled_rulesets_dir())
    registry = Registry()
    installer = Installer(registry)
    installer.install(catalog, installer.build(catalog))
    engine = Engine(registry)
    decision_log = _open_decision_log(config)
    gate = CallGate()
    options = server_options(
        reuse_port=True, max_connection_age=config.max_connection_age, max_connection_age_grace=config.max_connection_age_grace
    )
    running = await start_server(
        engine, config.address, interceptors=[gate], options=options, security=config.security, decision_log=decision_log
    )
    http = None
    if config.http_port is not None:
        from needlepoint.cdshooks.server import start_http

        # The worklist page has no sign-in of its own yet, so it is served only in a local trial
        # (--insecure-dev, loopback unless --insecure): never beside token-protected CDS Hooks.
        mounts = []
        if config.insecure_dev:
            from needlepoint.worklist.web import worklist_mount

            mounts.append(worklist_mount(engine, config.worklist_dir))
        http = await start_http(
            engine, config.host, config.http_port, grace=config.grace, tls=config.security.tls if config.security else None,
            mounts=mounts, **cds_hooks_options(config, engine, decision_log),
        )
    stop = asyncio.Event()
    catalogs: asyncio.Queue[Catalog] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    installing = None
    # Everything built so far (rule sets and their compiled plans, the gRPC and HTTP stacks) lives
    # as long as the worker: out of the collector's sight, a full collection no longer walks its
    # ~50,000 objects (about 7 ms) in the middle of someone's request.
    gc.collect()
    gc.freeze()
    if control is not None:
        loop.add_reader(control.fileno(), _on_control, loop, control, stop, catalogs)
        installing = asyncio.create_task(_install_catalogs(catalogs, installer, control))
        control.send(("ready", os.getpid(), running.port))
    address = format_address(config.host, running.port)
    log.info("serving on %s (rule sets: %s)", address, ", ".join(f"{i} {registry.serving(i)}" for i in engine.ruleset_ids))
    log.info("%s", (config.security or SecurityConfig()).describe())
    await stop.wait()
    if installing is not None:
        installing.cancel()
    log.info("draining, grace %.1fs (%d call(s) in flight)", config.grace, gate.in_flight)
    await running.health.enter_graceful_shutdown()
    gate.drain()
    if http is not None:  # CDS Hooks: stop taking requests, let those in flight finish within the grace
        await http.stop(config.grace)
    if await gate.idle(config.grace):
        await asyncio.sleep(FLUSH_PAUSE)
        log.info("stopped")
    else:
        log.warning("stopped with %d call(s) still in flight after %.1fs; they end UNAVAILABLE", gate.in_flight, config.grace)
    if decision_log is not None:  # every record queued so far is committed before the process goes
        decision_log.close()
    _exit_now()


async def _install_catalogs(catalogs: asyncio.Queue[Catalog], installer: Installer, control: Connection) -> None:
    """Install each catalog the supervisor sends, in order: compile in a thread, swap on the loop."""
    while True:
        catalog = await catalogs.get()
        error = ""
        try:
            started = time.perf_counter()
            versions = await asyncio.to_thread(installer.build, catalog)
            built = time.perf_counter()
            installer.install(catalog, versions)
            swapped = time.perf_counter()
            # the new rule sets live until the next reload: out of the collector's sight too (one
            # full collection now, which also frees what the old ones left in cycles)
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            serving = ", ".join(f"{i} {installer.registry.serving(i)}" for i in installer.registry.ids)
            log.info("installed rule sets generation %d (serving %s; built in %.0f ms off the loop, swapped in %.1f ms)",
                     catalog.generation, serving, (built - started) * 1000, (swapped - built) * 1000)
        except Exception as exc:  # the previous versions keep serving
            error = str(exc)
            log.exception("cannot install rule sets generation %d; the previous ones keep serving", catalog.generation)
        with contextlib.suppress(OSError, ValueError):
            control.send(("installed", catalog.generation, error))


def _on_control(
    loop: asyncio.AbstractEventLoop, control: Connection, stop: asyncio.Event, catalogs: asyncio.Queue[Catalog]
) -> None:
    """A catalog to install; ``("stop",)`` or the supervisor's end of the pipe closing means stop."""
    try:
        message = control.recv()
    except (EOFError, OSError):
        log.warning("supervisor gone; stopping")
        message = ("stop",)
    if message[0] == "catalog":
        catalogs.put_nowait(message[1])
        return
    loop.remove_reader(control.fileno())
    stop.set()


def http_base_url(config: WorkerConfig) -> str:
    """The CDS Hooks public base URL: ``--http-base-url``, else ``http(s)://HOST:HTTP_PORT`` from
    the bound address (https when TLS is configured)."""
    if config.http_base_url:
        return config.http_base_url.rstrip("/")
    scheme = "https" if config.security is not None and config.security.tls is not None else "http"
    return f"{scheme}://{format_address(config.host, config.http_port or 0)}"


def cds_hooks_options(config: WorkerConfig, engine: Engine, decision_log: DecisionLog | None) -> dict:
    """``create_app`` options for this worker: the JWT check (each endpoint's exact URL as the
    audience) when tokens are configured, or insecure development mode, said loudly at every
    start; the decision log; CORS origins; the public base URL for token audiences and links."""
    options: dict = {"decision_log": decision_log, "cors_origins": list(config.cors_origins) or None}
    tokens = config.security.tokens if config.security is not None else None
    if config.insecure_dev:
        log.warning(
            "INSECURE-DEV: CDS Hooks on port %d accepts every caller without a token%s; "
            "development only, never with patient data",
            config.http_port,
            " and lets any web page call it (CORS *)" if not config.cors_origins or "*" in config.cors_origins else "",
        )
        options["insecure_dev"] = True
        if config.http_base_url:
            options["public_url"] = http_base_url(config)
        return options
    if tokens is None:
        raise ValueError("CDS Hooks needs token authentication (--auth-jwks/--auth-jku with --auth-issuer) or --insecure-dev")
    from needlepoint.cdshooks.auth import JwtAuthenticator

    base = http_base_url(config)
    options["authenticate"] = JwtAuthenticator(tokens, base, lambda: engine.ruleset_ids)
    options["public_url"] = base
    log.info("CDS Hooks: bearer tokens required, aud = the endpoint's URL under %s, %d issuer(s)", base, len(tokens.issuers))
    return options


def _open_decision_log(config: WorkerConfig) -> DecisionLog | None:
    """The worker's decision log writer, or None when serving without one."""
    if not config.database:
        return None
    from needlepoint.decisionlog import DecisionLog, Masker
    from needlepoint.decisionlog.database import redacted
    from needlepoint.decisionlog.masking import parse_fields

    decision_log = DecisionLog(config.database, masker=Masker(parse_fields(config.mask)))
    log.info("decision log: %s", redacted(config.database))
    return decision_log
