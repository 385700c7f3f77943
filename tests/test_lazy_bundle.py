"""Large Bundles are read lazily (needlepoint.fhir.mapper, LAZY_READ_BYTES): simdjson checks the
whole document, and only the resources the mapping reads become Python objects. Read so, a Bundle
must give exactly the record, or exactly the error, that reading it whole with orjson gives.

And with ``observation_codes`` (an evaluator's), Observations of other codes are not mapped at
all, whichever way the Bundle was read.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest

from needlepoint.core.record import PatientRecord, RecordError
from needlepoint.fhir import mapper
from needlepoint.fhir.mapper import record_from_bundle, record_from_bundle_with_hip_order

from .real_records import bundle_id, bundle_paths

HAND_MADE = Path(__file__).resolve().parent / "data" / "fhir" / "hip_injection_order.json"
LOINC = "http://loinc.org"


@pytest.fixture(scope="module")
def read_codes(hip_evaluator) -> frozenset[tuple[str, str]]:
    return hip_evaluator.observation_codes


def padded(bundle: dict) -> bytes:
    """The bundle as bytes over LAZY_READ_BYTES, read lazily: a Claim (never read) carries the padding."""
    claim = {"resourceType": "Claim", "id": "padding", "status": "active", "text": {"div": "x" * mapper.LAZY_READ_BYTES}}
    raw = orjson.dumps({**bundle, "entry": [*bundle["entry"], {"resource": claim}]})
    assert len(raw) >= mapper.LAZY_READ_BYTES and read_lazily(raw)
    return raw


def read_lazily(raw: bytes) -> bool:
    return mapper._lazy_bundle_entries(raw, "Bundle", None) is not None


def outcome(read: Any) -> PatientRecord | str:
    """The record, or the error as the caller sees it."""
    try:
        return read()
    except RecordError as error:
        return f"RecordError at {error.path}: {error}"


def whole(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> PatientRecord | str:
    """What reading the same bytes whole with orjson gives (as bundles under LAZY_READ_BYTES are)."""
    with monkeypatch.context() as patch:
        patch.setattr(mapper, "LAZY_READ_BYTES", float("inf"))
        return outcome(lambda: record_from_bundle(raw))


@pytest.fixture
def bundle() -> dict:
    return orjson.loads(HAND_MADE.read_bytes())


# --- the same record ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", bundle_paths(), ids=bundle_id)
def test_a_synthea_bundle_gives_the_same_record_read_lazily(path: Path, read_codes: frozenset) -> None:
    raw = path.read_bytes()
    assert read_lazily(raw)
    assert record_from_bundle(raw) == record_from_bundle(orjson.loads(raw))
    assert record_from_bundle(raw, observation_codes=read_codes) == record_from_bundle(
        orjson.loads(raw), observation_codes=read_codes
    )


def test_a_reference_to_a_resource_not_read_resolves_all_the_same(bundle: dict) -> None:
    # the hand-made bundle reaches Medication resources (never read for themselves) by reference,
    # and its order names a Condition by reasonReference
    raw = padded(bundle)
    assert read_lazily(raw)
    lazy = record_from_bundle(raw)
    assert lazy == record_from_bundle(orjson.loads(raw))
    assert [[str(c) for c in p.codes] for p in lazy.planned_injectates] == [["np-injectate#corticosteroid"], ["atc#N01BB02"]]
    assert lazy.medications[0].codes[0].code == "855332"  # warfarin, through its Medication


def test_a_bundle_without_a_hip_order_is_refused_the_same_read_lazily(bundle: dict) -> None:
    order = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == "hip-injection")
    order["bodySite"] = [{"coding": [{"system": "http://snomed.info/sct", "code": "72696002"}]}]  # knee
    raw = padded(bundle)
    with pytest.raises(RecordError) as lazy:
        record_from_bundle_with_hip_order(raw)
    with pytest.raises(RecordError) as parsed:
        record_from_bundle_with_hip_order(orjson.loads(raw))
    assert (lazy.value.path, str(lazy.value)) == (parsed.value.path, str(parsed.value))
    assert parsed.value.path == "order.target"


# --- the same error, or the same acceptance, for what simdjson reads differently -----------------


def _deep(levels: int) -> bytes:
    """A JSON value nested ``levels`` arrays deep."""
    return b"[" * levels + b"1" + b"]" * levels


@pytest.mark.parametrize(
    "name, tamper",
    [
        # simdjson skips a byte order mark, which orjson refuses
        ("byte order mark", lambda raw: b"\xef\xbb\xbf" + raw),
        # simdjson refuses integers beyond 64 bits, which orjson reads as floats
        (
            "big integer",
            lambda raw: raw.replace(b'"status":"active"', b'"status":"active","n":123456789012345678901234567890', 1),
        ),
        ("invalid UTF-8", lambda raw: raw.replace(b'"padding"', b'"pad\xffding"', 1)),
        ("lone surrogate", lambda raw: raw.replace(b'"padding"', b'"pad\\ud800ding"', 1)),
        ("trailing content", lambda raw: raw + b" x"),
        ("trailing comma", lambda raw: raw[:-2] + b",]}"),
        ("too deep", lambda raw: raw.replace(b'"status":"active"', b'"status":"active","n":' + _deep(1100), 1)),
        ("not a Bundle", lambda raw: raw.replace(b'"resourceType":"Bundle"', b'"resourceType":"Bunch"', 1)),
        ("entry not an array", lambda raw: raw.replace(b'"entry":[', b'"entry":{"a":[', 1)[:-1] + b"}}"),
    ],
)
def test_what_simdjson_reads_differently_gets_the_answer_orjson_gives(
    bundle: dict, name: str, tamper: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = tamper(padded(bundle))
    assert outcome(lambda: record_from_bundle(raw)) == whole(raw, monkeypatch)


def test_a_resource_nested_a_thousand_levels_deep_is_read_as_orjson_reads_it(bundle: dict) -> None:
    # orjson reads 1,024 levels, simdjson 1,023 (a deeper one goes to orjson); as_dict builds them in C
    condition = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == "oa-hip")
    condition["extension"] = [{"url": "urn:deep", "valueString": "x", "_deep": "here"}]
    raw = padded(bundle).replace(b'"here"', _deep(1000))
    assert read_lazily(raw)
    assert record_from_bundle(raw) == record_from_bundle(orjson.loads(raw))


@pytest.mark.parametrize("name", ["entry", "type", "resourceType"])
def test_a_bundle_that_repeats_a_name_is_read_as_orjson_reads_it(
    bundle: dict, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the Bundle's own names: orjson keeps the last occurrence, so the lazy reader leaves it to orjson
    raw = padded(bundle)
    if name == "type":  # the bundle's own "type", now its last, is one that is refused
        raw = raw.replace(b'"type":"collection"', b'"type":"document"', 1)
    first = {"entry": b'"entry":[],', "type": b'"type":"collection",', "resourceType": b'"resourceType":"Basic",'}[name]
    raw = raw.replace(b'"resourceType":"Bundle",', b'"resourceType":"Bundle",' + first, 1)
    assert not read_lazily(raw)
    assert outcome(lambda: record_from_bundle(raw)) == whole(raw, monkeypatch)


@pytest.mark.parametrize(
    "name, before, after",
    [
        # a read type first, then one the mapping skips: orjson keeps the Claim
        ("resourceType", b'"resourceType":"Condition"', b'"resourceType":"Condition","resourceType":"Claim"'),
        # a Medication (read only through a reference) with two ids: orjson keeps the last, and the
        # reference to the first then finds nothing
        ("id", b'"id":"warfarin"', b'"id":"warfarin","id":"other"'),
    ],
)  # fmt: skip
def test_a_resource_read_lazily_that_repeats_a_name_is_read_as_orjson_reads_it(
    bundle: dict, name: str, before: bytes, after: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = padded(bundle)
    assert raw.count(before) >= 1
    raw = raw.replace(before, after, 1)
    assert read_lazily(raw)  # the entries are read lazily; the repeated name shows when the resource is built
    lazily, whole_ = outcome(lambda: record_from_bundle(raw)), whole(raw, monkeypatch)
    assert lazily == whole_
    padded_plain = record_from_bundle(padded(bundle))
    assert lazily != padded_plain  # (the repeated name does change the record: the test shows something)


# --- Observations no rule reads -----------------------------------------------------------------


def _with_observations(bundle: dict, *observations: dict) -> dict:
    bundle = copy.deepcopy(bundle)
    bundle["entry"] += [
        {"resource": {"resourceType": "Observation", "id": f"extra-{i}", **o}} for i, o in enumerate(observations)
    ]
    return bundle


def _coded(code: str) -> dict:
    return {"coding": [{"system": LOINC, "code": code}]}


def bundle_without_last(bundle: dict) -> dict:
    return {**bundle, "entry": bundle["entry"][:-1]}


@pytest.mark.parametrize("lazily", [True, False], ids=["lazily", "parsed"])
def test_observations_of_codes_not_read_are_not_mapped(bundle: dict, read_codes: frozenset, lazily: bool) -> None:
    assert ("loinc", "6301-6") in read_codes and ("loinc", "8867-4") not in read_codes  # INR is read, heart rate not
    bundle = _with_observations(
        bundle,
        {"status": "final", "code": _coded("8867-4"), "effectiveDateTime": "2025-05-01", "valueQuantity": {"value": 70}},
        # not read, and broken in ways the mapping would refuse: never looked at
        {"status": 5, "code": _coded("8867-4"), "valueQuantity": {"value": 70, "unit": []}},
    )
    given: Any = padded(bundle) if lazily else bundle
    read = record_from_bundle(given, observation_codes=read_codes)
    assert read.observations and all(any((c.system, c.code) in read_codes for c in o.codes) for o in read.observations)
    # exactly the ones read: mapped whole (without the broken one), less those of other codes
    unbroken = padded(bundle_without_last(bundle)) if lazily else bundle_without_last(bundle)
    everything = record_from_bundle(unbroken).observations
    assert read.observations == [o for o in everything if any((c.system, c.code) in read_codes for c in o.codes)]
    with pytest.raises(RecordError, match="expected a string"):
        record_from_bundle(given)  # mapped whole, the broken one is refused, naming its field


@pytest.mark.parametrize("lazily", [True, False], ids=["lazily", "parsed"])
def test_an_observation_that_may_be_read_is_mapped_and_checked(bundle: dict, read_codes: frozenset, lazily: bool) -> None:
    cases = {
        "read code beside another": {
            "status": 5,
            "code": {"coding": [{"system": LOINC, "code": "8867-4"}, {"system": LOINC, "code": "6301-6"}]},
        },
        "a coding without a system": {"status": 5, "code": {"coding": [{"code": "8867-4"}]}},
        "no coding": {"status": 5, "code": {"text": "heart rate"}},
        "an empty coding list": {"status": 5, "code": {"coding": [], "text": "heart rate"}},
    }
    for name, observation in cases.items():
        broken = _with_observations(bundle, observation)
        with pytest.raises(RecordError, match="expected a string") as refused:
            record_from_bundle(padded(broken) if lazily else broken, observation_codes=read_codes)
        assert refused.value.path.endswith(".status"), name


@pytest.mark.parametrize("lazily", [True, False], ids=["lazily", "parsed"])
def test_an_observation_with_a_code_outside_an_own_vocabulary_is_refused_as_without_the_filter(
    bundle: dict, read_codes: frozenset, lazily: bool
) -> None:
    target = "http://needlepoint.dev/fhir/CodeSystem/injection-target"
    odd = _with_observations(bundle, {"status": "final", "code": {"coding": [{"system": target, "code": "bogus"}]}})
    given: Any = padded(odd) if lazily else odd
    with pytest.raises(RecordError, match="unknown code 'bogus'") as whole:
        record_from_bundle(given)
    with pytest.raises(RecordError, match="unknown code 'bogus'") as filtered:
        record_from_bundle(given, observation_codes=read_codes)
    assert filtered.value.path == whole.value.path


def test_the_order_may_name_an_observation_not_read_as_its_reason(bundle: dict, read_codes: frozenset) -> None:
    bundle = _with_observations(bundle, {"status": "final", "code": _coded("8867-4"), "valueQuantity": {"value": 70}})
    order = next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == "hip-injection")
    order["reasonReference"] = [{"reference": "Observation/extra-0"}]
    for given in (padded(bundle), bundle):
        record = record_from_bundle(given, observation_codes=read_codes)
        assert record.order is not None and "loinc#8867-4" in [str(c) for c in record.order.reasons]
        assert all(o.codes[0].code != "8867-4" for o in record.observations)


def test_a_cds_hooks_request_skips_the_same_observations(bundle: dict, read_codes: frozenset) -> None:
    from needlepoint.fhir.mapper import record_from_cds_hooks_request

    broken = {"resourceType": "Observation", "id": "hr", "status": 5, "code": _coded("8867-4")}
    order = next(e for e in bundle["entry"] if e["resource"]["id"] == "hip-injection")
    others = [e for e in bundle["entry"] if e is not order]
    request = {
        "hook": "order-select",
        "context": {"patientId": "pat-1", "draftOrders": {"resourceType": "Bundle", "entry": [order]}},
        "prefetch": {"record": {"resourceType": "Bundle", "entry": others}, "heartRate": broken},
    }
    record = record_from_cds_hooks_request(request, observation_codes=read_codes)
    assert record.order is not None and record.order.target == "hip-intra-articular"
    with pytest.raises(RecordError, match="expected a string"):
        record_from_cds_hooks_request(request)
