"""The inputs of ``needlepoint rules diff``: which files under the cases directory are read, in
chunks of about equal size for the worker processes, and the cases each holds, as patient records
(by :mod:`needlepoint.intake`, the one request -> record road, and :mod:`needlepoint.casefile`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from needlepoint.casefile import load_cases
from needlepoint.core.record import InjectionOrder, ObservationCodes, RecordError
from needlepoint.corpus import input_files
from needlepoint.intake import apply_order, record_from_json, request_kind
from needlepoint.rulesets.reader import YAMLSyntaxError, load_yaml

JSON_SUFFIXES = frozenset({".json"})
YAML_SUFFIXES = frozenset({".yaml", ".yml"})
NDJSON_SUFFIXES = frozenset({".ndjson", ".jsonl"})


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A file to read, or a run of lines of an NDJSON file (``offset`` bytes in, from line
    ``first_line``, ``lines`` lines)."""

    kind: str  # "json" | "yaml" | "ndjson"
    path: str
    rel: str
    size: int
    offset: int = 0
    first_line: int = 1
    lines: int = 0

    @property
    def label(self) -> str:
        if self.kind != "ndjson":
            return self.rel
        return f"{self.rel}:{self.first_line}-{self.first_line + self.lines - 1}"


def _ndjson_pieces(path: Path, rel: str, target: int) -> Iterator[WorkItem]:
    """The file in runs of whole lines of about ``target`` bytes."""
    with path.open("rb") as fh:
        offset, first, lines, size = 0, 1, 0, 0
        for raw in fh:
            lines += 1
            size += len(raw)
            if size >= target:
                yield WorkItem("ndjson", str(path), rel, size, offset, first, lines)
                offset, first, lines, size = offset + size, first + lines, 0, 0
        if lines:
            yield WorkItem("ndjson", str(path), rel, size, offset, first, lines)


def scan(root: Path, jobs: int) -> tuple[list[list[WorkItem]], list[tuple[str, str]], int]:
    """The inputs under ``root`` in chunks of about equal size (several per worker, so that the
    workers finish together), the files skipped with the reason, and the total size in bytes."""
    found: list[tuple[str, Path, str, int]] = []
    skipped: list[tuple[str, str]] = []
    for path, rel in input_files(root):
        suffix = path.suffix.lower()
        kind = (
            "json"
            if suffix in JSON_SUFFIXES
            else "yaml"
            if suffix in YAML_SUFFIXES
            else "ndjson"
            if suffix in NDJSON_SUFFIXES
            else None
        )
        if kind is None:
            skipped.append((rel, "not an input format (.json, .yaml, .yml, .ndjson, .jsonl)"))
            continue
        try:
            size = path.stat().st_size
        except OSError as exc:
            skipped.append((rel, f"cannot be read: {exc.strerror or exc}"))
            continue
        found.append((kind, path, rel, size))
    total = sum(size for *_, size in found)
    target = max(16 * 1024, min(2 * 1024 * 1024, total // max(1, jobs * 6)))
    items: list[WorkItem] = []
    for kind, path, rel, size in found:
        if kind == "ndjson":
            try:
                items.extend(_ndjson_pieces(path, rel, target))
            except OSError as exc:
                skipped.append((rel, f"cannot be read: {exc.strerror or exc}"))
        else:
            items.append(WorkItem(kind, str(path), rel, size))
    chunks: list[list[WorkItem]] = []
    chunk: list[WorkItem] = []
    weight = 0
    for item in items:
        chunk.append(item)
        weight += item.size
        if weight >= target:
            chunks.append(chunk)
            chunk, weight = [], 0
    if chunk:
        chunks.append(chunk)
    return chunks, skipped, total


# -- the cases of an input --------------------------------------------------------------------------


class CaseReader:
    """Reads the cases of work items: (sort key, where, name, record, as_of, problem) per case,
    with a problem (text) instead of a record for an input that cannot be evaluated.

    ``as_of`` (--as-of) puts every case at one instant; otherwise a case keeps its own, and
    ``default_as_of`` stands in for inputs without one. ``order`` (--target/--side/--intent)
    overrides the order of FHIR inputs field by field, an exported request's own order included
    (:func:`needlepoint.intake.apply_order`); test cases are used as written."""

    def __init__(
        self,
        as_of: dt.datetime | None,
        default_as_of: dt.datetime,
        order: InjectionOrder | None,
        observation_codes: ObservationCodes | None = None,
    ) -> None:
        self.as_of, self.default_as_of, self.order = as_of, default_as_of, order
        self.observation_codes = observation_codes  # the Observations either version reads

    def _instant(self, own: dt.datetime | None) -> dt.datetime:
        return self.as_of or own or self.default_as_of

    def cases(self, item: WorkItem, skipped: list[tuple[str, str]]) -> Iterator[tuple]:
        """(sort key, where, name, record, as_of, problem) per case; a problem (text) instead of a
        record for an input that cannot be evaluated."""
        path = Path(item.path)
        if item.kind == "yaml":
            yield from self._yaml_cases(path, item, skipped)
        elif item.kind == "json":
            try:
                obj = orjson.loads(path.read_bytes())
            except OSError as exc:
                skipped.append((item.rel, f"cannot be read: {exc.strerror or exc}"))
                return
            except orjson.JSONDecodeError as exc:
                skipped.append((item.rel, f"not valid JSON: {exc}"))
                return
            if request_kind(obj) is None:
                skipped.append((item.rel, "not a FHIR Bundle, a CDS Hooks request or an evaluate request"))
                return
            yield self._one((item.rel, 0), item.rel, obj)
        else:
            with path.open("rb") as fh:
                fh.seek(item.offset)
                for k in range(item.lines):
                    raw = fh.readline()
                    line = item.first_line + k
                    if not raw.strip():
                        continue
                    where = f"{item.rel}:{line}"
                    try:
                        obj = orjson.loads(raw)
                    except orjson.JSONDecodeError as exc:
                        yield (item.rel, line), where, "", None, None, f"line {line}: not valid JSON: {exc}"
                        continue
                    yield self._one((item.rel, line), where, obj)

    def _one(self, key: tuple, where: str, obj: Any) -> tuple:
        try:
            record, own, name = record_from_json(obj, self.observation_codes)
            record = apply_order(record, self.order)
        except RecordError as exc:
            return key, where, "", None, None, str(exc)
        return key, where, name, record, self._instant(own), None

    def _yaml_cases(self, path: Path, item: WorkItem, skipped: list[tuple[str, str]]) -> Iterator[tuple]:
        try:
            cases = load_cases(path)
        except OSError as exc:
            skipped.append((item.rel, f"cannot be read: {exc.strerror or exc}"))
            return
        except UnicodeDecodeError:
            skipped.append((item.rel, "cannot be read: not UTF-8 text"))
            return
        except YAMLSyntaxError as exc:
            skipped.append((item.rel, f"not valid YAML: {exc.problem}"))
            return
        except RecordError as exc:
            if _looks_like_cases(path):
                yield (item.rel, 0), item.rel, "", None, None, f"the case file cannot be read: {exc}"
            else:
                skipped.append((item.rel, "not a file of rule-set test cases (a list of cases with name, patient and expect)"))
            return
        for i, case in enumerate(cases):
            yield (item.rel, i), f"{item.rel}[{i}]", case.name, case.record, self._instant(case.as_of), None


def _looks_like_cases(path: Path) -> bool:
    """Whether a YAML file that load_cases refused is a case file with a bad case (an error to
    report) rather than some other YAML file (to skip)."""
    try:
        content = load_yaml(path)
    except (OSError, UnicodeDecodeError, YAMLSyntaxError):
        return False
    return isinstance(content, list) and any(
        isinstance(c, dict) and "name" in c and ("patient" in c or "expect" in c) for c in content
    )
