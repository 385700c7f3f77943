"""The seeded FHIR order bundles of tests/bundles.py (the benchmark's payloads): every one maps and
evaluates without error, they are distinct and reproducible, and the "not for us" ones are refused
at ``order.target`` by both the quick order scan and the full mapping, with the same words."""

from __future__ import annotations

import random

import orjson
import pytest

from needlepoint.core.record import NO_ORDER_PROBLEM, RecordError
from needlepoint.fhir.mapper import record_from_bundle, record_from_bundle_with_hip_order
from tests.bundles import NOT_FOR_US_ORDERS, not_for_us_bundle, random_bundles
from tests.patients import AS_OF

N = 1000


@pytest.fixture(scope="module")
def bundles() -> list[bytes]:
    return [orjson.dumps(bundle) for bundle in random_bundles(N, seed=11)]


def test_every_bundle_maps_and_evaluates(bundles: list[bytes], hip_evaluator) -> None:
    reasons: set[str] = set()
    for i, raw in enumerate(bundles):
        record = record_from_bundle_with_hip_order(raw)
        assert record == record_from_bundle(raw), f"bundle {i}: the quick order scan changed the record"
        decision = hip_evaluator.evaluate(record, AS_OF)
        assert decision["ruleset"]["digest"] == hip_evaluator.ruleset.digest
        reasons.update(d["reason"] for d in decision.get("deferrals", []))
    # seeded around the thresholds: most deferral reasons occur somewhere in the set
    assert {"BLEEDING_RISK", "PENDING_DATA", "SYSTEMIC_INFECTION", "INJECTATE_ALLERGY"} <= reasons


def test_bundles_are_distinct_and_reproducible(bundles: list[bytes]) -> None:
    assert len(set(bundles)) == N
    assert [orjson.dumps(b) for b in random_bundles(20, seed=11)] == bundles[:20]
    assert [orjson.dumps(b) for b in random_bundles(20, seed=12)] != bundles[:20]


@pytest.mark.parametrize("kind", range(len(NOT_FOR_US_ORDERS)))
def test_not_for_us_is_refused_at_order_target_by_both_roads(kind: int, hip_evaluator) -> None:
    raw = orjson.dumps(not_for_us_bundle(random.Random(kind), kind))
    with pytest.raises(RecordError) as quick:
        record_from_bundle_with_hip_order(raw)
    assert quick.value.path == "order.target"
    with pytest.raises(RecordError) as full:  # the full road refuses it too, so no decision is lost
        hip_evaluator.evaluate(record_from_bundle(raw), AS_OF)
    assert full.value.path == "order.target"


def test_no_order_is_refused_with_the_core_s_words(bundles: list[bytes], hip_evaluator) -> None:
    bundle = orjson.loads(bundles[0])
    bundle["entry"] = [
        e for e in bundle["entry"] if e["resource"]["resourceType"] != "ServiceRequest" or e["resource"]["status"] != "draft"
    ]
    raw = orjson.dumps(bundle)
    with pytest.raises(RecordError) as quick:
        record_from_bundle_with_hip_order(raw)
    with pytest.raises(RecordError) as full:
        hip_evaluator.evaluate(record_from_bundle(raw), AS_OF)
    assert (quick.value.path, quick.value.message) == (full.value.path, full.value.message) == ("order", NO_ORDER_PROBLEM)


def test_unusual_orders_go_to_the_full_mapping(bundles: list[bytes]) -> None:
    """A malformed bundle, or an order the scan cannot judge, gets the full mapping's own answer."""
    with pytest.raises(RecordError) as caught:
        record_from_bundle_with_hip_order(b'{"resourceType": "Bundle", "entry": [1]}')
    assert caught.value.path == "Bundle.entry[0]"
    bundle = orjson.loads(bundles[1])
    order = next(
        e["resource"]
        for e in bundle["entry"]
        if e["resource"].get("status") == "draft" and e["resource"]["resourceType"] == "ServiceRequest"
    )
    order["bodySite"] = [{"text": "right hip"}]  # text alone: the mapping names it
    with pytest.raises(RecordError) as caught:
        record_from_bundle_with_hip_order(orjson.dumps(bundle))
    assert caught.value.path.endswith(".bodySite[0]")
