"""The typed decision (core/decision.py) and its one serialiser to the contract JSON."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from needlepoint.core.decision import (
    Caution,
    Decision,
    Deferral,
    Evidence,
    Explanation,
    Injectate,
    MatchedFact,
    MissingData,
    Modality,
    ParameterUse,
    RuleHead,
    RulesetRef,
)

from .patients import AS_OF, random_patients

HEAD = RuleHead(
    "DEF-INR-HIGH", "1.0.0", "INR above the limit", "deferral", "defer: BLEEDING_RISK (HARD, scope PROCEDURE)", "Why.",
    (Evidence("Patel 2019", "consensus"),), (ParameterUse("inr_defer_above", "3", "hip-injection"),),
)  # fmt: skip


def _decision(**changes) -> Decision:
    full = Decision(
        decision_id="dec-1",
        as_of="2025-06-02T09:00:00Z",
        ruleset=RulesetRef("hip-injection", "1.0.0", "sha256:x"),
        modality=Modality("FLUOROSCOPY", ("ULTRASOUND",), ("LANDMARK",), ("MOD-A",)),
        injectates=(Injectate("CORTICOSTEROID", "AVOID", ("INJ-A",), "No steroid."),),
        deferrals=(Deferral("BLEEDING_RISK", "HARD", "PROCEDURE", ("DEF-INR-HIGH",), "INR 3.4."),),
        cautions=(Caution("DIABETES", ("CAU-A",), "Check glucose."),),
        missing_data=(MissingData("INR", "No INR.", ("DATA-INR",)),),
        explanations=(Explanation(HEAD, HEAD.outcome, (MatchedFact("observation inr.value", "3.4 {INR}"),)),),
    )
    return dataclasses.replace(full, **changes)


def test_the_json_has_the_contracts_members_in_the_contracts_order() -> None:
    out = _decision().to_json()
    assert list(out) == [
        "decisionId",
        "asOf",
        "ruleset",
        "modality",
        "injectates",
        "deferrals",
        "cautions",
        "missingData",
        "explanations",
    ]
    assert out["modality"] == {
        "preferred": "FLUOROSCOPY",
        "acceptable": ["ULTRASOUND"],
        "avoid": ["LANDMARK"],
        "ruleIds": ["MOD-A"],
    }
    members = ["ruleId", "ruleVersion", "title", "category", "outcome", "rationale", "evidence", "matched", "parameters"]
    assert list(out["explanations"][0]) == members
    assert out["explanations"][0]["matched"] == [{"fact": "observation inr.value", "value": "3.4 {INR}"}]
    assert out["explanations"][0]["parameters"] == [{"name": "inr_defer_above", "value": "3", "layer": "hip-injection"}]


def test_empty_parts_are_left_out_and_an_overruled_rule_says_by_whom() -> None:
    bare_head = dataclasses.replace(HEAD, evidence=(), parameters=())
    out = _decision(
        modality=Modality(None, (), (), ("MOD-A",)),
        injectates=(), deferrals=(), cautions=(), missing_data=(),
        explanations=(Explanation(bare_head, "o", (), ("MOD-B",)),),
    ).to_json()  # fmt: skip
    assert list(out) == ["decisionId", "asOf", "ruleset", "modality", "explanations"]
    assert out["modality"] == {"ruleIds": ["MOD-A"]}
    assert list(out["explanations"][0]) == [
        "ruleId",
        "ruleVersion",
        "title",
        "category",
        "outcome",
        "rationale",
        "matched",
        "overriddenBy",
    ]
    assert "modality" not in _decision(modality=None).to_json()


def test_each_call_gives_a_new_json_and_the_decision_cannot_change() -> None:
    decision = _decision()
    first = decision.to_json()
    first["deferrals"][0]["ruleIds"].append("X")
    assert decision.to_json()["deferrals"][0]["ruleIds"] == ["DEF-INR-HIGH"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.decision_id = "dec-2"  # type: ignore[misc]


def test_the_evaluator_json_is_the_typed_decisions_json(hip_evaluator) -> None:
    for patient in random_patients(50, seed=41):
        typed = hip_evaluator.decide(patient, AS_OF)
        assert isinstance(typed, Decision)
        assert orjson.dumps(hip_evaluator.evaluate(patient, AS_OF)) == orjson.dumps(typed.to_json())
