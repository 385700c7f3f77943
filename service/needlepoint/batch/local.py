"""The local engine: every core of this machine, through :mod:`needlepoint.workpool`.

Work comes in chunks of about equal size, several per worker process:

* referrals that read a Bundle file (a folder of Bundles, a CSV's ``bundle`` rows, and rows that
  are already errors), in runs of about ``CHUNK_BYTES`` of Bundles;
* for a Bulk Data export, *buckets* of patients. The parent reads the export once, line by line,
  and appends each line (with its file and line number) to the bucket file of its patient
  (``crc32(patient id) mod B``) in a temporary folder; a worker then reads one bucket, groups its
  lines by patient, and evaluates each patient. Lines that belong to no patient are dropped
  (resources outside every patient compartment) or, when they cannot be read, become error rows.

**Memory.** The parent holds one line at a time; a worker holds one bucket, about
``BUCKET_BYTES`` of the export (B = max(4 × workers, export size / ``BUCKET_BYTES``)), plus one
patient's record. The temporary folder needs about the export's size on disk. Results are kept
sorted on disk: each chunk's rows come back sorted and are written to a run file, and the runs
are merged (k-way, one line per run in memory) into OUT at the end.

Each worker builds one :class:`~needlepoint.batch.evaluate.ReferralEvaluator` when it starts and
reuses it. A worker that dies costs only its chunk in flight: its referrals become error rows
(for a bucket, an error row for each patient it held, saying the bucket was lost), and the
run goes on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from needlepoint.batch import bulk, output
from needlepoint.batch.evaluate import Options, ReferralEvaluator, error_row
from needlepoint.batch.referrals import Plan, Referral
from needlepoint.workpool import ProgressBar, can_spawn, run_pool

CHUNK_BYTES = 4 * 1024 * 1024
BUCKET_BYTES = 32 * 1024 * 1024
IN_PROCESS_BYTES = 256 * 1024  # less input than this is evaluated in this process
PROGRESS_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Bucket:
    """One bucket file of a Bulk Data export: its index of ``count``, and the CSV's referrals
    for the patients hashed to it (None: every patient of the export)."""

    path: str
    index: int
    count: int
    size: int
    referrals: dict[str, list[Referral]] | None


@dataclass
class Chunk:
    """A unit of work: Bundle referrals, or one bucket."""

    referrals: list[Referral] = field(default_factory=list)
    bucket: Bucket | None = None
    size: int = 0


class Worker:
    """What runs in each worker process: one ReferralEvaluator, reused for every chunk."""

    def __init__(self, options: Options):
        self.evaluator = ReferralEvaluator(options)

    def run(self, chunk: Chunk) -> tuple[list[dict], int]:
        """The chunk's rows (sorted) and its size, for the progress bar."""
        rows = [self.evaluator.bundle_row(r) for r in chunk.referrals]
        if chunk.bucket is not None:
            rows += self._bucket(chunk.bucket)
        rows.sort(key=output.key)
        return rows, chunk.size

    def _bucket(self, bucket: Bucket) -> list[dict]:
        groups: dict[str, list[bulk.Line]] = {}
        orphans: list[bulk.Line] = []
        with open(bucket.path, "rb") as fh:
            for raw in fh:
                head, _, body = raw.partition(b"\t")
                pid, file, number, problem = orjson.loads(head)
                item = bulk.Line(file, number, body.rstrip(b"\n"), problem)
                if pid is None:
                    orphans.append(item)
                else:
                    groups.setdefault(pid, []).append(item)
        rows = [self.evaluator.error_row(Referral(o.where, o.where), o.problem or "") for o in orphans]
        wanted = bucket.referrals
        pids = sorted(groups.keys() | (wanted.keys() if wanted is not None else set()))
        for pid in pids:
            rows += self.evaluator.patient_rows(pid, groups.get(pid, []), wanted.get(pid, []) if wanted is not None else None)
        return rows


def make_worker(options: Options) -> Worker:
    """The factory the process pool calls once in each worker."""
    return Worker(options)


@dataclass
class Outcome:
    """What the run did: rows written, by status, and how long it took."""

    rows: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    processes: int = 1


def spill(export: Path, referrals: dict[str, list[Referral]] | None, folder: Path, jobs: int) -> list[Bucket]:
    """Read the export once and write each line to its patient's bucket file in ``folder``;
    lines that cannot be tied to a patient go to bucket 0 as orphans."""
    files = sorted(p for p in export.iterdir() if p.is_file() and p.suffix.lower() in bulk.NDJSON_SUFFIXES)
    total = sum(p.stat().st_size for p in files)
    count = max(jobs * 4, -(-total // BUCKET_BYTES), 1)
    sizes = [0] * count
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(open(folder / f"bucket-{i:05d}", "wb")) for i in range(count)]
        for path in files:
            with path.open("rb") as fh:
                for number, raw in enumerate(fh, start=1):
                    found = bulk.read_line(path.name, number, raw)
                    if found is None:
                        continue
                    pid, item = found
                    if pid is None and item.problem is None:
                        continue
                    b = bulk.bucket_of(pid, count) if pid is not None else 0
                    record = orjson.dumps([pid, item.file, item.line, item.problem]) + b"\t" + item.raw + b"\n"
                    handles[b].write(record)
                    sizes[b] += len(record)
    by_bucket: list[dict[str, list[Referral]] | None] = [None] * count
    if referrals is not None:
        by_bucket = [{} for _ in range(count)]
        for pid, rs in referrals.items():
            by_bucket[bulk.bucket_of(pid, count)][pid] = rs  # type: ignore[index]
    return [Bucket(str(folder / f"bucket-{i:05d}"), i, count, sizes[i], by_bucket[i]) for i in range(count)]


def _bundle_chunks(referrals: list[Referral], jobs: int) -> list[Chunk]:
    """The referrals of a folder or CSV of bundles in chunks of about equal size for ``jobs``
    worker processes (the batch and the worklist send the same chunks)."""
    sized = []
    for r in referrals:
        try:
            size = os.path.getsize(r.bundle_path) if r.bundle_path and r.problem is None else 0
        except OSError:
            size = 0
        sized.append((r, size + 256))
    total = sum(s for _, s in sized)
    target = max(64 * 1024, min(CHUNK_BYTES, total // max(1, jobs * 6)))
    chunks, chunk = [], Chunk()
    for r, size in sized:
        chunk.referrals.append(r)
        chunk.size += size
        if chunk.size >= target:
            chunks.append(chunk)
            chunk = Chunk()
    if chunk.referrals:
        chunks.append(chunk)
    return chunks


def plan_chunks(plan: Plan, scratch: Path, jobs: int) -> list[Chunk]:
    """The work of a plan for ``jobs`` processes: its Bundle files in chunks of about equal size,
    and its Bulk Data export spilled into per-patient buckets under ``scratch``."""
    chunks = _bundle_chunks(plan.referrals, jobs)
    if plan.export is not None:
        chunks += [Chunk(bucket=b, size=b.size) for b in spill(plan.export, plan.by_patient, scratch, jobs)]
    return chunks


def evaluate_chunks(
    chunks: list[Chunk], options: Options, jobs: int, collect: Callable[[tuple[list[dict], int]], None],
    *, in_process: bool | None = None,
) -> int:
    """Evaluate every chunk, handing each result (its rows, its size) to ``collect`` as it
    finishes; a chunk whose worker died comes back as error rows (:func:`_lost_rows`). In this
    process when ``in_process``, by default when there is one job, one chunk, a small input or no
    way to spawn; else on a pool. The number of processes that evaluated."""
    if in_process is None:
        total = sum(c.size for c in chunks)
        in_process = jobs == 1 or len(chunks) <= 1 or total < IN_PROCESS_BYTES or not can_spawn()
    if in_process:
        worker = Worker(options)
        try:
            for chunk in chunks:
                collect(worker.run(chunk))
        finally:
            worker.evaluator.close()
        return 1
    processes = min(jobs, len(chunks))
    run_pool(chunks, processes, options, make_worker, collect, lambda c, why: collect((_lost_rows(options, c, why), c.size)))
    return processes


def run(plan: Plan, options: Options, out: Path, fmt: str, *, jobs: int | None = None, progress: bool | None = None) -> Outcome:
    """Evaluate every referral of the plan and write OUT (which :func:`output.prepare_folder`
    has readied). ``progress``: True always draws a bar on standard error, None only on a
    terminal for a long run."""
    started = time.perf_counter()
    jobs = max(1, jobs or os.cpu_count() or 1)
    scratch = Path(tempfile.mkdtemp(prefix="needlepoint-batch-"))
    outcome = Outcome()
    try:
        chunks = plan_chunks(plan, scratch, jobs)
        total = sum(c.size for c in chunks)
        runs: list[Path] = []
        show = progress if progress is not None else (sys.stderr.isatty() and total >= PROGRESS_BYTES)
        bar = (
            ProgressBar("batch", total, "{task.fields[rows]:,} referrals, {task.fields[errors]:,} errors", rows=0, errors=0)
            if show
            else None
        )

        def collect(result: tuple[list[dict], int]) -> None:
            rows, size = result
            path = scratch / f"run-{len(runs):06d}"
            with path.open("wb") as fh:
                output.write_run(rows, fh)
            runs.append(path)
            outcome.rows += len(rows)
            for row in rows:
                outcome.statuses[row["status"]] = outcome.statuses.get(row["status"], 0) + 1
            if bar:
                bar.advance(size, rows=outcome.rows, errors=outcome.statuses.get("error", 0))

        try:
            if bar:
                bar.start()
            outcome.processes = evaluate_chunks(chunks, options, jobs, collect)
        finally:
            if bar:
                bar.stop()
        output.write_lines(output.merge_runs(runs), out, fmt)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _lost_rows(options: Options, chunk: Chunk, why: str) -> list[dict]:
    """Error rows for a chunk whose worker died: its referrals, or its bucket's patients."""
    rows = [error_row(options, r, f"{r.where}: {why}") for r in chunk.referrals]
    if chunk.bucket is not None:
        b = chunk.bucket
        pids = sorted(b.referrals) if b.referrals is not None else _bucket_patients(b.path)
        for pid in pids:
            referrals = b.referrals.get(pid) if b.referrals is not None else None
            for r in referrals or [Referral(pid, f"bucket {b.index} of {b.count}", patient_id=pid)]:
                rows.append(error_row(options, r, f"{r.where}: {why}", pid))
    return rows


def _bucket_patients(path: str) -> list[str]:
    pids: set[str] = set()
    with open(path, "rb") as fh:
        for raw in fh:
            pid = orjson.loads(raw.partition(b"\t")[0])[0]
            if pid is not None:
                pids.add(pid)
    return sorted(pids)
