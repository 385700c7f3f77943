"""Codes as EHRs send them: ICD-10-CM with or without the dot, SNOMED-only problem lists, RxNorm
clinical and branded drugs, and codings that are malformed but must not break anything.

The rule set's own cases (rulesets/hip-injection/tests/codes.yaml) show each spelling firing its
rule; these tests pin the mechanics (one normalisation, at value-set build and at lookup) and run
real Synthea bundles through the mapper and the core."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson
import pytest

from needlepoint.authoring.lint import check_code
from needlepoint.core.prepare import Preparer, TagIndex
from needlepoint.core.record import Code, Condition, InjectionOrder, PatientRecord
from needlepoint.core.ruleset import match_key
from needlepoint.fhir import record_from_bundle
from needlepoint.rulesets import build_ruleset

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"  # beside the repository, as in CI
HAND_MADE = REPO / "tests" / "data" / "fhir" / "hip_injection_order.json"
AS_OF = dt.datetime(2025, 6, 2, 9, 0, tzinfo=dt.timezone.utc)
ORDER = InjectionOrder("hip-intra-articular", "right", "therapeutic")


def fired(decision: dict) -> set[str]:
    return {e["ruleId"] for e in decision.get("explanations", [])}


def fixture_bundle(folder: str, first_name: str) -> dict:
    """A Synthea bundle by the patient's first name; the test is skipped where the shared
    fixtures are not beside the repository."""
    paths = sorted((FIXTURES / folder).glob(f"{first_name}_*.json"))
    if not paths:
        pytest.skip(f"shared fixture {folder}/{first_name}_* is not beside the repository")
    return orjson.loads(paths[0].read_bytes())


def mini_ruleset(docs: dict, value_sets: dict):
    """The bundled rule set (``docs``: its documents) with ``value_sets`` added to the ones its
    rules need, so that a test can declare codes in either spelling."""
    docs["value_sets"] = {**docs["value_sets"], **value_sets}
    return build_ruleset(docs)


# --- one normalisation ---------------------------------------------------------------------


def test_match_key_drops_the_icd10cm_dot_and_nothing_else() -> None:
    assert match_key("icd10cm", "L03.115") == match_key("icd10cm", "L03115") == "L03115"
    assert match_key("icd10cm", "z3a.38") == "Z3A38"  # lower case as some feeds send it
    assert match_key("icd10cm", "M16") == "M16"
    # other systems are matched exactly as written
    assert match_key("snomed", "34552-0") == "34552-0"
    assert match_key("atc", "B01AA03") == "B01AA03"
    assert match_key("loinc", "6301-6") == "6301-6"


@pytest.mark.parametrize(
    ("declared", "sent", "matches"),
    [
        ({"codes": ["L03.115"]}, "L03115", True),  # dotted declaration, dotless record
        ({"codes": ["L03115"]}, "L03.115", True),  # dotless declaration, dotted record
        ({"codes": ["L03.115"]}, "L03.115", True),
        ({"codes": ["L03.115"]}, "L03.11", False),  # a parent is not the listed child
        ({"codes": ["L03.115"]}, "L0311", False),
        ({"prefixes": ["M25.55"]}, "M25551", True),  # deeper specificity, dotless
        ({"prefixes": ["M2555"]}, "M25.552", True),  # dotless prefix, dotted record
        ({"prefixes": ["M25.55"]}, "M25.5", False),  # shorter than the prefix
        ({"prefixes": ["M25.55"]}, "M25.65", False),
        ({"prefixes": ["D68.0"]}, "D6800", True),
        ({"prefixes": ["D68.0"]}, "D68.1", False),
    ],
)
def test_value_sets_match_either_spelling(hip_documents: dict, declared: dict, sent: str, matches: bool) -> None:
    rs = mini_ruleset(hip_documents, {"probe": {"title": "probe", "codes": {"icd10cm": declared}}})
    assert rs.value_sets["probe"].contains("icd10cm", sent) is matches


def test_the_code_index_looks_up_either_spelling_once(hip_ruleset) -> None:
    """The tag index keys each record code as the value sets are keyed: entry-site infection is
    listed dotted (L03.115 exactly, L02.41 as a prefix) and found from dotless codes."""
    index = TagIndex(hip_ruleset)
    tag = "code@entry-site-skin-infection"
    for code in ("L03.115", "L03115", "l03115", "L02.416", "L02416"):
        assert tag in index.tags("condition", "code", [Code("icd10cm", code)]), code
    for code in ("L03.11", "L0311", "L02.4"):
        assert tag not in index.tags("condition", "code", [Code("icd10cm", code)]), code
    # another system with the same characters is not ICD-10-CM
    assert index.tags("condition", "code", [Code("snomed", "L03115")]) == []


def test_lint_accepts_both_spellings_alike() -> None:
    for code in ("L03.115", "L03115", "M16.11", "M1611", "Z3A.38", "Z3A38"):
        assert check_code("icd10cm", code) is None, code
    for prefix in ("M25.55", "M2555", "L02.41", "L0241", "Z3A"):
        assert check_code("icd10cm", prefix, prefix=True) is None, prefix
    for bad in ("M16.", "M1.6", "16.11", "M16.11.2"):
        assert check_code("icd10cm", bad) is not None, bad


# --- real records --------------------------------------------------------------------------


def test_mafalda_warfarin_and_hip_oa_fire_their_rules(hip_evaluator) -> None:
    """Synthea: warfarin as the clinical drug 855332 and hip OA as SNOMED 239872002 only."""
    record = record_from_bundle(fixture_bundle("synthea", "Mafalda")).with_order(ORDER)
    prepared, decision = hip_evaluator.evaluate_with_facts(record, AS_OF)
    tags = {t for fact in prepared.facts for t in fact.get("_tags", ())}
    assert {"code@vitamin-k-antagonists", "code@antithrombotics", "code@hip-osteoarthritis"} <= tags
    assert {"CAU-ANTITHROMBOTIC-CONTINUE", "DATA-INR-CURRENT", "INJ-OA-HIP-CS"} <= fired(decision)
    assert "INJ-THERAPEUTIC-CS-LA" not in fired(decision)  # the OA diagnosis was recognised


def test_gayla_clopidogrel_is_an_antithrombotic_but_not_a_vka(hip_evaluator) -> None:
    """Synthea: clopidogrel 75 MG (309362) and SNOMED hip OA; no INR is asked for."""
    record = record_from_bundle(fixture_bundle("synthea", "Gayla")).with_order(ORDER)
    decision = hip_evaluator.evaluate(record, AS_OF)
    assert {"CAU-ANTITHROMBOTIC-CONTINUE", "INJ-OA-HIP-CS"} <= fired(decision)
    assert "DATA-INR-CURRENT" not in fired(decision)


def test_parker_two_agents_and_snomed_only_diabetes(hip_evaluator) -> None:
    """Synthea sample: warfarin 855332 and clopidogrel 309362 are two agents; neuropathy due to
    type 2 diabetes (368581000119106) and metformin ER 500 (860975) are two kinds of evidence.
    Evaluated in mid-2020: every one of them is on record by then, and the patient (who died in
    2021) is alive and under 75, so only the two agents can raise the bleeding risk."""
    record = record_from_bundle(fixture_bundle("synthea-r4-sample", "Parker")).with_order(ORDER)
    prepared, decision = hip_evaluator.evaluate_with_facts(record, dt.datetime(2020, 6, 1, 9, 0, tzinfo=dt.timezone.utc))
    (summary,) = [f for f in prepared.facts if f["t"] == "summary"]
    assert summary["antithrombotic_agents"] == 2
    assert summary["diabetes_evidence"] == 2
    assert {"CAU-PATIENT-BLEED-RISK", "CAU-DM-COUNSEL", "DATA-INR-CURRENT"} <= fired(decision)


def test_synthea_pregnancy_that_ended_is_not_current(hip_ruleset) -> None:
    """156073000 is "Complete miscarriage" in SNOMED CT (Synthea shows it as "Fetus with unknown
    complication") and 19169002 is a miscarriage: neither means pregnant now."""
    preparer = Preparer(hip_ruleset)
    for code, pregnant in (("72892002", True), ("77386006", True), ("79586000", True), ("156073000", False), ("19169002", False)):
        record = PatientRecord(
            birth_date=dt.date(1990, 1, 1), sex="female", conditions=[Condition([Code("snomed", code)])], order=ORDER
        )
        tags = {t for fact in preparer.prepare(record, AS_OF).facts for t in fact.get("_tags", ())}
        assert ("code@pregnancy-conditions" in tags) is pregnant, code


# --- malformed codings ---------------------------------------------------------------------


def test_a_loinc_shaped_code_under_snomed_is_in_no_value_set(hip_evaluator) -> None:
    """A coding such as SNOMED "34552-0" (a LOINC code under the wrong system) maps and evaluates
    without error; it simply matches nothing."""
    bundle = orjson.loads(HAND_MADE.read_bytes())
    patient_ref = next(f"Patient/{e['resource']['id']}" for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    bundle["entry"].append(
        {
            "resource": {
                "resourceType": "Condition",
                "id": "malformed-snomed",
                "clinicalStatus": {
                    "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
                },
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "34552-0", "display": "Cardiology Note"}]},
                "subject": {"reference": patient_ref},
            }
        }
    )
    record = record_from_bundle(bundle)
    malformed = [c for c in record.conditions if Code("snomed", "34552-0") in c.codes]
    assert len(malformed) == 1
    prepared, decision = hip_evaluator.evaluate_with_facts(record, AS_OF)
    labels = [info.label for info in prepared.info]
    assert not any("34552-0" in label for label in labels)  # no fact: it is in no value set
    baseline = hip_evaluator.evaluate(record_from_bundle(orjson.loads(HAND_MADE.read_bytes())), AS_OF)
    assert fired(decision) == fired(baseline)
