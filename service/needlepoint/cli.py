"""The ``needlepoint`` command: run the server, or evaluate a FHIR Bundle from the shell.

``needlepoint evaluate`` builds the same EvaluateRequest whether it evaluates in-process or
through ``--server``, and renders the same Decision message, so both print identical JSON and
fail with identical messages. Exit codes: 0 a decision, 2 input that cannot be evaluated (the
message is the gRPC error's ``path: problem``), 1 anything else (server unreachable, broken rule
set).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn

import click

from needlepoint import __version__
from needlepoint.cli_batch import command as batch_command
from needlepoint.cli_cds import cds as cds_command
from needlepoint.cli_decisions import DATABASE_OPTION, MASK_OPTION, decisions, migrate_for_serve
from needlepoint.cli_options import order_options, parse_instant
from needlepoint.cli_rules import LazyGroup, rules
from needlepoint.cli_worklist import command as worklist_command
from needlepoint.rulesets import DEFAULT_RULESET
from needlepoint.security.options import client_connection_options, server_security_options

if TYPE_CHECKING:
    from needlepoint.security.transport import SecurityConfig
    from needlepoint.v1.decision_pb2 import Decision
    from needlepoint.v1.decision_service_pb2 import EvaluateRequest

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2

_RULESETS_OPTION = click.option(
    "--rulesets",
    "rulesets_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory of rule sets, one per subdirectory with a ruleset.yaml (default: the bundled ones).",
)


@click.group(cls=LazyGroup, lazy_commands={"explain": "needlepoint.cli_explain:command"})
@click.version_option(__version__, prog_name="needlepoint")
def main() -> None:
    """Needlepoint: decision support for image-guided hip injections."""


main.add_command(rules)
main.add_command(cds_command)
main.add_command(batch_command)
main.add_command(decisions)
main.add_command(worklist_command)


@main.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind (loopback by default; others need TLS and auth, or --insecure).",
)
@click.option("--port", type=click.IntRange(1, 65535), default=50051, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=os.cpu_count() or 1,
    show_default="number of CPUs",
    help="Worker processes sharing the port (SO_REUSEPORT); a worker that dies is replaced.",
)
@_RULESETS_OPTION
@click.option("--grace", type=click.FloatRange(0), default=10.0, show_default=True, help="Seconds to drain on SIGTERM.")
@click.option(
    "--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False), default="INFO"
)
@click.option("--watch", is_flag=True, help="Hot-reload rule sets that change on disk (validated, tested, then swapped in).")
@click.option(
    "--watch-interval", type=click.FloatRange(0.1), default=2.0, show_default=True, help="Seconds between looks at the rule sets."
)
@click.option("--http-port", type=click.IntRange(1, 65535),
              help="Also serve CDS Hooks 2.0 on this port (/cds-services): TLS from --tls-cert/--tls-key, JWTs per --auth-*.")
@click.option(
    "--http-base-url",
    metavar="URL",
    help="Public base URL of CDS Hooks, e.g. https://cds.example.org:8443 (tokens' aud; default from --host and --http-port).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    help="A browser origin allowed to call CDS Hooks (CORS), e.g. https://ehr.example.org; repeatable; none by default.",
)
@click.option(
    "--insecure-dev",
    is_flag=True,
    help="CDS Hooks without client authentication and CORS open: local trials only, logged as a warning.",
)
@click.option("--worklist-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The folder the worklist page (/worklist, served with --http-port --insecure-dev) may read.")
@click.option("--max-connection-age", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Seconds before a client connection is asked to reconnect, so load spreads onto replaced workers (0: never).")
@click.option("--max-connection-age-grace", type=click.FloatRange(0), default=30.0, show_default=True,
              help="Seconds the calls on an aged connection get to finish.")
@click.option(
    "--metrics-port", type=click.IntRange(0, 65535), default=None, help="Serve Prometheus metrics on this port (off by default)."
)
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address the metrics endpoint binds.")
@server_security_options
@DATABASE_OPTION
@MASK_OPTION
def serve(
    host: str,
    port: int,
    workers: int,
    rulesets_dir: Path | None,
    grace: float,
    log_level: str,
    watch: bool,
    watch_interval: float,
    http_port: int | None,
    http_base_url: str | None,
    cors_origins: tuple[str, ...],
    insecure_dev: bool,
    worklist_dir: Path | None,
    max_connection_age: float,
    max_connection_age_grace: float,
    metrics_port: int | None,
    metrics_host: str,
    security: SecurityConfig,
    database: str | None,
    mask: str,
) -> None:
    """Serve the gRPC API until SIGTERM.

    A supervisor runs WORKERS processes that share the port; each serves needlepoint.v1.DecisionService,
    grpc.health.v1 and server reflection. On SIGTERM or Ctrl-C in-flight calls get --grace seconds;
    calls that cannot finish are answered UNAVAILABLE, which clients retry.
    With --watch, a rule set that changes on disk is linted and run against its own test cases in a
    separate process; only then is it loaded and swapped in, and a rule set that fails keeps the
    previous version serving (GetRuleset reports why). Earlier versions stay loaded for pinning.
    TLS (--tls-cert/--tls-key, mutual with --client-ca) and bearer tokens (--auth-jwks, --auth-issuer)
    are described in the README's Security section; an address other than loopback needs both, or --insecure.
    With --metrics-port, Prometheus metrics are served at http://METRICS_HOST:METRICS_PORT/metrics.
    Every decision is committed to the decision log (--database; 'none' for no log) before it is
    answered; its schema is migrated first.
    """
    from needlepoint.security.transport import enforce_exposure
    from needlepoint.server.supervisor import Supervisor
    from needlepoint.server.worker import WorkerConfig, setup_logging

    _check_cds_hooks_options(host, http_port, http_base_url, cors_origins, insecure_dev, security)
    if worklist_dir is not None and not (http_port is not None and insecure_dev):
        raise click.UsageError(
            "--worklist-dir is for the worklist page, served with --http-port --insecure-dev only (it has no sign-in yet)"
        )
    setup_logging(log_level)
    if http_port is not None and insecure_dev:
        import logging

        logging.getLogger("needlepoint.cdshooks").warning(
            "INSECURE-DEV: CDS Hooks on port %d without client authentication; do not expose it beyond a test network", http_port)
    try:
        enforce_exposure(host, security)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    config = WorkerConfig(
        host=host,
        port=port,
        rulesets_dir=rulesets_dir,
        grace=grace,
        log_level=log_level,
        watch=watch,
        watch_interval=watch_interval,
        security=security,
        http_port=http_port,
        insecure_dev=insecure_dev,
        http_base_url=http_base_url,
        cors_origins=cors_origins,
        worklist_dir=worklist_dir,
        max_connection_age=max_connection_age,
        max_connection_age_grace=max_connection_age_grace,
        database=migrate_for_serve(database, mask),
        mask=mask,
    )
    metrics_address = (metrics_host, metrics_port) if metrics_port is not None else None
    sys.exit(Supervisor(config, workers, metrics_address=metrics_address).run())


def _check_cds_hooks_options(
    host: str,
    http_port: int | None,
    base_url: str | None,
    cors_origins: tuple[str, ...],
    insecure_dev: bool,
    security: SecurityConfig,
) -> None:
    """Usage errors for CDS Hooks options that cannot be served safely or correctly: no client
    authentication without --insecure-dev, CORS '*' outside it, a base URL that is not one, and a
    wildcard host with tokens but no base URL (a token's aud must be the exact URL the EHR calls)."""
    from urllib.parse import urlsplit

    from needlepoint.security.transport import is_loopback

    if http_port is None:
        if base_url or cors_origins or insecure_dev:
            raise click.UsageError(
                "--http-base-url, --cors-origin and --insecure-dev are CDS Hooks options: they need --http-port"
            )
        return
    if not insecure_dev and security.tokens is None:
        raise click.UsageError(
            "--http-port needs caller authentication: --auth-jwks FILE or --auth-jku URL with --auth-issuer ISS "
            "(CDS Hooks JWTs), or --insecure-dev for a local trial")
    if "*" in cors_origins and not insecure_dev:
        raise click.UsageError("--cors-origin '*' lets any web page call the service: only with --insecure-dev")
    for origin in cors_origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/")):
            raise click.UsageError(f"--cors-origin {origin!r}: an origin is scheme://host[:port], e.g. https://ehr.example.org")
    if base_url is not None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise click.UsageError(f"--http-base-url {base_url!r}: give an http(s) URL without query, e.g. https://cds.example.org:8443")
    elif not insecure_dev and host.strip("[]") in ("0.0.0.0", "::", ""):
        raise click.UsageError(
            "--http-base-url is needed with --host 0.0.0.0 or [::]: tokens must name the exact URL the EHR calls"
        )
    if insecure_dev and not is_loopback(host) and not security.insecure:
        raise click.UsageError(f"--insecure-dev on {host}, which other machines can reach: bind 127.0.0.1, or add --insecure too")


@main.command()
@click.argument("file", type=click.File("rb"))
@click.option("--as-of", callback=parse_instant, help="Evaluation instant, ISO 8601 (default: now; UTC if no zone).")
@order_options("supplies or overrides the order's.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision JSON, nothing else.")
@click.option(
    "--width",
    type=click.IntRange(20),
    help="Wrap the summary at this many columns (default: the terminal's width; no wrapping when piped).",
)
@click.option("--server", metavar="HOST:PORT", help="Evaluate on a running server instead of in-process.")
@click.option("--ruleset", "ruleset_id", default=DEFAULT_RULESET, show_default=True, help="Rule set id.")
@_RULESETS_OPTION
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=10.0, show_default=True,
              help="Deadline in seconds for --server.")
@client_connection_options
@click.option("--record", is_flag=True, help="Commit the in-process decision to the decision log (a server logs its own).")
@DATABASE_OPTION
@MASK_OPTION
def evaluate(
    file: BinaryIO,
    as_of: dt.datetime | None,
    target: str | None,
    side: str | None,
    intent: str | None,
    as_json: bool,
    width: int | None,
    server: str | None,
    ruleset_id: str,
    rulesets_dir: Path | None,
    timeout: float,
    connection: dict[str, Any],
    record: bool,
    database: str | None,
    mask: str,
) -> None:
    """Evaluate the FHIR R4 Bundle in FILE ('-' for standard input).

    In-process by default, or on a running server with --server; both print the same decision.
    Without --json it prints the referral coordinator's view: the verdict, each reason to wait
    with what to do about it, guidance, medicines, cautions and records to complete, in plain
    words. On a terminal it wraps at the terminal's width and uses colour; piped, it is neither
    padded, wrapped nor coloured (--width N wraps at N). Exit code 2 when the bundle cannot be
    evaluated, with the reason on standard error.
    """
    from needlepoint_client import InjectionOrder, decision_to_dict, decision_to_json, make_request

    order = None
    if target or side or intent:
        order = InjectionOrder(target=target or "", side=side or "", intent=intent or "")
    try:
        request = make_request(fhir_bundle=file.read(), as_of=as_of, order=order, ruleset_id=ruleset_id)
    except (ValueError, OverflowError):  # an --as-of a Timestamp cannot hold (year 1 at +01:00...)
        _fail("as_of: timestamp out of range (0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z)", EXIT_BAD_INPUT)
    decision = _remote(server, request, timeout, connection) if server else _in_process(rulesets_dir, request)
    if record and not server:
        from needlepoint.cli_decisions import record_cli_decision

        record_cli_decision(database, mask, request, decision)
    if as_json:
        click.echo(decision_to_json(decision))
    else:
        print_summary(decision_to_dict(decision), width)


def _remote(server: str, request: EvaluateRequest, timeout: float, connection: dict[str, Any]) -> Decision:
    import grpc

    from needlepoint_client import EvaluationError, NeedlepointClient, NeedlepointError

    with NeedlepointClient(server, timeout=timeout, **connection) as client:
        try:
            return client.evaluate(request)
        except EvaluationError as exc:
            _fail(exc.message, EXIT_BAD_INPUT)
        except NeedlepointError as exc:
            if exc.code is grpc.StatusCode.RESOURCE_EXHAUSTED:  # the request is too large: bad input
                _fail(exc.message, EXIT_BAD_INPUT)
            _fail(f"{server}: {exc.code.name}: {exc.message}", EXIT_FAILURE)


def _in_process(rulesets_dir: Path | None, request: EvaluateRequest) -> Decision:
    import grpc

    from needlepoint.server.errors import ServiceError
    from needlepoint.server.service import Engine

    try:
        engine = Engine.load(rulesets_dir)
    except Exception as exc:  # noqa: BLE001 - a broken rule set: say what, without a traceback
        _fail(f"cannot load rule sets: {exc}", EXIT_FAILURE)
    try:
        return engine.evaluate(request)
    except ServiceError as exc:
        bad_input = exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        _fail(exc.message, EXIT_BAD_INPUT if bad_input else EXIT_FAILURE)
    except Exception as exc:  # noqa: BLE001 - a fault of the service: say so in one line, as the server would
        _fail(f"internal error ({type(exc).__name__}); please report it with the input", EXIT_FAILURE)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


# -- the summary for a referral coordinator -----------------------------------------------------

# How a terminal shows each style of views.coordinator.Line (nothing, when output is piped).
STYLES = {
    "heading": "bold",
    "not-now": "bold red",
    "review-first": "bold yellow",
    "go-ahead-without-some": "bold green",
    "go-ahead": "bold green",
    "section": "bold underline",
    "headline": "bold",
    "detail": "",
    "note": "dim",
}


def print_summary(decision: dict[str, Any], width: int | None = None) -> None:
    """Print the coordinator's view of a decision (views.coordinator). On a terminal, as rich
    detects one (NO_COLOR and FORCE_COLOR honoured), lines wrap at its width and are coloured;
    piped, nothing is padded, wrapped or coloured. ``width`` wraps at that many columns either way."""
    from rich.console import Console
    from rich.text import Text

    from needlepoint.views.coordinator import coordinator_view, view_lines, wrap

    console = Console(highlight=False, soft_wrap=True, emoji=False)
    if width is None and console.is_terminal:
        width = console.width
    for line in view_lines(coordinator_view(decision)):
        for text in wrap(line, width):
            console.print(Text(text, style=STYLES.get(line.style, "")))


if __name__ == "__main__":
    main()
