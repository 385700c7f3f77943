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
  ``context.patientId``; the ``display`` text beside such a reference is removed. Narratives
  and Patients are looked for where requests carry them: the resources of a Bundle's entries, and
  the prefetch values and ``draftOrders`` of a CDS Hooks request (not ``contained`` resources). The pseudonym is
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
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

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


MAX_KEPT_DEPTH = 200  # levels of nesting kept in a stored request (orjson writes at most 254)
TOO_DEEP = "(nested too deeply to keep)"


def _flattened(obj: Any) -> Any:
    """``obj`` with every value below ``MAX_KEPT_DEPTH`` levels replaced by ``TOO_DEEP``, built
    without recursion (the value may be nested 1,000 levels deep). No rule reads so deep, so the
    replay of the stored request gives the same decision."""
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, int]] = [(obj, root, 0, 0)]  # (value, its container, key there, depth)
    while stack:
        value, container, key, depth = stack.pop()
        if isinstance(value, (dict, list)) and depth >= MAX_KEPT_DEPTH:
            container[key] = TOO_DEEP
        elif isinstance(value, dict):
            copy: dict = {}
            container[key] = copy
            stack.extend((v, copy, k, depth + 1) for k, v in value.items())
        elif isinstance(value, list):
            items: list = [None] * len(value)
            container[key] = items
            stack.extend((v, items, i, depth + 1) for i, v in enumerate(value))
        else:
            container[key] = value
    return root[0]


@dataclass(frozen=True)
class Masker:
    """Masks the chosen fields (see the module docstring); returns masked JSON bytes."""

    fields: frozenset[str] = DEFAULT_FIELDS
    key: bytes = field(default_factory=lambda: os.environ.get("NEEDLEPOINT_MASK_KEY", "").encode())

    def pseudonym(self, patient_id: str) -> str:
        """The stable stand-in for a patient id."""
        digest = hmac.new(self.key, patient_id.encode(), hashlib.sha256).hexdigest()
        return f"masked-{digest[:12]}"

    def bundle(self, bundle: Any) -> tuple[bytes, list[str]]:
        """A FHIR Bundle (its JSON bytes, or parsed) masked: (JSON bytes, the masked paths)."""
        obj = orjson.loads(bundle) if isinstance(bundle, (bytes, bytearray, memoryview, str)) else _copy(bundle)
        masked: set[str] = set()
        try:
            ids = self._resources(_top_resources(obj), masked)
        except Exception:  # noqa: BLE001 - a shape the masker does not know: keep nothing rather than leave a name in
            return orjson.dumps({"resourceType": "Bundle", "type": "collection"}), ["the whole bundle (it could not be masked)"]
        try:
            text = orjson.dumps(obj)
        except TypeError:  # nested deeper than orjson writes (it reads up to 1,024 levels, writes 254)
            text = orjson.dumps(_flattened(obj))
            masked.add("values nested too deeply")
        return self._references(text, ids, masked), sorted(masked)

    def cds_hooks_request(self, request: Any) -> tuple[bytes, list[str]]:
        """A CDS Hooks request (bytes or parsed) masked: its Patients, the references to them,
        ``context.patientId``; ``fhirAuthorization`` is always dropped. (JSON bytes, masked paths)."""
        obj = orjson.loads(request) if isinstance(request, (bytes, bytearray, memoryview, str)) else _copy(request)
        if not isinstance(obj, dict):
            raise ValueError("a CDS Hooks request is a JSON object")
        masked: set[str] = set()
        if obj.pop("fhirAuthorization", None) is not None:
            masked.add("fhirAuthorization")
        context = found if isinstance(found := obj.get("context"), dict) else {}
        resources = list(_top_resources(context.get("draftOrders")))
        prefetch = obj.get("prefetch")
        for value in (prefetch.values() if isinstance(prefetch, dict) else ()):
            resources += _top_resources(value)
        ids = self._resources(resources, masked)
        if isinstance(context.get("patientId"), str):
            ids.add(context["patientId"])
            if "id" in self.fields:
                context["patientId"] = self.pseudonym(context["patientId"])
                masked.add("context.patientId")
        return self._references(orjson.dumps(obj), ids, masked), sorted(masked)

    def _resources(self, resources: Iterable[dict[str, Any]], masked: set[str]) -> set[str]:
        """Mask narratives and Patients in place; the original ids of the Patients."""
        ids: set[str] = set()
        for resource in resources:
            rtype = resource.get("resourceType")
            if "narrative" in self.fields and isinstance(resource.get("text"), dict):
                del resource["text"]
                masked.add(f"{rtype}.text")
            if rtype == "Patient":
                if isinstance(resource.get("id"), str):
                    ids.add(resource["id"])
                self._patient(resource, masked)
        return ids

    def _patient(self, resource: dict[str, Any], masked: set[str]) -> None:
        for name in PATIENT_FIELDS:
            if name in self.fields and name in resource:
                del resource[name]
                masked.add(f"Patient.{name}")
        if isinstance(resource.get("extension"), list):
            kept = []
            for ext in resource["extension"]:
                url = ext.get("url") if isinstance(ext, dict) else None
                url = url if isinstance(url, str) else ""  # (a malformed extension is kept as it is)
                field_name = next((f for suffix, f in IDENTIFYING_EXTENSIONS.items() if url.endswith(suffix)), None)
                if field_name is not None and field_name in self.fields:
                    masked.add(f"Patient.extension({url.rsplit('/', 1)[-1]})")
                else:
                    kept.append(ext)
            resource["extension"] = kept
        if "birthDate" in self.fields and isinstance(resource.get("birthDate"), str) and len(resource["birthDate"]) > 4:
            resource["birthDate"] = resource["birthDate"][:4]
            masked.add("Patient.birthDate")
        if "id" in self.fields and isinstance(resource.get("id"), str):
            resource["id"] = self.pseudonym(resource["id"])
            masked.add("Patient.id")

    def _references(self, data: bytes, ids: set[str], masked: set[str]) -> bytes:
        """Replace the patient's ids in references (``Patient/<id>``, ``.../Patient/<id>``,
        ``urn:uuid:<id>``, as whole JSON strings) and drop the ``display`` beside such a reference.
        Done on the serialized JSON with C string and regex operations: a Synthea bundle has tens
        of thousands of JSON nodes, too many to walk in Python on every decision."""
        if "id" not in self.fields or not ids:
            return data
        pseudonyms = []
        for pid in ids:
            new = self.pseudonym(pid).encode()
            raw = orjson.dumps(pid)[1:-1]  # the id as it appears inside a JSON string
            pseudonyms.append(re.escape(new))
            for old_ref, new_ref in ((b'"Patient/' + raw + b'"', b'"Patient/' + new + b'"'),
                                     (b'/Patient/' + raw + b'"', b'/Patient/' + new + b'"'),
                                     (b'"urn:uuid:' + raw + b'"', b'"urn:uuid:' + new + b'"')):
                if old_ref in data:
                    data = data.replace(old_ref, new_ref)
                    masked.add("Reference(Patient)")
        display = re.compile(
            rb'("reference":"[^"]*(?:'
            + b"|".join(pseudonyms)
            + rb')")((?:,"[A-Za-z]+":(?:"(?:[^"\\]|\\.)*"|\{[^{}]*\}))*?),"display":"(?:[^"\\]|\\.)*"'
        )
        data, count = display.subn(rb"\1\2", data)
        if count:
            masked.add("Reference(Patient).display")
        return data


def _copy(obj: Any) -> Any:
    """A deep copy of parsed JSON (the caller's object is never changed)."""
    return orjson.loads(orjson.dumps(obj))


def _top_resources(node: Any) -> Iterable[dict[str, Any]]:
    """The resources of a Bundle's entries, or the resource itself."""
    if not isinstance(node, dict):
        return []
    if node.get("resourceType") == "Bundle":
        return [e["resource"] for e in node.get("entry") or [] if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
    return [node] if "resourceType" in node else []
