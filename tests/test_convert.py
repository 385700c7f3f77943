"""The fast decision converter equals the protobuf JSON mapping it stands in for."""

from __future__ import annotations

import pytest
from google.protobuf import json_format

from needlepoint.core.record import InjectionOrder
from needlepoint.fhir.mapper import record_from_bundle
from needlepoint.server import convert
from needlepoint.v1 import decision_pb2
from tests.patients import AS_OF, random_patients


def _decisions(hip_evaluator, synthea_bundles) -> list[dict]:
    order = InjectionOrder("hip-intra-articular", "right", "therapeutic")
    records = [record_from_bundle(b).with_order(order) for b in synthea_bundles.values()]
    records += random_patients(300, seed=31)
    return [hip_evaluator.evaluate(r, AS_OF) for r in records]


def test_decision_to_proto_equals_the_json_mapping(hip_evaluator, synthea_bundles) -> None:
    decisions = _decisions(hip_evaluator, synthea_bundles)
    # The sample has to exercise the message's nested parts, or the comparison proves little.
    assert any(d.get("deferrals") for d in decisions)
    assert any(d.get("missingData") for d in decisions)
    assert all(d["explanations"] for d in decisions)
    for decision in decisions:
        fast = convert.decision_to_proto(decision)
        assert fast == json_format.ParseDict(decision, decision_pb2.Decision())
        assert json_format.MessageToDict(fast) == decision


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda d: d.update(unknownMember=1), KeyError),
        (lambda d: d["modality"].update(preferred="TELEPATHY"), ValueError),
        (lambda d: d["ruleset"].update(version=3), TypeError),
    ],
)
def test_a_decision_the_proto_cannot_hold_raises(hip_evaluator, change, error) -> None:
    decision = hip_evaluator.evaluate(random_patients(1, seed=5)[0], AS_OF)
    change(decision)
    with pytest.raises(error):
        convert.decision_to_proto(decision)
