"""Units as labs send them: UCUM codes are matched exactly, display units only where the rule set
lists them, every accepted unit of the bundled rule set is used by one of its cases, the loader
and lint refuse ambiguous unit lists, and the FHIR, typed and case-file roads read units alike."""

from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
import yaml

from needlepoint.authoring.lint import lint
from needlepoint.casefile import load_cases
from needlepoint.core.prepare import apply_conversion, convert, unit_conversion
from needlepoint.core.record import Code, InjectionOrder, Observation, PatientRecord
from needlepoint.core.ruleset import RuleSetError
from needlepoint.fhir import record_from_bundle
from needlepoint.intake import context_from_record, record_from_context
from needlepoint.rulesets import build_ruleset, bundled_rulesets_dir

HIP = bundled_rulesets_dir() / "hip-injection"
MINIMAL = Path(__file__).resolve().parent / "data" / "rulesets" / "minimal"
HAND_MADE = Path(__file__).resolve().parent / "data" / "fhir" / "hip_injection_order.json"
AS_OF = dt.datetime(2025, 6, 2, 9, tzinfo=dt.timezone.utc)
UCUM = "http://unitsofmeasure.org"


# --- every accepted unit has a case -----------------------------------------------------------------


def units_without_a_case(observations: dict, case_dir: Path) -> list[str]:
    """``concept: unit (kind)`` for each unit of ``observations`` (as parsed from
    observations.yaml) that no case in ``case_dir`` sends: a UCUM code as ``unit:``, a display
    unit as ``unit_display:`` without a UCUM code."""
    used: set[tuple[str, str, str]] = set()  # (system#code, kind, unit)
    for path in sorted(case_dir.glob("*.yaml")):
        for case in load_cases(path):
            for o in case.record.observations:
                for c in o.codes:
                    if o.unit:
                        used.add((f"{c.system}#{c.code}", "units", o.unit))
                    elif o.unit_display:
                        used.add((f"{c.system}#{c.code}", "display_units", o.unit_display.strip()))
    unused = []
    for cid, spec in observations.items():
        for kind in ("units", "display_units"):
            for unit in spec.get(kind) or {}:
                if not any((code, kind, unit) in used for code in spec["codes"]):
                    unused.append(f"{cid}: {unit} ({kind})")
    return unused


def test_every_accepted_unit_of_the_bundled_rule_set_is_used_by_a_case() -> None:
    observations = yaml.safe_load((HIP / "observations.yaml").read_text(encoding="utf-8"))
    assert units_without_a_case(observations, HIP / "tests") == []


def test_a_unit_without_a_case_is_named() -> None:
    observations = yaml.safe_load((HIP / "observations.yaml").read_text(encoding="utf-8"))
    observations["glucose"]["units"]["umol/L"] = 0.018016
    observations["platelets"]["display_units"]["thou/uL"] = 1
    assert units_without_a_case(observations, HIP / "tests") == ["platelets: thou/uL (display_units)", "glucose: umol/L (units)"]


# --- how a unit is read ----------------------------------------------------------------------------


def test_a_ucum_code_is_matched_exactly_and_decides_alone(hip_ruleset) -> None:
    platelets = hip_ruleset.observations["platelets"]
    assert unit_conversion("10*3/uL", None, platelets) == 1
    assert unit_conversion("/uL", None, platelets) == 0.001
    assert unit_conversion("10*3/UL", None, platelets) is None  # UCUM is case-sensitive
    assert unit_conversion("K/uL", None, platelets) is None  # kelvin per microlitre
    assert unit_conversion("K/uL", "K/uL", platelets) is None  # a wrong code is not rescued by its text
    assert unit_conversion("10*3/uL", "furlongs", platelets) == 1  # nor a right one spoiled


def test_display_text_is_read_only_without_a_code_and_only_where_listed(hip_ruleset) -> None:
    platelets, temperature = hip_ruleset.observations["platelets"], hip_ruleset.observations["temperature"]
    assert unit_conversion(None, "K/uL", platelets) == 1
    assert unit_conversion(None, "  x10E3/uL\t", platelets) == 1  # spaces around the text are ignored
    assert unit_conversion(None, "/uL", platelets) == 0.001  # a UCUM code written as text
    assert unit_conversion(None, "k/ul", platelets) is None  # not listed: never guessed
    assert unit_conversion(None, "Cel", platelets) is None  # another concept's unit
    assert unit_conversion(None, "°F", temperature) == "fahrenheit_to_celsius"
    assert unit_conversion(None, "", platelets) is None and unit_conversion(None, None, platelets) is None


def test_convert_keeps_its_signature_and_takes_the_display_text_as_an_option(hip_ruleset) -> None:
    concepts = hip_ruleset.observations
    assert convert(15000, "/uL", concepts["platelets"]) == pytest.approx(15)
    assert convert(15, None, concepts["platelets"], "K/uL") == 15
    assert convert(15, "K/uL", concepts["platelets"]) is None
    assert convert(101.3, None, concepts["temperature"], "degF") == pytest.approx(38.5)
    assert convert(25, "mL/min", concepts["egfr"]) == 25  # eGFR is per 1.73 m2 whatever the unit says
    assert convert(17.8, "mmol/l", concepts["glucose"]) == pytest.approx(320.68, abs=0.01)
    assert convert(10.4, None, concepts["hba1c"], "% of total Hgb") == 10.4
    assert convert(42, "d", concepts["conservative-care-weeks"]) == pytest.approx(6.0, abs=1e-4)
    assert convert(1, "mo", concepts["conservative-care-weeks"]) == pytest.approx(30.4375 / 7, abs=1e-4)
    assert apply_conversion(86, "ifcc_to_ngsp") == pytest.approx(10.02, abs=0.01)


def _missing(decision: dict) -> dict[str, str]:
    return {m["code"]: m["message"] for m in decision.get("missingData", [])}


def _record(*observations: Observation) -> PatientRecord:
    return PatientRecord(
        birth_date=dt.date(1960, 3, 1),
        sex="male",
        observations=list(observations),
        order=InjectionOrder("hip-intra-articular", "right", "therapeutic"),
    )


def _platelets(value: float, unit: str | None = None, display: str | None = None) -> Observation:
    return Observation(
        [Code("loinc", "777-3")], AS_OF - dt.timedelta(days=1), value=value, unit=unit, unit_display=display, source="obs"
    )


def test_messages_say_which_unit_was_refused_and_why(hip_evaluator) -> None:
    by_code = _missing(hip_evaluator.evaluate(_record(_platelets(15, "K/uL", "K/uL")), AS_OF))
    assert (
        "'K/uL', which is not an accepted unit (×10⁹/L, " in by_code["unit-unknown:platelets"]
    )  # units read as people write them
    assert "Its display text 'K/uL' would be accepted without the code" in by_code["unit-unknown:platelets"]
    by_code = _missing(hip_evaluator.evaluate(_record(_platelets(15, None, "thou/uL")), AS_OF))
    assert "'thou/uL' (display text, no UCUM code)" in by_code["unit-unknown:platelets"]
    assert "as display text also K/uL, K/µL, x10E3/uL" in by_code["unit-unknown:platelets"]
    by_code = _missing(hip_evaluator.evaluate(_record(_platelets(15, None, "   ")), AS_OF))
    assert "unit-missing:platelets" in by_code
    by_code = _missing(hip_evaluator.evaluate(_record(_platelets(9000, None, "K/uL")), AS_OF))
    assert "9000 K/uL, is outside the plausible range" in by_code["implausible:platelets"]
    assert "It would be plausible in /uL (9.0 ×10⁹/L)" in by_code["implausible:platelets"]


# --- the three roads read units alike -----------------------------------------------------------------


@pytest.mark.parametrize(
    "quantity",
    [
        {"value": 15, "unit": "K/uL"},
        {"value": 15, "unit": "K/uL", "system": UCUM, "code": "K/uL"},
        {"value": 15000, "unit": "cells/uL", "system": UCUM, "code": "/uL"},
        {"value": 15, "unit": "x10E3/uL"},
        {"value": 15, "unit": "k/ul"},
    ],
)
def test_fhir_typed_and_case_file_roads_decide_alike(hip_evaluator, tmp_path: Path, quantity: dict) -> None:
    bundle = json.loads(HAND_MADE.read_text(encoding="utf-8"))
    (resource,) = [e["resource"] for e in bundle["entry"] if e["resource"].get("id") == "platelets-unitless"]
    resource["valueQuantity"] = quantity
    by_fhir = record_from_bundle(bundle)
    by_context = record_from_context(context_from_record(by_fhir))
    (platelets,) = [o for o in by_fhir.observations if o.codes[0].code == "777-3"]
    case = {"code": "loinc#777-3", "value": quantity["value"], "at": platelets.effective.isoformat()}
    case.update({k: v for k, v in (("unit", platelets.unit), ("unit_display", platelets.unit_display)) if v})
    (tmp_path / "case.yaml").write_text(
        yaml.safe_dump([{"name": "n", "as_of": AS_OF.isoformat(), "patient": {"observations": [case]}, "expect": {}}])
    )
    (by_case,) = list(load_cases(tmp_path / "case.yaml")[0].record.observations)
    assert (by_case.unit, by_case.unit_display) == (platelets.unit, platelets.unit_display)

    def outcome(record: PatientRecord) -> tuple:
        decision = hip_evaluator.evaluate(record, AS_OF)
        return sorted(e["ruleId"] for e in decision.get("explanations", [])), sorted(_missing(decision))

    assert outcome(by_fhir) == outcome(by_context)
    assert outcome(_record(by_case)) == outcome(_record(platelets))


# --- the loader and lint refuse ambiguous unit lists -------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o["platelets"]["display_units"].update({"/uL": 1}), "one text cannot mean two things"),
        (lambda o: o["platelets"]["units"].update({"K/µL": 1}), "not a UCUM code"),
        (lambda o: o["bmi"]["units"].update({"kg/m 2": 1}), "not a UCUM code"),
        (lambda o: o["platelets"]["display_units"].update({" K/uL": 1}), "surrounding spaces"),
        (lambda o: o["platelets"]["display_units"].update({"K/uL": 0}), "a positive factor"),
        (lambda o: o["platelets"]["display_units"].update({"K/uL": "kilo"}), "unknown conversion 'kilo'"),
        (lambda o: o["pregnancy-status"].update({"display_units": {"pregnant": 1}}), "need a canonical unit"),
        (lambda o: o["platelets"]["units"].update({"10*9/L": 1000}), "must be an accepted UCUM code with factor 1"),
        (lambda o: o["platelets"].update({"plausible": [2000, 0]}), "low < high"),
    ],
)
def test_the_loader_refuses_an_ambiguous_or_malformed_unit_list(hip_documents: dict, change, message: str) -> None:
    docs = hip_documents
    build_ruleset(docs)
    mutated = copy.deepcopy(docs)
    change(mutated["observations"])
    with pytest.raises(RuleSetError, match=message):
        build_ruleset(mutated)


def _lint_minimal(tmp_path: Path, platelets: dict) -> list[tuple[str, str, str]]:
    root = tmp_path / "rs"
    shutil.copytree(MINIMAL, root)
    spec = {
        "title": "Platelet count",
        "codes": ["loinc#777-3", "loinc#26515-7"],
        "unit": "10*9/L",
        "plausible": [0, 2000],
        **platelets,
    }
    (root / "observations.yaml").write_text(yaml.safe_dump({"platelets": spec}, allow_unicode=True))
    return [(f.code, f.severity, f.message) for f in lint(root)]


def test_lint_accepts_display_units_and_names_each_problem(tmp_path: Path) -> None:
    assert _lint_minimal(tmp_path / "ok", {"units": {"10*9/L": 1, "/uL": 0.001}, "display_units": {"K/uL": 1}}) == []
    findings = _lint_minimal(
        tmp_path / "bad",
        {"units": {"10*9/L": 1, "/uL": 0.001, "K/µL": 1}, "display_units": {"/uL": 1, "10*9/L": 1, " K/uL": 1, "x10E3/uL": -1}},
    )
    assert sorted((code, severity) for code, severity, _ in findings) == [("NP002", "error")] * 4 + [("NP015", "warning")]
    text = "\n".join(message for _, _, message in findings)
    assert "'K/µL' is not a UCUM code" in text
    assert "display unit '/uL' is also a UCUM code of this concept converting by 0.001" in text
    assert "display unit '10*9/L' is already accepted as a UCUM code" in text
    assert "surrounding spaces" in text and "a positive factor" in text
