"""``needlepoint rules diff OLD NEW --cases DIR``: the command line of the rule-set impact report
(:mod:`needlepoint.authoring.diff`)."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import click
import orjson

from needlepoint.authoring.diff import DiffError, parse_version, render_html, render_markdown, run_diff, to_json
from needlepoint.authoring.diff.render import headline
from needlepoint.authoring.diff.report import EXIT_CANNOT_RUN
from needlepoint.cli_options import order_options, parse_instant


@click.command(name="diff")
@click.argument("old")
@click.argument("new")
@click.option("--cases", "cases_dir", required=True, type=click.Path(exists=True, path_type=Path),
              help="Directory of cases (searched recursively), or one file.")
@click.option("--as-of", callback=parse_instant, help="Evaluate every case at this instant (ISO 8601; UTC if no zone).")
@click.option("--old-overlay", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Site overlay for OLD.")
@click.option("--new-overlay", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Site overlay for NEW.")
@order_options(
    "overrides the one in every FHIR input's order, a logged order in an export too"
    " (leave it off to replay what was decided)."
)
@click.option("--format", "fmt", type=click.Choice(["markdown", "html", "json"]), default="markdown", show_default=True)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Write the report here (default: standard output).",
)
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=None, help="Worker processes [default: one per CPU].")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Draw a progress bar on standard error [default: on a terminal, for long runs].",
)
@click.option("--max-cases", type=click.IntRange(0), default=0, show_default=True,
              help="List at most this many cases per section in Markdown and HTML (0: all); counts always cover every case.")
def command(
    old: str,
    new: str,
    cases_dir: Path,
    as_of: dt.datetime | None,
    old_overlay: Path | None,
    new_overlay: Path | None,
    target: str | None,
    side: str | None,
    intent: str | None,
    fmt: str,
    output: Path | None,
    jobs: int | None,
    progress: bool | None,
    max_cases: int,
) -> None:
    """Impact of a rule-set change: evaluate every case under OLD and NEW and report what changed.

    OLD and NEW are rule-set directories, bundled rule-set ids, or either as DIR:OVERLAY.yaml to
    apply a site overlay (or use --old-overlay/--new-overlay).

    \b
    Cases (--cases, searched recursively):
      *.json           a FHIR R4 Bundle, a CDS Hooks request, or one request as below
      *.yaml, *.yml    rule-set test cases (each at its own as_of unless --as-of)
      *.ndjson, *.jsonl  past requests, one a line:
          {"correlationId": "r-1", "asOf": "2025-06-02T09:00:00Z", "fhirBundle": {Bundle}}
        (correlationId, asOf optional; fhirBundle may be base64 as in the protobuf JSON
        mapping, or "context" may replace it; a line may also be a bare Bundle)
    Other files are skipped with a note; inputs that cannot be evaluated are error cases.

    \b
    Compared: modality (preferred/acceptable/avoid), injectates, deferrals, caution and
    missing-data codes. Reported: each changed case with the rules that fired differently
    and the rules responsible, a summary by field and by rule, errors and skipped files.
    Exit code: 0 no decision changed, 1 some changed, 2 the diff could not run.
    """
    try:
        report = run_diff(
            parse_version(old, old_overlay),
            parse_version(new, new_overlay),
            cases_dir,
            as_of=as_of,
            order=(target, side, intent),
            jobs=jobs,
            progress=progress,
        )
    except DiffError as exc:
        raise click.UsageError(str(exc)) from None
    if fmt == "json":
        text = orjson.dumps(to_json(report), option=orjson.OPT_INDENT_2).decode() + "\n"
    elif fmt == "html":
        text = render_html(report, max_cases=max_cases or None)
    else:
        text = render_markdown(report, max_cases=max_cases or None)
    if output is None:
        click.echo(text, nl=False)
    else:
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            click.echo(f"error: cannot write {output}: {exc.strerror or exc}", err=True)
            sys.exit(EXIT_CANNOT_RUN)
        click.echo(headline(report), err=True)
    sys.exit(report.exit_code)
