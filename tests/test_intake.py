"""The one request -> record road (``needlepoint.intake``) and its one order semantics, "supply or
override", on every road that takes an order beside the patient: gRPC, ``needlepoint explain``,
``needlepoint rules diff`` and ``needlepoint batch``."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from needlepoint import intake
from needlepoint.batch.evaluate import referral_order
from needlepoint.batch.referrals import Referral
from needlepoint.cli import main
from needlepoint.core.record import Code, InjectionOrder, PatientRecord, RecordError
from needlepoint.limits import MAX_BUNDLE_BYTES
from needlepoint.v1 import decision_service_pb2, patient_pb2

ORDER_BUNDLE = Path(__file__).parent / "data" / "fhir" / "hip_injection_order.json"
AS_OF = "2025-06-02T09:00:00Z"
CPT = Code("cpt", "20610")


def _with_order(**fields) -> PatientRecord:
    return PatientRecord(
        order=InjectionOrder(**{"target": None, "side": None, "intent": None, **fields}, source="Bundle.entry[3]")
    )


def test_an_order_overrides_the_fields_it_gives_and_keeps_the_others() -> None:
    record = _with_order(target="hip-intra-articular", side="right", codes=[CPT])
    merged = intake.apply_order(record, InjectionOrder("iliopsoas-bursa", None, "therapeutic", source="order"))
    assert merged.order == InjectionOrder("iliopsoas-bursa", "right", "therapeutic", [CPT], [], source="Bundle.entry[3]")
    assert record.order.target == "hip-intra-articular"  # the record itself is not changed


def test_an_order_is_taken_whole_by_a_record_without_one() -> None:
    given = InjectionOrder("gluteal-tendon", "left", None, source=intake.COMMAND_LINE_ORDER)
    assert intake.apply_order(PatientRecord(), given).order == given
    assert intake.apply_order(PatientRecord(), None).order is None


def test_command_line_fields_make_an_order_only_when_one_is_given() -> None:
    assert intake.order_from_fields(None, None, None) is None
    assert intake.order_from_fields(None, "both", None) == InjectionOrder(None, "both", None, source="--target/--side/--intent")


def test_the_request_road_applies_the_request_order() -> None:
    request = decision_service_pb2.EvaluateRequest(
        fhir_bundle=ORDER_BUNDLE.read_bytes(), order=patient_pb2.InjectionOrder(side="left")
    )
    record = intake.record_from_request(request)
    assert (record.order.target, record.order.side) == ("hip-intra-articular", "left")
    assert record.order.source.startswith("Bundle.entry")


def test_the_request_road_names_what_is_wrong() -> None:
    with pytest.raises(RecordError, match=r"^patient: one of context or fhir_bundle is required$"):
        intake.record_from_request(decision_service_pb2.EvaluateRequest())
    too_big = decision_service_pb2.EvaluateRequest(fhir_bundle=b" " * (MAX_BUNDLE_BYTES + 1))
    with pytest.raises(
        RecordError, match=rf"^fhir_bundle: the bundle is {MAX_BUNDLE_BYTES + 1} bytes; the limit is {MAX_BUNDLE_BYTES} bytes$"
    ):
        intake.record_from_request(too_big)
    with pytest.raises(RecordError, match=r"^order\.intent: unknown code 'curative'"):
        intake.record_from_request(
            decision_service_pb2.EvaluateRequest(
                context=patient_pb2.PatientContext(), order=patient_pb2.InjectionOrder(intent="curative")
            )
        )


def test_an_exported_request_carries_its_bundle_as_an_object() -> None:
    bundle = orjson.loads(ORDER_BUNDLE.read_bytes())
    request, carried = intake.request_from_json(
        {"correlationId": "r-1", "asOf": AS_OF, "fhirBundle": bundle, "order": {"side": "left"}}
    )
    assert carried == bundle and request.correlation_id == "r-1" and not request.fhir_bundle
    assert intake.record_from_request(request, carried).order.side == "left"
    with pytest.raises(RecordError, match=r"^request: not an evaluate request"):
        intake.request_from_json({"asOf": "yesterday"})


def test_explain_command_line_overrides_the_bundle_order() -> None:
    # the bundle orders the right hip joint; --target asks about the iliopsoas bursa, keeping the
    # bundle's side and intent, as `needlepoint evaluate --target` and the gRPC order would
    args = ["explain", str(ORDER_BUNDLE), "--as-of", AS_OF, "--rule", "CAU-SOFT-TISSUE-CS", "--json"]
    plain = orjson.loads(CliRunner().invoke(main, args).output)
    overridden = orjson.loads(CliRunner().invoke(main, [*args, "--target", "iliopsoas-bursa"]).output)
    assert not plain["rule"]["fired"] and overridden["rule"]["fired"]
    order = overridden["rule"]["alternatives"][0]["patterns"][0]["candidates"][0]
    assert order["fact"] == "order iliopsoas-bursa right therapeutic"


def test_a_batch_row_wins_over_the_command_line_and_both_over_the_record() -> None:
    row = Referral("r1", "referrals.csv row 2", order=(None, "left", None))
    order = referral_order(row, ("iliopsoas-bursa", "right", None))
    assert order == InjectionOrder("iliopsoas-bursa", "left", None, source="referrals.csv row 2")
    record = intake.apply_order(_with_order(target="hip-intra-articular", side="right", intent="therapeutic"), order)
    assert (record.order.target, record.order.side, record.order.intent) == ("iliopsoas-bursa", "left", "therapeutic")
    assert referral_order(Referral("r2", "b.json"), None) is None
    assert referral_order(Referral("r3", "b.json"), (None, None, "diagnostic")).source == intake.COMMAND_LINE_ORDER


def test_any_json_input_gives_its_record_instant_and_name() -> None:
    bundle = orjson.loads(ORDER_BUNDLE.read_bytes())
    record, as_of, name = intake.record_from_json(bundle)
    assert record.order.target == "hip-intra-articular" and (as_of, name) == (None, "")
    record, as_of, name = intake.record_from_json(
        {"correlationId": "r-7", "asOf": AS_OF, "fhirBundle": bundle, "order": {"side": "left"}}
    )
    assert (record.order.side, as_of.isoformat(), name) == ("left", "2025-06-02T09:00:00+00:00", "r-7")
    with pytest.raises(RecordError, match=r"^line: not a FHIR Bundle, a CDS Hooks request or an evaluate request$"):
        intake.record_from_json({"resourceType": "Patient"})


def _not_for_us_request(order: patient_pb2.InjectionOrder | None = None) -> decision_service_pb2.EvaluateRequest:
    import random

    from tests.bundles import not_for_us_bundle

    bundle = orjson.dumps(not_for_us_bundle(random.Random(3), 0))
    request = decision_service_pb2.EvaluateRequest(fhir_bundle=bundle)
    if order is not None:
        request.order.CopyFrom(order)
    return request


def test_the_server_refuses_an_order_not_for_us_before_mapping_the_record() -> None:
    from needlepoint.fhir.mapper import NOT_HIP_PROBLEM
    from needlepoint.server.errors import ServiceError
    from needlepoint.server.service import Engine

    request = _not_for_us_request()
    engine = Engine.load()
    # the early refusal's own wording (the full mapping words it otherwise), whether the server
    # hands the bundle's bytes over (as Engine.evaluate does) or the road reads them itself
    for bundle in (request.fhir_bundle, None):
        with pytest.raises(RecordError) as caught:
            engine.record(request, bundle)
        assert (caught.value.path, caught.value.message) == ("order.target", NOT_HIP_PROBLEM)
    with pytest.raises(ServiceError) as refused:
        engine.evaluate(request)
    assert NOT_HIP_PROBLEM in refused.value.message


def test_only_the_server_refuses_early_a_tool_with_an_order_of_its_own_maps_the_record() -> None:
    request = _not_for_us_request()
    record = intake.record_from_request(request, request.fhir_bundle)  # rules diff, batch: no early refusal
    assert record.order is not None and record.order.target is None
    # a base64 bundle in an exported request, as the protobuf JSON mapping writes it, is mapped too,
    # so that --target/--side/--intent can still supply the order afterwards
    from google.protobuf import json_format

    exported = json_format.MessageToDict(request)
    assert not exported["fhirBundle"].lstrip().startswith("{")
    mapped, _, _ = intake.record_from_json(exported)
    assert mapped == record


def test_an_order_beside_a_bundle_not_for_us_is_applied_not_refused() -> None:
    from needlepoint.server.service import Engine

    order = patient_pb2.InjectionOrder(target="hip-intra-articular", side="left", intent="therapeutic")
    request = _not_for_us_request(order)
    record = Engine.load().record(request, request.fhir_bundle)
    assert (record.order.target, record.order.side, record.order.intent) == ("hip-intra-articular", "left", "therapeutic")
