"""Referrals: what a batch run evaluates, and the inputs a coordinator can produce.

A :class:`Referral` is one question to answer: this patient (a Bundle file, or a patient of a
FHIR Bulk Data export), this order (target, side, intent), on this planned date, as of this
instant. Inputs (see :func:`plan`):

* a folder of FHIR Bundles (``*.json``, searched recursively; hidden files ignored): one
  referral per file, id = its path relative to the folder;
* a FHIR Bulk Data export (a folder with ``*.ndjson`` files, one resource a line, e.g.
  ``Patient.ndjson``, ``Condition.ndjson``): one referral per patient, id = the Patient id
  (see :mod:`needlepoint.batch.bulk` for the grouping);
* a CSV of referrals (``*.csv``, a header row then one referral a row), columns by header name
  (case and spaces ignored; ``-`` and ``_`` alike):

  ``referral_id`` (optional; default ``<file>:<row>``), ``patient_id`` (a patient of the Bulk
  Data export given by ``--export``, default the CSV's folder) or ``bundle`` (a Bundle file,
  relative to the CSV's folder), ``target``, ``side``, ``intent`` (override the record's order),
  ``planned_date`` (ISO date or date-time), ``as_of`` (optional, overrides ``--as-of``).

Problems are values: a row that cannot be read (no patient nor bundle, a bad date, an unknown
target, a duplicate referral id) becomes a referral with ``problem`` set, evaluated as an error
result naming the file and row; it never stops the run.

**Dates.** A planned *date* without a time means the end of that day in UTC (23:59:59Z): a
result must still be current at the last moment of the planned day. A date-time is used as
written (UTC when it has no zone).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from dataclasses import dataclass, field
from pathlib import Path

from needlepoint.core.record import INTENTS, SIDES, TARGETS
from needlepoint.corpus import OrderFields, input_files

NO_ORDER: OrderFields = (None, None, None)


class BatchError(Exception):
    """The batch cannot run at all (no such input, an unreadable CSV header, a bad option)."""


@dataclass(frozen=True, slots=True)
class Referral:
    """One referral to evaluate. Exactly one of ``bundle_path`` and ``patient_id`` says where the
    record is, unless ``problem`` says why there is none. ``order``: the referral's own target,
    side and intent (each may be None), which override the record's order; ``planned`` and
    ``as_of``: its own instants, else the run's."""

    id: str
    where: str  # for people: the file, or file:row, the referral came from
    bundle_path: str | None = None
    patient_id: str | None = None
    order: OrderFields = NO_ORDER
    planned: dt.datetime | None = None
    as_of: dt.datetime | None = None
    problem: str | None = None


@dataclass
class Plan:
    """What a run evaluates: referrals that read a Bundle file (or are already errors), and a
    Bulk Data export with, for a CSV, the referrals of each patient (None: every patient of the
    export, each with the run's defaults)."""

    referrals: list[Referral] = field(default_factory=list)
    export: Path | None = None
    by_patient: dict[str, list[Referral]] | None = None
    kind: str = ""  # "bundles" | "bulk" | "csv"


def parse_when(text: str, what: str, *, end_of_day: bool) -> dt.datetime:
    """An ISO 8601 date or date-time as an aware UTC-based datetime. A bare date is the start of
    the day, or with ``end_of_day`` its last second. Raises ValueError naming ``what``."""
    text = text.strip()
    try:
        if len(text) == 10:
            day = dt.date.fromisoformat(text)
            clock = dt.time(23, 59, 59) if end_of_day else dt.time(0, 0)
            return dt.datetime.combine(day, clock, tzinfo=dt.timezone.utc)
        instant = dt.datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an ISO 8601 date or date-time (e.g. 2025-06-20)") from None
    return instant if instant.tzinfo else instant.replace(tzinfo=dt.timezone.utc)


def is_bulk_export(path: Path) -> bool:
    """Whether ``path`` is a folder with NDJSON files at its top level (a Bulk Data export)."""
    return path.is_dir() and any(p.is_file() and p.suffix.lower() in (".ndjson", ".jsonl") for p in path.iterdir())


def plan(input_path: Path, *, export: Path | None = None) -> Plan:
    """The referrals of an input: a CSV file, a Bulk Data export folder, or a folder (or one
    file) of Bundles. ``export``: where a CSV's patient ids are looked up (default: the CSV's
    folder). Raises BatchError when the input cannot be read at all."""
    if not input_path.exists():
        raise BatchError(f"{input_path}: no such file or directory")
    if input_path.is_file() and input_path.suffix.lower() == ".csv":
        return _plan_csv(input_path, export)
    if is_bulk_export(input_path):
        return Plan(export=input_path, by_patient=None, kind="bulk")
    referrals = [
        Referral(id=rel, where=rel, bundle_path=str(path))
        for path, rel in input_files(input_path)
        if path.suffix.lower() == ".json"
    ]
    return Plan(referrals=referrals, kind="bundles")


_COLUMNS = {
    "referralid": "referral_id", "referral": "referral_id", "id": "referral_id",
    "patientid": "patient_id", "patient": "patient_id",
    "bundle": "bundle", "bundlefile": "bundle", "file": "bundle",
    "target": "target", "side": "side", "intent": "intent",
    "planneddate": "planned_date", "planned": "planned_date", "date": "planned_date",
    "asof": "as_of",
}  # fmt: skip


def _column(name: str) -> str | None:
    return _COLUMNS.get("".join(ch for ch in name.lower() if ch.isalnum()))


def _plan_csv(path: Path, export: Path | None) -> Plan:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchError(f"{path}: cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise BatchError(
            f"{path}: empty; a header row is needed (patient_id or bundle, target, side, intent, planned_date)"
        ) from None
    except csv.Error as exc:
        raise BatchError(f"{path}: the header row cannot be read: {exc}") from None
    columns = [_column(h) for h in header]
    if "patient_id" not in columns and "bundle" not in columns:
        raise BatchError(f"{path}: the header names neither a patient_id nor a bundle column (found: {', '.join(header)})")
    base = path.parent
    export = export if export is not None else base
    name = path.name
    result = Plan(kind="csv")
    seen: set[str] = set()
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            line = reader.line_num
            result.referrals.append(
                Referral(f"{name}:{line}", f"{name}:{line}", problem=f"{name} row {line}: cannot be read: {exc}")
            )
            continue
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        values = {col: cell.strip() for col, cell in zip(columns, row, strict=False) if col}  # a ragged row is reported below
        where = f"{name}:{line}"
        referral = _referral(values, where, name, line, base, seen, len(row) != len(header))
        if referral.patient_id is not None and referral.problem is None:
            if result.by_patient is None:
                result.by_patient = {}
            result.by_patient.setdefault(referral.patient_id, []).append(referral)
        else:
            result.referrals.append(referral)
    if result.by_patient is not None:
        if not is_bulk_export(export):
            for referrals in result.by_patient.values():
                result.referrals += [
                    _with_problem(r, f"{r.where}: patient {r.patient_id}: {export} is not a Bulk Data export "
                                     "(no .ndjson files); give it with --export")
                    for r in referrals
                ]
            result.by_patient = None
        else:
            result.export = export
    return result


def _with_problem(referral: Referral, problem: str) -> Referral:
    return Referral(referral.id, referral.where, patient_id=referral.patient_id, problem=problem)


def _referral(values: dict[str, str], where: str, name: str, line: int, base: Path, seen: set[str], ragged: bool) -> Referral:
    """One CSV row as a referral, or as a referral carrying the row's first problem."""
    rid = values.get("referral_id") or where
    patient, bundle = values.get("patient_id") or None, values.get("bundle") or None
    problems: list[str] = []
    if ragged:
        problems.append("the row has a different number of cells than the header")
    if rid in seen:
        problems.append(f"referral id {rid!r} is used by an earlier row")
        rid = where
    seen.add(rid)
    if bool(patient) == bool(bundle):
        problems.append("give either a patient_id or a bundle, not " + ("both" if patient else "neither"))
    order: dict[str, str | None] = {}
    for key, allowed in (("target", TARGETS), ("side", SIDES), ("intent", INTENTS)):
        value = values.get(key) or None
        if value is not None and value not in allowed:
            problems.append(f"{key} {value!r} is not one of {', '.join(allowed)}")
            value = None
        order[key] = value
    instants: dict[str, dt.datetime | None] = {}
    for key, end_of_day in (("planned_date", True), ("as_of", False)):
        instants[key] = None
        if values.get(key):
            try:
                instants[key] = parse_when(values[key], key, end_of_day=end_of_day)
            except ValueError as exc:
                problems.append(str(exc))
    bundle_path = str(base / bundle) if bundle else None
    if problems:
        return Referral(rid, where, patient_id=patient, problem=f"{name} row {line}: " + "; ".join(problems))
    return Referral(rid, where, bundle_path=bundle_path, patient_id=patient,
                    order=(order["target"], order["side"], order["intent"]),
                    planned=instants["planned_date"], as_of=instants["as_of"])
