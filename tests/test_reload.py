"""The parts of the hot reload (``needlepoint.server.reload``) in one process, on a small rule set:
what a validation accepts and rejects and why, and the catalog's rule that a version number means
one content. The reload itself, in a real server under load, is ``tests/test_hot_reload.py`` (slow)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from needlepoint.rulesets import load_ruleset
from needlepoint.server.reload import Catalog, Snapshot, fingerprint, load_catalog, parse_snapshot, validate

MINIMAL = Path(__file__).resolve().parent / "data" / "rulesets" / "minimal"

CASES = """\
- name: platelets 15 defer
  as_of: 2025-06-02T09:00:00Z
  patient:
    observations:
      - {code: loinc#777-3, value: 15, unit: 10*9/L, days_before: 1}
    order: {target: hip-intra-articular, side: right, intent: therapeutic}
  expect:
    fired: [DEF-PLT-LOW]
    deferrals: [BLEEDING_RISK]
"""


@pytest.fixture
def minimal(tmp_path: Path) -> Path:
    """A copy of the small rule set, with one case of its own."""
    directory = tmp_path / "rulesets" / "minimal"
    shutil.copytree(MINIMAL, directory)
    (directory / "tests").mkdir()
    (directory / "tests" / "cases.yaml").write_text(CASES)
    return directory


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_a_rule_set_that_loads_lints_clean_and_passes_its_cases_is_accepted(minimal: Path) -> None:
    verdict = validate(minimal)
    assert verdict["ok"] and verdict["message"] == "1 test cases pass", verdict
    accepted = verdict["accepted"]
    assert (accepted.ruleset_id, accepted.version) == ("minimal", "0.1.0")
    assert accepted.digest == load_ruleset(minimal).digest and accepted.files_digest == fingerprint(minimal)
    evaluator = accepted.evaluator()  # a worker builds exactly the validated rule set
    evaluator.close()


def test_a_failing_case_a_lint_error_or_a_load_error_is_a_rejection_naming_it(minimal: Path) -> None:
    _edit(minimal / "parameters.yaml", "value: 20\n", "value: 10\n")  # 15 no longer defers
    verdict = validate(minimal)
    assert not verdict["ok"] and "accepted" not in verdict
    assert verdict["message"].startswith("1 of 1 test case(s) fail, first ") and "platelets 15 defer" in verdict["message"]

    _edit(minimal / "parameters.yaml", "value: 10\n", "value: 60\n")  # the deferral band now swallows the caution band
    verdict = validate(minimal)
    assert not verdict["ok"] and verdict["message"].startswith("1 lint error(s), first "), verdict["message"]
    assert "rules/rules.yaml:29:45: NP007 CAU-PLT-BORDERLINE can never fire" in verdict["message"]

    _edit(minimal / "rules" / "rules.yaml", "category: deferral", "category: suggestion")
    verdict = validate(minimal)
    assert not verdict["ok"] and verdict["message"].startswith("does not load: ") and "suggestion" in verdict["message"]


def test_a_rejection_about_the_cases_names_the_watched_directory_not_the_private_copy(minimal: Path) -> None:
    """The verdict is reached in a private temporary copy; its message names the files the author
    edits, and a test file that cannot be read is a rejection saying so, not a crash."""
    cases = minimal / "tests" / "cases.yaml"
    _edit(minimal / "parameters.yaml", "value: 20\n", "value: 10\n")  # the case fails
    verdict = validate(minimal)
    assert not verdict["ok"] and "needlepoint-validate-" not in verdict["message"], verdict["message"]
    assert verdict["message"].startswith(f"1 of 1 test case(s) fail, first {cases}[0] platelets 15 defer: "), verdict["message"]

    cases.write_text("name: not a list of cases\n")
    verdict = validate(minimal)
    assert not verdict["ok"] and "accepted" not in verdict
    assert verdict["message"] == f"the test cases cannot run: {cases}: a test file is a list of cases", verdict["message"]

    cases.write_text(CASES.replace("days_before: 1}", "days_before: 1"))  # an unclosed flow mapping
    verdict = validate(minimal)
    assert not verdict["ok"] and verdict["message"].startswith(f"the test cases cannot run: {cases}:"), verdict["message"]
    assert "YAML syntax error" in verdict["message"] and "needlepoint-validate-" not in verdict["message"]


def test_a_version_means_one_content(minimal: Path) -> None:
    catalog, seen = load_catalog(minimal.parent)
    assert seen == {minimal: fingerprint(minimal)} and catalog.serving("minimal").version == "0.1.0"
    _edit(minimal / "rules" / "rules.yaml", "are below {$platelet_defer_below}.", "are below {$platelet_defer_below}, too few.")
    changed = parse_snapshot(Snapshot.read(minimal))
    assert changed.version == "0.1.0" and changed.digest != catalog.serving("minimal").digest
    assert catalog.conflict(changed) == "version 0.1.0 is already loaded with other content; bump the version"
    with pytest.raises(ValueError, match="bump the version"):
        catalog.add(changed)
    for patch in range(1, 5):  # newer versions serve; the last three stay loaded for pinning
        _edit(minimal / "ruleset.yaml", f"version: 0.1.{patch - 1}", f"version: 0.1.{patch}")
        catalog.add(parse_snapshot(Snapshot.read(minimal)))
    assert [a.version for a in catalog.versions["minimal"]] == ["0.1.4", "0.1.3", "0.1.2"]
    assert isinstance(catalog, Catalog) and catalog.generation == 5


def test_one_rule_set_id_twice_stops_the_start(minimal: Path) -> None:
    shutil.copytree(minimal, minimal.parent / "copy")
    with pytest.raises(ValueError, match="rule set id 'minimal' is loaded twice"):
        load_catalog(minimal.parent)
