"""``needlepoint explain FILE [--rule RULE_ID]`` (also ``needlepoint rules explain``): why a rule
did or did not fire for one patient, and what would change each deferral, printed. The
explanation itself is the core's (:mod:`needlepoint.core.explain`).
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path
from typing import BinaryIO

import click
import orjson

from needlepoint.cli_options import order_options, parse_instant
from needlepoint.core.record import RecordError


def _facts_of(pattern_text: str) -> str:
    """The facts a pattern is about, from its description: ``observation inr facts``."""
    kind = pattern_text.split(" with ", maxsplit=1)[0].removeprefix("no ")
    concept = re.search(r"\bconcept = ([\w-]+)", pattern_text)
    return f"{kind} {concept.group(1)} facts" if concept else f"{kind} facts"


def _render(rule_report: dict | None, changes: list[dict]) -> list[str]:
    lines = []
    if rule_report is not None:
        lines.append(
            f"{rule_report['ruleId']} {rule_report['ruleVersion']}: {rule_report['title']}: "
            f"{'FIRED' if rule_report['fired'] else 'did not fire'}"
        )
        for alt in rule_report["alternatives"]:
            lines.append(f"  alternative {alt['index']}: {'holds' if alt['holds'] else 'does not hold'}")
            for p in alt["patterns"]:
                lines.append(f"    {p['alias']}: {p['pattern']}: {'holds' if p['holds'] else 'does not hold'}")
                if not p["candidates"]:
                    lines.append(f"      (no {_facts_of(p['pattern'])} in the record)")
                for c in p["candidates"]:
                    lines.append(f"      {c['fact']}")
                    for t in c["conditions"]:
                        lines.append(
                            f"        {'✓' if t['holds'] else '✗'} {t['condition']} (threshold {t['threshold']}): saw {t['saw']}"
                        )
    lines.append("What would change the deferrals:" if changes else "No deferral depends on a numeric value that could change.")
    lines += [f"  {c['deferral']}: {c['text']}" for c in changes]
    return lines


@click.command(name="explain")
@click.argument("file", type=click.File("rb"))
@click.option("--rule", "rule_id", help="Explain this rule: each condition with the value it saw.")
@click.option("--as-of", callback=parse_instant, help="Evaluation instant, ISO 8601 (default: now; UTC if no zone).")
@order_options("supplies or overrides the order's.")
@click.option(
    "--ruleset",
    "ruleset_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Rule set directory (default: the bundled hip-injection).",
)
@click.option("--overlay", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Site parameter overlay.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def command(
    file: BinaryIO,
    rule_id: str | None,
    as_of: dt.datetime | None,
    target: str | None,
    side: str | None,
    intent: str | None,
    ruleset_dir: Path | None,
    overlay: Path | None,
    as_json: bool,
) -> None:
    """Explain a rule for one patient (a FHIR Bundle, or - for stdin), and what would change each deferral."""
    # imported here, so that `needlepoint --help` does not load the engine to list this command
    from needlepoint.core.evaluator import Evaluator
    from needlepoint.core.explain import counterfactuals, explain_rule
    from needlepoint.fhir.mapper import record_from_bundle
    from needlepoint.intake import apply_order, order_from_fields
    from needlepoint.rulesets import DEFAULT_RULESET, bundled_rulesets_dir, load_ruleset

    try:
        instant = as_of or dt.datetime.now(dt.timezone.utc)
        evaluator = Evaluator(load_ruleset(ruleset_dir or bundled_rulesets_dir() / DEFAULT_RULESET, overlay=overlay))
        bundle = record_from_bundle(file.read(), observation_codes=evaluator.observation_codes)  # as the service reads it
        record = apply_order(bundle, order_from_fields(target, side, intent))
        report = explain_rule(evaluator, record, instant, rule_id) if rule_id else None
        changes = counterfactuals(evaluator, record, instant)
    except (RecordError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(orjson.dumps({"rule": report, "counterfactuals": changes}, option=orjson.OPT_INDENT_2).decode())
    else:
        for line in _render(report, changes):
            click.echo(line)
