"""``needlepoint explain``: conditions with the values they saw, and verified counterfactuals."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

from click.testing import CliRunner

from needlepoint.cli_explain import command
from needlepoint.core.explain import counterfactuals, explain_rule
from needlepoint.core.record import Code, InjectionOrder, Medication, Observation, PatientRecord

from .patients import AS_OF

ORDER = InjectionOrder("hip-intra-articular", "right", "therapeutic")
WARFARIN = Medication([Code("rxnorm", "855332")])


def inr(value: float, days_before: float = 1) -> Observation:
    return Observation([Code("loinc", "6301-6")], AS_OF - dt.timedelta(days=days_before), value=value, unit="{INR}")


def test_a_fired_rule_shows_each_condition_with_value_and_threshold(hip_evaluator) -> None:
    report = explain_rule(
        hip_evaluator, PatientRecord(medications=[WARFARIN], observations=[inr(3.4)], order=ORDER), AS_OF, "DEF-INR-HIGH"
    )
    assert report["fired"] is True
    (alternative,) = report["alternatives"]
    inr_pattern = next(p for p in alternative["patterns"] if p["alias"] == "inr")
    value_test = next(t for t in inr_pattern["candidates"][0]["conditions"] if t["condition"].startswith("value"))
    assert value_test == {"condition": "value > $inr_defer_above", "threshold": "3.0", "saw": "3.4 {INR}", "holds": True}


def test_a_silent_rule_shows_the_condition_that_failed(hip_evaluator) -> None:
    report = explain_rule(
        hip_evaluator, PatientRecord(medications=[WARFARIN], observations=[inr(2.8)], order=ORDER), AS_OF, "DEF-INR-HIGH"
    )
    assert report["fired"] is False
    failing = [
        t for p in report["alternatives"][0]["patterns"] for c in p["candidates"] for t in c["conditions"] if not t["holds"]
    ]
    assert [(t["condition"], t["saw"]) for t in failing] == [("value > $inr_defer_above", "2.8 {INR}")]


def test_counterfactuals_are_verified_by_re_evaluation(hip_evaluator) -> None:
    record = PatientRecord(medications=[WARFARIN], observations=[inr(3.4)], order=ORDER)
    changes = counterfactuals(hip_evaluator, record, AS_OF)
    value = next(c for c in changes if c["field"] == "value")
    assert value["deferral"] == "BLEEDING_RISK/PROCEDURE" and value["change"] == "value ≤ 3 {INR}"
    assert value["liftsDeferral"] is True and value["newDeferrals"] == []
    age = next(c for c in changes if c["field"] == "age_days")
    assert age["liftsDeferral"] is True and age["newDeferrals"] == ["PENDING_DATA/PROCEDURE"]
    # and the claim holds on a real re-evaluation of a record with the INR at the boundary
    lifted = hip_evaluator.evaluate(PatientRecord(medications=[WARFARIN], observations=[inr(3.0)], order=ORDER), AS_OF)
    assert "deferrals" not in lifted


def test_a_deferral_held_by_two_rules_does_not_lift_by_changing_one(hip_evaluator) -> None:
    platelets = Observation([Code("loinc", "777-3")], AS_OF - dt.timedelta(days=1), value=10, unit="10*9/L")
    record = PatientRecord(medications=[WARFARIN], observations=[inr(3.4), platelets], order=ORDER)
    changes = [c for c in counterfactuals(hip_evaluator, record, AS_OF) if c["field"] == "value"]
    assert {c["ruleId"] for c in changes} == {"DEF-INR-HIGH", "DEF-PLT-LOW"}
    assert all(not c["liftsDeferral"] for c in changes)
    assert {tuple(c["stillDeferredBy"]) for c in changes} == {("DEF-PLT-LOW",), ("DEF-INR-HIGH",)}


def test_the_command_prints_the_rule_and_the_changes(tmp_path: Path) -> None:
    bundle = json.loads((Path(__file__).parent / "data" / "fhir" / "hip_injection_order.json").read_text())
    for entry in bundle["entry"]:
        resource = entry["resource"]
        if resource["resourceType"] == "Observation" and resource["code"]["coding"][0]["code"] == "6301-6":
            resource["valueQuantity"]["value"] = 3.4
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    result = CliRunner().invoke(command, [str(path), "--rule", "DEF-INR-HIGH", "--as-of", "2025-06-02T09:00:00Z"])
    assert result.exit_code == 0, result.output
    assert re.search(
        r"DEF-INR-HIGH \d+\.\d+\.\d+: INR above the procedural limit on a vitamin K antagonist: FIRED", result.output
    )
    assert "✓ value > $inr_defer_above (threshold 3.0): saw 3.4 {INR}" in result.output
    assert "DEF-INR-HIGH would not apply at ≤ 3 {INR}; the deferral would lift." in result.output
    result = CliRunner().invoke(command, [str(path), "--rule", "NO-SUCH-RULE", "--as-of", "2025-06-02T09:00:00Z"])
    assert result.exit_code == 2 and "no rule 'NO-SUCH-RULE'" in result.output


def test_a_condition_is_judged_only_against_facts_of_its_own_pattern(hip_evaluator) -> None:
    """A BMI of 30.3 is not an INR: it is no candidate for the INR pattern, so it is never shown
    as meeting (✓) or failing (✗) the INR threshold."""
    bmi = Observation([Code("loinc", "39156-5")], AS_OF - dt.timedelta(days=2), value=30.3, unit="kg/m2")
    record = PatientRecord(medications=[WARFARIN], observations=[bmi, inr(2.5)], order=ORDER)
    report = explain_rule(hip_evaluator, record, AS_OF, "DEF-INR-HIGH")
    inr_pattern = next(p for p in report["alternatives"][0]["patterns"] if p["alias"] == "inr")
    assert [c["fact"].split(" (")[0] for c in inr_pattern["candidates"]] == ["observation inr"]
    saw = [t["saw"] for c in inr_pattern["candidates"] for t in c["conditions"]]
    assert not any("kg/m2" in s for s in saw)
    # without any INR, the pattern has no candidate at all, and the text says which facts are missing
    report = explain_rule(
        hip_evaluator, PatientRecord(medications=[WARFARIN], observations=[bmi], order=ORDER), AS_OF, "DEF-INR-HIGH"
    )
    inr_pattern = next(p for p in report["alternatives"][0]["patterns"] if p["alias"] == "inr")
    assert inr_pattern["candidates"] == [] and inr_pattern["holds"] is False


def test_the_command_shows_no_other_concept_against_a_threshold(tmp_path: Path) -> None:
    """The printed report of a rule never lists a result of another concept under a pattern."""
    bundle = json.loads((Path(__file__).parent / "data" / "fhir" / "hip_injection_order.json").read_text())
    bundle["entry"] = [
        e
        for e in bundle["entry"]
        if not (e["resource"]["resourceType"] == "Observation" and e["resource"]["code"]["coding"][0]["code"] == "6301-6")
    ]
    bundle["entry"].append(
        {
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "39156-5", "display": "BMI"}]},
                "effectiveDateTime": "2025-05-30T09:00:00Z",
                "valueQuantity": {"value": 30.3, "unit": "kg/m2", "system": "http://unitsofmeasure.org", "code": "kg/m2"},
            }
        }
    )
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(bundle))
    result = CliRunner().invoke(command, [str(path), "--rule", "DEF-INR-HIGH", "--as-of", "2025-06-02T09:00:00Z"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    inr: observation with"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("      "))
    inr_block = "\n".join(lines[start:end])
    assert "bmi" not in inr_block and "30.3" not in inr_block
    assert "(no observation inr facts in the record)" in inr_block
