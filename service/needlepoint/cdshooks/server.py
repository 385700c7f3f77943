"""Serving the CDS Hooks app with uvicorn inside a worker's own event loop.

:func:`start_http` binds the port itself with ``SO_REUSEPORT`` (so every worker process of
``needlepoint serve`` listens on the same HTTP port, as they do on the gRPC port, and the kernel
spreads connections), runs ``uvicorn.Server.serve`` as a task on the running loop, and returns once
it accepts connections. uvicorn's own signal handling is switched off: the worker owns SIGTERM and
SIGINT and stops the HTTP server through :meth:`RunningHttp.stop`, draining requests in flight.

TLS comes from the same :class:`~needlepoint.security.transport.TlsConfig` as gRPC's
(``--tls-cert``/``--tls-key``; with ``--client-ca`` a client certificate is required here too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.routing import Mount

from needlepoint.cdshooks.app import create_app
from needlepoint.security.transport import TlsConfig
from needlepoint.server.service import Engine

log = logging.getLogger("needlepoint.cdshooks")


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class RunningHttp:
    """A started HTTP server: its bound port, and how to stop it."""

    port: int
    server: uvicorn.Server
    task: asyncio.Task

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in flight finish for up to ``grace`` seconds, then close."""
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout=grace + 1.0)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``[::]`` or an IPv6 literal: dual-stack), shared by
    processes that set SO_REUSEPORT the same way."""
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose proto says
    # TCP, and without it Nagle and delayed ACKs add about 40 ms to every large request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((bare, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def start_http(
    engine: Engine, host: str, port: int, *, grace: float = 10.0, tls: TlsConfig | None = None, mounts: Sequence[Mount] = (),
    **app_options: Any,
) -> RunningHttp:
    """Serve the CDS Hooks app for ``engine`` on ``host:port`` from the running event loop, over
    TLS when ``tls`` is given.

    ``app_options`` go to :func:`needlepoint.cdshooks.app.create_app` (``insecure_dev``,
    ``authenticate``, the stores, ``public_url``, ``decision_log``, ``cors_origins``...). Port 0
    picks a free port (see ``.port``). ``mounts`` are other apps served beside CDS Hooks, outside
    its middleware (the worklist page). Raises OSError if the address cannot be bound,
    RuntimeError if the server does not start.
    """
    app = create_app(engine, **app_options)
    if mounts:
        app = Starlette(routes=[*mounts, Mount("/", app)])
    sock = bind_socket(host, port)
    config = uvicorn.Config(
        app,
        log_config=None,  # the process's logging stays as the worker set it up
        access_log=False,
        lifespan="off",
        http="httptools",
        timeout_graceful_shutdown=int(max(grace, 1)),
        server_header=False,
        **_tls_options(tls),
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="needlepoint-http")
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # re-raise why it could not start
            raise RuntimeError("the HTTP server stopped before it started")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    shown = host if ":" not in host.strip("[]") else f"[{host.strip('[]')}]"
    log.info("CDS Hooks on %s://%s:%d/cds-services", "https" if tls is not None else "http", shown, bound)
    return RunningHttp(bound, server, task)


def _tls_options(tls: TlsConfig | None) -> dict[str, Any]:
    """uvicorn's TLS settings for ``tls`` (none: plaintext). TLS 1.2 at least, uvicorn's default
    context otherwise; a client CA makes the handshake require a certificate it signed."""
    if tls is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
    if tls.client_ca_file is not None:
        options.update(ssl_ca_certs=str(tls.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options
