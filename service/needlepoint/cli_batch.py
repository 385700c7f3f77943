"""``needlepoint batch INPUT OUT``: evaluate a worklist of referrals (a folder of FHIR Bundles, a
FHIR Bulk Data export, or a CSV of referrals) into OUT, NDJSON or Parquet, one row per referral.

Exit codes: 0 the run completed (referrals that could not be evaluated are rows with status
``error``, never a failed run), 2 bad arguments or an input that cannot be read at all, 1 the
run could not complete (a rule set that does not load, Spark not installed).
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from needlepoint.cli_options import order_options, parse_instant
from needlepoint.rulesets import DEFAULT_RULESET, bundled_rulesets_dir, load_ruleset

if TYPE_CHECKING:
    from needlepoint.batch.evaluate import Options


def evaluation_options(
    rulesets_dir: Path | None, ruleset_id: str, overlay: Path | None, as_of: dt.datetime | None, planned: dt.datetime | None,
    target: str | None, side: str | None, intent: str | None,
) -> Options:
    """The batch evaluation's options from the command line (shared by ``batch`` and ``worklist``);
    a rule set that does not load exits 1 with what is wrong, without a traceback."""
    from needlepoint.batch.evaluate import Options

    directory = (rulesets_dir or bundled_rulesets_dir()) / ruleset_id
    try:
        ruleset = load_ruleset(directory, overlay=overlay)
    except Exception as exc:  # noqa: BLE001 - a broken rule set: say what, without a traceback
        click.echo(f"error: cannot load rule set {directory}: {exc}", err=True)
        sys.exit(1)
    return Options(
        ruleset=ruleset,
        as_of=as_of or dt.datetime.now(dt.timezone.utc).replace(microsecond=0),
        planned=planned,
        order=(target, side, intent) if (target or side or intent) else None,
    )


def _planned(ctx: click.Context, param: click.Parameter, value: str | None) -> dt.datetime | None:
    """--planned: a date (the end of that day, UTC) or a date-time."""
    if value is None:
        return None
    from needlepoint.batch.referrals import parse_when

    try:
        return parse_when(value, "--planned", end_of_day=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def referral_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """How the referrals are evaluated, the same options for ``batch`` and ``worklist``: --as-of,
    --planned, --target/--side/--intent, --export, --ruleset, --rulesets, --overlay (the arguments
    :func:`evaluation_options` takes, with ``export``)."""
    options = [
        click.option(
            "--as-of", callback=parse_instant,
            help="Evaluation instant for referrals without their own (ISO 8601) [default: now].",
        ),
        click.option(
            "--planned", callback=_planned,
            help="Planned date for referrals without their own (a date means the end of that day, UTC).",
        ),
        order_options("overrides the one in each referral's own order (its Bundle's); a CSV row's own value wins over it."),
        click.option("--export", "export", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="The Bulk Data export a CSV's patient_id column refers to [default: the CSV's folder]."),
        click.option("--ruleset", "ruleset_id", default=DEFAULT_RULESET, show_default=True, help="Rule set id."),
        click.option("--rulesets", "rulesets_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                     help="Directory of rule sets [default: the bundled ones]."),
        click.option(
            "--overlay", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="A site overlay for the rule set."
        ),
    ]
    for option in reversed(options):  # the first listed is the first in --help, as with stacked decorators
        command = option(command)
    return command


@click.command(name="batch")
@click.argument("input_path", metavar="INPUT")
@click.argument("out", metavar="OUT")
@click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True,
              help="local: a process pool on this machine; spark: PySpark (needs the 'spark' extra).")
@click.option(
    "--master", metavar="URL", help="Spark master (local[2], spark://host:7077, yarn…) [default: spark-submit's, else local[*]]."
)
@click.option("--format", "fmt", type=click.Choice(["ndjson", "parquet"]), default="ndjson", show_default=True)
@referral_options
@click.option(
    "--jobs", "-j", type=click.IntRange(1, 256), default=None, help="Local engine: worker processes [default: one per CPU]."
)
@click.option(
    "--partitions", type=click.IntRange(1), default=None, help="Spark engine: partitions of the patient shuffle and the output."
)
@click.option("--overwrite", is_flag=True, help="Replace what OUT holds.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Local engine: progress bar on standard error [default: on a terminal, for long runs].",
)
def command(input_path: str, out: str, engine: str, master: str | None, fmt: str, as_of: dt.datetime | None,
            planned: dt.datetime | None, target: str | None, side: str | None, intent: str | None, export: Path | None,
            ruleset_id: str, rulesets_dir: Path | None, overlay: Path | None, jobs: int | None, partitions: int | None,
            overwrite: bool, progress: bool | None) -> None:  # fmt: skip
    """Evaluate every referral of INPUT and write one row per referral to the folder OUT.

    \b
    INPUT is one of:
      a folder of FHIR Bundles (*.json)     one referral per file
      a Bulk Data export (*.ndjson files)   one referral per patient
      a CSV of referrals                    columns: referral_id, patient_id or bundle,
                                            target, side, intent, planned_date, as_of
    Each referral is evaluated as of --as-of and, given a planned date, on that date too; results
    that will be too old by then are listed under toRepeat with the dates to repeat them.
    A referral that cannot be evaluated becomes a row with status 'error' naming the file and row.
    """
    from needlepoint.batch import local, output
    from needlepoint.batch.referrals import BatchError, Plan, plan

    uri = "://" in input_path
    if uri and engine != "spark":
        raise click.UsageError("a URI input (hdfs://, s3a://…) needs --engine spark")
    try:
        work = Plan(export=input_path, kind="bulk") if uri else plan(Path(input_path), export=export)  # type: ignore[arg-type]
    except BatchError as exc:
        raise click.UsageError(str(exc)) from None
    options = evaluation_options(rulesets_dir, ruleset_id, overlay, as_of, planned, target, side, intent)
    if engine == "local":
        try:
            output.prepare_folder(Path(out), overwrite)
        except (FileExistsError, OSError) as exc:
            raise click.UsageError(str(exc)) from None
        outcome = local.run(work, options, Path(out), fmt, jobs=jobs, progress=progress)
    else:
        try:
            from needlepoint.batch import spark
        except ImportError as exc:  # pragma: no cover - depends on the environment
            click.echo(f"error: the Spark engine needs PySpark and Java (scripts/setup-spark): {exc}", err=True)
            sys.exit(1)
        outcome = spark.run(work, options, out, fmt, master=master, partitions=partitions, overwrite=overwrite)
    counts = ", ".join(
        f"{outcome.statuses[s]:,} {s}" for s in ("go-ahead", "to-repeat", "review", "not-now", "error") if outcome.statuses.get(s)
    )
    rate = outcome.rows / outcome.seconds if outcome.seconds else 0.0
    click.echo(
        f"{outcome.rows:,} referrals ({counts or 'none'}) in {outcome.seconds:.1f} s ({rate:,.1f}/s, {engine}) -> {out}", err=True
    )
