"""``needlepoint batch`` with the local engine: the three inputs, the planned date and results to
repeat, errors as rows, and the same rows from one process or several.

The Bulk Data export is made at test time from the Synthea fixtures (never edited)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from needlepoint.batch import bulk, local, output
from needlepoint.batch.evaluate import Options
from needlepoint.batch.referrals import plan
from needlepoint.cli import main

REPO = Path(__file__).resolve().parents[1]
SYNTHEA = REPO.parent / "shared" / "fixtures" / "synthea"
ORDER_BUNDLE = REPO / "tests" / "data" / "fhir" / "hip_injection_order.json"
AS_OF = "2020-01-01T00:00:00Z"
ORDER = ["--target", "hip-intra-articular", "--side", "right", "--intent", "therapeutic"]


def _run(*args: str) -> object:
    result = CliRunner().invoke(main, ["batch", *args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The five Synthea bundles as a Bulk Data export, plus a malformed line and a line that
    cannot be tied to any patient."""
    folder = tmp_path_factory.mktemp("export")
    bulk.write_export((orjson.loads(p.read_bytes()) for p in sorted(SYNTHEA.glob("*.json"))), folder)
    with (folder / "Observation.ndjson").open("ab") as fh:
        fh.write(b'{"resourceType": "Observation", "subject": {"reference": "Patient/no-such"\n')  # cut short
        fh.write(b"\n")  # blank lines are skipped
        fh.write(b"[1, 2]\n")  # JSON, not a resource, no patient named
    return folder


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bundles")
    for path in sorted(SYNTHEA.glob("*.json")):
        shutil.copy(path, folder / path.name)
    (folder / "broken.json").write_text('{"resourceType": "Bundle", "entry": [')
    return folder


def rows_of(out: Path) -> dict[str, dict]:
    return {row["referralId"]: row for row in output.read_rows(out)}


def test_a_bulk_export_groups_each_patient_into_the_same_record_as_the_bundle(
    export: Path, bundles: Path, tmp_path: Path
) -> None:
    _run(str(export), str(tmp_path / "bulk"), "--as-of", AS_OF, *ORDER)
    _run(str(bundles), str(tmp_path / "files"), "--as-of", AS_OF, *ORDER)
    from_bulk, from_files = rows_of(tmp_path / "bulk"), rows_of(tmp_path / "files")
    by_patient = {r["patientId"]: r for r in from_files.values() if r["patientId"]}
    patients = {r["patientId"]: r for r in from_bulk.values() if r["patientId"] and r["status"] != "error"}
    assert set(patients) == set(by_patient) and len(patients) == 5
    for pid, row in patients.items():  # content-addressed: the same facts at the same instant
        assert row["decisionId"] == by_patient[pid]["decisionId"]
        assert row["decision"] == by_patient[pid]["decision"]
    errors = {k: r["error"] for k, r in from_bulk.items() if r["status"] == "error"}
    # the cut-short line names its patient, who is referred nowhere and not in the export
    assert set(errors) == {"no-such", "Observation.ndjson:424"}
    assert "Observation.ndjson:422: not valid JSON" in errors["no-such"]
    assert "not a FHIR resource" in errors["Observation.ndjson:424"]
    assert from_files["broken.json"]["status"] == "error" and "not valid JSON" in from_files["broken.json"]["error"]


def test_the_planned_date_lists_results_to_repeat_and_by_when(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(ORDER_BUNDLE, folder / "order.json")
    _run(str(folder), str(tmp_path / "now"), "--as-of", "2025-06-02T09:00:00Z")
    _run(str(folder), str(tmp_path / "out"), "--as-of", "2025-06-02T09:00:00Z", "--planned", "2025-06-20")
    plain, row = rows_of(tmp_path / "now")["order.json"], rows_of(tmp_path / "out")["order.json"]
    assert plain["status"] == "go-ahead" and plain["plannedDecision"] is None and plain["toRepeat"] == []
    # warfarin and an INR of 2.4 from 30 May: fine now, more than 7 days old on 20 June
    assert row["status"] == "to-repeat" and row["plannedStatus"] == "not-now"
    assert row["decision"] == plain["decision"]
    assert row["toRepeat"] == [{
        "concept": "inr", "title": "INR", "resultAt": "2025-05-30T06:15:00Z", "windowDays": 7,
        "validUntil": "2025-06-06T06:15:00Z", "repeatFrom": "2025-06-13T23:59:59Z", "repeatBy": "2025-06-20T23:59:59Z",
        "ruleIds": ["DATA-INR-CURRENT"], "parameters": ["inr_max_age_days"],
    }]  # fmt: skip
    assert "INR" in {m["code"] for m in row["plannedDecision"]["missingData"]}
    # a planned date within the INR's window: nothing to repeat
    _run(str(folder), str(tmp_path / "soon"), "--as-of", "2025-06-02T09:00:00Z", "--planned", "2025-06-05")
    soon = rows_of(tmp_path / "soon")["order.json"]
    assert soon["toRepeat"] == [] and soon["status"] == "go-ahead"


def test_a_csv_of_referrals_points_at_bundles_and_at_an_export(export: Path, tmp_path: Path) -> None:
    shutil.copy(ORDER_BUNDLE, tmp_path / "order.json")
    pid = "6f8ccac9-41a3-42a2-a97b-06bfc0a91c26"  # Floyd Connelly, in the export
    (tmp_path / "referrals.csv").write_text(
        "Referral ID,Patient ID,Bundle,Target,Side,Intent,Planned date\n"
        "r1,,order.json,,,,2025-06-20\n"
        f"r2,{pid},,hip-intra-articular,left,therapeutic,2020-02-01\n"
        f"r3,{pid},,greater-trochanteric-bursa,right,diagnostic,\n"
        "r4,ghost,,hip-intra-articular,left,therapeutic,2020-02-01\n"
        "r5,,order.json,elbow,,,\n"
        "r1,,order.json,,,,not-a-date\n"
        ",,,,,,\n"
        "r7,,missing.json,,,,\n"
    )
    _run(str(tmp_path / "referrals.csv"), str(tmp_path / "out"), "--export", str(export), "--as-of", "2025-06-02T09:00:00Z")
    rows = rows_of(tmp_path / "out")
    # the export's unreadable line is reported whoever is referred; patient no-such is not referred
    assert set(rows) == {"r1", "r2", "r3", "r4", "r5", "referrals.csv:7", "r7", "Observation.ndjson:424"}
    assert rows["r1"]["status"] == "to-repeat" and rows["r1"]["patientId"] == "pat-1"
    assert rows["r2"]["patientId"] == pid and rows["r2"]["plannedDate"] == "2020-02-01T23:59:59Z"
    assert (
        rows["r2"]["decision"]["asOf"] == "2025-06-02T09:00:00Z" and rows["r2"]["plannedDecision"] is None
    )  # planned before asOf
    assert rows["r3"]["status"] != "error"
    assert "patient ghost is not in the export" in rows["r4"]["error"]
    assert rows["r5"]["error"].startswith("referrals.csv row 6: target 'elbow' is not one of")
    assert "referral id 'r1' is used by an earlier row" in rows["referrals.csv:7"]["error"]
    assert "not-a-date" in rows["referrals.csv:7"]["error"]
    assert "cannot read" in rows["r7"]["error"]


@pytest.mark.slow  # worker processes
def test_several_processes_write_the_same_bytes_as_one(
    export: Path, bundles: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset

    options = Options(load_ruleset(bundled_rulesets_dir() / "hip-injection"), dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
                      dt.datetime(2020, 3, 1, tzinfo=dt.timezone.utc),
                      ("hip-intra-articular", "right", "therapeutic"))  # fmt: skip
    for name, source in (("bulk", export), ("files", bundles)):
        (tmp_path / f"{name}-1").mkdir()
        (tmp_path / f"{name}-2").mkdir()
        local.run(plan(source), options, tmp_path / f"{name}-1", "ndjson", jobs=1)
        monkeypatch.setattr(local, "IN_PROCESS_BYTES", 0)
        outcome = local.run(plan(source), options, tmp_path / f"{name}-2", "ndjson", jobs=2)
        monkeypatch.undo()
        assert outcome.processes == 2
        one, two = output.ndjson_bytes(tmp_path / f"{name}-1"), output.ndjson_bytes(tmp_path / f"{name}-2")
        assert one == two and one.count(b"\n") >= 6
        keys = [output.key(orjson.loads(line)) for line in one.splitlines()]
        assert keys == sorted(keys)


def test_parquet_holds_the_same_rows(export: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    _run(str(export), str(tmp_path / "json"), "--as-of", AS_OF, "--planned", "2020-02-01", *ORDER)
    _run(str(export), str(tmp_path / "pq"), "--as-of", AS_OF, "--planned", "2020-02-01", "--format", "parquet", *ORDER)
    assert output.read_rows(tmp_path / "pq") == output.read_rows(tmp_path / "json")


def test_out_must_be_empty_unless_overwrite(bundles: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(str(bundles), str(out), "--as-of", AS_OF, *ORDER)
    again = CliRunner().invoke(main, ["batch", str(bundles), str(out), "--as-of", AS_OF])
    assert again.exit_code == 2 and "not empty" in again.output
    _run(str(bundles), str(out), "--as-of", AS_OF, "--overwrite", *ORDER)
    missing = CliRunner().invoke(main, ["batch", str(tmp_path / "absent"), str(tmp_path / "o2")])
    assert missing.exit_code == 2 and "no such file" in missing.output
