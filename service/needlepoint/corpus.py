"""Reading folders of cases: which files are inputs, what a parsed JSON input is, and how the
command line's order fields fill an order the input lacks.

Shared by ``needlepoint rules diff`` (folders of Bundles, CDS Hooks requests, exported requests)
and ``needlepoint batch`` (folders of Bundles, Bulk Data exports, referral lists).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from needlepoint.core.record import InjectionOrder, PatientRecord

# --target/--side/--intent as given on the command line (each may be None).
OrderFields = tuple[str | None, str | None, str | None]


def input_files(root: Path) -> Iterator[tuple[Path, str]]:
    """Every file under ``root`` (recursively, in name order), or ``root`` itself when it is a
    file, with its path relative to ``root`` in POSIX form. Hidden files and anything under a
    hidden folder are left out."""
    if root.is_file():
        yield root, root.name
        return
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        yield path, rel.as_posix()


def request_kind(obj: Any) -> str | None:
    """What a parsed JSON value is: ``bundle`` (a FHIR Bundle), ``cds-hooks`` (a CDS Hooks
    request), ``request`` (an exported EvaluateRequest) or None."""
    if type(obj) is not dict:
        return None
    if obj.get("resourceType") == "Bundle":
        return "bundle"
    if "hook" in obj and "context" in obj:
        return "cds-hooks"
    if "fhirBundle" in obj or "context" in obj:
        return "request"
    return None


def with_order_defaults(record: PatientRecord, defaults: OrderFields | None, source: str = "--target/--side/--intent") -> PatientRecord:
    """The record with the fields of its order that are missing taken from ``defaults``; a
    record without an order gets one made of them (``source`` says where it came from). A field
    the record has is kept."""
    if not defaults or not any(defaults):
        return record
    target, side, intent = defaults
    base = record.order
    if base is None:
        return record.with_order(InjectionOrder(target=target, side=side, intent=intent, source=source))
    filled = dataclasses.replace(base, target=base.target or target, side=base.side or side, intent=base.intent or intent)
    return record if filled == base else record.with_order(filled)
