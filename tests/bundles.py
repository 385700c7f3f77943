"""Seeded random FHIR R4 order bundles, as an EHR sends them at order time (contract §1).

Each bundle is a seeded random patient from :mod:`tests.patients` written out as FHIR: the
Patient, active Conditions (ICD-10-CM or SNOMED), active MedicationRequests (RxNorm or ATC),
final Observations with a UCUM ``valueQuantity`` (or a coded pregnancy status), AllergyIntolerances,
completed injection Procedures, an active ServiceRequest for a planned surgery, the draft
ServiceRequest of the injection order (target, laterality, intent, CPT codes, reason, clinical
flags) and draft MedicationRequests for the planned injectates. The patient generator's broken
data stays broken here (a value without a unit, an unknown unit, an undated result, an order
without side or intent), so the bundles exercise the data-quality paths too.

Every bundle is distinct: its Patient id, and so every reference to it, comes from its index.

:func:`not_for_us_bundle` is the other common case at order time: the same kind of record with a
draft order that is not a hip injection (a knee injection, a spine MRI, a blood test), for which the service has
nothing to say.

Used by the benchmark (``bench/run.py``) and ``tests/test_bundles.py``.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from typing import Any

from needlepoint.core.record import SYSTEM_URI_OF, Code, PatientRecord
from tests.patients import AS_OF, random_patient

JSON = dict[str, Any]

URIS = SYSTEM_URI_OF  # short name -> URI
UCUM = "http://unitsofmeasure.org"
CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
SIDES = {"left": "7771000", "right": "24028007", "both": "51440002"}
HIP_JOINT = "24136001"


def _concept(*codes: Code) -> JSON:
    return {"coding": [{"system": URIS.get(c.system, c.system), "code": c.code} for c in codes]}


def _instant(value: dt.datetime) -> str:
    return value.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Writer:
    """Collects the entries of one bundle; every resource gets a urn:uuid fullUrl and an id."""

    def __init__(self, rng: random.Random, patient_id: str) -> None:
        self.rng = rng
        self.patient_ref = {"reference": f"Patient/{patient_id}"}
        self.entries: list[JSON] = []

    def add(self, resource: JSON) -> None:
        full_url = f"urn:uuid:{uuid.UUID(int=self.rng.getrandbits(128), version=4)}"
        resource.setdefault("id", f"{resource['resourceType'].lower()}-{len(self.entries)}")
        if resource["resourceType"] != "Patient":
            resource["subject" if resource["resourceType"] not in ("AllergyIntolerance",) else "patient"] = self.patient_ref
        self.entries.append({"fullUrl": full_url, "resource": resource})


def bundle_from_record(record: PatientRecord, patient_id: str, rng: random.Random, as_of: dt.datetime = AS_OF) -> JSON:
    """``record`` written as a FHIR R4 collection Bundle (the order included, when it has one)."""
    out = _Writer(rng, patient_id)
    patient: JSON = {"resourceType": "Patient", "id": patient_id, "gender": record.sex or "unknown"}
    if record.birth_date is not None:
        patient["birthDate"] = record.birth_date.isoformat()
    out.add(patient)
    for condition in record.conditions:
        resource: JSON = {
            "resourceType": "Condition",
            "clinicalStatus": {"coding": [{"system": CLINICAL, "code": "active"}]},
            "code": _concept(*condition.codes),
        }
        if rng.random() < 0.5:  # half with a recorded date, some long before the instant
            resource["recordedDate"] = _instant(as_of - dt.timedelta(days=rng.uniform(1, 2000)))
        out.add(resource)
    for medication in record.medications:
        out.add(
            {
                "resourceType": "MedicationRequest",
                "status": "active",
                "intent": "order",
                "medicationCodeableConcept": _concept(*medication.codes),
            }
        )
    for observation in record.observations:
        resource = {"resourceType": "Observation", "status": "final", "code": _concept(*observation.codes)}
        if observation.effective is not None:
            resource["effectiveDateTime"] = _instant(observation.effective)
        if observation.value_code is not None:
            resource["valueCodeableConcept"] = _concept(observation.value_code)
        else:
            quantity: JSON = {"value": observation.value}
            if observation.unit is not None:
                quantity.update(unit=observation.unit, system=UCUM, code=observation.unit)
            resource["valueQuantity"] = quantity
        out.add(resource)
    for allergy in record.allergies:
        resource = {"resourceType": "AllergyIntolerance", "code": _concept(*allergy.codes)}
        if allergy.severity is not None:
            resource["reaction"] = [{"severity": allergy.severity}]
        out.add(resource)
    for injection in record.prior_injections:
        resource = {"resourceType": "Procedure", "status": "completed", "code": _concept(*injection.codes)}
        if injection.performed is not None:
            resource["performedDateTime"] = _instant(injection.performed)
        site = [Code("np-target", injection.target)] if injection.target else []
        if injection.side is not None:
            site.append(Code("snomed", SIDES[injection.side]))
        if site:
            resource["bodySite"] = [_concept(*site)]
        if injection.agents:
            resource["usedCode"] = [_concept(agent) for agent in injection.agents]
        out.add(resource)
    for surgery in record.planned_surgeries:
        resource = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "code": _concept(*surgery.codes)}
        if surgery.date is not None:
            resource["occurrenceDateTime"] = _instant(surgery.date)
        if surgery.side is not None:
            resource["bodySite"] = [_concept(Code("snomed", HIP_JOINT), Code("snomed", SIDES[surgery.side]))]
        out.add(resource)
    order = record.order
    if order is not None:
        site = [Code("np-target", order.target)] if order.target else []
        if order.side is not None:
            site.append(Code("snomed", SIDES[order.side]))
        resource = {
            "resourceType": "ServiceRequest",
            "status": "draft",
            "intent": "order",
            "authoredOn": _instant(as_of - dt.timedelta(minutes=5)),
        }
        if order.codes:
            resource["code"] = _concept(*order.codes)
        if site:
            resource["bodySite"] = [_concept(*site)]
        details = [_concept(Code("np-intent", order.intent))] if order.intent else []
        details += [_concept(Code("np-flag", flag)) for flag in record.flags]
        if details:
            resource["orderDetail"] = details
        if order.reasons:
            resource["reasonCode"] = [_concept(reason) for reason in order.reasons]
        out.add(resource)
    for injectate in record.planned_injectates:
        out.add(
            {
                "resourceType": "MedicationRequest",
                "status": "draft",
                "intent": "order",
                "medicationCodeableConcept": _concept(*injectate.codes),
            }
        )
    return {"resourceType": "Bundle", "id": f"order-{patient_id}", "type": "collection", "entry": out.entries}


def random_bundle(rng: random.Random, index: int, as_of: dt.datetime = AS_OF) -> JSON:
    """One seeded random order bundle; ``index`` makes its patient, and so the bundle, distinct."""
    return bundle_from_record(random_patient(rng, as_of), f"pat-{index:06d}", rng, as_of)


def random_bundles(n: int, seed: int = 11, as_of: dt.datetime = AS_OF) -> list[JSON]:
    """``n`` distinct order bundles from one seed (the same seed gives the same bundles)."""
    rng = random.Random(seed)
    return [random_bundle(rng, i, as_of) for i in range(n)]


NOT_FOR_US_ORDERS = (
    # a knee injection: the injection CPT code, at another joint
    {"code": _concept(Code("cpt", "20610")), "bodySite": [_concept(Code("snomed", "72696002"), Code("snomed", "24028007"))]},
    # an MRI of the lumbar spine: not an injection at all
    {"code": _concept(Code("cpt", "72148"))},
    # a blood test
    {"code": _concept(Code("loinc", "6301-6"))},
)


def not_for_us_bundle(rng: random.Random, index: int, as_of: dt.datetime = AS_OF) -> JSON:
    """A seeded random record whose draft order is not a hip injection (the order of the index'th
    kind of :data:`NOT_FOR_US_ORDERS`, in turn)."""
    record = random_patient(rng, as_of)
    record.order, record.flags, record.planned_injectates = None, [], []
    bundle = bundle_from_record(record, f"other-{index:06d}", rng, as_of)
    order = {
        "resourceType": "ServiceRequest",
        "id": "draft-order",
        "status": "draft",
        "intent": "order",
        **NOT_FOR_US_ORDERS[index % len(NOT_FOR_US_ORDERS)],
    }
    order["subject"] = {"reference": f"Patient/other-{index:06d}"}
    bundle["entry"].append({"fullUrl": f"urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}", "resource": order})
    return bundle
