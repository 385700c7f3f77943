"""Result rows and how they are written: NDJSON or Parquet, sorted by referral id.

One row per referral, the same columns in both formats (see :data:`COLUMNS`): a flat summary a
worklist can filter on (referral and patient ids, status, deferral reasons, missing-data codes,
rule set version, decision id), the results to repeat, and the decision JSON itself (and the
planned-date decision). In NDJSON the nested columns are JSON values; in Parquet they are JSON
text (strings), and the two list columns are lists of strings.

**Canonical.** A row is serialised by :func:`line` alone (orjson, compact, keys in column order,
the decision's keys in the order the core produced them), and rows are sorted by ``(referralId,
source)``, so that the same referrals give the same bytes whichever engine evaluated them and in
whatever order they finished.

**Layout.** OUT is a folder of part files, read in name order (``part-*``); the local engine
writes one (``part-00000.ndjson`` or ``.parquet``), Spark one per output partition, globally
sorted. :func:`read_rows` reads either back.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

if TYPE_CHECKING:
    import pyarrow
    from pyspark.sql.types import StructType

COLUMNS: tuple[tuple[str, str], ...] = (
    ("referralId", "string"),
    ("patientId", "string"),
    ("source", "string"),
    ("status", "string"),
    ("plannedStatus", "string"),
    ("asOf", "string"),
    ("plannedDate", "string"),
    ("deferralReasons", "list"),
    ("missingData", "list"),
    ("toRepeat", "json"),
    ("rulesetId", "string"),
    ("rulesetVersion", "string"),
    ("decisionId", "string"),
    ("error", "string"),
    ("decision", "json"),
    ("plannedDecision", "json"),
)
FORMATS = ("ndjson", "parquet")
PARQUET_ROW_GROUP = 2048


def key(row: dict) -> tuple[str, str]:
    """The sort key of a row."""
    return row["referralId"], row["source"]


def line(row: dict) -> bytes:
    """The row as one canonical NDJSON line (without the newline)."""
    return orjson.dumps({name: row[name] for name, _ in COLUMNS})


def parquet_values(row: dict) -> tuple:
    """The row's Parquet column values, in column order: JSON columns as canonical JSON text."""
    out: list[Any] = []
    for name, kind in COLUMNS:
        value = row[name]
        if kind == "json":
            out.append(None if value is None else orjson.dumps(value).decode())
        elif kind == "list":
            out.append(list(value))
        else:
            out.append(value)
    return tuple(out)


def arrow_schema() -> pyarrow.Schema:
    """The Parquet schema as a pyarrow schema."""
    import pyarrow as pa

    return pa.schema([(name, pa.list_(pa.string()) if kind == "list" else pa.string()) for name, kind in COLUMNS])


def spark_schema() -> StructType:
    """The Parquet schema as a Spark StructType (the same columns and types)."""
    from pyspark.sql.types import ArrayType, StringType, StructField, StructType

    return StructType([StructField(name, ArrayType(StringType()) if kind == "list" else StringType()) for name, kind in COLUMNS])


def prepare_folder(out: Path, overwrite: bool) -> None:
    """Make sure OUT can be written: absent or an empty folder, or (with ``overwrite``) any
    folder, whose part files are then removed."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (use --overwrite)")
        for child in out.iterdir():
            if child.is_file() and (child.name.startswith("part-") or child.name.startswith("_") or child.name.startswith(".")):
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)


# -- sorted runs, merged (the local engine) ---------------------------------------------------------


def write_run(rows: Iterable[dict], fh: BinaryIO) -> int:
    """Write rows, sorted, as a run file: a JSON sort key, a tab, the canonical line."""
    n = 0
    for row in sorted(rows, key=key):
        fh.write(orjson.dumps(key(row)) + b"\t" + line(row) + b"\n")
        n += 1
    return n


def merge_runs(paths: list[Path]) -> Iterator[bytes]:
    """The canonical lines of every run file, in key order (a k-way merge: one line per run in
    memory at a time)."""
    files = [p.open("rb") for p in paths]
    try:

        def entries(fh: BinaryIO) -> Iterator[tuple[list, bytes]]:
            for raw in fh:
                head, _, body = raw.partition(b"\t")
                yield orjson.loads(head), body.rstrip(b"\n")

        for _, body in heapq.merge(*(entries(fh) for fh in files), key=lambda e: e[0]):
            yield body
    finally:
        for fh in files:
            fh.close()


def write_lines(lines: Iterable[bytes], out: Path, fmt: str) -> int:
    """Write canonical lines, already in order, to OUT's single part file in ``fmt``."""
    n = 0
    if fmt == "ndjson":
        with (out / "part-00000.ndjson").open("wb") as fh:
            for body in lines:
                fh.write(body + b"\n")
                n += 1
        return n
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema()
    with pq.ParquetWriter(out / "part-00000.parquet", schema) as writer:
        batch: list[tuple] = []
        for body in lines:
            batch.append(parquet_values(orjson.loads(body)))
            n += 1
            if len(batch) >= PARQUET_ROW_GROUP:
                writer.write_table(_table(batch, schema, pa))
                batch = []
        if batch or n == 0:
            writer.write_table(_table(batch, schema, pa))
    return n


def _table(batch: list[tuple], schema: pyarrow.Schema, pa: ModuleType) -> pyarrow.Table:
    columns = list(zip(*batch, strict=True)) if batch else [() for _ in schema]
    return pa.Table.from_arrays([pa.array(list(col), type=f.type) for col, f in zip(columns, schema, strict=True)], schema=schema)


# -- reading back -------------------------------------------------------------------------------------


def part_files(out: Path) -> list[Path]:
    """OUT's part files in name order (Spark's and ours), without checksums and markers."""
    return sorted(p for p in out.iterdir() if p.is_file() and p.name.startswith("part-") and not p.name.endswith(".crc"))


def ndjson_bytes(out: Path) -> bytes:
    """The NDJSON result of a run, its part files concatenated: the bytes two engines must agree on."""
    return b"".join(p.read_bytes() for p in part_files(out))


def read_rows(out: Path) -> list[dict]:
    """Every row of a run's output, NDJSON or Parquet, in order; Parquet's JSON columns parsed
    back, so that both formats read the same."""
    parts = part_files(out)
    if any(p.suffix == ".parquet" for p in parts):
        import pyarrow.parquet as pq

        rows = []
        for p in parts:
            for record in pq.read_table(p).to_pylist():
                rows.append({name: (orjson.loads(record[name]) if kind == "json" and record[name] is not None else record[name])
                             for name, kind in COLUMNS})  # fmt: skip
        return rows
    return [orjson.loads(raw) for raw in ndjson_bytes(out).splitlines() if raw.strip()]
