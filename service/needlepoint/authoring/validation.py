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
from needlepoint.rulesets import load

from .lint import ERROR, run as run_lint
from .runner import run as run_cases


@dataclass(frozen=True)
class Validation:
    ok: bool
    message: str
    ruleset: RuleSet | None = None  # when it loads
    documents: dict[str, Any] = field(default_factory=dict, repr=False)  # what it was built from


def validate_ruleset(directory: Path, *, shown: str | Path | None = None) -> Validation:
    """Load, compile, lint and test the rule set in ``directory``. ``shown`` is how messages name
    the directory (a snapshot validated in a private copy names the directory it came from)."""
    try:
        loaded = load(directory, shown=shown)
        Evaluator(loaded.ruleset).close()  # compiles into the engine
    except Exception as exc:  # noqa: BLE001 - anything that stops loading is a rejection, with its message
        return Validation(False, f"does not load: {exc}")
    ruleset, documents = loaded.ruleset, loaded.documents
    errors = [f for f in run_lint(directory, shown=shown).findings if f.severity == ERROR]
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
        _, results, _ = run_cases(directory, shown=shown)
    except Exception as exc:  # noqa: BLE001 - a test file that cannot be read or run is a rejection, with its message
        return Validation(False, f"the test cases cannot run: {exc}", ruleset, documents)
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
