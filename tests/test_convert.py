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


def test_the_typed_encoder_equals_the_json_road(hip_evaluator, synthea_bundles) -> None:
    """encode_decision (the server's request path) gives the message the contract JSON gives,
    at instants before 1970 and with fractions of a second too."""
    import datetime as dt

    order = InjectionOrder("hip-intra-articular", "right", "therapeutic")
    records = [record_from_bundle(b).with_order(order) for b in synthea_bundles.values()]
    records += random_patients(300, seed=32)
    instants = (AS_OF, dt.datetime(1969, 7, 20, 20, 17, 40, 123456, tzinfo=dt.timezone.utc))
    seen = {"overridden": 0, "modality": 0, "injectates": 0, "cautions": 0}
    for i, record in enumerate(records):
        typed = hip_evaluator.decide(record, instants[i % 2])
        fast = convert.encode_decision(typed)
        assert fast == convert.decision_to_proto(typed.to_json())
        assert json_format.MessageToDict(fast) == typed.to_json()
        seen["overridden"] += any(e.overridden_by for e in typed.explanations)
        seen["modality"] += typed.modality is not None
        seen["injectates"] += bool(typed.injectates)
        seen["cautions"] += bool(typed.cautions)
    assert all(seen.values()), seen  # every part of the message was exercised


def test_the_typed_encoder_refuses_an_enum_name_the_proto_does_not_know(hip_evaluator) -> None:
    import dataclasses

    typed = hip_evaluator.decide(random_patients(1, seed=5)[0], AS_OF)
    deferral = dataclasses.replace(typed.deferrals[0], reason="BAD_MOOD") if typed.deferrals else None
    assert deferral is not None
    with pytest.raises(ValueError):
        convert.encode_decision(dataclasses.replace(typed, deferrals=(deferral,)))


@pytest.mark.parametrize("micros", [0, 500_000, 120_000, 123_450, 100, 1, 999_999])
def test_the_typed_encoder_keeps_every_fraction_of_the_instant(hip_evaluator, micros: int) -> None:
    """asOf trims trailing zeros (``.5Z``, ``.12345Z``): every length of fraction is encoded, on
    every Python the project supports (3.10's fromisoformat takes only 3 or 6 digits)."""
    import datetime as dt

    instant = dt.datetime(2025, 6, 2, 9, 0, 0, micros, tzinfo=dt.timezone.utc)
    record = random_patients(1, seed=5)[0]
    message = convert.encode_decision(hip_evaluator.decide(record, instant))
    assert message.as_of.ToDatetime(tzinfo=dt.timezone.utc) == instant
    assert message == convert.decision_to_proto(hip_evaluator.evaluate(record, instant))
