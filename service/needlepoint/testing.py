"""A pytest plugin that collects every rule set's YAML test cases (``<ruleset>/tests/*.yaml``)
as test items, with pytest-style failure reports (one line per expectation not met).

Enabled for this repository by ``-p needlepoint.testing`` in pyproject.toml; a site that keeps
its own rule sets can run ``pytest -p needlepoint.testing path/to/rulesets``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from needlepoint.casefile import Case, check, load_cases
from needlepoint.core.evaluator import Evaluator
from needlepoint.rulesets import load_ruleset

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr  # what Item.repr_failure returns; pytest names it only here

_evaluators: dict[Path, Evaluator] = {}


def _evaluator(ruleset_dir: Path) -> Evaluator:
    if ruleset_dir not in _evaluators:
        _evaluators[ruleset_dir] = Evaluator(load_ruleset(ruleset_dir))
    return _evaluators[ruleset_dir]


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> RuleSetCaseFile | None:
    if file_path.suffix == ".yaml" and file_path.parent.name == "tests" and (file_path.parent.parent / "ruleset.yaml").is_file():
        return RuleSetCaseFile.from_parent(parent, path=file_path)
    return None


class RuleSetCaseFile(pytest.File):
    def collect(self) -> Iterator[RuleSetCase]:
        for case in load_cases(self.path):
            yield RuleSetCase.from_parent(self, name=case.name, case=case)


class RuleSetCase(pytest.Item):
    def __init__(self, *, case: Case, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case

    def runtest(self) -> None:
        evaluator = _evaluator(self.path.parent.parent)
        decision = evaluator.evaluate(self.case.record, self.case.as_of)
        problems = check(self.case, decision)
        if problems:
            raise CaseFailure(problems)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str | TerminalRepr:
        if isinstance(excinfo.value, CaseFailure):
            return f"{self.case.source}: {self.case.name}\n  " + "\n  ".join(excinfo.value.problems)
        return super().repr_failure(excinfo, style)

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"{self.path.name}::{self.case.name}"


class CaseFailure(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems
