"""``needlepoint worklist INPUT --out report.html|.csv|.xlsx``: a referral coordinator's worklist,
one row per referral in plain words; ``needlepoint worklist --serve``: the same as a web page.

INPUT and the evaluation options are ``needlepoint batch``'s (a folder of Bundles, a Bulk Data
export, a CSV of referrals; --as-of, --planned, --target/--side/--intent, --export, the rule set
options, --jobs); the evaluation is the batch engine's. ``--out`` may be given several times, one
file per format. Exit codes: 0 the report was written (referrals that cannot be evaluated are rows
saying why), 2 bad arguments or an input that cannot be read at all, 1 a rule set that does not
load.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from needlepoint.cli_batch import evaluation_options, referral_options
from needlepoint.security.transport import is_loopback

if TYPE_CHECKING:
    from needlepoint.batch.evaluate import Options
    from needlepoint.worklist.rows import WorklistRow


@click.command(name="worklist")
@click.argument("input_path", metavar="INPUT", required=False)
@click.option("--out", "outs", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The report: .html (self-contained), .csv or .xlsx. Repeat for several formats.")
@referral_options
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=None, help="Worker processes [default: one per CPU].")
@click.option("--progress/--no-progress", default=None, help="Progress bar on standard error [default: on a terminal].")
@click.option(
    "--link-base", metavar="URL", help="CSV/XLSX without an HTML report beside them: link each row to URL/decisions/<id>."
)
@click.option(
    "--serve", is_flag=True, help="Serve the worklist page instead of writing a report (INPUT, if given, starts a worklist)."
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="--serve: address to bind (loopback only: the page has no authentication).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="--serve: HTTP port.")
@click.option("--allow-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="--serve: a folder the page may read (Bundles a CSV names, CSVs and folders given by path, a Bulk export).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="--serve: where worklists are kept [default: <state dir>/worklists].",
)
def command(input_path: str | None, outs: tuple[Path, ...], as_of: dt.datetime | None, planned: dt.datetime | None,
            target: str | None, side: str | None, intent: str | None, export: Path | None, ruleset_id: str,
            rulesets_dir: Path | None, overlay: Path | None, jobs: int | None, progress: bool | None, link_base: str | None,
            serve: bool, host: str, port: int, allow_dir: Path | None, state_dir: Path | None) -> None:  # fmt: skip
    """Evaluate every referral of INPUT and write a worklist a coordinator can act on.

    \b
    One row per referral: a status (ready, needs data, deferred, needs clinician review,
    cannot evaluate), what to do in words, the reasons with their rule titles, and a link to
    the full explanation. INPUT is what `needlepoint batch` reads: a folder of FHIR Bundles
    (each with its own order: no CSV needed), a Bulk Data export, or a CSV of referrals.
    """
    from needlepoint.worklist import writers

    options = evaluation_options(rulesets_dir, ruleset_id, overlay, as_of, planned, target, side, intent)
    if serve:
        _serve(input_path, export, options, host, port, allow_dir, state_dir, jobs)
        return
    if input_path is None:
        raise click.UsageError("give INPUT (or --serve)")
    if not outs:
        raise click.UsageError("give --out report.html, .csv or .xlsx (several --out for several formats)")
    for out in outs:
        if out.suffix.lower() not in writers.FORMATS:
            raise click.UsageError(f"--out {out}: the extension must be one of {', '.join(writers.FORMATS)}")
    from needlepoint.batch.referrals import BatchError, plan
    from needlepoint.worklist import html
    from needlepoint.worklist.run import terminal_progress, worklist

    try:
        work = plan(Path(input_path), export=export)
    except BatchError as exc:
        raise click.UsageError(str(exc)) from None
    show = progress if progress is not None else sys.stderr.isatty()
    update, stop = terminal_progress() if show else (None, lambda: None)
    try:
        rows = worklist(
            work,
            options,
            csv_path=Path(input_path) if input_path.lower().endswith(".csv") else None,
            jobs=jobs,
            on_progress=update,
        )
    finally:
        stop()
    html_out = next((o for o in outs if o.suffix.lower() == ".html"), None)

    def link(row: WorklistRow) -> str | None:
        if not row.decision_id:
            return None
        if html_out is not None:
            return f"{html_out.name}#explain-{row.decision_id}"
        return f"{link_base.rstrip('/')}/decisions/{row.decision_id}" if link_base else None

    for out in outs:
        writers.write(rows, out, link)
    click.echo(f"{html.summary(rows)} -> {', '.join(str(o) for o in outs)}", err=True)


def _serve(
    input_path: str | None,
    export: Path | None,
    options: Options,
    host: str,
    port: int,
    allow_dir: Path | None,
    state_dir: Path | None,
    jobs: int | None,
) -> None:
    """Serve the worklist page alone, at / (and start INPUT as the first worklist, if given)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import RedirectResponse
    from starlette.routing import Mount, Route

    from needlepoint.batch.referrals import BatchError, plan
    from needlepoint.worklist.web import JobStore, create_worklist_app, default_root

    if not is_loopback(host):
        raise click.UsageError(
            f"--host {host}: the worklist page has no authentication and binds loopback only (127.0.0.0/8, ::1, localhost)"
        )
    store = JobStore(state_dir or default_root(), lambda: options.ruleset, allow_dir=allow_dir, jobs=jobs)
    if input_path is not None:
        try:
            work = plan(Path(input_path), export=export)
        except BatchError as exc:
            raise click.UsageError(str(exc)) from None
        job, folder = store.new_job(Path(input_path).name)
        store.start(job, folder, work, Path(input_path) if input_path.lower().endswith(".csv") else None, options)
        click.echo(f"worklist {job}: http://{host}:{port}/worklist/jobs/{job}", err=True)
    app = Starlette(
        routes=[Route("/", lambda request: RedirectResponse("/worklist/")), Mount("/worklist", create_worklist_app(store))]
    )
    click.echo(f"worklist page on http://{host}:{port}/worklist/", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
