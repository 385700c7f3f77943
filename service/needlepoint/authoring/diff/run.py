"""Running ``needlepoint rules diff``: both versions loaded once per process, every case evaluated
under each and compared (:mod:`.compare`), in this process for a small input or on a pool of
worker processes (:func:`needlepoint.workpool.run_pool`) sent chunks of about equal size."""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from needlepoint.authoring.diff.compare import CaseOutcome, compare, rule_fields, rule_order, ruleset_changes
from needlepoint.authoring.diff.inputs import CaseReader, WorkItem, scan
from needlepoint.authoring.diff.report import DiffReport, VersionInfo
from needlepoint.authoring.diff.versions import DiffError, Version, load_version
from needlepoint.core.evaluator import Evaluator, format_instant
from needlepoint.core.record import InjectionOrder, PatientRecord, RecordError
from needlepoint.core.ruleset import RuleSet
from needlepoint.intake import order_from_fields
from needlepoint.workpool import ProgressBar, can_spawn, run_pool

# Inputs smaller than this are evaluated in this process: starting workers would cost more.
IN_PROCESS_BYTES = 128 * 1024
# A progress bar is worth drawing (on a terminal) from this much input on.
PROGRESS_BYTES = 512 * 1024


@dataclass(frozen=True)
class Options:
    as_of: dt.datetime | None  # --as-of: every case at this instant
    default_as_of: dt.datetime  # for inputs that carry no instant
    order: InjectionOrder | None  # --target/--side/--intent
    affected: frozenset[str]


@dataclass
class ChunkResult:
    outcomes: list[CaseOutcome]  # every case that is not the same under both versions
    same: int
    skipped: list[tuple[str, str]]
    size: int
    old_seconds: float = 0.0
    new_seconds: float = 0.0


class Comparer:
    """Both versions loaded once; reads work items and compares their cases."""

    def __init__(self, old: RuleSet, new: RuleSet, options: Options):
        self.old, self.new = Evaluator(old), Evaluator(new)
        self.options = options
        # both versions' Observations, read as the service reads a request for either
        codes = self.old.observation_codes | self.new.observation_codes
        self.reader = CaseReader(options.as_of, options.default_as_of, options.order, codes)
        self.order = rule_order(old, new)
        self.rule_fields = rule_fields(old)
        for rid, fields in rule_fields(new).items():
            self.rule_fields.setdefault(rid, set()).update(fields)

    def close(self) -> None:
        self.old.close()
        self.new.close()

    def run(self, chunk: list[WorkItem]) -> ChunkResult:
        result = ChunkResult([], 0, [], sum(item.size for item in chunk))
        for item in chunk:
            try:
                cases = list(self.reader.cases(item, result.skipped))
            except Exception as exc:  # noqa: BLE001 - a fault here costs this input, not the run
                cases = [((item.rel, 0), item.label, "", None, None, f"cannot read the input: {type(exc).__name__}: {exc}")]
            for key, where, name, record, as_of, problem in cases:
                outcome = self._compare(key, where, name, record, as_of, problem, result)
                if outcome.status == "same":
                    result.same += 1
                else:
                    result.outcomes.append(outcome)
        return result

    def _compare(
        self,
        key: tuple,
        where: str,
        name: Any,
        record: PatientRecord | None,
        as_of: dt.datetime | None,
        problem: str | None,
        result: ChunkResult,
    ) -> CaseOutcome:
        outcome = CaseOutcome(key, where, str(name or ""), format_instant(as_of) if as_of else "")
        if problem is not None:
            outcome.old_error = outcome.new_error = problem
            return outcome
        assert record is not None and as_of is not None  # a case without a problem has both (CaseReader.cases)
        decisions: list[dict | None] = []
        for side, evaluator in (("old", self.old), ("new", self.new)):
            started = time.perf_counter()
            try:
                decisions.append(evaluator.evaluate(record, as_of))
            except RecordError as exc:
                decisions.append(None)
                setattr(outcome, f"{side}_error", str(exc))
            except Exception as exc:  # noqa: BLE001 - a fault of the version, reported per case
                decisions.append(None)
                setattr(outcome, f"{side}_error", f"internal error: {type(exc).__name__}: {exc}")
            elapsed = time.perf_counter() - started
            if side == "old":
                result.old_seconds += elapsed
            else:
                result.new_seconds += elapsed
        if decisions[0] is not None and decisions[1] is not None:
            outcome.changes, outcome.firings = compare(
                decisions[0], decisions[1], self.order, self.options.affected, self.rule_fields
            )
        return outcome


def _comparer(state: tuple) -> Comparer:
    """A worker process's Comparer, from the parent's (old, new, options)."""
    old, new, options = state
    return Comparer(old, new, options)


def _run_pool(chunks: list[list[WorkItem]], jobs: int, state: tuple, on_result: Callable[[ChunkResult], None]) -> None:
    """Evaluate the chunks on ``jobs`` spawned workers (:func:`needlepoint.workpool.run_pool`):
    a worker that dies costs the chunks in flight, reported as error cases."""
    run_pool(chunks, jobs, state, _comparer, on_result, lambda chunk, why: on_result(_crashed(chunk, why)))


def _version_info(version: Version, ruleset: RuleSet) -> VersionInfo:
    return VersionInfo(version.label, ruleset.id, ruleset.version, ruleset.digest, tuple(ruleset.layers))


def _crashed(chunk: list[WorkItem], why: str) -> ChunkResult:
    outcomes = [
        CaseOutcome((item.rel, item.first_line if item.kind == "ndjson" else 0), item.label, "", "", old_error=why, new_error=why)
        for item in chunk
    ]
    return ChunkResult(outcomes, 0, [], sum(item.size for item in chunk))


def run_diff(
    old: Version,
    new: Version,
    cases: Path,
    *,
    as_of: dt.datetime | None = None,
    order: tuple[str | None, str | None, str | None] | None = None,
    jobs: int | None = None,
    progress: bool | None = None,
) -> DiffReport:
    """Evaluate every case under ``cases`` with both versions and compare. ``progress``: True
    always draws a bar on standard error, None only on a terminal for a long run. Raises
    DiffError when the diff cannot run."""
    started = time.perf_counter()
    old_rs, new_rs = load_version(old), load_version(new)
    if not cases.exists():
        raise DiffError(f"{cases}: no such file or directory")
    jobs = max(1, jobs or os.cpu_count() or 1)
    changes = ruleset_changes(old_rs, new_rs)
    default_as_of = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    options = Options(as_of, default_as_of, order_from_fields(*order) if order else None, frozenset(changes.affected))
    chunks, skipped, total_bytes = scan(cases, jobs)

    outcomes: list[CaseOutcome] = []
    totals = {"same": 0, "cases": 0, "changed": 0}
    seconds = {"old": 0.0, "new": 0.0}
    show = progress if progress is not None else (sys.stderr.isatty() and total_bytes >= PROGRESS_BYTES)
    bar = (
        ProgressBar(
            "rules diff", total_bytes, "{task.fields[cases]:,} cases, {task.fields[changed]:,} changed", cases=0, changed=0
        )
        if show
        else None
    )

    def collect(result: ChunkResult) -> None:
        outcomes.extend(result.outcomes)
        skipped.extend(result.skipped)
        totals["same"] += result.same
        seconds["old"] += result.old_seconds
        seconds["new"] += result.new_seconds
        totals["cases"] += result.same + len(result.outcomes)
        totals["changed"] += sum(1 for o in result.outcomes if o.status == "changed")
        if bar:
            bar.advance(result.size, cases=totals["cases"], changed=totals["changed"])

    in_process = jobs == 1 or len(chunks) <= 1 or total_bytes < IN_PROCESS_BYTES or not can_spawn()
    try:
        if bar:
            bar.start()
        if in_process:
            comparer = Comparer(old_rs, new_rs, options)
            try:
                for chunk in chunks:
                    collect(comparer.run(chunk))
            finally:
                comparer.close()
        else:
            _run_pool(chunks, min(jobs, len(chunks)), (old_rs, new_rs, options), collect)
    finally:
        if bar:
            bar.stop()
    outcomes.sort(key=lambda o: o.key)
    skipped.sort()
    titles = {r.id: r.title for r in old_rs.rules} | {r.id: r.title for r in new_rs.rules}
    return DiffReport(
        old=_version_info(old, old_rs),
        new=_version_info(new, new_rs),
        changes=changes,
        cases_dir=str(cases),
        as_of=format_instant(as_of) if as_of else None,
        default_as_of=format_instant(default_as_of),
        outcomes=outcomes,
        same=totals["same"],
        skipped=skipped,
        titles=titles,
        order=rule_order(old_rs, new_rs),
        jobs=1 if in_process else min(jobs, len(chunks)),
        seconds=time.perf_counter() - started,
        old_seconds=seconds["old"],
        new_seconds=seconds["new"],
    )
