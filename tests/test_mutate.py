"""``needlepoint rules mutate``: the bundled rule set's cases notice every small change to its
thresholds, comparisons and value sets; weak cases are reported as survivors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from needlepoint.authoring.mutate import command, run
from needlepoint.rulesets import bundled_rulesets_dir

HIP = bundled_rulesets_dir() / "hip-injection"


@pytest.mark.slow
def test_every_mutant_of_the_bundled_rule_set_is_killed() -> None:
    report = run(HIP)
    assert [m.description for m in report.survived] == []
    assert len(report.killed) > 300
    # the only invalid mutants empty a value set entirely, which the loader refuses
    assert all("value set has no codes" in why for _, why in report.invalid)


def test_weak_cases_let_mutants_survive_and_the_command_says_which(tmp_path: Path) -> None:
    weak = tmp_path / "hip-injection"
    shutil.copytree(HIP, weak)
    for case_file in (weak / "tests").glob("*.yaml"):
        if case_file.name != "bleeding.yaml":
            case_file.unlink()
    result = CliRunner().invoke(command, [str(weak), "--kind", "parameter"])
    assert result.exit_code == 1
    assert "SURVIVED parameter: fever_celsius: 38 -> 34.2" in result.output
    assert "SURVIVED parameter: inr_defer_above" not in result.output  # the bleeding cases pin it
    assert "mutants killed" in result.output.strip().splitlines()[-1]
