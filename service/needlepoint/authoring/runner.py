"""``needlepoint rules test PATH``: run a rule set's own cases, with coverage.

Output follows pytest: one line per failing case with what differed (expected vs actual), then
a closing ``N passed, M failed`` line; the exit code is 1 when a case fails or a coverage gate is
not met. Coverage (``--coverage``) is reported three ways:

* **rules**: each rule fired in at least one case, or never;
* **outcomes**: every outcome the rule set can produce (each deferral reason and scope, each
  modality a rule prefers, accepts or avoids, each injectate recommendation, each caution and
  missing-data code) appears in the final decision of some case;
* **conditions**: each field test of each pattern was seen both true and false on a fact of its
  kind in some case (a test never seen false cannot be told apart from ``true``).

``--min-coverage P`` fails the run when rule or outcome coverage is below P percent;
``--html FILE`` writes a page with every rule coloured by coverage.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

from needlepoint.casefile import Case, check, load_cases
from needlepoint.core.conditions import FieldTest, Pattern, test_holds
from needlepoint.core.evaluator import Evaluator
from needlepoint.core.record import RecordError
from needlepoint.core.resolve import preferred_modality
from needlepoint.core.ruleset import RuleSet, RuleSetError
from needlepoint.rulesets import load_ruleset


@dataclass
class CaseResult:
    case: Case
    problems: list[str]
    fired: set[str] = field(default_factory=set)
    outcomes: set[str] = field(default_factory=set)

    @property
    def passed(self) -> bool:
        return not self.problems


@dataclass
class Coverage:
    rules_fired: dict[str, int]  # rule id -> cases in which it fired
    outcomes: dict[str, int]  # possible outcome -> cases producing it
    conditions: dict[str, set[bool]]  # condition label -> truth values seen

    @staticmethod
    def percent(hit: int, total: int) -> float:
        return 100.0 if total == 0 else 100.0 * hit / total

    @property
    def rule_percent(self) -> float:
        return self.percent(sum(1 for n in self.rules_fired.values() if n), len(self.rules_fired))

    @property
    def outcome_percent(self) -> float:
        return self.percent(sum(1 for n in self.outcomes.values() if n), len(self.outcomes))

    @property
    def condition_percent(self) -> float:
        return self.percent(sum(1 for seen in self.conditions.values() if len(seen) == 2), len(self.conditions))


def possible_outcomes(ruleset: RuleSet) -> set[str]:
    """Every outcome a rule of the set can put into a decision, in the form of decision_outcomes."""
    params = ruleset.param_values()
    out: set[str] = set()
    for rule in ruleset.rules:
        then = rule.then
        if then.deferral:
            out.add(f"deferral {then.deferral['reason']}/{then.deferral['scope']}")
        if then.modality:
            pref = preferred_modality(rule, params)
            if pref:
                out.add(f"modality preferred {pref}")
            out |= {f"modality avoid {m}" for m in then.modality.get("avoid", ())}
        out |= {f"injectate {i['category']} {i['recommendation']}" for i in then.injectates}
        if then.caution:
            out.add(f"caution {then.caution}")
        if then.missing_data and "{" not in then.missing_data:
            out.add(f"missing {then.missing_data}")
    return out


def decision_outcomes(decision: dict) -> set[str]:
    out = {f"deferral {d['reason']}/{d['scope']}" for d in decision.get("deferrals", [])}
    modality = decision.get("modality", {})
    if "preferred" in modality:
        out.add(f"modality preferred {modality['preferred']}")
    out |= {f"modality avoid {m}" for m in modality.get("avoid", [])}
    out |= {f"injectate {i['category']} {i['recommendation']}" for i in decision.get("injectates", [])}
    out |= {f"caution {c['code']}" for c in decision.get("cautions", [])}
    out |= {f"missing {m['code']}" for m in decision.get("missingData", [])}
    return out


def condition_labels(ruleset: RuleSet) -> Iterator[tuple[str, Pattern, FieldTest]]:
    """(label, pattern, test) for every field test of every rule pattern."""
    for rule in ruleset.rules:
        for i, alternative in enumerate(rule.alternatives):
            for pattern in alternative:
                for test in pattern.tests:
                    where = f"{rule.id}" + (f" alternative {i}" if len(rule.alternatives) > 1 else "")
                    neg = "not " if pattern.negated else ""
                    yield f"{where}: {pattern.alias} = {neg}{pattern.kind} with {test.describe()}", pattern, test


def run(
    path: Path, *, overlay: Path | None = None, select: str | None = None, shown: str | Path | None = None
) -> tuple[RuleSet, list[CaseResult], Coverage]:
    """Run every case under ``path/tests`` (``select``: a substring of the case name). ``shown``
    is how errors name the directory (a private copy names the directory it came from)."""
    ruleset = load_ruleset(path, overlay=overlay)
    evaluator = Evaluator(ruleset)
    try:
        results, coverage = run_cases(evaluator, path, select=select, shown=shown)
    finally:
        evaluator.close()
    return ruleset, results, coverage


def run_cases(
    evaluator: Evaluator, path: Path, *, select: str | None = None, shown: str | Path | None = None
) -> tuple[list[CaseResult], Coverage]:
    """:func:`run` with the rule set already loaded into ``evaluator`` (the caller closes it)."""
    ruleset = evaluator.ruleset
    params = ruleset.param_values()
    conditions = list(condition_labels(ruleset))
    coverage = Coverage(
        rules_fired={r.id: 0 for r in ruleset.rules},
        outcomes=dict.fromkeys(sorted(possible_outcomes(ruleset)), 0),
        conditions={label: set() for label, _, _ in conditions},
    )
    results: list[CaseResult] = []
    for case_file in sorted((Path(path) / "tests").glob("*.yaml")):
        for case in load_cases(case_file, shown=Path(shown) / "tests" / case_file.name if shown else None):
            if select and select not in case.name:
                continue
            results.append(_run_case(case, case_file.name, evaluator, params, conditions, coverage))
    return results, coverage


def _run_case(
    case: Case,
    file_name: str,
    evaluator: Evaluator,
    params: dict,
    conditions: list[tuple[str, Pattern, FieldTest]],
    coverage: Coverage,
) -> CaseResult:
    case.source = f"{file_name}{case.source[case.source.index('['):]}" if "[" in case.source else case.source
    try:
        prepared, decision = evaluator.evaluate_with_facts(case.record, case.as_of)
    except RecordError as exc:
        return CaseResult(case, [f"the case cannot be evaluated: {exc}"])
    result = CaseResult(case, check(case, decision))
    result.fired = {e["ruleId"] for e in decision.get("explanations", [])}
    result.outcomes = decision_outcomes(decision)
    for rid in result.fired:
        coverage.rules_fired[rid] += 1
    for outcome in result.outcomes:
        if outcome in coverage.outcomes:
            coverage.outcomes[outcome] += 1
    by_kind: dict[str, list[dict]] = {}
    for fact in prepared.facts:
        by_kind.setdefault(fact["t"], []).append(fact)
    for label, pattern, test in conditions:
        seen = coverage.conditions[label]
        if len(seen) < 2:
            for fact in by_kind.get(pattern.kind, ()):
                seen.add(test_holds(test, fact, params))
    return result


def format_report(path: Path, results: list[CaseResult], coverage: Coverage | None, elapsed: float) -> list[str]:
    lines = []
    failed = [r for r in results if not r.passed]
    if failed:
        lines.append("=" * 30 + " FAILURES " + "=" * 30)
        for r in failed:
            lines.append(f"FAILED {path.name}/tests/{r.case.source}: {r.case.name}")
            lines += [f"    {p}" for p in r.problems]
    if coverage is not None:
        never = [rid for rid, n in coverage.rules_fired.items() if not n]
        missing = [o for o, n in coverage.outcomes.items() if not n]
        partial = [
            f"{label}: seen only {'true' if True in seen else 'false' if seen else 'never'}"
            for label, seen in coverage.conditions.items()
            if len(seen) < 2
        ]
        lines.append("-" * 30 + " coverage " + "-" * 30)
        lines.append(
            f"rules       {sum(1 for n in coverage.rules_fired.values() if n)}/{len(coverage.rules_fired)} fired "
            f"({coverage.rule_percent:.1f}%)"
        )
        lines.append(
            f"outcomes    {sum(1 for n in coverage.outcomes.values() if n)}/{len(coverage.outcomes)} produced "
            f"({coverage.outcome_percent:.1f}%)"
        )
        lines.append(
            f"conditions  {sum(1 for s in coverage.conditions.values() if len(s) == 2)}/{len(coverage.conditions)} seen true "
            f"and false ({coverage.condition_percent:.1f}%)"
        )
        lines += [f"  never fired: {rid}" for rid in never]
        lines += [f"  never produced: {o}" for o in missing]
        lines += [f"  {p}" for p in partial]
    lines.append(f"{len(results) - len(failed)} passed, {len(failed)} failed in {elapsed:.2f}s")
    return lines


def html_report(ruleset: RuleSet, results: list[CaseResult], coverage: Coverage) -> str:
    esc = html.escape
    rows = []
    for rule in ruleset.rules:
        n = coverage.rules_fired[rule.id]
        conds = [(label, seen) for label, seen in coverage.conditions.items() if label.split(":")[0].split(" ")[0] == rule.id]
        full = sum(1 for _, seen in conds if len(seen) == 2)
        status = "hit" if n and full == len(conds) else ("partial" if n else "miss")
        detail = "".join(
            f"<li class='{'ok' if len(seen) == 2 else 'gap'}'>{esc(label.split(': ', 1)[1])} — seen "
            f"{esc('/'.join(sorted(str(v).lower() for v in seen)) or 'never')}</li>"
            for label, seen in conds
        )
        rows.append(
            f"<tr class='{status}'><td>{esc(rule.id)}</td><td>{esc(rule.title)}</td><td>{n}</td><td>{full}/{len(conds)}</td>"
            f"<td><ul>{detail}</ul></td></tr>"
        )
    outcomes = "".join(f"<li class='{'ok' if n else 'gap'}'>{esc(o)} ({n})</li>" for o, n in coverage.outcomes.items())
    failed = sum(1 for r in results if not r.passed)
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>Coverage of {esc(ruleset.id)} {esc(ruleset.version)}</title>\n"
        "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}\n"
        "tr.hit{background:#e6f4ea}tr.partial{background:#fff4ce}tr.miss{background:#fde7e9}"
        "li.gap{color:#a4262c}li.ok{color:#1e7b34}ul{margin:0;padding-left:1.2em}</style></head><body>\n"
        f"<h1>Rule set {esc(ruleset.id)} {esc(ruleset.version)}</h1>\n"
        f"<p>{len(results) - failed} passed, {failed} failed. Rules {coverage.rule_percent:.1f}% fired; "
        f"outcomes {coverage.outcome_percent:.1f}% produced;\n"
        f"conditions {coverage.condition_percent:.1f}% seen true and false. Green: fired, every condition seen both ways; "
        "yellow: fired, some condition\n"
        "seen one way only; red: never fired.</p>\n"
        "<table><tr><th>Rule</th><th>Title</th><th>Cases fired</th><th>Conditions both ways</th><th>Conditions</th></tr>"
        f"{''.join(rows)}</table>\n"
        f"<h2>Outcomes</h2><ul>{outcomes}</ul></body></html>\n"
    )


@click.command(name="test")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--overlay", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Site parameter overlay to test under."
)
@click.option("-k", "select", help="Only cases whose name contains this text.")
@click.option("--coverage", "show_coverage", is_flag=True, help="Report rule, outcome and condition coverage.")
@click.option("--min-coverage", type=click.FloatRange(0, 100), help="Fail below this rule and outcome coverage (percent).")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path), help="Write a coverage page here.")
def command(
    path: Path, overlay: Path | None, select: str | None, show_coverage: bool, min_coverage: float | None, html_file: Path | None
) -> None:
    """Run the rule set's own test cases (PATH/tests/*.yaml)."""
    start = time.perf_counter()
    try:
        ruleset, results, coverage = run(path, overlay=overlay, select=select)
    except (RuleSetError, RecordError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    wants_coverage = show_coverage or min_coverage is not None or html_file is not None
    for line in format_report(path, results, coverage if wants_coverage else None, time.perf_counter() - start):
        click.echo(line)
    if html_file is not None:
        html_file.write_text(html_report(ruleset, results, coverage), encoding="utf-8")
    failed = any(not r.passed for r in results)
    below = min_coverage is not None and min(coverage.rule_percent, coverage.outcome_percent) < min_coverage
    if below:
        click.echo(
            f"coverage below {min_coverage:g}%: rules {coverage.rule_percent:.1f}%, outcomes {coverage.outcome_percent:.1f}%",
            err=True,
        )
    raise SystemExit(1 if failed or below else 0)
