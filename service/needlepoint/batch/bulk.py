"""FHIR Bulk Data exports: NDJSON files of resources, grouped into one Bundle per patient.

An export is a folder of ``*.ndjson`` files at its top level (``Patient.ndjson``,
``Condition.ndjson``, ``Observation.ndjson``, ``Observation.2.ndjson``…), one resource a line.
A resource belongs to the patient its ``subject`` or ``patient`` reference names
(``Patient/123``, an absolute URL ending in ``Patient/123``, or ``urn:uuid:123``); a Patient
resource to itself. Resources outside every patient compartment (Organization, Practitioner,
Medication…) are ignored, so a reference from a patient's resource to one of them is unresolved
in the patient's Bundle, which the mapper reports as a data issue rather than guessing.

Each patient's resources become a ``collection`` Bundle in a fixed order, by file name then line
number, whichever engine grouped them: the decision depends only on the export's content.

Lines are located as ``FILE:LINE`` (1-based, counting blank lines). A line that is not JSON, not
a resource, or a Patient without an id, is a problem. If the patient it is about can still be
read from it (a ``"reference": "Patient/…"`` in the raw text), that patient's referrals become
errors naming the line: a decision on a record with a resource missing would be a decision on
the wrong record. Otherwise the line is an error result of its own (id ``FILE:LINE``).

These functions are shared by the local engine (which spills lines into hash buckets on disk,
:mod:`needlepoint.batch.local`) and the Spark engine (which groups with a shuffle), so that both
read every line exactly alike.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterable
from typing import Any, BinaryIO, NamedTuple

import orjson

NDJSON_SUFFIXES = (".ndjson", ".jsonl")

_PATIENT_REF = re.compile(rb'"reference"\s*:\s*"(?:[^"]*/)?Patient/([A-Za-z0-9\-.]{1,64})"')


class Line(NamedTuple):
    """One line of an export: where it is, its raw bytes (without the line end), and the
    problem with it, if any."""

    file: str
    line: int
    raw: bytes
    problem: str | None = None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def patient_of_reference(reference: object) -> str | None:
    """The patient id a reference string names, or None when it does not name a Patient."""
    if type(reference) is not str or not reference:
        return None
    if reference.startswith("urn:uuid:"):
        return reference[9:] or None
    parts = reference.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Patient" and parts[-1]:
        return parts[-1]
    return None


def read_line(file: str, number: int, raw: bytes) -> tuple[str | None, Line] | None:
    """Read one line: ``(patient id or None, Line)``, or None for a blank line or a resource
    outside every patient compartment. A Line with a problem and no patient is an orphan
    problem; with a patient, it spoils that patient's record."""
    raw = raw.rstrip(b"\r\n")
    if not raw.strip():
        return None
    try:
        resource = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return _salvage(file, number, raw, f"not valid JSON: {exc}")
    if type(resource) is not dict or type(resource.get("resourceType")) is not str:
        return _salvage(file, number, raw, "not a FHIR resource (an object with a resourceType)")
    if resource["resourceType"] == "Patient":
        pid = resource.get("id")
        if type(pid) is not str or not pid:
            return None, Line(file, number, b"", f"{file}:{number}: a Patient without an id")
        return pid, Line(file, number, raw)
    for key in ("subject", "patient"):
        ref = resource.get(key)
        if type(ref) is dict:
            pid = patient_of_reference(ref.get("reference"))
            if pid is not None:
                return pid, Line(file, number, raw)
    return None


def _salvage(file: str, number: int, raw: bytes, why: str) -> tuple[str | None, Line]:
    match = _PATIENT_REF.search(raw)
    return (match.group(1).decode() if match else None), Line(file, number, b"", f"{file}:{number}: {why}")


def bundle_of(lines: Iterable[Line]) -> tuple[dict, list[str]]:
    """A patient's lines (none with a problem) as a collection Bundle, in file then line order,
    and the location of each entry (for turning ``Bundle.entry[N]`` back into ``FILE:LINE``)."""
    ordered = sorted(lines, key=lambda ln: (ln.file, ln.line))
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": orjson.loads(ln.raw)} for ln in ordered]}
    return bundle, [ln.where for ln in ordered]


_ENTRY = re.compile(r"Bundle\.entry\[(\d+)\](?:\.resource)?")


def locate(message: str, wheres: list[str]) -> str:
    """A mapper message about the grouped Bundle with each ``Bundle.entry[N]`` replaced by the
    export line it came from."""

    def swap(match: re.Match[str]) -> str:
        k = int(match.group(1))
        return wheres[k] if k < len(wheres) else match.group(0)

    return _ENTRY.sub(swap, message)


def bucket_of(patient_id: str, buckets: int) -> int:
    """The bucket (0 … buckets-1) a patient's lines go to: a hash that is the same in every
    process and on every machine (unlike Python's ``hash`` of a str)."""
    return zlib.crc32(patient_id.encode("utf-8", "surrogatepass")) % buckets


def write_export(bundles: Iterable[dict], folder: str | os.PathLike[str]) -> dict[str, int]:
    """Write Bundles as a Bulk Data export in ``folder``: one ``<Type>.ndjson`` per resource
    type, resources in Bundle order, ``urn:uuid:`` references rewritten to ``Type/id`` (as a
    server's export has them). For tests and benchmarks built from Synthea bundles. Returns the
    number of resources written per type."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handles: dict[str, BinaryIO] = {}
    counts: dict[str, int] = {}
    try:
        for bundle in bundles:
            entries = [e for e in bundle.get("entry", []) if isinstance(e, dict) and isinstance(e.get("resource"), dict)]
            names = {
                e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource'].get('id')}"
                for e in entries
                if isinstance(e.get("fullUrl"), str)
            }
            for entry in entries:
                resource = _rewrite(entry["resource"], names)
                rtype = resource["resourceType"]
                if rtype not in handles:
                    handles[rtype] = (folder / f"{rtype}.ndjson").open("ab")
                handles[rtype].write(orjson.dumps(resource) + b"\n")
                counts[rtype] = counts.get(rtype, 0) + 1
    finally:
        for handle in handles.values():
            handle.close()
    return counts


def _rewrite(value: Any, names: dict[str, str]) -> Any:
    """A copy of a JSON value with every ``reference`` that names a Bundle fullUrl rewritten."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k] = names.get(v, v) if k == "reference" and isinstance(v, str) else _rewrite(v, names)
        return out
    if isinstance(value, list):
        return [_rewrite(v, names) for v in value]
    return value
