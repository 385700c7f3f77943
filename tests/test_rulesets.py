"""The rule-set front end (``needlepoint.rulesets``): one reader that keeps the place of every key
and value, one builder whose diagnostics carry code, severity, file:line:col, key path, message
and suggestion, the same model from files and from plain documents, and the places named by
loading, by hot-reload validation and by the rule-set test cases' reader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from needlepoint.authoring.validation import validate_ruleset
from needlepoint.casefile import load_cases
from needlepoint.core.ruleset import RuleSetError
from needlepoint.rulesets import build, build_ruleset, bundled_rulesets_dir, load, load_ruleset, read_documents, read_sources
from needlepoint.rulesets.reader import YAMLSyntaxError, read_text

HIP = bundled_rulesets_dir() / "hip-injection"
FIXTURES = Path(__file__).resolve().parent / "data" / "rulesets"


def test_the_reader_keeps_the_line_and_column_of_every_key_and_value() -> None:
    doc = read_text("a:\n  b: [1, {c: x}]\n  d: 00100\n", "f.yaml", "f.yaml")
    assert doc.value == {"a": {"b": [1, {"c": "x"}], "d": 64}}
    assert doc.pos(("a", "b")) == (2, 3) and doc.pos(("a", "b"), key=False) == (2, 6)
    assert doc.pos(("a", "b", 1, "c")) == (2, 11) and doc.pos(("a", "b", 1, "c"), key=False) == (2, 14)
    assert doc.pos(("a", "nothing", "here")) == (1, 1)  # the nearest enclosing key
    assert doc.scalar_text(("a", "d")) == "00100"


def test_the_reader_reports_syntax_errors_and_duplicate_keys_without_raising() -> None:
    broken = read_text("a: [1, 2\nb: 3\n", "f.yaml", "f.yaml")
    assert not broken.loaded and broken.problem is not None and broken.problem.message.startswith("YAML syntax error")
    twice = read_text("a: 1\nb: 2\na: 3\n", "f.yaml", "f.yaml")
    assert twice.value == {"a": 3, "b": 2}
    assert [(d.path, d.line, d.column, d.earlier_line) for d in twice.duplicates] == [(("a",), 3, 1, 1)]


def test_a_diagnostic_carries_code_severity_place_key_path_message_and_suggestion() -> None:
    built = build(read_sources(FIXTURES / "np004-unknown-parameter"))
    (d,) = built.diagnostics
    assert (d.code, d.severity, Path(d.file).name, d.line, d.column) == ("NP004", "error", "rules.yaml", 9, 21)
    assert d.key_path == "when.plt.observation.value.lt" and d.suggestion == "platelet_defer_below"
    assert (
        d.where == "rules/rules.yaml:1 DEF-PLT-LOW.when.plt.observation.value.lt"
        and "unknown parameter $platelet_defer_belw" in d.message
    )
    assert built.ruleset is None


def test_files_and_plain_documents_build_the_same_rule_set() -> None:
    from_files = load_ruleset(HIP)
    from_documents = build_ruleset(read_documents(HIP))
    assert from_files == from_documents and from_files.digest == from_documents.digest
    assert from_files.rules[0].source.startswith("rules/") and ":" in from_files.rules[0].source


def test_plain_documents_are_refused_with_the_old_key_paths() -> None:
    docs = read_documents(HIP)
    docs["parameters"] = {**docs["parameters"], "inr_defer_above": {"value": 3.0}}
    with pytest.raises(RuleSetError) as caught:
        build_ruleset(docs)
    assert caught.value.where == "parameters.yaml.inr_defer_above" and len(caught.value.diagnostics) == 3
    assert "missing required key 'provenance'" in str(caught.value) and all(d.line == 0 for d in caught.value.diagnostics)


def test_validation_names_files_under_the_directory_they_came_from(tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(HIP, copy)
    bleeding = copy / "rules" / "10-bleeding.yaml"
    bleeding.write_text(
        bleeding.read_text(encoding="utf-8").replace("category: deferral", "category: deferal", 1), encoding="utf-8"
    )
    result = validate_ruleset(copy, shown="rulesets/hip-injection")
    assert not result.ok and result.ruleset is None and result.message.startswith("does not load: ")
    line = next(n for n, text in enumerate(bleeding.read_text(encoding="utf-8").splitlines(), 1) if "category: deferal" in text)
    assert (
        f"(rulesets/hip-injection/rules/10-bleeding.yaml:{line}:13)" in result.message
        and "did you mean 'deferral'" in result.message
    )
    with pytest.raises(RuleSetError, match=f"{copy}/rules/10-bleeding.yaml:{line}:13"):
        load(copy)


def test_a_case_file_that_is_not_yaml_is_named_with_its_line_and_column(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text("- name: one\n  expect: {fired: [A\n- name: two\n", encoding="utf-8")
    with pytest.raises(YAMLSyntaxError) as caught:
        load_cases(cases)
    assert caught.value.file == str(cases) and caught.value.line == 3 and str(caught.value).startswith(f"{cases}:3:")


@pytest.mark.parametrize(
    ("document", "shape"),
    [
        ("parameters", "parameters.yaml is a mapping of parameter name to its definition"),
        ("observations", "observations.yaml is a mapping of concept id to its definition"),
        ("aggregates", "aggregates.yaml is a mapping of summary field name to its definition"),
    ],
)
def test_a_file_that_is_not_a_mapping_is_refused_saying_what_it_maps(document: str, shape: str) -> None:
    docs = read_documents(HIP)
    docs[document] = ["not", "a", "mapping"]
    with pytest.raises(RuleSetError) as caught:
        build_ruleset(docs)
    assert any(d.code == "NP002" and d.message == f"{shape}; got a list" for d in caught.value.diagnostics), [
        d.message for d in caught.value.diagnostics
    ]


def test_a_parameter_named_only_in_missing_data_is_among_the_rules_parameters(tmp_path: Path) -> None:
    """Rule.params (what a parameter change reaches, in rules diff) counts every template the
    builder checks, the missing-data code included."""
    root = tmp_path / "rs"
    shutil.copytree(FIXTURES / "minimal", root)
    rules = root / "rules" / "rules.yaml"
    text = rules.read_text(encoding="utf-8")
    rules.write_text(
        text.replace(
            "    deferral: {reason: BLEEDING_RISK, severity: HARD, scope: PROCEDURE}\n",
            "    deferral: {reason: BLEEDING_RISK, severity: HARD, scope: PROCEDURE}\n"
            "    missing_data: PLATELETS_BELOW_{$platelet_caution_below}\n",
        ),
        encoding="utf-8",
    )
    rule = {r.id: r for r in load_ruleset(root).rules}["DEF-PLT-LOW"]
    assert rule.then.missing_data == "PLATELETS_BELOW_{$platelet_caution_below}"
    assert rule.params == ("platelet_defer_below", "platelet_max_age_days", "platelet_caution_below")
