"""The core on its own: facts in, decision out. Units, missing data, replay, errors, determinism,
the contract's invariants, overlays and rule-format errors."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import pytest

from needlepoint.core.evaluator import Evaluator
from needlepoint.core.prepare import convert
from needlepoint.core.record import Code, InjectionOrder, Medication, Observation, PatientRecord, RecordError
from needlepoint.core.ruleset import DEFERRAL_REASONS, INJECTATE_CATEGORIES, MODALITIES, RECOMMENDATIONS, SCOPES, RuleSetError
from needlepoint.rulesets import build_ruleset, bundled_rulesets_dir, load_ruleset

from .patients import AS_OF, random_patients

HIP = bundled_rulesets_dir() / "hip-injection"
ORDER = InjectionOrder("hip-intra-articular", "right", "therapeutic")


def patient(*observations: Observation, **kwargs) -> PatientRecord:
    return PatientRecord(
        birth_date=dt.date(1960, 3, 1), sex="male", observations=list(observations), order=kwargs.pop("order", ORDER), **kwargs
    )


def obs(loinc: str, value: float | None, unit: str | None, days_before: float = 0.5, **kwargs) -> Observation:
    return Observation(
        [Code("loinc", loinc)], AS_OF - dt.timedelta(days=days_before), value=value, unit=unit, source=f"obs {loinc}", **kwargs
    )


def fired(decision: dict) -> set[str]:
    return {e["ruleId"] for e in decision.get("explanations", [])}


def missing_codes(decision: dict) -> set[str]:
    return {m["code"] for m in decision.get("missingData", [])}


# --- units --------------------------------------------------------------------------------


def test_unit_conversions(hip_ruleset) -> None:
    concepts = hip_ruleset.observations
    assert convert(100.4, "[degF]", concepts["temperature"]) == pytest.approx(38.0)
    assert convert(16.7, "mmol/L", concepts["glucose"]) == pytest.approx(300.87, abs=0.01)
    assert convert(86, "mmol/mol", concepts["hba1c"]) == pytest.approx(10.02, abs=0.01)
    assert convert(53, "mmol/mol", concepts["hba1c"]) == pytest.approx(7.0, abs=0.01)
    assert convert(150, "10*3/uL", concepts["platelets"]) == convert(150, "10*9/L", concepts["platelets"]) == 150
    assert convert(2.5, "mg/dL", concepts["crp"]) == 25
    assert convert(1, "furlongs", concepts["inr"]) is None


def test_fever_in_fahrenheit_defers(hip_evaluator) -> None:
    decision = hip_evaluator.evaluate(patient(obs("8310-5", 100.4, "[degF]")), AS_OF)
    assert "DEF-FEVER" in fired(decision)
    decision = hip_evaluator.evaluate(patient(obs("8310-5", 100.3, "[degF]")), AS_OF)
    assert "DEF-FEVER" not in fired(decision)


def test_an_implausible_value_is_set_aside_with_a_suggested_unit(hip_evaluator) -> None:
    decision = hip_evaluator.evaluate(patient(obs("4548-4", 53, "%")), AS_OF)
    assert "implausible:hba1c" in missing_codes(decision)
    message = next(m["message"] for m in decision["missingData"] if m["code"] == "implausible:hba1c")
    assert "mmol/mol" in message  # suggested, never assumed
    assert "DEF-HBA1C-SEVERE" not in fired(decision)


def test_unknown_and_missing_units_are_named_and_no_threshold_applies(hip_evaluator) -> None:
    decision = hip_evaluator.evaluate(patient(obs("777-3", 5, "furlongs"), obs("2339-0", 450, None)), AS_OF)
    assert {"unit-unknown:platelets", "unit-missing:glucose"} <= missing_codes(decision)
    assert not {"DEF-PLT-LOW", "DEF-GLUCOSE-DAYOF"} & fired(decision)


def test_a_problem_on_an_unused_concept_raises_nothing(hip_evaluator) -> None:
    score = Observation([Code("loinc", "72514-3")], AS_OF, problem=("value-unsupported", "a string"))
    assert "missingData" not in hip_evaluator.evaluate(patient(score), AS_OF)


def test_the_newest_value_wins_even_when_it_is_unusable(hip_evaluator) -> None:
    older_good = obs("777-3", 250, "10*9/L", days_before=3)
    newer_broken = obs("777-3", None, None, days_before=1, problem=("value-censored", "the value is censored (<20)"))
    decision = hip_evaluator.evaluate(patient(older_good, newer_broken), AS_OF)
    assert "value-censored:platelets" in missing_codes(decision)
    newer_low = obs("777-3", 15, "10*9/L", days_before=1)
    assert "DEF-PLT-LOW" in fired(hip_evaluator.evaluate(patient(older_good, newer_low), AS_OF))


# --- the evaluation instant -------------------------------------------------------------------


def test_values_after_the_instant_are_not_yet_known(hip_evaluator) -> None:
    later_fever = obs("8310-5", 39.0, "Cel", days_before=-2)
    assert "DEF-FEVER" not in fired(hip_evaluator.evaluate(patient(later_fever), AS_OF))
    assert "DEF-FEVER" in fired(hip_evaluator.evaluate(patient(later_fever), AS_OF + dt.timedelta(days=2, hours=1)))


def test_the_same_input_gives_the_same_decision_and_id(hip_evaluator) -> None:
    for record in random_patients(30, seed=3):
        first = hip_evaluator.evaluate(copy.deepcopy(record), AS_OF)
        assert hip_evaluator.evaluate(copy.deepcopy(record), AS_OF) == first
        assert hip_evaluator.evaluate(record, AS_OF + dt.timedelta(seconds=1))["decisionId"] != first["decisionId"]


def test_an_instant_without_a_time_zone_is_refused(hip_evaluator) -> None:
    with pytest.raises(RecordError) as caught:
        hip_evaluator.evaluate(patient(), dt.datetime(2025, 6, 2, 9, 0))
    assert caught.value.path == "asOf"


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "path"),
    [
        (PatientRecord(birth_date=dt.date(1960, 1, 1)), "order"),
        (PatientRecord(order=InjectionOrder(None, "left", "therapeutic")), "order.target"),
        (patient(obs("6301-6", -1.2, "{INR}")), "obs 6301-6"),
    ],
)
def test_bad_input_names_the_field(hip_evaluator, record: PatientRecord, path: str) -> None:
    with pytest.raises(RecordError) as caught:
        hip_evaluator.evaluate(record, AS_OF)
    assert caught.value.path == path


def test_a_birth_date_after_the_instant_is_named_not_fatal(hip_evaluator) -> None:
    decision = hip_evaluator.evaluate(PatientRecord(birth_date=dt.date(2030, 1, 1), order=ORDER), AS_OF)
    missing = {m["code"]: m["message"] for m in decision["missingData"]}
    assert "impossible-date:patient.birthDate" in missing
    assert "2030-01-01 is after the evaluation instant" in missing["impossible-date:patient.birthDate"]


# --- the contract's invariants -----------------------------------------------------------------


def test_every_decision_keeps_the_contract(hip_evaluator, hip_ruleset) -> None:
    versions = {r.id: r.version for r in hip_ruleset.rules}
    for record in random_patients(300, seed=21):
        decision = hip_evaluator.evaluate(record, AS_OF)
        assert decision["ruleset"] == {"id": "hip-injection", "version": hip_ruleset.version, "digest": hip_ruleset.digest}
        explained = {e["ruleId"] for e in decision.get("explanations", [])}
        for e in decision.get("explanations", []):
            assert e["ruleVersion"] == versions[e["ruleId"]] and e["matched"]
        parts = [decision.get("modality", {})] + decision.get("injectates", []) + decision.get("deferrals", [])
        parts += decision.get("cautions", []) + decision.get("missingData", [])
        for part in parts:
            assert set(part.get("ruleIds", [])) <= explained
        modality = decision.get("modality", {})
        assert set(modality.get("acceptable", [])) | set(modality.get("avoid", [])) | {
            modality.get("preferred", "FLUOROSCOPY")
        } <= set(MODALITIES)
        assert not set(modality.get("acceptable", [])) & set(modality.get("avoid", []))
        assert modality.get("preferred") not in modality.get("avoid", [])
        for inj in decision.get("injectates", []):
            assert inj["category"] in INJECTATE_CATEGORIES and inj["recommendation"] in RECOMMENDATIONS
        for d in decision.get("deferrals", []):
            assert d["reason"] in DEFERRAL_REASONS and d["scope"] in SCOPES and d["severity"] in ("HARD", "SOFT")


def test_warfarin_without_an_inr_is_never_a_green_light(hip_evaluator) -> None:
    record = patient(medications=[Medication([Code("rxnorm", "855332")])])
    decision = hip_evaluator.evaluate(record, AS_OF)
    assert {"reason": "PENDING_DATA", "severity": "HARD", "scope": "PROCEDURE"}.items() <= decision["deferrals"][0].items()
    assert "INR" in missing_codes(decision)


# --- rule sets: digest, overlays, format errors ----------------------------------------------------


def test_an_overlay_changes_the_digest_and_records_its_layer(tmp_path: Path) -> None:
    overlay = tmp_path / "strict-site.yaml"
    overlay.write_text("site: strict-site\nparameters:\n  inr_defer_above: 2.0\n  ia_hip_default_modality: ULTRASOUND\n")
    base, strict = load_ruleset(HIP), load_ruleset(HIP, overlay=overlay)
    assert base.digest != strict.digest and load_ruleset(HIP).digest == base.digest
    record = patient(
        Observation([Code("loinc", "6301-6")], AS_OF, value=2.5, unit="{INR}"),
        medications=[Medication([Code("rxnorm", "855332")])],
    )
    assert "DEF-INR-HIGH" not in fired(Evaluator(base).evaluate(record, AS_OF))
    decision = Evaluator(strict).evaluate(record, AS_OF)
    assert "DEF-INR-HIGH" in fired(decision) and decision["modality"]["preferred"] == "ULTRASOUND"
    inr_rule = next(e for e in decision["explanations"] if e["ruleId"] == "DEF-INR-HIGH")
    assert {"name": "inr_defer_above", "value": "2.0", "layer": "strict-site"} in inr_rule["parameters"]


def test_an_overlay_with_an_unknown_parameter_is_refused(tmp_path: Path) -> None:
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("parameters:\n  inr_defer_abov: 2.0\n")
    with pytest.raises(RuleSetError, match="inr_defer_abov"):
        load_ruleset(HIP, overlay=overlay)


def _with_rule_change(docs: dict, change) -> dict:
    index = next(i for i, (_, rule) in enumerate(docs["rules"]) if rule["id"] == "DEF-INR-HIGH")
    source, rule = docs["rules"][index]
    rule = copy.deepcopy(rule)
    change(rule)
    docs["rules"][index] = (source, rule)
    return docs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["when"]["vka"]["medication"]["code"].update({"in": "no-such-set"}), "unknown value set 'no-such-set'"),
        (
            lambda r: r["when"]["inr"]["observation"]["value"].update({"gt": "$no_such_param"}),
            "unknown parameter \\$no_such_param",
        ),
        (lambda r: r["when"]["inr"]["observation"].update({"colour": "red"}), "observation has no field 'colour'"),
        (lambda r: r["when"]["inr"]["observation"]["value"].update({"approx": 3}), "unknown operator 'approx'"),
        (lambda r: r.update({"category": "suggestion"}), "'suggestion' is not one of"),
        (lambda r: r["then"]["deferral"].update({"reason": "TOO_RISKY"}), "'TOO_RISKY' is not one of"),
        (lambda r: r.update({"version": "1.0"}), "not a semantic version"),
    ],
)
def test_rule_format_errors_name_the_rule_and_key(hip_documents: dict, change, message: str) -> None:
    with pytest.raises(RuleSetError, match=message) as caught:
        build_ruleset(_with_rule_change(hip_documents, change))
    assert "DEF-INR-HIGH" in caught.value.where and caught.value.where.startswith("rules/10-bleeding.yaml:")


def test_every_value_set_of_the_bundled_rule_set_is_used(hip_ruleset) -> None:
    used = {
        t.operand
        for r in hip_ruleset.rules
        for alt in r.alternatives
        for p in alt
        for t in p.tests
        if t.op == "in" and isinstance(t.operand, str)
    }
    used |= {
        t.operand
        for a in hip_ruleset.aggregates
        for p in a.patterns
        for t in p.tests
        if t.op == "in" and isinstance(t.operand, str)
    }
    used |= set(hip_ruleset.requested_modality.values())
    assert set(hip_ruleset.value_sets) - used == set()


def test_a_message_may_only_name_facts_every_alternative_matches(hip_documents: dict) -> None:
    def change(rule: dict) -> None:
        rule.pop("when")
        rule["when_any"] = [
            {"vka": {"medication": {"code": {"in": "vitamin-k-antagonists"}}}, "inr": {"observation": {"concept": "inr"}}},
            {"vka": {"medication": {"code": {"in": "vitamin-k-antagonists"}}}},
        ]

    with pytest.raises(RuleSetError, match="alternative 1 does not match"):
        build_ruleset(_with_rule_change(hip_documents, change))
