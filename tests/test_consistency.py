"""Consistent answers (issue 7, item 7): no decision avoids a modality and suggests the contrast only
that modality uses; every explanation's outcome is rendered and says what its rule decides; rule
messages read as plain text with the specifics (value, unit, date, age, drug)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from needlepoint.core.evaluator import Evaluator
from needlepoint.core.record import Code, InjectionOrder, Medication, Observation, PatientRecord
from needlepoint.core.resolve import _outcome_text
from needlepoint.core.ruleset import RuleSetError, parse_placeholder
from needlepoint.rulesets import build_ruleset, bundled_rulesets_dir, load_ruleset

from .patients import AS_OF, random_patients

HIP = bundled_rulesets_dir() / "hip-injection"
ORDER = InjectionOrder("hip-intra-articular", "right", "therapeutic")
WARFARIN = Medication([Code("rxnorm", "855332", "Warfarin Sodium 5 MG Oral Tablet")], begun=AS_OF - dt.timedelta(days=400))
# what a text for people must not carry: template braces, coded values, raw UCUM, rule ids
RAW = re.compile(r"\{|\}|\b(?:rxnorm|snomed|loinc|icd10cm|atc)#|10\*\d|\[degF\]|\bCel\b|kg/m2\b|\b[A-Z]{2,}-[A-Z0-9-]+\b")


def child(age: int = 10) -> PatientRecord:
    return PatientRecord(birth_date=AS_OF.date().replace(year=AS_OF.year - age) - dt.timedelta(days=30), sex="male", order=ORDER)


def injectate(decision: dict, category: str) -> dict | None:
    return next((i for i in decision.get("injectates", []) if i["category"] == category), None)


def test_a_child_gets_no_contrast_suggestion_when_fluoroscopy_is_avoided(hip_evaluator) -> None:
    decision = hip_evaluator.evaluate(child(), AS_OF)
    assert "FLUOROSCOPY" in decision["modality"]["avoid"]
    contrast = injectate(decision, "IODINATED_CONTRAST")
    assert contrast["recommendation"] == "NOT_SUGGESTED"
    assert "MOD-PEDS-US" in contrast["ruleIds"] and "INJ-CONTRAST-ONLY-WITH-FLUORO" in contrast["ruleIds"]
    assert "only used with fluoroscopy" in contrast["message"] and not RAW.search(contrast["message"])
    peds = next(e for e in decision["explanations"] if e["ruleId"] == "MOD-PEDS-US")
    assert "IODINATED_CONTRAST NOT_SUGGESTED" in peds["outcome"]


def test_an_adult_keeps_the_contrast_suggestion_with_fluoroscopy(hip_evaluator) -> None:
    adult = PatientRecord(birth_date=dt.date(1960, 3, 1), sex="male", order=ORDER)
    decision = hip_evaluator.evaluate(adult, AS_OF)
    assert decision["modality"]["preferred"] == "FLUOROSCOPY"
    assert injectate(decision, "IODINATED_CONTRAST")["recommendation"] == "SUGGESTED"


def test_no_decision_suggests_contrast_its_modality_leaves_out(hip_evaluator, hip_ruleset) -> None:
    """Over generated patients: contrast bound to fluoroscopy is never SUGGESTED or CAUTION unless
    fluoroscopy is preferred or acceptable; and every rule an injectate lists is explained."""
    bound = hip_ruleset.modality_bound_injectates
    assert bound == {"IODINATED_CONTRAST": ("FLUOROSCOPY",)}
    checked = 0
    for record in random_patients(300, seed=5) + [child(age) for age in (3, 12, 17)]:
        decision = hip_evaluator.evaluate(record, AS_OF)
        modality = decision.get("modality", {})
        retained = {modality.get("preferred"), *modality.get("acceptable", [])}
        for category, modalities in bound.items():
            entry = injectate(decision, category)
            if entry and entry["recommendation"] in ("SUGGESTED", "CAUTION"):
                assert retained & set(modalities), decision
            if entry and modality and not retained & set(modalities):
                checked += 1
    assert checked > 0  # the case occurred, so the check above was not vacuous


def test_every_outcome_is_rendered_and_names_no_contradiction(hip_evaluator, hip_ruleset) -> None:
    issue = Observation([Code("loinc", "33914-3")], AS_OF - dt.timedelta(days=3), value=55, unit="mL/s", source="egfr")
    record = PatientRecord(
        birth_date=dt.date(1950, 1, 1),
        sex="female",
        medications=[Medication([Code("rxnorm", "309362")])],
        observations=[issue],
        order=ORDER,
    )
    decision = hip_evaluator.evaluate(record, AS_OF)
    aside = next(e for e in decision["explanations"] if e["ruleId"] == "DATA-VALUE-SET-ASIDE")
    assert aside["outcome"] == "missing data: unit-unknown:egfr"
    for record in random_patients(200, seed=11):
        for exp in hip_evaluator.evaluate(record, AS_OF).get("explanations", []):
            assert not re.search(r"\{[a-z$][\w.$+]*\}", exp["outcome"]), exp


@pytest.mark.parametrize("default", ["FLUOROSCOPY", "ULTRASOUND"])
def test_a_rule_outcome_never_calls_its_preferred_or_avoided_modality_acceptable(tmp_path: Path, default: str) -> None:
    overlay = tmp_path / "site.yaml"
    overlay.write_text(f"parameters:\n  ia_hip_default_modality: {default}\n")
    ruleset = load_ruleset(HIP, overlay=overlay)
    params = ruleset.param_values()
    for rule in ruleset.rules:
        if not rule.then.modality:
            continue
        outcome = _outcome_text(rule, ruleset)
        said = re.search(r"acceptable ([A-Z_/]+)", outcome)
        acceptable = set(said.group(1).split("/")) if said else set()
        preferred = rule.then.modality.get("preferred")
        preferred = params[preferred[1:]] if isinstance(preferred, str) and preferred.startswith("$") else preferred
        assert preferred not in acceptable and not acceptable & set(rule.then.modality.get("avoid", ())), (rule.id, outcome)
    default_rule = _outcome_text(ruleset.rule("MOD-IA-HIP-DEFAULT"), ruleset)
    other = "ULTRASOUND" if default == "FLUOROSCOPY" else "FLUOROSCOPY"
    assert f"prefer {default}, acceptable {other}, avoid LANDMARK" in default_rule


def test_messages_give_the_drug_the_value_its_date_and_age_and_the_deadline(hip_evaluator) -> None:
    inr = Observation([Code("loinc", "6301-6")], AS_OF - dt.timedelta(days=3), value=3.4, unit="{INR}")
    decision = hip_evaluator.evaluate(
        PatientRecord(birth_date=dt.date(1950, 1, 1), medications=[WARFARIN], observations=[inr], order=ORDER), AS_OF
    )
    bleeding = next(d for d in decision["deferrals"] if d["reason"] == "BLEEDING_RISK")
    assert "The INR is 3.4 (taken 30 May 2025, 3 days ago), above the limit of 3" in bleeding["message"]
    assert "Warfarin Sodium 5 MG Oral Tablet" in bleeding["message"] and not RAW.search(bleeding["message"])
    matched = next(e for e in decision["explanations"] if e["ruleId"] == "DEF-INR-HIGH")["matched"]
    assert any(m["value"] == "3.4 {INR}" for m in matched)  # auditors keep the raw unit

    decision = hip_evaluator.evaluate(PatientRecord(birth_date=dt.date(1950, 1, 1), medications=[WARFARIN], order=ORDER), AS_OF)
    pending = next(d for d in decision["deferrals"] if d["reason"] == "PENDING_DATA")
    assert "obtain an INR taken no earlier than 26 May 2025" in pending["message"]


def test_plain_units_in_messages(hip_evaluator) -> None:
    platelets = Observation([Code("loinc", "777-3")], AS_OF - dt.timedelta(days=1), value=12, unit="10*9/L")
    fever = Observation([Code("loinc", "8310-5")], AS_OF - dt.timedelta(hours=2), value=101.3, unit="[degF]")
    decision = hip_evaluator.evaluate(
        PatientRecord(birth_date=dt.date(1950, 1, 1), observations=[platelets, fever], order=ORDER), AS_OF
    )
    text = " ".join(d["message"] for d in decision["deferrals"])
    assert "12 ×10⁹/L" in text and "below 20 ×10⁹/L" in text
    assert "38.5 °C (measured today), at or above 38 °C" in text
    assert not RAW.search(text)


def test_no_message_for_people_carries_codes_raw_units_or_rule_ids(hip_evaluator) -> None:
    for record in random_patients(300, seed=3):
        decision = hip_evaluator.evaluate(record, AS_OF)
        for group in ("deferrals", "cautions", "injectates"):
            for item in decision.get(group, []):
                assert not RAW.search(item["message"]), item


def test_placeholders_parse() -> None:
    assert parse_placeholder("inr.value").field == "value"
    assert parse_placeholder("vka").field == ""
    assert parse_placeholder("$inr_max_age_days.since").modifier == "since"
    plus = parse_placeholder("prior.when+$steroid_min_interval_days")
    assert (plus.alias, plus.field, plus.param, plus.modifier) == ("prior", "when", "steroid_min_interval_days", "plus")
    assert parse_placeholder("prior.value+$x") is None and parse_placeholder("a b") is None


@pytest.mark.parametrize(
    ("bound", "message"),
    [
        ({"IODINATED_DYE": "FLUOROSCOPY"}, "'IODINATED_DYE' is not one of"),
        ({"IODINATED_CONTRAST": "XRAY"}, "'XRAY' is not one of"),
        ({"IODINATED_CONTRAST": []}, "a modality or a non-empty list"),
        ("FLUOROSCOPY", "a mapping of injectate category"),
    ],
)
def test_modality_bound_injectates_are_validated(hip_documents: dict, bound, message: str) -> None:
    docs = hip_documents
    docs["ruleset"] = {**docs["ruleset"], "modality_bound_injectates": bound}
    with pytest.raises(RuleSetError, match=message):
        build_ruleset(docs)


def test_a_binding_to_several_modalities_holds_while_one_is_retained(hip_documents: dict) -> None:
    docs = hip_documents
    docs["ruleset"] = {**docs["ruleset"], "modality_bound_injectates": {"IODINATED_CONTRAST": ["FLUOROSCOPY", "ULTRASOUND"]}}
    evaluator = Evaluator(build_ruleset(docs))
    try:
        decision = evaluator.evaluate(child(), AS_OF)
        assert injectate(decision, "IODINATED_CONTRAST")["recommendation"] == "SUGGESTED"  # ultrasound is preferred
    finally:
        evaluator.close()
