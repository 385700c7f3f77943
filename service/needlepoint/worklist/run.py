"""Running a worklist: the batch engine on every core, with progress reported as it goes.

The evaluation is the batch engine's own (:func:`needlepoint.batch.local.plan_chunks` and
:func:`~needlepoint.batch.local.evaluate_chunks`: one
:class:`~needlepoint.batch.evaluate.ReferralEvaluator` per process, on a pool for a large input);
a worker that dies costs its chunk, whose referrals become error rows exactly as in
``needlepoint batch``. What differs from
``batch.local.run`` is only where the rows go: they are kept in memory, sorted by referral id
(a worklist is a report for people, hundreds to a few thousand referrals), and every finished
chunk calls ``on_progress(done, total, rows, errors)`` so that a terminal bar or a web page can
show how far the run is.

Patient names are not part of a batch row (decisions carry no direct identifiers); the worklist
shows them for people to find a referral: from a CSV's ``patient_name`` (or ``name``) column,
else from the Patient resource of the referral's Bundle file or of the export's Patient files.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import orjson

from needlepoint.batch import local, output
from needlepoint.batch.evaluate import Options
from needlepoint.batch.referrals import Plan
from needlepoint.worklist.rows import WorklistRow, worklist_row
from needlepoint.workpool import ProgressBar

Progress = Callable[[int, int, int, int], None]  # done, total (units of work), rows, errors


def evaluate(
    plan: Plan, options: Options, *, jobs: int | None = None, on_progress: Progress | None = None, in_process: bool | None = None
) -> list[dict]:
    """The batch result rows of every referral of ``plan``, sorted by referral id. ``jobs``:
    worker processes (default one per CPU); ``in_process``: evaluate here rather than in a pool
    (default: when there is one job, one chunk or a small input, as the batch engine does)."""
    jobs = max(1, jobs or os.cpu_count() or 1)
    scratch = Path(tempfile.mkdtemp(prefix="needlepoint-worklist-"))
    rows: list[dict] = []
    try:
        chunks = local.plan_chunks(plan, scratch, jobs)
        total = sum(c.size for c in chunks)
        done = errors = 0

        def collect(result: tuple[list[dict], int]) -> None:
            nonlocal done, errors
            chunk_rows, size = result
            rows.extend(chunk_rows)
            done += size
            errors += sum(1 for r in chunk_rows if r["status"] == "error")
            if on_progress is not None:
                on_progress(done, total, len(rows), errors)

        if on_progress is not None:
            on_progress(0, total, 0, 0)
        local.evaluate_chunks(chunks, options, jobs, collect, in_process=in_process)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows.sort(key=output.key)
    return rows


def worklist(plan: Plan, options: Options, *, csv_path: Path | None = None, jobs: int | None = None,
             on_progress: Progress | None = None, in_process: bool | None = None) -> list[WorklistRow]:  # fmt: skip
    """The worklist rows of ``plan`` (see :func:`evaluate`), with patient names where found."""
    rows = evaluate(plan, options, jobs=jobs, on_progress=on_progress, in_process=in_process)
    names = patient_names(plan, csv_path)
    return [worklist_row(r, names.get(r["referralId"]) or names.get(f"patient:{r.get('patientId')}")) for r in rows]


def terminal_progress(label: str = "worklist") -> tuple[Progress, Callable[[], None]]:
    """A rich progress bar on standard error as an ``on_progress`` callback, and its stop function."""
    state: dict[str, ProgressBar] = {}

    def update(done: int, total: int, rows: int, errors: int) -> None:
        bar = state.get("bar")
        if bar is None:
            bar = state["bar"] = ProgressBar(
                label, total, "{task.fields[rows]:,} referrals, {task.fields[errors]:,} cannot be evaluated", rows=0, errors=0
            )
            bar.start()
        bar.progress.update(bar.task, completed=done, rows=rows, errors=errors)

    def stop() -> None:
        if "bar" in state:
            state.pop("bar").stop()

    return update, stop


# -- patient names (display only) ---------------------------------------------------------------------


def _name_of(patient: dict) -> str | None:
    """A Patient resource's first name as ``Given Family`` (Synthea's digits in names kept as written)."""
    names = patient.get("name")
    if type(names) is not list:
        return None
    for name in names:
        if type(name) is not dict:
            continue
        if type(name.get("text")) is str and name["text"].strip():
            return name["text"].strip()
        given = [g for g in name.get("given") or () if type(g) is str]
        family = name.get("family")
        if type(family) is not str:
            family = ""
        text = " ".join([*given, family]).strip()
        if text:
            return text
    return None


def _bundle_patient_name(path: str) -> str | None:
    try:
        bundle = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    for entry in bundle.get("entry") or () if type(bundle) is dict else ():
        resource = entry.get("resource") if type(entry) is dict else None
        if type(resource) is dict and resource.get("resourceType") == "Patient":
            return _name_of(resource)
    return None


def patient_names(plan: Plan, csv_path: Path | None) -> dict[str, str]:
    """Names by referral id (and ``patient:<id>`` for export patients), for display only."""
    names: dict[str, str] = {}
    if csv_path is not None:
        names.update(_csv_names(csv_path))
    for referral in plan.referrals:
        if referral.id not in names and referral.bundle_path and referral.problem is None:
            name = _bundle_patient_name(referral.bundle_path)
            if name:
                names[referral.id] = name
    if plan.export is not None and Path(str(plan.export)).is_dir():
        for path in sorted(Path(str(plan.export)).glob("Patient*.ndjson")):
            with path.open("rb") as fh:
                for raw in fh:
                    try:
                        patient = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        continue
                    if type(patient) is dict and type(patient.get("id")) is str and (name := _name_of(patient)):
                        names.setdefault(f"patient:{patient['id']}", name)
    return names


def _csv_names(path: Path) -> dict[str, str]:
    """The CSV's ``patient_name``/``name`` column by referral id (the batch reader's ids: the
    ``referral_id`` column, else ``<file>:<row>``)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return {}
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = ["".join(ch for ch in h.lower() if ch.isalnum()) for h in next(reader)]
    except (StopIteration, csv.Error):
        return {}
    name_col = next((i for i, h in enumerate(header) if h in ("patientname", "name")), None)
    id_col = next((i for i, h in enumerate(header) if h in ("referralid", "referral", "id")), None)
    if name_col is None:
        return {}
    names: dict[str, str] = {}
    seen: set[str] = set()
    try:
        for row in reader:
            rid = row[id_col].strip() if id_col is not None and len(row) > id_col and row[id_col].strip() else ""
            if not rid or rid in seen:  # no id, or a repeated one: the batch reader names it by file and row
                rid = f"{path.name}:{reader.line_num}"
            seen.add(rid)
            if len(row) > name_col and row[name_col].strip():
                names[rid] = row[name_col].strip()
    except csv.Error:
        pass
    return names
