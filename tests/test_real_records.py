"""Real records: the issue's "Done when", measured over every Synthea bundle in both shared folders.

Each bundle (no injection order: the issue supplies hip-intra-articular, right, therapeutic) is
evaluated in-process at 2025-06-02T09:00:00Z and at the patient's last encounter, and, to prove
that nothing recorded after the instant changes a decision, in full and truncated at those two
instants and at 2019-01-01, 2004-01-01 and the midpoint of the record's own span. Every check is
parametrised by bundle and instant, so a failure names both.

The truncation and the invariants are the independent second reading of the contract in
``tests/real_records.py``; the first part of this file tests that reading itself.
"""

from __future__ import annotations

import collections
import copy
import datetime as dt
import random

import orjson
import pytest

from .patients import AS_OF, random_patient
from .real_records import (
    MAIN_INSTANTS,
    TRUNCATION_INSTANTS,
    Corpus,
    Evidence,
    bundle_id,
    bundle_paths,
    deceased_at,
    deceased_findings,
    decision_invariants,
    exists_at,
    fhir_instant,
    observation_max_age_days,
    stale_missing_data,
    stale_pregnancy_deferrals,
    study_instants,
    truncate_bundle,
)

UTC = dt.timezone.utc
T = dt.datetime(2019, 1, 1, tzinfo=UTC)
BEFORE, AFTER = "2018-06-01T10:00:00+00:00", "2019-06-01T10:00:00+00:00"

PATHS = bundle_paths()
IDS = [bundle_id(path) for path in PATHS]


# --- the FHIR-level truncation, on small bundles ---------------------------------------------------


def bundle(*resources: dict) -> dict:
    """A transaction Bundle of ``resources`` with urn:uuid fullUrls, as Synthea writes them."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": f"urn:uuid:{i}", "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
            for i, r in enumerate(resources)
        ],
    }


def kept_ids(b: dict, instant=T) -> list[str]:
    """The ids of the resources that survive truncation at ``instant``."""
    return [e["resource"].get("id") for e in truncate_bundle(b, instant)["entry"]]


def test_fhir_dates_start_at_their_first_moment_in_utc() -> None:
    assert fhir_instant("2019-01-01T01:00:00+02:00") == dt.datetime(2018, 12, 31, 23, 0, tzinfo=UTC)
    assert fhir_instant("2019-03") == dt.datetime(2019, 3, 1, tzinfo=UTC)
    assert fhir_instant("2019") == dt.datetime(2019, 1, 1, tzinfo=UTC)
    assert fhir_instant("2019-03-05T10:20:30.123Z") == dt.datetime(2019, 3, 5, 10, 20, 30, 123000, tzinfo=UTC)
    assert [fhir_instant(x) for x in ("2019-02-30", "yesterday", None, 2019, "2019-01-01T25:00:00Z")] == [None] * 5


def test_a_condition_exists_once_it_began_or_was_written() -> None:
    b = bundle(
        {"resourceType": "Patient", "id": "p"},
        {"resourceType": "Condition", "id": "onset-later-recorded-before", "onsetDateTime": AFTER, "recordedDate": BEFORE},
        {"resourceType": "Condition", "id": "onset-before-recorded-later", "onsetDateTime": BEFORE, "recordedDate": AFTER},
        {"resourceType": "Condition", "id": "both-later", "onsetDateTime": AFTER, "recordedDate": AFTER},
        {"resourceType": "Condition", "id": "period-later", "onsetPeriod": {"start": AFTER}},
        {"resourceType": "Condition", "id": "undated"},
        {"resourceType": "Condition", "id": "unreadable", "onsetDateTime": "sometime in 2020"},
        {"resourceType": "Condition", "id": "exactly-at", "onsetDateTime": "2019-01-01T00:00:00Z"},
    )
    assert kept_ids(b) == [
        "p",
        "onset-later-recorded-before",
        "onset-before-recorded-later",
        "undated",
        "unreadable",
        "exactly-at",
    ]


def test_each_record_type_is_dated_by_the_fields_the_contract_names() -> None:
    b = bundle(
        {"resourceType": "MedicationRequest", "id": "mr-later", "status": "active", "authoredOn": AFTER},
        {"resourceType": "MedicationRequest", "id": "mr-before", "status": "stopped", "authoredOn": BEFORE},
        {"resourceType": "MedicationRequest", "id": "injectate-draft", "status": "draft", "authoredOn": AFTER},
        {
            "resourceType": "MedicationStatement",
            "id": "ms-asserted-before",
            "effectivePeriod": {"start": AFTER},
            "dateAsserted": BEFORE,
        },
        {"resourceType": "MedicationStatement", "id": "ms-later", "effectiveDateTime": AFTER},
        {"resourceType": "AllergyIntolerance", "id": "allergy-later", "recordedDate": AFTER},
        {"resourceType": "AllergyIntolerance", "id": "allergy-onset-before", "recordedDate": AFTER, "onsetDateTime": BEFORE},
        {"resourceType": "Procedure", "id": "proc-later", "performedPeriod": {"start": AFTER, "end": AFTER}},
        {"resourceType": "Procedure", "id": "proc-before", "performedDateTime": BEFORE},
        {"resourceType": "ServiceRequest", "id": "surgery-ordered-later", "status": "active", "authoredOn": AFTER},
        {"resourceType": "ServiceRequest", "id": "the-order", "status": "draft", "authoredOn": AFTER},
        {"resourceType": "Observation", "id": "obs-later", "effectiveDateTime": AFTER, "issued": AFTER},
        {"resourceType": "Observation", "id": "obs-issued-only-before", "issued": BEFORE},
        {"resourceType": "Observation", "id": "obs-taken-before-issued-later", "effectiveDateTime": BEFORE, "issued": AFTER},
        {"resourceType": "Encounter", "id": "encounter-later", "period": {"start": AFTER}},
    )
    assert kept_ids(b) == [
        "mr-before",
        "injectate-draft",
        "ms-asserted-before",
        "allergy-onset-before",
        "proc-before",
        "the-order",
        "obs-issued-only-before",
        "obs-taken-before-issued-later",
        "encounter-later",
    ]


def test_a_death_after_the_instant_has_not_happened_yet() -> None:
    later = bundle({"resourceType": "Patient", "id": "p", "birthDate": "1950-01-01", "deceasedDateTime": AFTER})
    earlier = bundle({"resourceType": "Patient", "id": "p", "deceasedDateTime": BEFORE})
    undated = bundle({"resourceType": "Patient", "id": "p", "deceasedBoolean": True})
    assert truncate_bundle(later, T)["entry"][0]["resource"] == {"resourceType": "Patient", "id": "p", "birthDate": "1950-01-01"}
    assert truncate_bundle(earlier, T) == earlier and truncate_bundle(undated, T) == undated
    assert [deceased_at(b, T) for b in (later, earlier, undated)] == [False, True, True]
    assert deceased_at(later, dt.datetime(2020, 1, 1, tzinfo=UTC))


def test_truncation_leaves_its_input_alone_and_keeps_ends_and_statuses() -> None:
    resolved = {
        "resourceType": "Condition",
        "id": "c",
        "clinicalStatus": {"coding": [{"code": "resolved"}]},
        "onsetDateTime": BEFORE,
        "abatementDateTime": AFTER,
    }
    b = bundle(
        {"resourceType": "Patient", "id": "p", "deceasedDateTime": AFTER},
        resolved,
        {"resourceType": "Observation", "id": "o", "effectiveDateTime": AFTER},
    )
    original = copy.deepcopy(b)
    out = truncate_bundle(b, "2019-01-01T00:00:00Z")
    assert b == original
    assert out["entry"][1]["resource"] is resolved  # the record existed: kept as it is, ending and all
    assert {k: v for k, v in out.items() if k != "entry"} == {k: v for k, v in b.items() if k != "entry"}


def test_a_record_dated_at_the_instant_exists_and_one_a_second_later_does_not() -> None:
    at = {"resourceType": "Observation", "effectiveDateTime": "2019-01-01T00:00:00Z"}
    assert exists_at(at, T) and not exists_at(at, T - dt.timedelta(seconds=1))


@pytest.mark.parametrize("path", [p for p in PATHS if p.parent.name == "synthea"], ids=bundle_id)
def test_truncation_of_a_real_bundle_is_idempotent_and_grows_with_the_instant(path) -> None:
    data = orjson.loads(path.read_bytes())
    instants = sorted(study_instants(data).values())
    previous: set[int] = set()
    for instant in instants:
        once = truncate_bundle(data, instant)
        assert truncate_bundle(once, instant) == once
        kept = {id(e["resource"]) for e in once["entry"] if e["resource"].get("resourceType") != "Patient"}
        assert previous <= kept, f"a record present at an earlier instant vanished at {instant}"
        previous = kept
    assert truncate_bundle(data, dt.datetime(2100, 1, 1, tzinfo=UTC)) == data


# --- the invariants, on decisions written by hand ---------------------------------------------------------


@pytest.fixture(scope="module")
def valid_decision(hip_ruleset) -> dict:
    """A decision that satisfies every invariant, built by hand from real rules of the rule set."""
    rs = hip_ruleset

    def explanation(rule_id: str, outcome: str) -> dict:
        return {
            "ruleId": rule_id,
            "ruleVersion": rs.rule(rule_id).version,
            "title": rs.rule(rule_id).title,
            "outcome": outcome,
            "rationale": "…",
        }

    return {
        "decisionId": "dec-test",
        "asOf": "2025-06-02T09:00:00Z",
        "ruleset": {"id": rs.id, "version": rs.version, "digest": rs.digest},
        "modality": {"preferred": "ULTRASOUND", "avoid": ["FLUOROSCOPY"], "ruleIds": ["MOD-SOFT-TISSUE-US"]},
        "injectates": [
            {
                "category": "CORTICOSTEROID",
                "recommendation": "SUGGESTED",
                "ruleIds": ["INJ-THERAPEUTIC-CS-LA"],
                "message": "Therapeutic injection.",
            },
            {
                "category": "LOCAL_ANESTHETIC",
                "recommendation": "SUGGESTED",
                "ruleIds": ["INJ-THERAPEUTIC-CS-LA"],
                "message": "Therapeutic injection.",
            },
        ],
        "deferrals": [
            {
                "reason": "BLEEDING_RISK",
                "severity": "HARD",
                "scope": "PROCEDURE",
                "ruleIds": ["DEF-INR-HIGH"],
                "message": "INR 3.4 {INR} is above 3: defer.",
            }
        ],
        "cautions": [{"code": "ANTITHROMBOTIC_CONTINUE", "ruleIds": ["CAU-ANTITHROMBOTIC-CONTINUE"], "message": "Continue it."}],
        "missingData": [
            {"code": "unit-unknown:egfr", "message": "The newest eGFR is in 'mL/min'.", "ruleIds": ["DATA-VALUE-SET-ASIDE"]}
        ],
        "explanations": [
            explanation("CAU-ANTITHROMBOTIC-CONTINUE", "caution: ANTITHROMBOTIC_CONTINUE"),
            explanation("DEF-INR-HIGH", "defer: BLEEDING_RISK (HARD, scope PROCEDURE)"),
            explanation("MOD-SOFT-TISSUE-US", "modality: prefer ULTRASOUND, avoid FLUOROSCOPY"),
            explanation("INJ-THERAPEUTIC-CS-LA", "CORTICOSTEROID: SUGGESTED; LOCAL_ANESTHETIC: SUGGESTED"),
            explanation("DATA-VALUE-SET-ASIDE", "missing data: unit-unknown:egfr"),
        ],
    }


def test_a_consistent_decision_has_no_violation(valid_decision, hip_ruleset) -> None:
    assert decision_invariants(valid_decision, hip_ruleset) == []


def _explanation(decision: dict, rule_id: str) -> dict:
    """The explanation of ``rule_id`` in a hand-written decision."""
    return next(e for e in decision["explanations"] if e["ruleId"] == rule_id)


# Each _break_* function makes one kind of inconsistency in a copy of the valid decision; BROKEN
# pairs it with the words its violation must contain.


def _break_rule_ids(d):
    d["cautions"][0]["ruleIds"].append("CAU-NOBODY")


def _break_version(d):
    _explanation(d, "DEF-INR-HIGH")["ruleVersion"] = "9.9.9"


def _break_outcome_placeholder(d):
    _explanation(d, "DATA-VALUE-SET-ASIDE")["outcome"] = "missing data: {issue.kind}:{issue.concept}"


def _break_message_marker(d):
    d["deferrals"][0]["message"] = "INR (not matched) is above 3."


def _break_acceptable_outcome(d):
    d["modality"] = {
        "preferred": "FLUOROSCOPY",
        "acceptable": ["ULTRASOUND"],
        "avoid": ["LANDMARK"],
        "ruleIds": ["MOD-IA-HIP-DEFAULT"],
    }
    d["explanations"] = [e for e in d["explanations"] if e["ruleId"] != "MOD-SOFT-TISSUE-US"]
    d["explanations"].append(
        {
            "ruleId": "MOD-IA-HIP-DEFAULT",
            "ruleVersion": "1.0.0",
            "outcome": "modality: prefer FLUOROSCOPY, acceptable FLUOROSCOPY/ULTRASOUND, avoid LANDMARK",
        }
    )


def _break_preferred_avoided(d):
    d["modality"]["avoid"].append("ULTRASOUND")


def _break_acceptable_preferred(d):
    d["modality"]["acceptable"] = ["ULTRASOUND"]


def _break_severity(d):
    d["deferrals"][0]["severity"] = "MEDIUM"


def _break_soft_hard(d):
    d["deferrals"][0]["severity"] = "SOFT"


def _break_recommendation(d):
    d["injectates"][0]["ruleIds"].append("DEF-GLUCOSE-DAYOF")
    d["explanations"].append({"ruleId": "DEF-GLUCOSE-DAYOF", "ruleVersion": "1.0.0", "outcome": "CORTICOSTEROID: NOT_SUGGESTED"})


def _break_missing_code(d):
    d["missingData"][0]["code"] = ""


def _break_contribution(d):
    d["deferrals"] = []


def _break_contrast_avoided(d):
    d["injectates"].append(
        {
            "category": "IODINATED_CONTRAST",
            "recommendation": "SUGGESTED",
            "ruleIds": ["INJ-CONTRAST-ONLY-WITH-FLUORO"],
            "message": "Contrast.",
        }
    )
    d["explanations"].append(
        {"ruleId": "INJ-CONTRAST-ONLY-WITH-FLUORO", "ruleVersion": "1.0.0", "outcome": "IODINATED_CONTRAST: SUGGESTED"}
    )


def _break_contrast_not_offered(d):
    _break_contrast_avoided(d)
    d["modality"]["avoid"] = []
    d["explanations"] = [e for e in d["explanations"] if e["ruleId"] != "MOD-SOFT-TISSUE-US"]
    d["modality"]["ruleIds"] = ["MOD-PREG-UNKNOWN"]
    d["modality"]["preferred"] = None
    d["modality"]["acceptable"] = ["ULTRASOUND"]
    d["explanations"].append({"ruleId": "MOD-PREG-UNKNOWN", "ruleVersion": "1.1.0", "outcome": "modality: acceptable ULTRASOUND"})


def _break_deceased(d):
    d["deferrals"].append(
        {
            "reason": "PATIENT_DECEASED",
            "severity": "HARD",
            "scope": "PROCEDURE",
            "ruleIds": ["DEF-INR-HIGH"],
            "message": "The patient died.",
        }
    )


BROKEN = {
    "a ruleIds entry without explanation": (_break_rule_ids, "lists CAU-NOBODY, which has no explanation"),
    "an explanation at another version": (_break_version, "is at version 9.9.9"),
    "a placeholder left in an outcome": (_break_outcome_placeholder, "outcome keeps {issue.kind}, {issue.concept}"),
    "a fill-in marker left in a message": (_break_message_marker, "keeps (not matched)"),
    "a preferred modality called acceptable": (
        _break_acceptable_outcome,
        "outcome says FLUOROSCOPY is acceptable, but the rule makes it preferred",
    ),
    "preferred and avoided": (_break_preferred_avoided, "ULTRASOUND is both preferred and avoided"),
    "preferred and acceptable": (_break_acceptable_preferred, "ULTRASOUND is both preferred and acceptable"),
    "a severity outside HARD/SOFT": (_break_severity, "severity 'MEDIUM' is neither HARD nor SOFT"),
    "SOFT although a rule says HARD": (_break_soft_hard, "is SOFT, but one of its rules says HARD"),
    "a recommendation weaker than a rule's": (_break_recommendation, "the most restrictive of its rules says NOT_SUGGESTED"),
    "an empty missing-data code": (_break_missing_code, "a missingData entry has an empty code"),
    "a fired rule's deferral missing": (_break_contribution, "DEF-INR-HIGH fired and defers BLEEDING_RISK/PROCEDURE"),
    "contrast while fluoroscopy is avoided": (
        _break_contrast_avoided,
        "IODINATED_CONTRAST is SUGGESTED while FLUOROSCOPY, the only modality that uses it, is avoided",
    ),
    "contrast while fluoroscopy is not offered": (_break_contrast_not_offered, "is neither preferred nor acceptable"),
    "a deceased patient asked for more": (_break_deceased, "PATIENT_DECEASED comes with other deferrals: BLEEDING_RISK"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_each_broken_decision_is_caught(valid_decision, hip_ruleset, name: str) -> None:
    breaker, expected = BROKEN[name]
    decision = copy.deepcopy(valid_decision)
    breaker(decision)
    violations = decision_invariants(decision, hip_ruleset)
    assert any(expected in v for v in violations), violations


def test_unit_annotations_are_not_placeholders(valid_decision, hip_ruleset) -> None:
    decision = copy.deepcopy(valid_decision)
    decision["cautions"][0]["message"] = "eGFR 25 mL/min/{1.73_m2} and INR 3.4 {INR}."
    assert decision_invariants(decision, hip_ruleset) == []


# --- the per-bullet checks, on small inputs ----------------------------------------------------------------


def test_a_pregnancy_deferral_needs_evidence_inside_the_window() -> None:
    deferred = {"deferrals": [{"reason": "PREGNANCY", "severity": "SOFT", "scope": "PROCEDURE"}]}
    assert stale_pregnancy_deferrals(deferred, [Evidence("Condition/a", 400.0), Evidence("Condition/b", 30.0)], 294) == []
    assert stale_pregnancy_deferrals(deferred, [Evidence("Condition/undated", None)], 294) == []
    assert "400 days old (window 294 days)" in stale_pregnancy_deferrals(deferred, [Evidence("Condition/a", 400.0)], 294)[0]
    assert stale_pregnancy_deferrals({}, [Evidence("Condition/a", 4000.0)], 294) == []


def test_the_deceased_check_works_both_ways() -> None:
    dead = {"deferrals": [{"reason": "PATIENT_DECEASED", "severity": "HARD", "scope": "PROCEDURE"}]}
    asked = {"deferrals": [{"reason": "PENDING_DATA"}], "missingData": [{"code": "INR"}]}
    assert deceased_findings(dead, True) == []
    assert len(deceased_findings(asked, True)) == 3
    assert deceased_findings(dead, False) == ["PATIENT_DECEASED deferral, but the patient was alive at the instant"]
    assert deceased_findings(asked, False) == []


def test_observation_age_limits_come_from_the_rule_set(hip_ruleset) -> None:
    limits = observation_max_age_days(hip_ruleset)
    params = hip_ruleset.param_values()
    assert limits["inr"] == params["inr_max_age_days"]
    assert limits["egfr"] == params["egfr_max_age_days"]
    assert limits["bmi"] == params["bmi_max_age_days"]
    assert limits["conservative-care-weeks"] == float("inf")  # no rule bounds its age
    decision = {"missingData": [{"code": "unit-unknown:egfr"}, {"code": "date-missing:egfr"}, {"code": "INR"}]}
    assert stale_missing_data(decision, {"egfr": [200.0, 400.0]}, limits) == [
        "missingData unit-unknown:egfr: the newest egfr value is 200 days old; no rule uses one older than 180 days"
    ]
    assert stale_missing_data(decision, {"egfr": [100.0, 400.0]}, limits) == []


# --- the Done-when, over every Synthea bundle -----------------------------------------------------------------
# (slow tests: every bundle at five instants, in full and truncated; the fast suite's decision corpus
# evaluates every bundle at two)


@pytest.fixture(scope="module")
def corpus(hip_evaluator) -> Corpus:
    """Every bundle studied once (lazily, on first use) and shared by all the tests below."""
    return Corpus(hip_evaluator)


def _assert_clean(corpus: Corpus, path, label: str, bullet: str) -> None:
    """Fail naming the bundle, the instant and every problem one check found there."""
    study = corpus.at(path, label)
    problems = study.findings[bullet]
    assert not problems, f"{bundle_id(path)} at {label} ({study.instant:%Y-%m-%dT%H:%M:%SZ}): " + " | ".join(problems)


def test_both_synthea_folders_are_there() -> None:
    assert len(PATHS) == 91, (
        "expected 91 Synthea bundles under ../shared/fixtures (set NEEDLEPOINT_SHARED for a checkout elsewhere)"
    )
    assert len(set(IDS)) == len(IDS)
    assert len({path.name for path in PATHS}) == 88  # three patients are in both folders, byte for byte


@pytest.mark.slow
@pytest.mark.parametrize("label", MAIN_INSTANTS)
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_every_bundle_evaluates_without_error(corpus, path, label) -> None:
    _assert_clean(corpus, path, label, "errors")


@pytest.mark.slow
@pytest.mark.parametrize("label", MAIN_INSTANTS)
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_no_pregnancy_deferral_outlives_its_window(corpus, path, label) -> None:
    _assert_clean(corpus, path, label, "pregnancy")


@pytest.mark.slow
@pytest.mark.parametrize("label", MAIN_INSTANTS)
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_a_deceased_patient_is_deferred_as_deceased_and_asked_for_nothing(corpus, path, label) -> None:
    _assert_clean(corpus, path, label, "deceased")


@pytest.mark.slow
@pytest.mark.parametrize("label", MAIN_INSTANTS)
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_no_missing_data_for_a_value_too_old_for_every_rule(corpus, path, label) -> None:
    _assert_clean(corpus, path, label, "stale-missing-data")


@pytest.mark.slow
@pytest.mark.parametrize("label", TRUNCATION_INSTANTS)
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_records_after_the_instant_do_not_change_the_decision(corpus, path, label) -> None:
    _assert_clean(corpus, path, label, "truncation")


@pytest.mark.slow
@pytest.mark.parametrize("label", MAIN_INSTANTS)
@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_every_decision_on_a_real_record_satisfies_the_invariants(corpus, path, label) -> None:
    _assert_clean(corpus, path, label, "invariants")


@pytest.mark.slow
def test_the_measuring_stick_sees_the_corpus(corpus) -> None:
    """The checks must have something to bite on: the corpus has deceased patients at the instant,
    truncation really removes records at the early instants, and the data end before 2025-06-02."""
    studies = [corpus.study(path) for path in PATHS]
    assert sum(s.instants["2025-06-02"].deceased for s in studies) >= 20
    assert all(s.instants["2025-06-02"].removed == 0 for s in studies)
    assert sum(s.instants["2004-01-01"].removed > 0 for s in studies) >= 60
    assert sum(s.instants["midpoint"].removed > 0 for s in studies) == len(studies)


@pytest.mark.parametrize("path", [p for p in PATHS if b'"34552-0"' in p.read_bytes()], ids=bundle_id)
def test_a_record_with_a_loinc_code_filed_under_snomed_evaluates(hip_evaluator, path) -> None:
    """Several Synthea bundles code an echocardiogram Procedure as SNOMED CT ``34552-0`` (a LOINC
    code). Such a code is malformed data to lint, never a reason for the mapper or core to fail."""
    from needlepoint.fhir.mapper import record_from_bundle

    from .real_records import default_order, last_encounter_start

    data = orjson.loads(path.read_bytes())
    record = record_from_bundle(data).with_order(default_order())
    for instant in (dt.datetime(2025, 6, 2, 9, tzinfo=UTC), last_encounter_start(data)):
        decision = hip_evaluator.evaluate(record, instant)
        assert decision["asOf"] and decision["ruleset"]["id"] == "hip-injection"


# --- generated patients --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_every_decision_on_a_generated_patient_satisfies_the_invariants(hip_evaluator, seed: int) -> None:
    """The seeded generator of tests/patients.py (values around every threshold, a share of broken
    data, every target and intent): each decision must satisfy every invariant."""
    rng = random.Random(seed)
    kinds: collections.Counter[str] = collections.Counter()
    first: dict[str, str] = {}
    for n in range(300):
        decision = hip_evaluator.evaluate(random_patient(rng), AS_OF)
        for violation in decision_invariants(decision, hip_evaluator.ruleset):
            kind = violation.split(":")[0]
            kinds[kind] += 1
            first.setdefault(kind, f"patient {n}: {violation}")
    if kinds:
        pytest.fail("; ".join(f"{count} x {first[kind]}" for kind, count in kinds.most_common()), pytrace=False)
