"""``needlepoint rules mutate``: the bundled rule set's cases notice every small change to its
thresholds, comparisons, value sets, unit conversions and plausible ranges; weak cases are
reported as survivors."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from needlepoint.authoring.mutate import command, plausible_mutants, run, unit_mutants
from needlepoint.rulesets import bundled_rulesets_dir, read_documents

HIP = bundled_rulesets_dir() / "hip-injection"


@pytest.mark.slow
def test_every_mutant_of_the_bundled_rule_set_is_killed() -> None:
    report = run(HIP)
    assert [m.description for m in report.survived] == []
    assert len(report.killed) > 500
    kinds = Counter(m.kind for m, _ in report.killed)
    numeric = [cid for cid, spec in read_documents(HIP)["observations"].items() if spec.get("plausible")]
    assert kinds["unit"] > 150 and kinds["plausible"] == 2 * len(numeric)
    # the only invalid mutants empty a value set entirely, which the loader refuses
    assert all("value set has no codes" in why for _, why in report.invalid)


def test_the_command_names_survivors_and_exits_by_them(tmp_path: Path) -> None:
    """The fast suite's run of the command: a few parameter mutants against the bleeding cases
    alone, which pin the INR limit and know nothing of fever."""
    weak = tmp_path / "hip-injection"
    shutil.copytree(HIP, weak)
    for case_file in (weak / "tests").glob("*.yaml"):
        if case_file.name != "bleeding.yaml":
            case_file.unlink()
    result = CliRunner().invoke(command, [str(weak), "--kind", "parameter", "--match", "fever_celsius"])
    assert result.exit_code == 1
    assert result.output.splitlines()[:4] == [
        "SURVIVED parameter: fever_celsius: 38 -> 34.2",
        "SURVIVED parameter: fever_celsius: 38 -> 41.8",
        "SURVIVED parameter: kocher_fever_celsius: 38.5 -> 34.65",
        "SURVIVED parameter: kocher_fever_celsius: 38.5 -> 42.35",
    ]
    assert result.output.splitlines()[-1].startswith("0 of 4 mutants killed, 4 survived in ")
    result = CliRunner().invoke(command, [str(weak), "--kind", "parameter", "--match", "inr_defer_above"])
    assert result.exit_code == 0
    assert result.output.startswith("2 of 2 mutants killed, 0 survived in ")


@pytest.mark.slow
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
    # platelets 19 in 10*3/uL defers, which notices x10 but not /10; nothing sends /uL
    result = CliRunner().invoke(command, [str(weak), "--kind", "unit", "--kind", "plausible", "--match", "platelets"])
    assert result.exit_code == 1
    assert "SURVIVED unit: platelets 10*3/uL: 1 -> 0.1\n" in result.output
    assert "SURVIVED unit: platelets 10*3/uL: 1 -> 10\n" not in result.output
    assert "SURVIVED unit: platelets /uL: 0.001 -> 0.0001\n" in result.output
    assert "SURVIVED unit: platelets /uL: no longer accepted\n" in result.output
    assert "SURVIVED plausible: platelets plausible high: 2000 -> " in result.output


def test_unit_mutants_change_each_conversion_but_never_the_canonical_unit() -> None:
    docs = read_documents(HIP)
    described = [m.description for m in unit_mutants(docs) if m.concept == "temperature"]
    assert described[:3] == [
        "temperature [degF]: fahrenheit_to_celsius -> ifcc_to_ngsp",
        "temperature [degF]: fahrenheit_to_celsius -> 1",
        "temperature [degF]: no longer accepted",
    ]
    assert "temperature °C (display): 1 -> 10" in described and "temperature °C (display): 1 -> 0.1" in described
    assert not [d for d in described if d.startswith("temperature Cel:")]
    (mutant,) = [m for m in unit_mutants(docs) if m.description == "platelets /uL: 0.001 -> 0.01"]
    assert mutant.documents["observations"]["platelets"]["units"]["/uL"] == 0.01
    assert docs["observations"]["platelets"]["units"]["/uL"] == 0.001  # the original is untouched
    assert mutant.documents["rules"] is docs["rules"]  # only the concept is copied


def test_plausible_mutants_narrow_each_end_just_past_the_cases_extremes() -> None:
    docs = read_documents(HIP)
    assert [m.description for m in plausible_mutants(docs, []) if m.concept == "inr"] == [
        "inr plausible low: 0.5 -> 2.45 (no case gives a value)",  # nothing could notice: it survives
        "inr plausible high: 20 -> 18.05 (no case gives a value)",
    ]


@pytest.mark.slow
def test_the_bundled_cases_kill_the_unit_and_range_mutants_of_a_concept() -> None:
    report = run(HIP, kinds=("unit", "plausible"), match="platelets")
    assert [m.description for m in report.survived] == [] and report.invalid == []
    killed = {m.description: case for m, case in report.killed}
    assert len(killed) == 41  # 7 UCUM codes and 6 display texts, x10, /10 and dropped; 2 range ends
    assert killed["platelets /uL: 0.001 -> 0.0001"] == "platelets 25000 /uL (25 x 10^9/L) are a caution"
    assert (
        killed["platelets plausible low: 0 -> 3.003 (excludes 3, the lowest value a case gives)"]
        == "platelets 3 (severe thrombocytopenia) are a real value and defer"
    )
    report = run(HIP, kinds=("unit",), match="temperature [degF]")
    assert len(report.killed) == 3 and report.survived == []
