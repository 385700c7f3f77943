"""Masking of direct identifiers in the replay input a decision log row keeps.

The decision log keeps each request so that ``rules diff --cases`` can replay it; it does not need
to know who the patient is. Before a request is stored, the fields chosen here are removed from
every ``Patient`` resource it carries (in a FHIR Bundle, in a CDS Hooks request's prefetch and
``draftOrders``), and the patient's id is replaced by a pseudonym wherever it is referenced.

Masked by default (:data:`DEFAULT_FIELDS`), none of which the rules read:

* ``name``, ``identifier`` (MRN, SSN...), ``telecom``, ``address``, ``photo``, ``contact`` of the
  Patient, with the extensions that are a name or an address (``patient-mothersMaidenName``,
  ``patient-birthPlace``);
* ``narrative``: the ``text`` (generated HTML) of every resource, which repeats names;
* ``id``: the Patient's id becomes ``masked-<12 hex>``, an HMAC of it, in the Patient, in every
  reference to it (``Patient/<id>``, ``urn:uuid:<id>``, ``fullUrl``), in CDS Hooks
  ``context.patientId``; the ``display`` text beside such a reference is removed. The pseudonym is
  stable, so one patient's decisions stay linked; it is keyed by ``$NEEDLEPOINT_MASK_KEY`` when set
  (without the key, it is a plain hash: a pseudonym, not anonymity).

Available, not default: ``birthDate``, cut to the year. Age enters the rules (its range from a
partial date is honoured, and a range that straddles a threshold becomes missing data), so a
replay of a request masked this way can give a different decision; it is for sites whose policy
demands it. A CDS Hooks request's ``fhirAuthorization`` (an access token) is always removed.

With the default fields the stored input replays to the same decision as the original (tested in
``tests/test_decisionlog.py``), because nothing the rules or the FHIR mapper read is touched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PATIENT_FIELDS = ("name", "identifier", "telecom", "address", "photo", "contact")
# Patient extensions that are names or addresses, masked with the field they belong to.
IDENTIFYING_EXTENSIONS = {"patient-mothersMaidenName": "name", "patient-birthPlace": "address"}
DEFAULT_FIELDS = frozenset({*PATIENT_FIELDS, "narrative", "id"})
OPTIONAL_FIELDS = frozenset({"birthDate"})
ALL_FIELDS = DEFAULT_FIELDS | OPTIONAL_FIELDS


def parse_fields(text: str | None) -> frozenset[str]:
    """``--mask`` as fields: ``default``, ``none``, or a comma list of field names, where
    ``default`` may be combined with others (``default,birthDate``). ValueError names a bad one."""
    if text is None or text.strip() == "" or text.strip() == "default":
        return DEFAULT_FIELDS
    chosen: set[str] = set()
    for name in (part.strip() for part in text.split(",")):
        if name == "none":
            continue
        if name == "default":
            chosen |= DEFAULT_FIELDS
        elif name in ALL_FIELDS:
            chosen.add(name)
        else:
            raise ValueError(f"unknown field to mask {name!r}; known: default, none, {', '.join(sorted(ALL_FIELDS))}")
    return frozenset(chosen)


@dataclass(frozen=True)
class Masker:
    """Masks the chosen fields (see the module docstring) in parsed request JSON, in place."""

    fields: frozenset[str] = DEFAULT_FIELDS
    key: bytes = field(default_factory=lambda: os.environ.get("NEEDLEPOINT_MASK_KEY", "").encode())

    def pseudonym(self, patient_id: str) -> str:
        """The stable stand-in for a patient id."""
        digest = hmac.new(self.key, patient_id.encode(), hashlib.sha256).hexdigest()
        return f"masked-{digest[:12]}"

    def bundle(self, bundle: Any) -> list[str]:
        """Mask a FHIR Bundle (a dict) in place; the masked paths, sorted."""
        masked: set[str] = set()
        patient_ids = set()
        for resource in _resources(bundle):
            if resource.get("resourceType") == "Patient" and isinstance(resource.get("id"), str):
                patient_ids.add(resource["id"])
        self._mask(bundle, patient_ids, masked, "Bundle")
        return sorted(masked)

    def cds_hooks_request(self, request: dict[str, Any]) -> list[str]:
        """Mask a CDS Hooks request (a dict) in place: its Patients, the references to them,
        ``context.patientId``; ``fhirAuthorization`` is always dropped. The masked paths."""
        masked: set[str] = set()
        if request.pop("fhirAuthorization", None) is not None:
            masked.add("fhirAuthorization")
        context = request.get("context") if isinstance(request.get("context"), dict) else {}
        patient_ids = {r["id"] for r in _resources(request) if r.get("resourceType") == "Patient" and isinstance(r.get("id"), str)}
        if isinstance(context.get("patientId"), str):
            patient_ids.add(context["patientId"])
            if "id" in self.fields:
                context["patientId"] = self.pseudonym(context["patientId"])
                masked.add("context.patientId")
        for key in ("draftOrders",):
            if key in context:
                self._mask(context[key], patient_ids, masked, f"context.{key}")
        prefetch = request.get("prefetch")
        if isinstance(prefetch, dict):
            for key, value in prefetch.items():
                self._mask(value, patient_ids, masked, "prefetch")
        return sorted(masked)

    def _mask(self, node: Any, patient_ids: Iterable[str], masked: set[str], where: str) -> None:
        """Walk parsed JSON once, masking Patients, narratives and references to the patient."""
        ids = set(patient_ids)
        stack = [node]
        while stack:
            obj = stack.pop()
            if isinstance(obj, list):
                stack.extend(obj)
                continue
            if not isinstance(obj, dict):
                continue
            rtype = obj.get("resourceType")
            if rtype is not None:
                self._resource(obj, rtype, masked)
            if "id" in self.fields:
                for key in ("reference", "fullUrl"):
                    value = obj.get(key)
                    if isinstance(value, str) and (new := self._reference(value, ids)) is not None:
                        obj[key] = new
                        masked.add(f"{where}.{key}" if key == "fullUrl" else "Reference(Patient)")
                        if key == "reference" and "display" in obj:
                            del obj["display"]
            stack.extend(v for v in obj.values() if isinstance(v, (dict, list)))

    def _resource(self, resource: dict[str, Any], rtype: str, masked: set[str]) -> None:
        if "narrative" in self.fields and isinstance(resource.get("text"), dict):
            del resource["text"]
            masked.add(f"{rtype}.text")
        if rtype != "Patient":
            return
        for name in PATIENT_FIELDS:
            if name in self.fields and name in resource:
                del resource[name]
                masked.add(f"Patient.{name}")
        if isinstance(resource.get("extension"), list):
            kept = []
            for ext in resource["extension"]:
                url = ext.get("url", "") if isinstance(ext, dict) else ""
                field_name = next((f for suffix, f in IDENTIFYING_EXTENSIONS.items() if url.endswith(suffix)), None)
                if field_name is not None and field_name in self.fields:
                    masked.add(f"Patient.extension({url.rsplit('/', 1)[-1]})")
                else:
                    kept.append(ext)
            resource["extension"] = kept
        if "birthDate" in self.fields and isinstance(resource.get("birthDate"), str) and len(resource["birthDate"]) > 4:
            resource["birthDate"] = resource["birthDate"][:4]
            masked.add("Patient.birthDate")
        if "id" in self.fields and isinstance(resource.get("id"), str) and not resource["id"].startswith("masked-"):
            resource["id"] = self.pseudonym(resource["id"])
            masked.add("Patient.id")

    def _reference(self, value: str, ids: set[str]) -> str | None:
        """The reference with the patient's id replaced, or None if it names no masked patient."""
        for pid in ids:
            for prefix in ("urn:uuid:", "Patient/"):
                if value == prefix + pid:
                    return prefix + self.pseudonym(pid)
            if value.endswith("/Patient/" + pid):
                return value[: -len(pid)] + self.pseudonym(pid)
        return None


def _resources(node: Any) -> Iterable[dict[str, Any]]:
    """Every object with a ``resourceType`` anywhere in parsed JSON."""
    stack = [node]
    while stack:
        obj = stack.pop()
        if isinstance(obj, list):
            stack.extend(obj)
        elif isinstance(obj, dict):
            if "resourceType" in obj:
                yield obj
            stack.extend(v for v in obj.values() if isinstance(v, (dict, list)))
