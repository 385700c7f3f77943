"""``needlepoint rules lint``: the bundled rule set lints clean; each broken fixture in
``tests/data/rulesets/`` yields its code at the exact line and column; lint reports the one
builder's diagnostics, and loading refuses exactly those errors at the same places;
the command's output and exit codes; and the JSON Schemas for editors are well-formed, accept
every bundled file and reject broken ones."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from needlepoint.authoring.lint import Finding, check_code, lint, loinc_check_digit, verhoeff_valid
from needlepoint.cli import main
from needlepoint.core.ruleset import RuleSetError
from needlepoint.rulesets import load_ruleset
from needlepoint.rulesets.schema import json_schemas

REPO = Path(__file__).resolve().parents[1]
HIP = REPO / "rulesets" / "hip-injection"
FIXTURES = REPO / "tests" / "data" / "rulesets"
MINIMAL = FIXTURES / "minimal"
OVERLAYS = FIXTURES / "overlays"
SCHEMAS = REPO / "rulesets" / "schema"
# ../shared beside the repository; NEEDLEPOINT_SHARED overrides it for a checkout elsewhere.
SHARED_FIXTURES = Path(os.environ.get("NEEDLEPOINT_SHARED") or REPO.parent / "shared") / "fixtures"


def found(path: Path, overlay: Path | None = None) -> list[tuple[str, str, str, int, int]]:
    """(code, severity, file relative to the rule set or overlay directory, line, column)."""
    out = []
    for f in lint(path, overlay=overlay):
        file = Path(f.file)
        base = overlay.parent if overlay is not None and file == overlay else path
        out.append((f.code, f.severity, file.relative_to(base).as_posix(), f.line, f.column))
    return out


# --- the bundled rule set -------------------------------------------------------------------------


def test_the_bundled_rule_set_lints_without_errors_or_warnings() -> None:
    assert [str(f) for f in lint(HIP)] == []


def test_the_bundled_rule_set_lints_clean_under_a_site_overlay(tmp_path: Path) -> None:
    overlay = tmp_path / "ultrasound-site.yaml"
    overlay.write_text(
        "site: ultrasound-site\nparameters:\n  ia_hip_default_modality: ULTRASOUND\n  inr_defer_above: 2.0\n"
        "  platelet_caution_below: 60\n"
    )
    assert [str(f) for f in lint(HIP, overlay=overlay)] == []


def test_an_overlay_that_inverts_bundled_bands_makes_those_rules_dead(tmp_path: Path) -> None:
    overlay = tmp_path / "inverted.yaml"
    overlay.write_text("site: inverted\nparameters:\n  platelet_caution_below: 10\n  arthroplasty_caution_days: 60\n")
    findings = lint(HIP, overlay=overlay)
    assert {(f.code, f.message.split(" ")[0]) for f in findings} == {
        ("NP007", "CAU-PLT-BORDERLINE"),
        ("NP007", "CAU-PRE-ARTHROPLASTY-WINDOW"),
    }
    assert all(f.file.endswith("rules/10-bleeding.yaml") or f.file.endswith("rules/20-corticosteroid.yaml") for f in findings)


def test_every_bundled_rule_file_names_the_rules_schema_on_its_first_line() -> None:
    for path in sorted((HIP / "rules").glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        match = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
        assert match, f"{path.name}: {first}"
        assert (path.parent / match.group(1)).resolve() == SCHEMAS / "rules.schema.json"


# --- broken fixtures: one defect each, at an exact line and column ----------------------------------

EXPECTED: dict[str, list[tuple[str, str, str, int, int]]] = {
    "minimal": [],
    # the parser's own position: the line after the unclosed flow mapping
    "np000-yaml-syntax": [("NP000", "error", "rules/rules.yaml", 7, 3)],
    "np001-unknown-key": [("NP001", "error", "rules/rules.yaml", 8, 55)],
    "np002-wrong-type": [("NP002", "error", "rules/rules.yaml", 5, 15)],
    "np003-unknown-value-set": [
        ("NP003", "error", "rules/rules.yaml", 6, 35),
        ("NP013", "warning", "valuesets/medications.yaml", 1, 1),  # the value set the typo missed
    ],
    "np004-unknown-parameter": [("NP004", "error", "rules/rules.yaml", 9, 21)],
    "np005-unknown-field": [("NP005", "error", "rules/rules.yaml", 9, 9)],
    "np006-malformed-code": [
        ("NP006", "warning", "observations.yaml", 3, 24),  # LOINC check digit
        ("NP006", "error", "valuesets/conditions.yaml", 5, 14),  # SNOMED CT Verhoeff check digit
    ],
    "np007-never-fires": [("NP007", "error", "rules/rules.yaml", 23, 47)],
    "np007-vocabulary": [("NP007", "error", "rules/rules.yaml", 6, 30)],
    "np007-negation": [("NP007", "error", "rules/rules.yaml", 9, 7)],
    "np008-shadowed": [("NP008", "warning", "rules/rules.yaml", 25, 16)],
    "np009-conflict": [("NP009", "error", "rules/rules.yaml", 20, 3)],
    "np010-band-gap": [
        ("NP010", "error", "rules/rules.yaml", 29, 17),  # the caution starts at 21, the deferral ends below 20
        ("NP012", "warning", "rules/rules.yaml", 29, 17),  # and 21 is a literal
    ],
    "np010-band-overlap": [("NP010", "warning", "rules/rules.yaml", 10, 30)],
    "np011-missing-citation": [("NP011", "error", "rules/rules.yaml", 36, 7)],
    "np012-hard-coded": [("NP012", "warning", "rules/rules.yaml", 12, 20)],
    "np013-unused": [("NP013", "warning", "parameters.yaml", 22, 1)],
    "np015-duplicate": [("NP015", "error", "rules/rules.yaml", 7, 5)],
}


def test_a_missing_rationale_is_reported_once(tmp_path: Path) -> None:
    root = tmp_path / "rs"
    shutil.copytree(MINIMAL, root)
    rules = root / "rules" / "rules.yaml"
    text = rules.read_text(encoding="utf-8")
    rules.write_text(text.replace("  rationale: Below this count the consensus advises transfusion before a procedure.\n", ""))
    assert found(root) == [("NP011", "error", "rules/rules.yaml", 3, 3)]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_fixture_yields_its_code_at_its_line(name: str) -> None:
    assert found(FIXTURES / name) == EXPECTED[name]


def test_every_fixture_directory_is_expected_and_marks_its_defects() -> None:
    """Each fixture marks its defect with ``# <- NPxxx`` on the line lint must report."""
    dirs = {p.name for p in FIXTURES.iterdir() if (p / "ruleset.yaml").is_file()}
    assert dirs == set(EXPECTED)
    for name in dirs:
        marked = set()
        for path in (FIXTURES / name).rglob("*.yaml"):
            for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                for code in re.findall(r"# <- (NP\d{3})", text):
                    marked.add((code, path.relative_to(FIXTURES / name).as_posix(), n))
        reported = {(code, file, line) for code, _, file, line, _ in EXPECTED[name]}
        assert marked <= reported, name
        # every fixture marks its defect, except the syntax error: the parser notices it a line later
        assert bool(marked) == (name not in ("minimal", "np000-yaml-syntax")), name


def test_every_code_is_covered_by_a_fixture_or_an_overlay() -> None:
    codes = {code for findings in EXPECTED.values() for code, *_ in findings} | {"NP014"}
    assert codes == {f"NP{n:03d}" for n in range(16)}


def test_fixture_messages_name_the_rule_and_the_fix() -> None:
    (gap,) = [f for f in lint(FIXTURES / "np010-band-gap") if f.code == "NP010"]
    assert "CAU-PLT-BORDERLINE" in gap.message and "DEF-PLT-LOW" in gap.message
    assert "[20, 21) matches neither band" in gap.message and "$platelet_defer_below = 20" in gap.message
    (typo,) = lint(FIXTURES / "np004-unknown-parameter")
    assert "did you mean 'platelet_defer_below'" in typo.message and typo.message.startswith("DEF-PLT-LOW")
    (conflict,) = lint(FIXTURES / "np009-conflict")
    assert "MOD-LOW-PLATELETS-US and MOD-IA-FLUORO" in conflict.message and "precedence 40" in conflict.message


# Broken fixtures the loader accepts: what lint alone catches.
LOADER_ACCEPTS = {
    "minimal",
    "np006-malformed-code",
    "np007-never-fires",
    "np007-vocabulary",
    "np007-negation",
    "np008-shadowed",
    "np009-conflict",
    "np010-band-gap",
    "np010-band-overlap",
    "np012-hard-coded",
    "np013-unused",
    "np015-duplicate",
}


def test_which_broken_fixtures_the_loader_accepts() -> None:
    accepted = set()
    for name in EXPECTED:
        try:
            load_ruleset(FIXTURES / name)
        except Exception:  # noqa: BLE001
            continue
        accepted.add(name)
    assert accepted == LOADER_ACCEPTS


# --- site overlays -----------------------------------------------------------------------------------


def test_an_overlay_with_an_unknown_parameter_and_a_wrong_type() -> None:
    overlay = OVERLAYS / "bad-site.yaml"
    assert found(MINIMAL, overlay) == [("NP014", "error", "bad-site.yaml", 3, 3), ("NP014", "error", "bad-site.yaml", 4, 27)]
    messages = [f.message for f in lint(MINIMAL, overlay=overlay)]
    assert (
        "did you mean 'platelet_defer_below'" in messages[0] and "expected a number like 50; got the string '50'" in messages[1]
    )


def test_rules_are_checked_under_the_overlay_values() -> None:
    assert found(MINIMAL, OVERLAYS / "inverted-band.yaml") == [("NP007", "error", "rules/rules.yaml", 29, 45)]
    (finding,) = lint(MINIMAL, overlay=OVERLAYS / "inverted-band.yaml")
    assert "$platelet_caution_below = 10" in finding.message


def test_a_valid_overlay_lints_clean() -> None:
    assert found(MINIMAL, OVERLAYS / "strict-site.yaml") == []


# --- more ways to break a rule set, each in a small rule set built here ------------------------------

_RULE = """\
- id: CAU-TEST
  version: 1.0.0
  title: A rule under test
  category: caution
  when:
{when}
  then:
    caution: TEST
    message: {message}
  rationale: A test.
  evidence:
    - citation: Local convention.
      strength: local convention [C]
"""


def make(tmp_path: Path, when: str, *, message: str = "A test.", files: dict[str, str] | None = None) -> Path:
    """The minimal rule set with its rules replaced by one rule, plus extra files."""
    root = tmp_path / "rs"
    shutil.copytree(MINIMAL, root)
    (root / "rules" / "rules.yaml").write_text(_RULE.format(when=when, message=message))
    (root / "parameters.yaml").write_text("")
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


CODED_CONCEPT = (
    "platelets:\n  title: Platelet count\n  codes: [loinc#777-3]\n  unit: 10*9/L\n  units: {10*9/L: 1}\n  plausible: [0, 2000]\n"
    "pregnancy-status:\n  title: Pregnancy status\n  codes: [loinc#82810-3]\n"
)
KOCHER = (
    "kocher:\n  description: Kocher criteria met.\n  criteria:\n"
    "    - {flag: {name: non-weight-bearing}}\n    - {flag: {name: hot-painful-joint}}\n"
)


@pytest.mark.parametrize(
    ("when", "files", "line", "column", "words"),
    [
        ("    ord: {order: {intent: {exists: false, eq: diagnostic}}}", {}, 6, 43, "a missing field satisfies no comparison"),
        (
            "    plt: {observation: {concept: platelets, value: {gt: $big}}}",
            {"parameters.yaml": "big:\n  value: 5000\n  provenance: C\n  source: x\n  description: x\n"},
            6,
            53,
            "plausible range 0-2000",
        ),
        (
            "    preg: {observation: {concept: pregnancy-status, value: {gt: $big}}}",
            {
                "parameters.yaml": "big:\n  value: 1\n  provenance: C\n  source: x\n  description: x\n",
                "observations.yaml": CODED_CONCEPT,
            },
            6,
            61,
            "is coded",
        ),
        ("    k: {summary: {kocher: {gte: 3}}}", {"aggregates.yaml": KOCHER}, 6, 28, "counts 2 criteria"),
        ("    a: {order: {intent: diagnostic}}\n    b: {order: {intent: therapeutic}}", {}, 7, 17, "test the same order fact"),
        ("    ia: {order: {intra_articular: true}}\n    nobody: {not: {patient: {}}}", {}, 7, 5, "always a patient fact"),
        (
            "    plt: {observation: {concept: platelets, value: {lt: 30}}}\n"
            "    not_low: {not: {observation: {concept: platelets, value: {lt: 50}}}}",
            {},
            7,
            5,
            "negates what plt requires",
        ),
    ],
)
def test_rules_that_can_never_fire(tmp_path: Path, when: str, files: dict, line: int, column: int, words: str) -> None:
    findings = [f for f in lint(make(tmp_path, when, files=files)) if f.code == "NP007"]
    assert [(f.line, f.column) for f in findings] == [(line, column)], [str(f) for f in findings]
    assert words in findings[0].message and findings[0].message.startswith("CAU-TEST can never fire")


@pytest.mark.parametrize(
    ("when", "code", "column", "words"),
    [
        ("    ord: {order: {requested_modality: FLUOROSCOPY}}", "NP005", 19, "order has no field 'requested_modality'"),
        ("    dx: {condition: {code: {exists: true}}}", "NP002", 22, "coded fields are tested by value-set membership only"),
    ],
)
def test_tests_the_loader_refuses_are_errors_where_written(tmp_path: Path, when: str, code: str, column: int, words: str) -> None:
    (finding,) = lint(make(tmp_path, when, files={}))
    assert (finding.code, finding.line, finding.column) == (code, 6, column) and words in finding.message


def test_a_dead_alternative_is_reported_but_the_rule_still_fires(tmp_path: Path) -> None:
    when = "    - ord: {order: {intent: diagnostic}}\n    - ord: {order: {side: middle}}"
    root = make(tmp_path, "", files={})
    text = (root / "rules" / "rules.yaml").read_text().replace("  when:\n\n", "  when_any:\n" + when + "\n")
    (root / "rules" / "rules.yaml").write_text(text)
    assert found(root) == [("NP007", "error", "rules/rules.yaml", 7, 27)]
    assert "'middle' is not a side" in lint(root)[0].message


def test_a_message_placeholder_is_reported_where_it_is_written(tmp_path: Path) -> None:
    root = make(
        tmp_path, "    plt: {observation: {concept: platelets}}", message=">-\n      Platelets\n      {plt.valu} and {$nope}."
    )
    assert found(root) == [("NP005", "error", "rules/rules.yaml", 11, 7), ("NP004", "error", "rules/rules.yaml", 11, 22)]


def test_codes_yaml_reads_as_other_numbers_and_negated_criteria(tmp_path: Path) -> None:
    vs = "anaesthesia:\n  title: Anaesthesia codes\n  codes:\n    cpt: [00100, '00102']\n"
    agg = "n:\n  description: x\n  criteria:\n    - {not: {flag: {name: hot-painful-joint}}}\n"
    root = make(
        tmp_path,
        "    ord: {order: {code: {in: anaesthesia}}}\n    n: {summary: {n: {gte: 1}}}",
        files={"valuesets/orders.yaml": vs, "aggregates.yaml": agg},
    )
    findings = found(root)
    assert ("NP006", "error", "valuesets/orders.yaml", 4, 11) in findings
    assert ("NP002", "error", "aggregates.yaml", 4, 8) in findings
    assert "read by YAML as the number 64" in next(f.message for f in lint(root) if f.code == "NP006")


def test_files_the_loader_ignores_and_duplicate_definitions(tmp_path: Path) -> None:
    root = make(tmp_path, "    ord: {order: {intent: diagnostic}}")
    shutil.copy(root / "rules" / "rules.yaml", root / "rules" / "more.yaml")
    (root / "rules" / "extra.yml").write_text("[]\n")
    (root / "parameter.yaml").write_text("{}\n")
    findings = found(root)
    assert ("NP015", "error", "rules/rules.yaml", 1, 7) in findings  # CAU-TEST, already in more.yaml
    assert ("NP001", "warning", "rules/extra.yml", 1, 1) in findings
    assert ("NP001", "warning", "parameter.yaml", 1, 1) in findings


def test_not_a_rule_set_and_empty_and_strange_files(tmp_path: Path) -> None:
    assert [(f.code, f.line) for f in lint(tmp_path)] == [("NP000", 1)]
    root = make(tmp_path, "    ord: {order: {intent: diagnostic}}")
    (root / "rules" / "rules.yaml").write_bytes(b"\xff\xfe not utf-8")
    (root / "observations.yaml").write_text("- just\n- a list\n")
    (root / "valuesets" / "x.yaml").parent.mkdir(exist_ok=True)
    (root / "valuesets" / "x.yaml").write_text("")
    codes = {(f.code, Path(f.file).name) for f in lint(root)}
    assert ("NP000", "rules.yaml") in codes and ("NP002", "observations.yaml") in codes


# --- lint and the loader agree -------------------------------------------------------------------------


def test_loading_refuses_what_lint_reports_as_builder_errors_with_every_file_line_and_column(tmp_path: Path) -> None:
    """One builder: loading raises one error listing every problem lint reports as the
    builder's, each at the file, line and column lint gives."""
    root = tmp_path / "rs"
    shutil.copytree(FIXTURES / "np004-unknown-parameter", root)
    text = (root / "rules" / "rules.yaml").read_text().replace("category: deferral", "category: deferal", 1)
    (root / "rules" / "rules.yaml").write_text(text)
    errors = [f for f in lint(root) if f.severity == "error"]
    assert {f.code for f in errors} == {"NP002", "NP004"} and len(errors) == 2
    with pytest.raises(RuleSetError) as caught:
        load_ruleset(root)
    message = str(caught.value)
    for f in errors:
        assert f"{f.file}:{f.line}:{f.column}" in message
    assert [(d.code, d.line, d.column) for d in caught.value.diagnostics] == [
        (f.code, f.line, f.column) for f in sorted(errors, key=lambda f: (f.line, f.column))
    ]
    assert caught.value.where.startswith("rules/rules.yaml:") and "DEF-PLT-LOW" in caught.value.where


_JUNK = [
    None,
    0,
    -1.5,
    7,
    "",
    "x",
    "$nope",
    "$platelet_defer_below",
    [],
    {},
    True,
    [1, "a"],
    {"lt": 3},
    {"in": "nope"},
    "FLUOROSCOPY",
    "1.0",
]


def _mutate(value: Any, rng: random.Random) -> Any:
    """One random change somewhere inside ``value``: replace, delete or rename."""
    if isinstance(value, dict) and value:
        key = rng.choice(list(value))
        roll = rng.random()
        out = dict(value)
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[f"{key}x"] = out.pop(key)
        elif roll < 0.45 or not isinstance(value[key], (dict, list)):
            out[key] = rng.choice(_JUNK)
        else:
            out[key] = _mutate(value[key], rng)
        return out
    if isinstance(value, list) and value:
        i = rng.randrange(len(value))
        out = list(value)
        out[i] = _mutate(value[i], rng) if isinstance(value[i], (dict, list)) and rng.random() < 0.7 else rng.choice(_JUNK)
        return out
    return rng.choice(_JUNK)


def test_lint_never_crashes_and_reports_an_error_whenever_the_loader_refuses(tmp_path: Path) -> None:
    """Random mutations of the minimal rule set: lint never raises, every finding has a real
    place, and a rule set the loader refuses always has at least one lint error."""
    rng = random.Random(20261122)
    originals = {
        rel: yaml.safe_load((MINIMAL / rel).read_text())
        for rel in ("rules/rules.yaml", "parameters.yaml", "observations.yaml", "ruleset.yaml")
    }
    for n in range(150):
        root = tmp_path / f"m{n}"
        shutil.copytree(MINIMAL, root)
        rel = rng.choice(list(originals))
        (root / rel).write_text(yaml.safe_dump(_mutate(originals[rel], rng), sort_keys=False))
        findings = lint(root)
        for f in findings:
            assert Path(f.file).exists() and f.line >= 1 and f.column >= 1 and re.fullmatch(r"NP0(0\d|1[0-5])", f.code), str(f)
        try:
            load_ruleset(root)
        except Exception as exc:  # noqa: BLE001
            assert any(f.severity == "error" for f in findings), f"{rel}: the loader refuses ({exc}) but lint is silent"


# --- code shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "code", "prefix", "severity"),
    [
        ("snomed", "239872002", False, None),
        ("snomed", "404684003", False, None),
        ("snomed", "138875005", False, None),
        ("snomed", "900000000000207008", False, None),
        ("snomed", "239872003", False, "error"),  # check digit
        ("snomed", "100014", False, "error"),  # a valid SCTID, but of a description (partition 01)
        ("snomed", "012345", False, "error"),  # leading zero
        ("snomed", "12345", False, "error"),  # too short
        ("loinc", "6301-6", False, None),
        ("loinc", "777-3", False, None),
        ("loinc", "6301-5", False, "warning"),
        ("loinc", "6301", False, "error"),
        ("loinc", "123456-7", False, "error"),
        ("icd10cm", "M16.11", False, None),
        ("icd10cm", "Z3A.38", False, None),
        ("icd10cm", "U07.1", False, None),
        ("icd10cm", "M1611", False, None),  # the dotless spelling EHRs send is the same code
        ("icd10cm", "L03115", False, None),
        ("icd10cm", "M2555", True, None),
        ("icd10cm", "M16.", False, "error"),
        ("icd10cm", "m16.11", False, "error"),
        ("icd10cm", "M25.55", True, None),
        ("icd10cm", "Z3A", True, None),
        ("icd10cm", "M16.1234X", True, "error"),
        ("atc", "B01AA03", False, None),
        ("atc", "H02AB", True, None),
        ("atc", "B01AA0", False, "error"),
        ("rxnorm", "855332", False, None),
        ("rxnorm", "RX855332", False, "error"),
        ("cpt", "77002", False, None),
        ("cpt", "0001U", False, None),
        ("cpt", "7700", False, "error"),
        ("np-injectate", "corticosteroid", False, None),
        ("np-injectate", "steroid", False, "error"),
        ("np-flag", "ultrasound-failed", False, None),
        ("np-obs", "conservative-therapy-duration", False, None),
        ("np-obs", "Conservative Therapy", False, "error"),
    ],
)
def test_code_shapes(system: str, code: str, prefix: bool, severity: str | None) -> None:
    problem = check_code(system, code, prefix=prefix)
    assert (problem[0] if problem else None) == severity, problem


@pytest.mark.slow  # reads every fixture bundle
def test_verhoeff_accepts_every_sctid_in_the_shared_fixtures() -> None:
    """Real data carries malformed codes: several Synthea bundles file the LOINC echocardiogram
    code 34552-0 under SNOMED CT. Every SCTID-shaped code in the fixtures passes the Verhoeff
    check; every other one is rejected, as a finding and without an exception."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip("../shared/fixtures is not beside the repository (set NEEDLEPOINT_SHARED)")
    codes: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("system") == "http://snomed.info/sct" and isinstance(node.get("code"), str):
                codes.add(node["code"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in SHARED_FIXTURES.rglob("*.json"):
        walk(json.loads(path.read_text(encoding="utf-8")))
    shaped = {c for c in codes if re.fullmatch(r"[1-9][0-9]{5,17}", c)}
    malformed = codes - shaped
    assert len(shaped) > 20
    assert [c for c in sorted(shaped) if not verhoeff_valid(c)] == []
    assert "34552-0" in malformed
    for code in sorted(malformed):
        assert verhoeff_valid(code) is False, code
        problem = check_code("snomed", code)
        assert problem is not None and problem[0] == "error", (code, problem)
    assert not verhoeff_valid("239872003") and not verhoeff_valid("2364") and verhoeff_valid("2363")


@pytest.mark.parametrize("text", ["34552-0", "", "23987200\n", " 239872002", "２３９８７２００２", "٢٣٩٨٧٢٠٠٢", "2398720O2", "²"])
def test_verhoeff_answers_false_for_anything_but_ascii_digits(text: str) -> None:
    assert verhoeff_valid(text) is False


def test_verhoeff_answers_false_for_a_value_that_is_not_text() -> None:
    assert [verhoeff_valid(value) for value in (None, 239872002, b"239872002")] == [False, False, False]  # type: ignore[arg-type]


def test_loinc_check_digits() -> None:
    assert [loinc_check_digit(n) for n in ("6301", "777", "34714", "2339", "82810")] == [6, 3, 6, 0, 3]
    assert [loinc_check_digit(n) for n in ("", "63O1", "６３０１", "6301\n", None)] == [None] * 5  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("system", "code"),
    [
        ("snomed", "23987200\n"),
        ("snomed", "239872002\n"),
        ("loinc", "6301-6\n"),
        ("loinc", "6301-٦"),
        ("rxnorm", "855332\n"),
        ("snomed", "２３９８７２００２"),
    ],
)
def test_a_code_with_a_trailing_newline_or_non_ascii_digits_is_malformed(system: str, code: str) -> None:
    problem = check_code(system, code)
    assert problem is not None and problem[0] == "error" and "not a" in problem[1], problem


def test_a_malformed_code_in_a_rule_set_is_np006_not_a_crash(tmp_path: Path) -> None:
    """Codes that once crashed lint (a trailing newline reached the Verhoeff check) or that real
    records carry (34552-0 under SNOMED CT) are NP006 errors at their own line and column."""
    root = tmp_path / "rs"
    shutil.copytree(FIXTURES / "np006-malformed-code", root)
    (root / "valuesets" / "conditions.yaml").write_text(
        "hip-osteoarthritis:\n"
        "  title: Osteoarthritis of the hip\n"
        "  codes:\n"
        "    icd10cm: {prefixes: [M16]}\n"
        '    snomed: ["34552-0", "23987200\\n", "２３９８７２００２", 239872002]\n'
    )
    findings = [(f.code, f.severity, f.line, f.column) for f in lint(root) if f.file.endswith("conditions.yaml")]
    assert findings == [("NP006", "error", 5, 14), ("NP006", "error", 5, 25), ("NP006", "error", 5, 39)]
    result = run(str(root))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "snomed code '34552-0': not an snomed code" in result.output


# --- the command ------------------------------------------------------------------------------------

_LINE = re.compile(r"^(?P<file>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<code>NP\d{3}) (?P<sev>error|warning): .+$")


def run(*args: str):
    return CliRunner().invoke(main, ["rules", "lint", *args])


def test_the_command_is_registered_under_rules() -> None:
    result = CliRunner().invoke(main, ["rules", "--help"])
    assert result.exit_code == 0 and "lint" in result.output


def test_a_clean_rule_set_exits_0_with_a_summary() -> None:
    result = run(str(HIP))
    assert result.exit_code == 0, result.output
    rules = len(load_ruleset(HIP).rules)
    files = sum(1 for p in HIP.rglob("*.yaml") if "tests" not in p.relative_to(HIP).parts)
    assert result.output.splitlines() == [f"0 errors, 0 warnings in {HIP} ({rules} rules, {files} files)"]


def test_errors_exit_1_one_line_per_finding_sorted_then_a_summary() -> None:
    result = run(str(FIXTURES / "np006-malformed-code"))
    assert result.exit_code == 1
    *lines, summary = result.output.splitlines()
    parsed = [_LINE.match(line) for line in lines]
    assert all(parsed), lines
    keys = [(m["file"], int(m["line"]), int(m["col"])) for m in parsed]
    assert keys == sorted(keys)
    assert [(Path(m["file"]).name, m["line"], m["col"], m["code"], m["sev"]) for m in parsed] == [
        ("observations.yaml", "3", "24", "NP006", "warning"),
        ("conditions.yaml", "5", "14", "NP006", "error"),
    ]
    assert summary == f"1 error, 1 warning in {FIXTURES / 'np006-malformed-code'} (1 rule, 5 files)"


def test_warnings_alone_exit_0_unless_strict() -> None:
    path = str(FIXTURES / "np013-unused")
    assert run(path).exit_code == 0
    assert run(path, "--strict").exit_code == 1
    assert run(str(MINIMAL), "--strict").exit_code == 0


def test_json_format() -> None:
    result = run(str(FIXTURES / "np010-band-gap"), "--format", "json")
    assert result.exit_code == 1
    document = json.loads(result.output)
    assert document["summary"] == {"errors": 1, "warnings": 1, "files": 4, "rules": 2}
    assert [(f["code"], f["severity"], f["line"], f["column"]) for f in document["findings"]] == [
        ("NP010", "error", 29, 17),
        ("NP012", "warning", 29, 17),
    ]
    assert set(document["findings"][0]) == {"code", "severity", "file", "line", "column", "message"}


def test_the_overlay_option() -> None:
    result = run(str(MINIMAL), "--overlay", str(OVERLAYS / "bad-site.yaml"))
    assert result.exit_code == 1
    assert [line.split(": ")[1] for line in result.output.splitlines()[:-1]] == ["NP014 error", "NP014 error"]


def test_a_finding_prints_as_file_line_column_code() -> None:
    f = Finding("NP010", "error", "rules/x.yaml", 3, 9, "a gap")
    assert str(f) == "rules/x.yaml:3:9: NP010 error: a gap"


# --- JSON Schemas ------------------------------------------------------------------------------------

# The keywords the generated schemas may use. The fallback validator below implements exactly
# these, so it is faithful to draft 2020-12 for these schemas.
_KEYWORDS = {
    "$schema", "$defs", "$ref", "title", "description", "type", "enum", "const", "pattern", "minLength",
    "properties", "additionalProperties", "propertyNames", "required", "minProperties", "maxProperties",
    "items", "minItems", "maxItems", "anyOf", "oneOf", "allOf", "if", "then", "exclusiveMinimum", "not",
}  # fmt: skip


def _subschemas(schema: dict) -> list[dict]:
    out = []
    for key in ("properties", "$defs"):
        out += list(schema.get(key, {}).values())
    for key in ("additionalProperties", "propertyNames", "items", "if", "then"):
        if isinstance(schema.get(key), dict):
            out.append(schema[key])
    for key in ("anyOf", "oneOf", "allOf"):
        out += schema.get(key, [])
    return out


def _walk(schema: dict):
    yield schema
    for sub in _subschemas(schema):
        yield from _walk(sub)


def _type_ok(value: Any, name: str) -> bool:
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "null": value is None,
    }[name]


def _errors(value: Any, schema: dict, root: dict, at: str = "$") -> list[str]:
    """A draft 2020-12 validator for the keywords in ``_KEYWORDS`` (used when the jsonschema
    package is not installed)."""
    out: list[str] = []
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        out += _errors(value, target, root, at)
    types = schema.get("type")
    if types is not None and not any(_type_ok(value, t) for t in ([types] if isinstance(types, str) else types)):
        return out + [f"{at}: not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{at}: {value!r} not in enum")
    if "const" in schema and value != schema["const"]:
        out.append(f"{at}: {value!r} is not {schema['const']!r}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            out.append(f"{at}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0):
            out.append(f"{at}: too short")
    if _type_ok(value, "number") and "exclusiveMinimum" in schema and not value > schema["exclusiveMinimum"]:
        out.append(f"{at}: not above {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                out.append(f"{at}: missing {key}")
        if not schema.get("minProperties", 0) <= len(value) <= schema.get("maxProperties", len(value)):
            out.append(f"{at}: wrong number of properties")
        for key, item in value.items():
            if "propertyNames" in schema:
                out += _errors(key, schema["propertyNames"], root, f"{at}.{key}(name)")
            if key in props:
                out += _errors(item, props[key], root, f"{at}.{key}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{at}: unexpected {key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                out += _errors(item, schema["additionalProperties"], root, f"{at}.{key}")
    if isinstance(value, list):
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            out.append(f"{at}: wrong number of items")
        if "items" in schema:
            for i, item in enumerate(value):
                out += _errors(item, schema["items"], root, f"{at}[{i}]")
    for sub in schema.get("allOf", []):
        out += _errors(value, sub, root, at)
    if "anyOf" in schema and all(_errors(value, sub, root, at) for sub in schema["anyOf"]):
        out.append(f"{at}: matches none of anyOf")
    if "oneOf" in schema and sum(not _errors(value, sub, root, at) for sub in schema["oneOf"]) != 1:
        out.append(f"{at}: does not match exactly one of oneOf")
    if "if" in schema and not _errors(value, schema["if"], root, at) and "then" in schema:
        out += _errors(value, schema["then"], root, at)
    return out


def schema_errors(value: Any, name: str) -> list[str]:
    schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    try:
        import jsonschema
    except ImportError:
        return _errors(value, schema, schema)
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(value)]


def test_the_committed_schemas_are_the_generated_ones() -> None:
    """Regenerate with ``needlepoint rules schema rulesets/schema``."""
    committed = {p.name: json.loads(p.read_text(encoding="utf-8")) for p in SCHEMAS.glob("*.schema.json")}
    assert committed == json_schemas()


@pytest.mark.parametrize("name", sorted(json_schemas()))
def test_each_schema_is_well_formed(name: str) -> None:
    schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    for node in _walk(schema):
        assert set(node) <= _KEYWORDS, set(node) - _KEYWORDS
        if "$ref" in node:
            target = schema
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
        if "pattern" in node:
            re.compile(node["pattern"])
        if "required" in node:
            assert isinstance(node["required"], list)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.Draft202012Validator.check_schema(schema)


def _bundled_files() -> list[tuple[Path, str]]:
    pairs = [(p, "rules.schema.json") for p in sorted((HIP / "rules").glob("*.yaml"))]
    pairs += [(p, "valuesets.schema.json") for p in sorted((HIP / "valuesets").glob("*.yaml"))]
    pairs += [(HIP / f"{n}.yaml", f"{n}.schema.json") for n in ("ruleset", "parameters", "observations", "aggregates")]
    pairs += [(MINIMAL / "rules" / "rules.yaml", "rules.schema.json"), (OVERLAYS / "strict-site.yaml", "overlay.schema.json")]
    return pairs


@pytest.mark.parametrize(("path", "schema"), _bundled_files(), ids=lambda x: x.name if isinstance(x, Path) else x)
def test_the_schema_accepts_every_bundled_file(path: Path, schema: str) -> None:
    assert schema_errors(yaml.safe_load(path.read_text(encoding="utf-8")), schema) == []


def _hip_rule() -> dict:
    return yaml.safe_load((HIP / "rules" / "10-bleeding.yaml").read_text(encoding="utf-8"))[1]  # DEF-INR-HIGH


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r["then"]["deferral"].update({"scop": "PROCEDURE"}),
        lambda r: r.update({"precedence": "high"}),
        lambda r: r["when"]["inr"]["observation"].update({"result": 3}),
        lambda r: r["when"]["inr"]["observation"]["value"].update({"approx": 3}),
        lambda r: r["when"]["vka"]["medication"].update({"code": "warfarin"}),
        lambda r: r["when"].update({"ord": {"order": {"target": "glutel-tendon"}}}),
        lambda r: r["when"].update({"x": {"laboratory": {}}}),
        lambda r: r["when"].update({"Bad-Alias": {"order": {}}}),
        lambda r: r.update({"when_any": [r["when"]]}),
        lambda r: r.pop("evidence"),
        lambda r: r["evidence"][0].pop("citation"),
        lambda r: r.update({"version": "1.0"}),
        lambda r: r.update({"id": "def-inr-high"}),
        lambda r: r["then"].update({"modality": {"preferred": "CT"}}),
        lambda r: r["then"].pop("deferral"),
    ],
)
def test_the_rules_schema_rejects_a_broken_rule(change) -> None:
    rule = _hip_rule()
    assert schema_errors([rule], "rules.schema.json") == []
    change(rule)
    assert schema_errors([rule], "rules.schema.json") != []


def test_the_other_schemas_reject_broken_files() -> None:
    assert schema_errors({"x": {"title": "X", "codes": {"snomed": ["23987200a"]}}}, "valuesets.schema.json") != []
    assert schema_errors({"x": {"title": "X", "codes": {"rxnorm": {"prefixes": ["85"]}}}}, "valuesets.schema.json") != []
    assert (
        schema_errors({"x": {"value": 1, "provenance": "Z", "source": "s", "description": "d"}}, "parameters.schema.json") != []
    )
    assert schema_errors({"inr": {"title": "INR", "codes": ["6301-6"]}}, "observations.schema.json") != []
    assert (
        schema_errors({"n": {"description": "d", "count": "medication", "where": {"colour": 1}}}, "aggregates.schema.json") != []
    )
    assert (
        schema_errors({"n": {"description": "d", "count": "medication", "criteria": [{"flag": {}}]}}, "aggregates.schema.json")
        != []
    )
    assert schema_errors({"id": "x", "version": "1", "title": "t", "validation": "v"}, "ruleset.schema.json") != []
    assert schema_errors({"site": "s", "parameters": {"bad-name": 1}}, "overlay.schema.json") != []


@pytest.mark.parametrize("name", ["t", "id", "sid"])
def test_an_aggregate_named_after_an_engine_reserved_field_is_refused_at_its_line(tmp_path: Path, name: str) -> None:
    agg = (
        "kocher:\n  description: Kocher criteria met.\n  criteria:\n    - {flag: {name: non-weight-bearing}}\n"
        f"{name}:\n  description: x\n  count: condition\n"
    )
    root = make(tmp_path, "    k: {summary: {kocher: {gte: 1}}}", files={"aggregates.yaml": agg})
    reserved = [f for f in lint(root) if "reserved by the engine" in f.message]
    assert [(f.code, Path(f.file).name, f.line, f.column) for f in reserved] == [("NP002", "aggregates.yaml", 5, 1)]


@pytest.mark.parametrize("name", ["t", "id", "sid", "_tags", "_fid"])
def test_a_parameter_named_after_an_engine_reserved_field_is_refused_at_its_line(tmp_path: Path, name: str) -> None:
    params = (
        "limit:\n  value: 3\n  provenance: C\n  source: x\n  description: x\n"
        f"{name}:\n  value: 1\n  provenance: C\n  source: x\n  description: x\n"
    )
    root = make(tmp_path, "    ord: {order: {intent: diagnostic}}", files={"parameters.yaml": params})
    reserved = [f for f in lint(root) if "reserved by the engine" in f.message]
    assert [(f.code, Path(f.file).name, f.line, f.column) for f in reserved] == [("NP002", "parameters.yaml", 6, 1)]
    with pytest.raises(RuleSetError, match="reserved by the engine") as caught:
        load_ruleset(root)
    assert "parameters.yaml:6:1" in str(caught.value) and caught.value.where == f"parameters.yaml.{name}"


@pytest.mark.parametrize(
    ("then", "code", "line", "column", "words"),
    [
        (
            "    injectates:\n      - {category: CORTICOSTEROID, recommendation: SUGGESTED}\n      - {category: CORTICOSTEROID, "
            "recommendation: AVOID}\n",
            "NP015", 10, 20, "CORTICOSTEROID is recommended twice in one outcome",
        ),
        ("    modality: {preferred: ULTRASOUND, avoid: [ULTRASOUND]}\n", "NP002", 8, 39, "prefers ULTRASOUND and avoids it too"),
    ],
)  # fmt: skip
def test_contradictory_outcomes_are_decided_once_by_the_builder(
    tmp_path: Path, then: str, code: str, line: int, column: int, words: str
) -> None:
    """A duplicate injectate category and a modality preferred and avoided: the loader refuses
    them, and lint reports the builder's diagnostic with its code at its place."""
    root = make(tmp_path, "    ord: {order: {intent: diagnostic}}")
    rules = root / "rules" / "rules.yaml"
    rules.write_text(rules.read_text().replace("    caution: TEST\n", then))
    (finding,) = lint(root)
    assert (finding.code, finding.line, finding.column) == (code, line, column) and words in finding.message
    with pytest.raises(RuleSetError, match=words) as caught:
        load_ruleset(root)
    assert f"rules.yaml:{line}:{column}" in str(caught.value)


def test_the_schema_command_writes_exactly_the_committed_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["rules", "schema", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(json_schemas())
    for name in written:
        assert (tmp_path / name).read_bytes() == (SCHEMAS / name).read_bytes(), name


def test_every_record_key_of_the_format_is_in_its_schema() -> None:
    """The builder and the schemas read one format description: each record's keys and required
    keys are the schema's properties and required list."""
    from needlepoint.rulesets import format as fmt

    schemas = json_schemas()
    rule = schemas["rules.schema.json"]["$defs"]
    pairs = [
        (fmt.RULE, rule["rule"]),
        (fmt.THEN, rule["then"]),
        (fmt.EVIDENCE, rule["evidence"]),
        (fmt.RULESET, schemas["ruleset.schema.json"]),
        (fmt.PARAMETER, schemas["parameters.schema.json"]["additionalProperties"]),
        (fmt.CONCEPT, schemas["observations.schema.json"]["additionalProperties"]),
        (fmt.AGGREGATE, schemas["aggregates.schema.json"]["$defs"]["aggregate"]),
        (fmt.VALUE_SET, schemas["valuesets.schema.json"]["$defs"]["valueSet"]),
        (fmt.OVERLAY, schemas["overlay.schema.json"]),
    ]
    for record, schema in pairs:
        assert list(schema["properties"]) == list(record.allowed), record.name
        assert schema.get("required", []) == [k.name for k in record.keys if k.required], record.name
        assert schema["additionalProperties"] is False
