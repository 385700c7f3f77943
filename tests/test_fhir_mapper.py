"""FHIR R4 Bundle / CDS Hooks request -> PatientRecord (needlepoint.fhir.mapper)."""

from __future__ import annotations

import copy
import datetime as dt
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from needlepoint.core.record import Code, PatientRecord, RecordError
from needlepoint.fhir import record_from_bundle, record_from_cds_hooks_request

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
SYNTHEA = sorted((FIXTURES / "synthea").glob("*.json"))
CDS_HOOKS = FIXTURES / "cds-hooks"
HAND_MADE = Path(__file__).resolve().parent / "data" / "fhir" / "hip_injection_order.json"

NP = "http://needlepoint.dev/fhir/CodeSystem/"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
SOURCE = re.compile(r"Bundle\.entry\[\d+\]\.resource \([A-Za-z]+/[^)]+\)")


def load(path: Path) -> Any:
    return orjson.loads(path.read_bytes())


def synthea(name: str) -> dict:
    (path,) = [p for p in SYNTHEA if p.name.startswith(name)]
    return load(path)


def codes_of(items: list[Any]) -> set[str]:
    return {str(code) for item in items for code in item.codes}


@pytest.fixture
def bundle() -> dict:
    return load(HAND_MADE)


def entry_index(bundle: dict, rid: str) -> int:
    return next(i for i, e in enumerate(bundle["entry"]) if e["resource"]["id"] == rid)


def resource(bundle: dict, rid: str) -> dict:
    return bundle["entry"][entry_index(bundle, rid)]["resource"]


def with_observation(bundle: dict, **fields: Any) -> dict:
    """The bundle plus one final glucose Observation; a field given as None is removed."""
    obs = {
        "resourceType": "Observation",
        "id": "extra-obs",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "2339-0"}]},
        "effectiveDateTime": "2025-05-30T08:00:00Z",
        "valueQuantity": {"value": 98, "unit": "mg/dL", "system": UCUM, "code": "mg/dL"},
    }
    for key, value in fields.items():
        if value is None:
            obs.pop(key, None)
        else:
            obs[key] = value
    bundle["entry"].append({"resource": obs})
    return bundle


# --- Synthea --------------------------------------------------------------------------------------


def test_synthea_fixtures_are_present() -> None:
    assert len(SYNTHEA) == 5


@pytest.mark.parametrize("path", SYNTHEA, ids=lambda p: p.name.split("_")[0])
def test_synthea_bundle_maps(path: Path) -> None:
    raw = path.read_bytes()
    record = record_from_bundle(raw)
    assert record == record_from_bundle(orjson.loads(raw))  # bytes and parsed JSON agree
    assert isinstance(record.birth_date, dt.date)
    assert record.sex in ("female", "male")
    assert record.conditions and record.observations
    assert record.order is None and record.planned_injectates == []
    assert record.data_issues == []  # Synthea data is complete and well formed
    items = record.conditions + record.medications + record.observations + record.allergies
    assert all(SOURCE.fullmatch(item.source) for item in items)
    assert all(o.effective is not None and o.effective.tzinfo is not None for o in record.observations)
    assert all((o.value is None) != (o.value_code is None) for o in record.observations)


def test_mafalda_warfarin_and_hip_oa_and_resolved_conditions_end_when_they_abated() -> None:
    data = synthea("Mafalda_Turcotte")
    record = record_from_bundle(data)
    assert "rxnorm#855332" in codes_of(record.medications)
    assert "snomed#239872002" in codes_of(record.conditions)
    resolved = {
        f"snomed#{c['code']}"
        for e in data["entry"]
        if e["resource"]["resourceType"] == "Condition"
        and e["resource"]["clinicalStatus"]["coding"][0]["code"] == "resolved"
        for c in e["resource"]["code"]["coding"]
    }
    assert "snomed#444814009" in resolved  # viral sinusitis, resolved several times
    # a resolved condition is kept with its abatement date: it was current before then
    ended = [c for c in record.conditions if c.ended is not None]
    assert resolved == codes_of(ended)
    assert all(c.begun is not None and c.since is not None and c.since <= c.ended for c in ended)
    assert len(record.conditions) - len(ended) == 4  # the four still active
    stopped = [e for e in data["entry"] if e["resource"].get("status") == "stopped"]
    assert stopped and len(record.medications) == 4  # the stopped requests are not medications


def test_mafalda_observations_keep_ucum_units() -> None:
    record = record_from_bundle(synthea("Mafalda_Turcotte"))
    glucose = [o for o in record.observations if Code("loinc", "2339-0") in {Code(c.system, c.code) for c in o.codes}]
    assert glucose and {o.unit for o in glucose} == {"mg/dL"}
    t_scores = [o for o in record.observations if any(c.code == "38265-5" for c in o.codes)]
    assert all(o.unit == "{T-score}" for o in t_scores)


def test_tony_douglas_has_seven_allergies() -> None:
    record = record_from_bundle(synthea("Tony_Douglas"))
    assert len(record.allergies) == 7
    assert all(a.codes and a.codes[0].system == "snomed" for a in record.allergies)
    assert {a.criticality for a in record.allergies} <= {"low", "high", "unable-to-assess", None}


# --- the hand-made hip-injection bundle ---------------------------------------------------------


def test_injection_order(bundle: dict) -> None:
    order = record_from_bundle(bundle).order
    assert order is not None
    assert (order.target, order.side, order.intent) == ("hip-intra-articular", "right", "therapeutic")
    assert [str(c) for c in order.codes] == ["cpt#20610", "cpt#77002"]
    # reasonCode plus the Condition named by reasonReference (Type/id), without repeats
    assert [str(c) for c in order.reasons] == ["icd10cm#M16.11", "snomed#239872002"]
    assert order.source == "Bundle.entry[3].resource (ServiceRequest/hip-injection)"


def test_order_flags_and_planned_injectates(bundle: dict) -> None:
    record = record_from_bundle(bundle)
    assert record.flags == ["ultrasound-failed"]
    assert [[str(c) for c in p.codes] for p in record.planned_injectates] == [
        ["np-injectate#corticosteroid"],
        ["atc#N01BB02"],  # medicationReference by urn:uuid
    ]


def test_active_medication_through_type_id_reference(bundle: dict) -> None:
    record = record_from_bundle(bundle)
    assert [[str(c) for c in m.codes] for m in record.medications] == [["rxnorm#855332"]]
    assert record.medications[0].source.endswith("(MedicationRequest/warfarin-order)")


def test_inr_and_unitless_platelets(bundle: dict) -> None:
    record = record_from_bundle(bundle)
    inr, platelets = record.observations
    assert (inr.value, inr.unit, inr.unit_display) == (2.4, "{INR}", "INR")  # the code and the display, apart
    assert inr.effective == dt.datetime(2025, 5, 30, 6, 15, tzinfo=dt.timezone.utc)
    # The unitless count is kept as it is: only the core knows whether a rule needs platelets.
    assert (platelets.value, platelets.unit, platelets.problem) == (180.0, None, None)
    assert platelets.source == "Bundle.entry[10].resource (Observation/platelets-unitless)"
    assert record.data_issues == []


def test_prior_injection(bundle: dict) -> None:
    (injection,) = record_from_bundle(bundle).prior_injections
    assert [str(c) for c in injection.codes] == ["cpt#20610"]
    assert injection.performed == dt.datetime(2025, 2, 10, 10, 0, tzinfo=dt.timezone.utc)
    assert (injection.target, injection.side) == ("hip-intra-articular", "left")  # laterality extension
    # usedCode (ATC + RxNorm) and the usedReference Medication (urn:uuid)
    assert [str(c) for c in injection.agents] == ["atc#H02AB08", "rxnorm#10759", "atc#N01BB02"]


def test_planned_surgery(bundle: dict) -> None:
    (surgery,) = record_from_bundle(bundle).planned_surgeries
    assert [str(c) for c in surgery.codes] == ["cpt#27130", "snomed#52734007"]
    assert surgery.date == dt.datetime(2025, 9, 1, tzinfo=dt.timezone.utc)
    assert surgery.side == "right"


def test_conditions_and_allergy(bundle: dict) -> None:
    record = record_from_bundle(bundle)
    assert [c.source for c in record.conditions] == ["Bundle.entry[1].resource (Condition/oa-hip)"]
    assert "snomed#70704007" not in codes_of(record.conditions)  # resolved
    (allergy,) = record.allergies
    assert (allergy.severity, allergy.criticality) == ("severe", "high")
    assert [str(c) for c in allergy.codes] == ["atc#V08AB02"]


def test_bundle_types_accepted(bundle: dict) -> None:
    for kind in ("collection", "searchset", "transaction"):
        bundle["type"] = kind
        assert record_from_bundle(bundle).order is not None


def test_order_ref_by_type_id_and_by_urn(bundle: dict) -> None:
    second = copy.deepcopy(resource(bundle, "hip-injection"))
    second["id"] = "hip-injection-2"
    second["bodySite"][0]["coding"][0]["code"] = "greater-trochanteric-bursa"
    bundle["entry"].append({"fullUrl": "urn:uuid:0b6e2a1c-5f3d-4c59-9a0e-000000000099", "resource": second})
    by_id = record_from_bundle(bundle, order_ref="ServiceRequest/hip-injection-2")
    assert by_id.order is not None and by_id.order.target == "greater-trochanteric-bursa"
    by_urn = record_from_bundle(bundle, order_ref="urn:uuid:0b6e2a1c-5f3d-4c59-9a0e-000000000004")
    assert by_urn.order is not None and by_urn.order.target == "hip-intra-articular"
    absolute = record_from_bundle(bundle, order_ref="https://ehr.example/fhir/ServiceRequest/hip-injection-2")
    assert absolute.order is not None and absolute.order.source == by_id.order.source


def test_one_injection_among_several_drafts_is_the_order(bundle: dict) -> None:
    bundle["entry"].append({"resource": {
        "resourceType": "ServiceRequest", "id": "xray", "status": "draft",
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "73502"}]},
    }})
    record = record_from_bundle(bundle)
    assert record.order is not None and record.order.source.endswith("(ServiceRequest/hip-injection)")
    assert len(record.planned_surgeries) == 1  # a draft that is not the order is not a surgery


def test_snomed_hip_joint_alone_means_intra_articular(bundle: dict) -> None:
    order = resource(bundle, "hip-injection")
    order["bodySite"] = [
        {"coding": [{"system": SNOMED, "code": "24136001"}]},
        {"coding": [{"system": SNOMED, "code": "51440002"}]},
    ]
    mapped = record_from_bundle(bundle).order
    assert mapped is not None and (mapped.target, mapped.side) == ("hip-intra-articular", "both")


def test_missing_target_is_left_to_the_evaluator(bundle: dict) -> None:
    del resource(bundle, "hip-injection")["bodySite"]
    mapped = record_from_bundle(bundle).order
    assert mapped is not None and (mapped.target, mapped.side, mapped.intent) == (None, None, "therapeutic")


def test_conflicting_laterality_is_a_data_issue(bundle: dict) -> None:
    surgery = resource(bundle, "planned-tha")
    surgery["bodySite"][0]["coding"].append({"system": SNOMED, "code": "7771000"})
    record = record_from_bundle(bundle)
    assert record.planned_surgeries[0].side is None
    assert "conflicting-laterality" in {i.kind for i in record.data_issues}


def test_text_only_resources_are_set_aside(bundle: dict) -> None:
    resource(bundle, "oa-hip")["code"] = {"text": "hip arthritis"}
    record = record_from_bundle(bundle)
    assert record.conditions == []
    issue = next(i for i in record.data_issues if i.kind == "uncoded")
    assert "hip arthritis" in issue.detail and issue.source.endswith("(Condition/oa-hip)")


def test_refuted_and_inactive_items_are_ignored(bundle: dict) -> None:
    allergy = resource(bundle, "contrast-allergy")
    allergy["verificationStatus"]["coding"][0]["code"] = "refuted"
    resource(bundle, "oa-hip")["verificationStatus"] = {"coding": [{"code": "entered-in-error"}]}
    record = record_from_bundle(bundle)
    assert record.allergies == [] and record.conditions == []


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({"effectiveDateTime": "30/05/2025"}, "unparseable-date"),
        ({"effectiveDateTime": "2025-05"}, "imprecise-date"),
        ({"effectiveDateTime": "2025-02-30T08:00:00Z"}, "unparseable-date"),
        ({"valueQuantity": {"unit": "mg/dL", "system": UCUM, "code": "mg/dL"}}, "value-missing"),
        ({"valueQuantity": {"value": "98", "unit": "mg/dL"}}, "value-unparseable"),
        ({"valueQuantity": {"value": 600, "comparator": ">", "unit": "mg/dL"}}, "value-censored"),
        ({"valueQuantity": None, "valueString": "normal"}, "value-unsupported"),
        ({"valueQuantity": None, "dataAbsentReason": {"coding": [{"system": "x", "code": "error"}]}}, "value-missing"),
    ],
)
def test_untrustworthy_observation_values_are_kept_with_their_problem(bundle: dict, fields: dict, kind: str) -> None:
    record = record_from_bundle(with_observation(bundle, **fields))
    (glucose,) = [o for o in record.observations if str(o.codes[0]) == "loinc#2339-0"]
    assert glucose.value is None and glucose.problem is not None
    assert glucose.problem[0] == kind
    assert record.data_issues == []


def test_unit_text_outside_ucum_is_kept_only_as_display(bundle: dict) -> None:
    quantity = {"value": 5.5, "unit": "mmol/l", "code": "mmol"}  # a code, but not in UCUM
    record = record_from_bundle(with_observation(bundle, valueQuantity=quantity))
    (glucose,) = [o for o in record.observations if o.codes[0].code == "2339-0"]
    assert (glucose.value, glucose.unit, glucose.unit_display) == (5.5, None, "mmol/l")


@pytest.mark.parametrize(
    "quantity, unit, display",
    [
        ({"value": 25, "unit": "K/uL", "system": UCUM, "code": "10*3/uL"}, "10*3/uL", "K/uL"),  # both kept
        ({"value": 25, "system": UCUM, "code": "10*3/uL"}, "10*3/uL", None),
        ({"value": 25, "unit": "K/uL"}, None, "K/uL"),  # display only: the core decides if it is safe
        ({"value": 25, "unit": "K/uL", "system": UCUM, "code": "K/uL"}, "K/uL", "K/uL"),  # kelvin: kept as sent
        ({"value": 25, "unit": "K/uL", "system": "http://example.org/units", "code": "thou"}, None, "K/uL"),
        ({"value": 25, "unit": "", "system": UCUM, "code": ""}, None, None),
    ],
)
def test_ucum_code_and_display_unit_are_kept_apart(bundle: dict, quantity: dict, unit: str | None, display: str | None) -> None:
    record = record_from_bundle(with_observation(bundle, valueQuantity=quantity))
    (obs,) = [o for o in record.observations if o.codes[0].code == "2339-0"]
    assert (obs.value, obs.unit, obs.unit_display) == (25.0, unit, display)


def test_coded_observation_value(bundle: dict) -> None:
    pregnancy = {"coding": [{"system": SNOMED, "code": "60001007", "display": "Not pregnant"}]}
    code = {"coding": [{"system": LOINC, "code": "82810-3"}]}
    bundle = with_observation(bundle, code=code, valueQuantity=None, valueCodeableConcept=pregnancy)
    (status,) = [o for o in record_from_bundle(bundle).observations if o.codes[0].code == "82810-3"]
    assert status.value is None and status.value_code == Code("snomed", "60001007", "Not pregnant")


def test_effective_falls_back_to_period_start_then_issued(bundle: dict) -> None:
    bundle = with_observation(bundle, effectiveDateTime=None, effectivePeriod={"start": "2025-05-01T00:00:00Z"})
    issued = "2025-04-01T12:00:00.123456789+00:00"
    bundle = with_observation(bundle, id="issued-only", effectiveDateTime=None, issued=issued)
    times = sorted(o.effective for o in record_from_bundle(bundle).observations if o.codes[0].code == "2339-0")
    assert times == [
        dt.datetime(2025, 4, 1, 12, 0, 0, 123456, tzinfo=dt.timezone.utc),
        dt.datetime(2025, 5, 1, tzinfo=dt.timezone.utc),
    ]


def test_unreadable_procedure_date_keeps_the_injection(bundle: dict) -> None:
    resource(bundle, "prior-injection")["performedDateTime"] = "last spring"
    record = record_from_bundle(bundle)
    (injection,) = record.prior_injections
    assert injection.performed is None  # a prior injection is never dropped for a bad date
    assert ("unparseable-date", "cpt#20610") in {(i.kind, i.concept) for i in record.data_issues}


def test_partial_birth_date_is_the_range_it_allows(bundle: dict) -> None:
    resource(bundle, "pat-1")["birthDate"] = "1958"
    record = record_from_bundle(bundle)
    assert record.birth_date is None
    assert record.birth_range == (dt.date(1958, 1, 1), dt.date(1958, 12, 31))
    assert not record.data_issues
    resource(bundle, "pat-1")["birthDate"] = "2016-02"
    assert record_from_bundle(bundle).birth_range == (dt.date(2016, 2, 1), dt.date(2016, 2, 29))


def test_unreadable_birth_date_is_named(bundle: dict) -> None:
    resource(bundle, "pat-1")["birthDate"] = "1958-13"
    record = record_from_bundle(bundle)
    assert record.birth_date is None and record.birth_range is None
    assert ("unparseable-date", "Patient.birthDate") in {(i.kind, i.concept) for i in record.data_issues}


def test_future_birth_date_is_parsed_not_judged(bundle: dict) -> None:
    resource(bundle, "pat-1")["birthDate"] = "2999-01-01"
    assert record_from_bundle(bundle).birth_date == dt.date(2999, 1, 1)


def test_unresolvable_reference_is_a_data_issue(bundle: dict) -> None:
    resource(bundle, "warfarin-order")["medicationReference"] = {"reference": "Medication/missing"}
    record = record_from_bundle(bundle)
    assert record.medications == []
    issue = next(i for i in record.data_issues if i.kind == "unresolved-reference")
    assert "Medication/missing" in issue.detail


def test_contained_medication_resolves(bundle: dict) -> None:
    request = resource(bundle, "warfarin-order")
    request["contained"] = [{"resourceType": "Medication", "id": "m1", "code": {"coding": [
        {"system": "http://www.whocc.no/atc", "code": "B01AA03"}]}}]
    request["medicationReference"] = {"reference": "#m1"}
    assert [str(c) for m in record_from_bundle(bundle).medications for c in m.codes] == ["atc#B01AA03"]


def test_snomed_procedure_at_the_hip_with_a_steroid_is_an_injection(bundle: dict) -> None:
    procedure = resource(bundle, "prior-injection")
    procedure["code"] = {"coding": [{"system": SNOMED, "code": "76601001"}]}  # any SNOMED procedure
    assert len(record_from_bundle(bundle).prior_injections) == 1
    del procedure["usedCode"], procedure["usedReference"]  # no agent: nothing says it was an injection
    assert record_from_bundle(bundle).prior_injections == []


def test_operation_outcome_is_a_data_issue(bundle: dict) -> None:
    bundle["entry"].append({"resource": {"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "timeout", "diagnostics": "Observation search timed out"}]}})
    record = record_from_bundle(bundle)
    assert any(i.kind == "source-error" and "timed out" in i.detail for i in record.data_issues)


# --- errors -------------------------------------------------------------------------------------


def raises(path: str, bundle: Any, **kwargs: Any) -> RecordError:
    with pytest.raises(RecordError) as caught:
        record_from_bundle(bundle, **kwargs)
    assert caught.value.path == path, caught.value
    return caught.value


def test_malformed_json_names_line_and_column() -> None:
    error = raises("Bundle", b'{"resourceType": "Bundle",\n  "entry": [,]}')
    assert "line 2" in error.message and "column" in error.message
    raises("Bundle", "")


def test_not_a_bundle(bundle: dict) -> None:
    raises("Bundle.resourceType", {"resourceType": "Patient", "id": "p"})
    raises("Bundle", b"[1, 2]")
    raises("Bundle.type", {**bundle, "type": "history"})
    raises("Bundle.entry", {"resourceType": "Bundle", "type": "collection", "entry": {}})


def test_entry_not_an_object(bundle: dict) -> None:
    bundle["entry"].insert(2, "Condition/oa-hip")
    raises("Bundle.entry[2]", bundle)


def test_no_patient(bundle: dict) -> None:
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Patient"]
    raises("Bundle", bundle)


def test_two_patients(bundle: dict) -> None:
    bundle["entry"].append({"resource": {"resourceType": "Patient", "id": "someone-else"}})
    raises(f"Bundle.entry[{len(bundle['entry']) - 1}].resource", bundle)


def test_unknown_injection_intent(bundle: dict) -> None:
    resource(bundle, "hip-injection")["orderDetail"][0]["coding"][0]["code"] = "cosmetic"
    error = raises("Bundle.entry[3].resource.orderDetail[0].coding[0].code", bundle)
    assert "cosmetic" in error.message


def test_unknown_codes_in_other_own_systems(bundle: dict) -> None:
    broken = copy.deepcopy(bundle)
    resource(broken, "planned-steroid")["medicationCodeableConcept"]["coding"][0]["code"] = "botox"
    raises("Bundle.entry[4].resource.medicationCodeableConcept.coding[0].code", broken)
    broken = copy.deepcopy(bundle)
    resource(broken, "hip-injection")["bodySite"][0]["coding"][0]["code"] = "knee"
    raises("Bundle.entry[3].resource.bodySite[0].coding[0].code", broken)
    resource(bundle, "hip-injection")["orderDetail"][1]["coding"][0]["code"] = "anxious"
    raises("Bundle.entry[3].resource.orderDetail[1].coding[0].code", bundle)


def test_two_draft_injection_orders(bundle: dict) -> None:
    second = copy.deepcopy(resource(bundle, "hip-injection"))
    second["id"] = "hip-injection-2"
    bundle["entry"].append({"resource": second})
    error = raises(f"Bundle.entry[{len(bundle['entry']) - 1}].resource", bundle)
    assert "ServiceRequest/hip-injection)" in error.message and "hip-injection-2" in error.message


def test_order_ref_that_resolves_to_nothing(bundle: dict) -> None:
    raises("order_ref", bundle, order_ref="ServiceRequest/nope")
    raises("order_ref", bundle, order_ref="MedicationRequest/planned-steroid")  # not a ServiceRequest


def test_coding_less_order_target(bundle: dict) -> None:
    resource(bundle, "hip-injection")["bodySite"] = [{"text": "right hip"}]
    raises("Bundle.entry[3].resource.bodySite[0]", bundle)


def test_non_finite_numbers_are_refused(bundle: dict) -> None:
    resource(bundle, "inr")["valueQuantity"]["value"] = float("nan")
    raises("Bundle.entry[9].resource.valueQuantity.value", bundle)


def test_negative_numbers_are_left_to_the_core(bundle: dict) -> None:
    # Only the rule set knows whether a negative value is impossible (an INR) or normal (a
    # T-score, a base excess), so the mapper keeps it; the evaluator refuses it (test_core).
    resource(bundle, "inr")["valueQuantity"]["value"] = -1.2
    (inr, _platelets) = record_from_bundle(bundle).observations
    assert inr.value == -1.2


def test_structurally_wrong_fields(bundle: dict) -> None:
    resource(bundle, "oa-hip")["code"] = [{"coding": []}]
    raises("Bundle.entry[1].resource.code", bundle)


# --- CDS Hooks ----------------------------------------------------------------------------------


def test_pama_order_select_request() -> None:
    record = record_from_cds_hooks_request(load(CDS_HOOKS / "pama-scenario-01-outbound-request.json"))
    assert isinstance(record, PatientRecord)
    order = record.order
    assert order is not None and (order.target, order.side, order.intent) == (None, None, None)
    assert [str(c) for c in order.codes] == ["cpt#72133"]
    assert [str(c) for c in order.reasons] == ["snomed#279039007"]
    assert order.source == "context.draftOrders.entry[0].resource (ServiceRequest/example-MRI-59879846)"
    # no Patient in the request: age and sex are unknown, and the record says so
    assert (record.birth_date, record.sex) == (None, None)
    assert [(i.kind, i.concept) for i in record.data_issues] == [("resource-missing", "Patient")]


def test_davinci_crd_order_sign_request() -> None:
    record = record_from_cds_hooks_request(load(CDS_HOOKS / "davinci-crd-CRDServiceRequest.json"))
    assert (record.birth_date, record.sex) == (dt.date(1987, 2, 20), "female")
    # two non-injection drafts (mammography, oxygen) and no selection: no injection order
    assert record.order is None
    assert record.planned_surgeries == [] and record.data_issues == []


def hip_request(bundle: dict) -> dict:
    """A CDS Hooks order-select request: the draft orders in context, the rest as prefetch."""
    drafts = [e for e in bundle["entry"] if e["resource"].get("status") == "draft"]
    others = [e for e in bundle["entry"] if e not in drafts and e["resource"]["resourceType"] != "Patient"]
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    return {
        "hook": "order-select",
        "hookInstance": "6f1c1e34-7d3b-4bcb-8f3e-1d7a0b8f9c10",
        "context": {
            "userId": "Practitioner/1",
            "patientId": "pat-1",
            "selections": ["ServiceRequest/hip-injection", "MedicationRequest/planned-steroid"],
            "draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": drafts},
        },
        "prefetch": {
            "patient": patient,
            "everything": {"resourceType": "Bundle", "type": "searchset", "entry": others},
            "inr": None,
        },
    }


def test_cds_hooks_request_from_hand_made_bundle(bundle: dict) -> None:
    request = hip_request(bundle)
    record = record_from_cds_hooks_request(request)
    direct = record_from_bundle(bundle)
    assert record.order is not None and direct.order is not None
    assert (record.order.target, record.order.side, record.order.intent) == (
        "hip-intra-articular",
        "right",
        "therapeutic",
    )
    assert record.order.source == "context.draftOrders.entry[0].resource (ServiceRequest/hip-injection)"
    assert record.order.reasons == direct.order.reasons  # reasonReference resolves across prefetch
    assert codes_of(record.medications) == codes_of(direct.medications)
    assert record.prior_injections[0].agents == direct.prior_injections[0].agents
    assert record.birth_date == direct.birth_date and record.flags == ["ultrasound-failed"]
    assert record.data_issues == []


def test_cds_hooks_selections_choose_between_drafts(bundle: dict) -> None:
    second = copy.deepcopy(resource(bundle, "hip-injection"))
    second["id"] = "hip-injection-2"
    second["bodySite"][0]["coding"][0]["code"] = "iliopsoas-bursa"
    bundle["entry"].append({"resource": second})
    request = hip_request(bundle)
    request["context"]["selections"] = ["ServiceRequest/hip-injection-2"]
    order = record_from_cds_hooks_request(request).order
    assert order is not None and order.target == "iliopsoas-bursa"
    request["context"]["selections"] = ["ServiceRequest/not-there"]
    with pytest.raises(RecordError) as caught:
        record_from_cds_hooks_request(request)
    assert caught.value.path == "context.selections[0]"


def test_cds_hooks_malformed_requests(bundle: dict) -> None:
    with pytest.raises(RecordError) as caught:
        record_from_cds_hooks_request({"hook": "order-select"})
    assert caught.value.path == "context"
    request = hip_request(bundle)
    request["prefetch"]["everything"] = "not a resource"
    with pytest.raises(RecordError) as caught:
        record_from_cds_hooks_request(request)
    assert caught.value.path == "prefetch.everything"


# --- robustness ---------------------------------------------------------------------------------


def _field_paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (dict keys and list indexes) below ``node``."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    found = []
    for key, child in items:
        found.append(prefix + (key,))
        found += _field_paths(child, prefix + (key,))
    return found


def test_wrong_typed_fields_never_crash(bundle: dict) -> None:
    """Any field of the hand-made bundle replaced by a wrong-typed value maps or raises RecordError."""
    unexpected = []
    for path in _field_paths(bundle):
        for value in (None, 1, "x", [], {}, [{}], True):
            mutated = copy.deepcopy(bundle)
            node = mutated
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
            try:
                record_from_bundle(mutated)
            except RecordError:
                pass
            except Exception as error:  # noqa: BLE001 - the point is to catch anything else
                unexpected.append((path, value, repr(error)))
    assert unexpected == []
