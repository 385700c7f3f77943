"""``needlepoint rules test``: the bundled rule set passes with full coverage; failures and
coverage gaps are reported the way a rule author needs, with the right exit code."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from needlepoint.authoring.runner import command, run
from needlepoint.rulesets import bundled_rulesets_dir

HIP = bundled_rulesets_dir() / "hip-injection"


def test_bundled_rule_set_passes_with_full_rule_outcome_and_condition_coverage() -> None:
    _, results, coverage = run(HIP)
    assert results and all(r.passed for r in results)
    assert coverage.rule_percent == coverage.outcome_percent == coverage.condition_percent == 100.0


@pytest.fixture
def copy_of_hip(tmp_path: Path) -> Path:
    target = tmp_path / "hip-injection"
    shutil.copytree(HIP, target)
    for case_file in (target / "tests").glob("*.yaml"):
        if case_file.name != "bleeding.yaml":
            case_file.unlink()
    return target


def test_a_failing_case_prints_expected_and_actual_and_exits_1(copy_of_hip: Path) -> None:
    (copy_of_hip / "tests" / "extra.yaml").write_text(
        """
- name: a deliberately wrong expectation
  patient:
    age: 60
    medications: [rxnorm#855332]
    order: {target: hip-intra-articular, side: left, intent: therapeutic}
  expect:
    deferrals: [BLEEDING_RISK]
"""
    )
    result = CliRunner().invoke(command, [str(copy_of_hip)])
    assert result.exit_code == 1
    assert "FAILED hip-injection/tests/extra.yaml[0]: a deliberately wrong expectation" in result.output
    assert "deferrals: expected ['BLEEDING_RISK'], got ['PENDING_DATA']" in result.output
    cases = sum(1 for line in (copy_of_hip / "tests" / "bleeding.yaml").read_text().splitlines() if line.startswith("- name:"))
    assert result.output.strip().splitlines()[-1].startswith(f"{cases} passed, 1 failed in ")


def test_the_coverage_gate_fails_when_rules_never_fire(copy_of_hip: Path, tmp_path: Path) -> None:
    page = tmp_path / "coverage.html"
    result = CliRunner().invoke(command, [str(copy_of_hip), "--min-coverage", "100", "--html", str(page)])
    assert result.exit_code == 1
    assert "never fired: DEF-FEVER" in result.output
    assert "never produced: deferral SYSTEMIC_INFECTION/PROCEDURE" in result.output
    assert "<tr class='miss'><td>DEF-FEVER</td>" in page.read_text()
    assert "<tr class='hit'><td>DEF-INR-HIGH</td>" in page.read_text()


def test_select_runs_a_subset_and_a_broken_rule_set_exits_2(copy_of_hip: Path) -> None:
    result = CliRunner().invoke(command, [str(copy_of_hip), "-k", "platelets"])
    assert result.exit_code == 0 and "0 failed" in result.output
    assert int(result.output.strip().splitlines()[-1].split()[0]) == sum(
        1
        for line in (copy_of_hip / "tests" / "bleeding.yaml").read_text().splitlines()
        if line.startswith("- name:") and "platelets" in line
    )
    (copy_of_hip / "parameters.yaml").write_text("inr_defer_above: {value: 3.0}\n")
    result = CliRunner().invoke(command, [str(copy_of_hip)])
    assert result.exit_code == 2 and "error: parameters.yaml.inr_defer_above" in result.output
