"""``needlepoint batch --engine spark`` against ``--engine local`` on the same Bulk Data export:
the same decisions, byte for byte (NDJSON), and the same rows (Parquet). A real local Spark
session (local[2]); slow, and skipped only where PySpark or Java is missing (CI installs both
with scripts/setup-spark)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import orjson
import pytest

pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("no Java runtime (scripts/setup-spark installs one)", allow_module_level=True)

from needlepoint.batch import bulk, local, output, spark
from needlepoint.batch.evaluate import Options
from needlepoint.batch.referrals import plan

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SYNTHEA = REPO.parent / "shared" / "fixtures" / "synthea"
ORDER_BUNDLE = REPO / "tests" / "data" / "fhir" / "hip_injection_order.json"


@pytest.fixture(scope="module")
def session():
    """One small Spark session for the module: local[2], two shuffle partitions."""
    s = spark.session("local[2]", 2)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    bulk.write_export((orjson.loads(p.read_bytes()) for p in sorted(SYNTHEA.glob("*.json"))), folder)
    bulk.write_export([orjson.loads(ORDER_BUNDLE.read_bytes())], folder)  # warfarin, an INR to repeat
    with (folder / "Observation.ndjson").open("ab") as fh:
        fh.write(b'{"resourceType": "Observation", "subject": {"reference": "Patient/pat-1"\n')  # spoils pat-1
        fh.write(b"not json at all\n")
    return folder


@pytest.fixture(scope="module")
def options() -> Options:
    from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset

    return Options(load_ruleset(bundled_rulesets_dir() / "hip-injection"), dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
                   dt.datetime(2020, 2, 1, 23, 59, 59, tzinfo=dt.timezone.utc),
                   ("hip-intra-articular", "right", "therapeutic"))  # fmt: skip


def _both(session, work, options: Options, tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    mine, theirs = tmp_path / f"local-{fmt}", tmp_path / f"spark-{fmt}"
    mine.mkdir()
    local.run(work, options, mine, fmt, jobs=2)
    outcome = spark.run(work, options, str(theirs), fmt, partitions=2, spark=session)
    assert outcome.rows == len(output.read_rows(mine))
    return mine, theirs


def test_spark_writes_the_local_engines_bytes(session, export: Path, options: Options, tmp_path: Path) -> None:
    mine, theirs = _both(session, plan(export), options, tmp_path, "ndjson")
    assert output.ndjson_bytes(theirs) == output.ndjson_bytes(mine)
    rows = {r["referralId"]: r for r in output.read_rows(theirs)}
    assert sum(r["status"] != "error" for r in rows.values()) == 5
    assert "Observation.ndjson:" in rows["pat-1"]["error"] and rows["pat-1"]["status"] == "error"
    assert any(k.startswith("Observation.ndjson:") for k in rows)  # the line naming no patient


def test_spark_parquet_and_a_csv_over_the_export(session, export: Path, options: Options, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    (tmp_path / "referrals.csv").write_text(
        "referral_id,patient_id,bundle,target,side,intent,planned_date\n"
        "a,6f8ccac9-41a3-42a2-a97b-06bfc0a91c26,,hip-intra-articular,left,therapeutic,2020-03-01\n"
        "b,ghost,,,,,\n"
        f"c,,{ORDER_BUNDLE},,,,2025-06-20\n"
    )
    work = plan(tmp_path / "referrals.csv", export=export)
    mine, theirs = _both(session, work, options, tmp_path, "parquet")
    assert output.read_rows(theirs) == output.read_rows(mine)
    rows = {r["referralId"]: r for r in output.read_rows(theirs)}
    assert rows["a"]["status"] != "error" and "not in the export" in rows["b"]["error"]
    assert rows["c"]["patientId"] == "pat-1"
