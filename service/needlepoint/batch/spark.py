"""The Spark engine: the same evaluation, on Apache Spark (PySpark), local or on a cluster.

A Bulk Data export is read as text, one RDD per NDJSON file (``textFile`` as bytes, one partition per
Hadoop split, then ``zipWithIndex`` for the line numbers, which costs one extra pass over a file of
several splits); each line is
read by :func:`needlepoint.batch.bulk.read_line`, exactly as the local engine reads it, and keyed
by patient. A shuffle groups the lines by patient (``groupByKey``, or ``cogroup`` with a CSV's
referrals), and ``mapPartitions`` evaluates each patient with one
:class:`~needlepoint.batch.evaluate.ReferralEvaluator` per executor Python process: built on
first use from the broadcast options (the rule set travels pickled, so executors read no rule
files) and cached in the process for every later partition (PySpark reuses its Python workers).
Referrals that read a Bundle file are parallelised as they are; their paths must be readable on
the executors (a shared filesystem).

Rows are written with Spark's own writers, globally sorted by ``(referralId, source)``: NDJSON as
text part files whose concatenation is byte for byte what the local engine writes, or Parquet
with the same columns. Files are listed through Hadoop's FileSystem API, so INPUT and OUT may be
``hdfs://`` or ``s3a://`` URIs as well as local paths.

Memory: one patient's lines at a time per task after the shuffle (``groupByKey`` materialises a
patient's group), plus Spark's own buffers; the export itself never needs to fit anywhere.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from needlepoint.batch import bulk, output
from needlepoint.batch.bulk import Line
from needlepoint.batch.evaluate import Options, ReferralEvaluator, error_row
from needlepoint.batch.local import Outcome
from needlepoint.batch.referrals import Plan, Referral

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Per executor Python process: run token -> its evaluator (built once, reused by every task).
_EVALUATORS: dict[str, ReferralEvaluator] = {}


class Shared:
    """The run's options as executors see them: a broadcast, and a token naming the run (so that
    a process that served an earlier run in the same application builds a fresh evaluator)."""

    def __init__(self, token: str, broadcast: Any):
        self.token, self.broadcast = token, broadcast

    @property
    def options(self) -> Options:
        return self.broadcast.value


def _evaluator(shared: Shared) -> ReferralEvaluator:
    """This process's evaluator for the run, built on first use and cached."""
    evaluator = _EVALUATORS.get(shared.token)
    if evaluator is None:
        evaluator = _EVALUATORS[shared.token] = ReferralEvaluator(shared.options)
    return evaluator


def _read_lines(file: str, pairs: Iterable[tuple[bytes, int]]) -> Iterator[tuple[str | None, Line]]:
    """One file's (raw bytes, 0-based index) pairs as (patient id or None, Line)."""
    for raw, index in pairs:
        found = bulk.read_line(file, index + 1, raw)
        if found is not None and (found[0] is not None or found[1].problem is not None):
            yield found


def _patients(broadcast: Shared, groups: Iterable[tuple[str, tuple[Iterable[Line], Iterable[list[Referral]] | None]]]
              ) -> Iterator[dict]:
    """Rows for each (patient id, (lines, referral lists or None)) of a partition."""
    evaluator = _evaluator(broadcast)
    for pid, (lines, referral_lists) in groups:
        referrals = None if referral_lists is None else [r for rl in referral_lists for r in rl]
        yield from evaluator.patient_rows(pid, list(lines), referrals)


def _orphans(broadcast: Shared, items: Iterable[tuple[None, Line]]) -> Iterator[dict]:
    """Error rows for lines that cannot be tied to a patient."""
    options = broadcast.options
    for _, line in items:
        yield error_row(options, Referral(line.where, line.where), line.problem or "")


def _bundles(broadcast: Shared, referrals: Iterable[Referral]) -> Iterator[dict]:
    """Rows for referrals that read a Bundle file (or are already errors)."""
    evaluator = _evaluator(broadcast)
    for referral in referrals:
        yield evaluator.bundle_row(referral)


def _ndjson_record(row: dict) -> tuple[str, str, str, str]:
    return row["referralId"], row["source"], row["status"], output.line(row).decode()


def export_files(sc: Any, export: str) -> list[tuple[str, str]]:
    """(URI, file name) of each NDJSON file at the top of the export, in name order, listed
    through Hadoop's FileSystem (local paths, hdfs://, s3a://…)."""
    jvm = sc._jvm
    path = jvm.org.apache.hadoop.fs.Path(export)
    fs = path.getFileSystem(sc._jsc.hadoopConfiguration())
    found = []
    for status in fs.listStatus(path):
        name = status.getPath().getName()
        if status.isFile() and name.lower().endswith(bulk.NDJSON_SUFFIXES) and not name.startswith((".", "_")):
            found.append((status.getPath().toString(), name))
    return sorted(found, key=lambda f: f[1])


def session(master: str | None, partitions: int) -> SparkSession:
    """A SparkSession: ``master`` if given (``local[2]``, ``spark://host:7077``, ``yarn``…),
    else whatever spark-submit says, else ``local[*]``. No UI; in local mode the executors' Python
    is this one unless PYSPARK_PYTHON says otherwise."""
    if not master or master.startswith("local"):  # on a cluster, the executors' Python is the cluster's to say
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("needlepoint-batch")
    if master:
        builder = builder.master(master)
    builder = (
        builder.config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", str(partitions))
        .config("spark.default.parallelism", str(partitions))
        .config("spark.python.worker.reuse", "true")
        .config("spark.ui.showConsoleProgress", "false")
    )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def run(plan: Plan, options: Options, out: str, fmt: str, *, master: str | None = None, partitions: int | None = None,
        overwrite: bool = False, spark: Any = None) -> Outcome:  # fmt: skip
    """Evaluate every referral of the plan on Spark and write OUT (``overwrite``: replace what
    is there). ``partitions``: of the patient shuffle and the output (default: twice the
    default parallelism). ``spark``: an existing session to use (and leave running)."""
    started = time.perf_counter()
    own = spark is None
    if own:
        spark = session(master, partitions or 4)
    try:
        sc = spark.sparkContext
        n = partitions or max(2, 2 * sc.defaultParallelism)
        handle = sc.broadcast(options)
        broadcast = Shared(uuid.uuid4().hex, handle)
        parts = []
        if plan.referrals:
            parts.append(
                sc.parallelize(plan.referrals, max(1, min(n, len(plan.referrals)))).mapPartitions(partial(_bundles, broadcast))
            )
        if plan.export is not None:
            files = export_files(sc, str(plan.export))
            if files:
                lines = sc.union(
                    [
                        sc.textFile(uri, minPartitions=1, use_unicode=False)
                        .zipWithIndex()
                        .mapPartitions(partial(_read_lines, name))
                        for uri, name in files
                    ]
                )
                parts.append(lines.filter(lambda kv: kv[0] is None).mapPartitions(partial(_orphans, broadcast)))
                keyed = lines.filter(lambda kv: kv[0] is not None)
                if plan.by_patient is not None:
                    wanted = sc.parallelize(sorted(plan.by_patient.items()), max(1, min(n, len(plan.by_patient))))
                    grouped = keyed.cogroup(wanted, numPartitions=n)
                else:
                    grouped = keyed.groupByKey(numPartitions=n).mapValues(lambda ls: (ls, None))
                parts.append(grouped.mapPartitions(partial(_patients, broadcast)))
            elif plan.by_patient is not None:  # a CSV over an export with no files: every patient is missing
                referred: list[tuple[str, tuple[list[Any], list[list[Referral]]]]] = [
                    (pid, ([], [rs])) for pid, rs in sorted(plan.by_patient.items())
                ]
                parts.append(sc.parallelize(referred, 1).mapPartitions(partial(_patients, broadcast)))
        rows = sc.union(parts) if parts else sc.emptyRDD()
        mode = "overwrite" if overwrite else "errorifexists"
        if fmt == "ndjson":
            df = spark.createDataFrame(rows.map(_ndjson_record), "referralId string, source string, status string, line string")
        else:
            df = spark.createDataFrame(rows.map(output.parquet_values), output.spark_schema())
        df = df.persist()
        try:
            ordered = df.orderBy("referralId", "source")
            if fmt == "ndjson":
                ordered.select("line").write.mode(mode).option("lineSep", "\n").text(out)
            else:
                ordered.write.mode(mode).parquet(out)
            counts = {r["status"]: r["count"] for r in df.groupBy("status").count().collect()}
        finally:
            df.unpersist()
        handle.unpersist()
        return Outcome(
            rows=sum(counts.values()), statuses=counts, seconds=time.perf_counter() - started, processes=sc.defaultParallelism
        )
    finally:
        if own:
            spark.stop()
