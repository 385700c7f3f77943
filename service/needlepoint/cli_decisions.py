"""``needlepoint decisions``: the decision log from the shell.

* ``decisions migrate [--database URL]``: create or upgrade the log's schema (``serve`` does it too).
* ``decisions export --since T [--until T] [--road R] [--database URL] [-o FILE]``: past requests as
  NDJSON for ``needlepoint rules diff OLD NEW --cases FILE``.
* ``decisions overrides [--since T] [--format text|json|html] [--database URL]``: per rule, fired,
  shown, accepted, overridden, with override reasons and comments.

``--database`` defaults to the SQLite file in the state directory (see
:mod:`needlepoint.decisionlog.database`); ``T`` is an ISO 8601 date or instant (UTC without a zone)
or a span back from now such as ``30d`` or ``12h``.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from typing import IO, TYPE_CHECKING

import click

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from needlepoint.v1.decision_pb2 import Decision
    from needlepoint.v1.decision_service_pb2 import EvaluateRequest

DATABASE_OPTION = click.option(
    "--database",
    metavar="URL",
    default=None,
    help="Decision log: sqlite:///FILE or postgresql://user:pass@host/db "
    "(default: $NEEDLEPOINT_STATE_DIR or ~/.local/state/needlepoint/decisions.sqlite3).",
)
MASK_OPTION = click.option(
    "--mask",
    default="default",
    show_default=True,
    metavar="FIELDS",
    help="Identifiers removed from the logged requests: default (Patient name, identifier, telecom, address, photo, "
    "contact, narratives, id pseudonymised), none, or a comma list, e.g. default,birthDate.",
)
_SPAN = re.compile(r"(\d+)([dhm])")


def _instant(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """An instant as the log stores it (UTC text) from ISO 8601 or a span back from now (``30d``)."""
    from needlepoint.decisionlog.entries import utc_text

    if value is None:
        return None
    if match := _SPAN.fullmatch(value.strip()):
        unit = {"d": "days", "h": "hours", "m": "minutes"}[match[2]]
        return utc_text(dt.datetime.now(dt.timezone.utc) - dt.timedelta(**{unit: int(match[1])}))
    try:
        instant = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 date or instant, nor a span such as 30d") from None
    return utc_text(instant if instant.tzinfo else instant.replace(tzinfo=dt.timezone.utc))


def _engine(database: str | None) -> Engine:
    """An engine on a migrated log, or exit 1 saying what to do."""
    from needlepoint.decisionlog import database as db

    engine = db.connect(database)
    revision = db.current_revision(engine)
    if revision != db.HEAD:
        engine.dispose()
        click.echo(f"error: the decision log at {db.redacted(db.normalize_url(database))} is at schema {revision or 'none'}: "
                   "run `needlepoint decisions migrate`", err=True)
        sys.exit(1)
    return engine


@click.group()
def decisions() -> None:
    """The decision log: migrate it, export past requests for `rules diff`, report overrides."""


@decisions.command()
@DATABASE_OPTION
def migrate(database: str | None) -> None:
    """Create or upgrade the decision log's schema (Alembic migrations)."""
    from needlepoint.decisionlog import database as db

    revision = db.migrate(database)
    click.echo(f"{db.redacted(db.normalize_url(database))}: schema {revision}")


@decisions.command()
@click.option("--since", callback=_instant, required=True, help="First instant (created_at), e.g. 2025-05-01 or 30d.")
@click.option("--until", callback=_instant, help="End of the window (exclusive).")
@click.option("--road", type=click.Choice(["grpc", "cds-hooks", "cli"]), help="Only decisions that came this way.")
@click.option("-o", "--output", type=click.File("wb"), default="-", help="File to write (default: standard output).")
@DATABASE_OPTION
def export(since: str, until: str | None, road: str | None, output: IO[bytes], database: str | None) -> None:
    """Past requests as NDJSON, one a line, for `needlepoint rules diff OLD NEW --cases FILE`.

    Each line is the request as logged (direct identifiers masked) with the instant its decision
    was made at, so the diff replays real decisions under both rule-set versions."""
    from needlepoint.decisionlog.export import export as run_export

    engine = _engine(database)
    try:
        count = run_export(engine, output, since=since, until=until, road=road)
    finally:
        engine.dispose()
    click.echo(f"{count} decision(s) exported", err=True)


@decisions.command()
@click.option("--since", callback=_instant, help="Only decisions made from this instant on, e.g. 2025-05-01 or 30d.")
@click.option("--until", callback=_instant, help="End of the window (exclusive).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "html"]), default="text", show_default=True)
@DATABASE_OPTION
def overrides(since: str | None, until: str | None, fmt: str, database: str | None) -> None:
    """Per rule: decisions it fired in, cards shown, accepted, overridden, with the override
    reasons and comments clinicians gave (from CDS Hooks feedback)."""
    import json

    from needlepoint.decisionlog.report import overrides_report, render_html, render_text

    engine = _engine(database)
    try:
        report = overrides_report(engine, since=since, until=until)
    finally:
        engine.dispose()
    if fmt == "json":
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    elif fmt == "html":
        click.echo(render_html(report), nl=False)
    else:
        click.echo(render_text(report), nl=False)


def migrate_for_serve(database: str | None, mask: str) -> str | None:
    """For ``serve``: the log URL the workers open (None for ``--database none``), its schema
    migrated once here, before any worker starts. Exits 1 on a bad --mask or an unreachable log."""
    from needlepoint.decisionlog import database as db
    from needlepoint.decisionlog.masking import parse_fields

    if database == "none":
        return None
    try:
        parse_fields(mask)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--mask") from None
    url = db.normalize_url(database)
    try:
        db.migrate(url)
    except Exception as exc:  # noqa: BLE001 - any driver error means the log cannot be opened
        click.echo(f"error: cannot open the decision log at {db.redacted(url)}: {exc}", err=True)
        sys.exit(1)
    return url


def record_cli_decision(database: str | None, mask: str, request: EvaluateRequest, decision: Decision) -> None:
    """``evaluate --record``: commit an in-process decision to the log (road ``cli``)."""
    import getpass

    from needlepoint.decisionlog import DecisionEntry, DecisionLog, Masker
    from needlepoint.decisionlog.masking import parse_fields

    url = migrate_for_serve(database, mask)
    if url is None:
        return
    with DecisionLog(url, masker=Masker(parse_fields(mask))) as decision_log:
        decision_log.record(DecisionEntry.evaluate(request, decision, caller=f"cli:{getpass.getuser()}", road="cli")).result(60)
