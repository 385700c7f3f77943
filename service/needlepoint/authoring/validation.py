"""Is a rule-set directory fit to serve? Load it (every error with its file:line:col), compile it
into the engine, lint it and run its own cases. Hot reload (:mod:`needlepoint.server.reload`)
asks this before it swaps a new version in; anything else that must judge a rule set the same
way can call it too."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from needlepoint.core.evaluator import Evaluator
from needlepoint.core.ruleset import RuleSet
from needlepoint.rulesets import build, read_sources
from needlepoint.rulesets.diagnostics import raise_errors

from .lint import ERROR, report
from .runner import run_cases


@dataclass(frozen=True)
class Validation:
    ok: bool
    message: str
    ruleset: RuleSet | None = None  # when it loads
    documents: dict[str, Any] = field(default_factory=dict, repr=False)  # what it was built from


def validate_ruleset(directory: Path, *, shown: str | Path | None = None) -> Validation:
    """Load, compile, lint and test the rule set in ``directory``. ``shown`` is how messages name
    the directory (a snapshot validated in a private copy names the directory it came from). The
    directory is read and built once, and compiled once, for all four."""
    try:
        sources = read_sources(directory, shown=shown)
        built = build(sources)
        raise_errors(built.diagnostics)
        assert built.ruleset is not None  # (built without errors)
        evaluator = Evaluator(built.ruleset)  # compiles into the engine
    except Exception as exc:  # noqa: BLE001 - anything that stops loading is a rejection, with its message
        return Validation(False, f"does not load: {exc}")
    ruleset, documents = built.ruleset, sources.documents()
    try:
        errors = [f for f in report(sources, built).findings if f.severity == ERROR]
        if errors:
            first_error = errors[0]
            where = f"{first_error.file}:{first_error.line}:{first_error.column}"
            return Validation(
                False,
                f"{len(errors)} lint error(s), first {where}: {first_error.code} {first_error.message}",
                ruleset,
                documents,
            )
        try:
            results, _ = run_cases(evaluator, directory, shown=shown)
        except Exception as exc:  # noqa: BLE001 - a test file that cannot be read or run is a rejection, with its message
            return Validation(False, f"the test cases cannot run: {exc}", ruleset, documents)
    finally:
        evaluator.close()
    failed = [r for r in results if not r.passed]
    if failed:
        first_failure = failed[0]
        failing = Path(shown or directory) / "tests" / first_failure.case.source  # the case's file[index]
        return Validation(
            False,
            f"{len(failed)} of {len(results)} test case(s) fail, first {failing} {first_failure.case.name}: "
            f"{first_failure.problems[0]}",
            ruleset,
            documents,
        )
    return Validation(True, f"{len(results)} test cases pass", ruleset, documents)
