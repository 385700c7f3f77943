"""``needlepoint worklist``: a CSV of 100 referrals over the Synthea fixtures (some malformed, some
deceased patients, some planned dates that make a lab stale) as HTML, CSV and XLSX reports, with
every status and "what to do" line checked against the decisions the batch engine makes.

The CSV is built at test time (:func:`build_worklist`, also used by the browser test); fixtures
are read, never edited."""

from __future__ import annotations

import csv
import io
import re
import shutil
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from needlepoint.batch import output
from needlepoint.cli import main
from needlepoint.worklist import rows as plain

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
ORDER_BUNDLE = REPO / "tests" / "data" / "fhir" / "hip_injection_order.json"
AS_OF = "2020-01-01T00:00:00Z"
EMERY = "synthea-r4-sample/Emery_Purdy_298c62e6-b204-4a14-8e21-73d5be0ce22e.json"
HEADER = ["referral_id", "patient_name", "bundle", "target", "side", "intent", "planned_date", "as_of"]


def build_worklist(folder: Path) -> Path:
    """``folder/referrals.csv``: 100 referrals, with the Bundles they name reachable from
    ``folder`` (links to the fixture folders, a copy of the order bundle, one broken file).

    * 91 Synthea patients (both fixture folders) for a right therapeutic intra-articular injection,
      as of 1 January 2020, planned for 20 January 2020: 22 of them have died by then;
    * 3 planned dates that make a result stale: Emery Purdy's HbA1c (taken 22 January 2021, 180
      days) for a injection planned in August 2021; the order bundle's INR (30 May 2025, 7 days)
      for 20 June and 12 June 2025 (on those days hip replacement surgery is also close);
    * 6 malformed referrals: an unknown target, a date that is not one, a missing file, a file
      that is not JSON, a repeated referral id, a row with an extra cell.
    """
    (folder / "synthea-r4-sample").symlink_to(FIXTURES / "synthea-r4-sample")
    (folder / "synthea").symlink_to(FIXTURES / "synthea")
    shutil.copy(ORDER_BUNDLE, folder / "order.json")
    (folder / "broken.json").write_text('{"resourceType": "Bundle", "entry": [')
    lines = [HEADER]
    bundles = sorted(
        p.relative_to(FIXTURES).as_posix() for d in ("synthea-r4-sample", "synthea") for p in (FIXTURES / d).glob("*.json")
    )
    for i, bundle in enumerate(bundles, start=1):
        name = " ".join(Path(bundle).stem.split("_")[:-1])
        lines.append([f"R{i:03d}", name, bundle, "hip-intra-articular", "right", "therapeutic", "2020-01-20", AS_OF])
    n = len(lines)
    lines += [
        [f"R{n:03d}", "Emery Purdy", EMERY, "hip-intra-articular", "left", "therapeutic", "2021-08-15", "2021-01-27T00:00:00Z"],
        [f"R{n + 1:03d}", "Pat Order", "order.json", "", "", "", "2025-06-20", "2025-06-02T09:00:00Z"],
        [f"R{n + 2:03d}", "Pat Order", "order.json", "", "", "", "2025-06-12", "2025-06-02T09:00:00Z"],
        [f"R{n + 3:03d}", "Wrong Site", bundles[0], "elbow", "right", "therapeutic", "2020-01-20", AS_OF],
        [f"R{n + 4:03d}", "Bad Date", bundles[1], "hip-intra-articular", "right", "therapeutic", "next tuesday", AS_OF],
        [f"R{n + 5:03d}", "No File", "synthea/nobody.json", "hip-intra-articular", "right", "therapeutic", "2020-01-20", AS_OF],
        [f"R{n + 6:03d}", "Broken File", "broken.json", "hip-intra-articular", "right", "therapeutic", "2020-01-20", AS_OF],
        ["R001", "Same Id", bundles[2], "hip-intra-articular", "right", "therapeutic", "2020-01-20", AS_OF],
        [
            f"R{n + 8:03d}",
            "Extra Cell",
            bundles[3],
            "hip-intra-articular",
            "right",
            "therapeutic",
            "2020-01-20",
            AS_OF,
            "surplus",
        ],
    ]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    path = folder / "referrals.csv"
    path.write_text(buffer.getvalue())
    assert len(lines) - 1 == 100
    return path


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The worklist as HTML, CSV and XLSX from one run, and the batch rows of the same input."""
    folder = tmp_path_factory.mktemp("worklist")
    referrals = build_worklist(folder)
    out = {fmt: folder / f"report.{fmt}" for fmt in ("html", "csv", "xlsx")}
    result = CliRunner().invoke(main, ["worklist", str(referrals), *(a for p in out.values() for a in ("--out", str(p)))])
    assert result.exit_code == 0, result.output
    batch = CliRunner().invoke(main, ["batch", str(referrals), str(folder / "batch")])
    assert batch.exit_code == 0, batch.output
    with (out["csv"]).open(encoding="utf-8-sig", newline="") as fh:
        table = list(csv.DictReader(fh))
    return {
        "out": out,
        "csv": table,
        "batch": {r["referralId"]: r for r in output.read_rows(folder / "batch")},
        "log": result.output,
    }


def _expected_status(row: dict) -> str:
    """The plain status, restated from the README's table, straight from the batch row."""
    if row["status"] == "error":
        return "cannot evaluate"

    def of(decision: dict) -> int:
        whole = [d for d in decision.get("deferrals", []) if d["scope"] == "PROCEDURE"]
        if any(d["severity"] == "HARD" and d["reason"] != "PENDING_DATA" for d in whole):
            return 1  # deferred
        if any(d["severity"] == "HARD" for d in whole):
            return 3  # needs data
        return 2 if whole else 4  # review, ready

    now = of(row["decision"])
    if row["toRepeat"]:
        now = min(now, 3)
    if row["plannedDecision"] is not None:
        now = min(now, of(row["plannedDecision"]))
    return {1: "deferred", 2: "needs clinician review", 3: "needs data", 4: "ready"}[now]


@pytest.mark.slow  # the 100 referrals over every Synthea bundle
def test_every_status_follows_the_decisions(reports: dict) -> None:
    table, batch = reports["csv"], reports["batch"]
    assert len(table) == 100 and {r["Referral"] for r in table} == set(batch)
    for row in table:
        b = batch[row["Referral"]]
        assert row["Status"] == _expected_status(b), (row["Referral"], row["Status"], b["status"])
        if b["status"] != "error":
            assert row["Decision id"] in {b["decisionId"], (b["plannedDecision"] or {}).get("decisionId")}
            rule_ids = {rid for d in b["decision"].get("deferrals", []) for rid in d["ruleIds"]}
            assert all(f"({rid})" in row["Reasons (rules)"] for rid in rule_ids), row
    counts = {s: sum(1 for r in table if r["Status"] == s) for s in plain.STATUSES}
    assert counts["cannot evaluate"] == 6 and counts["ready"] > 40 and counts["deferred"] >= 22, counts
    assert "100 referrals:" in reports["log"]


@pytest.mark.slow  # the 100 referrals over every Synthea bundle
def test_deceased_patients_are_deferred_in_their_own_words(reports: dict) -> None:
    dead = [r for r in reports["csv"] if "PATIENT_DECEASED" in (reports["batch"][r["Referral"]]["deferralReasons"] or [])]
    assert len(dead) == 22
    for row in dead:
        assert row["Status"] == "deferred"
        assert row["What to do"].startswith("Do not book: the record says the patient has died.")
        assert row["Reasons (rules)"].startswith("The record says the patient has died")


@pytest.mark.slow  # the 100 referrals over every Synthea bundle
def test_a_stale_lab_says_what_to_take_and_when(reports: dict) -> None:
    by_name = {}
    for r in reports["csv"]:
        by_name.setdefault(r["Patient name"], []).append(r)
    emery = next(r for r in by_name["Emery Purdy"] if r["Planned date"] == "15 August 2021")
    item = reports["batch"][emery["Referral"]]["toRepeat"][0]
    assert item["concept"] == "hba1c" and emery["Status"] == "needs data"
    assert emery["What to do"].startswith(
        f"{item['title']} needed, taken on or after 16 February 2021 and by 15 August 2021 (the result of 22 January 2021"
    )
    first, second = sorted(by_name["Pat Order"], key=lambda r: r["Referral"])
    assert "INR needed, taken on or after 13 June 2025 and by 20 June 2025 (the result of 30 May 2025" in first["What to do"]
    assert "INR needed, taken on or after 5 June 2025 and by 12 June 2025" in second["What to do"]
    # on the planned date the hip replacement is close too: the planned-date decision defers
    assert (
        first["Status"] == "deferred"
        and "By the planned date, 20 June 2025: Hip replacement surgery is planned soon: not now." in first["What to do"]
    )
    assert (
        "Hip replacement surgery is planned soon (on the planned date): "
        "Ipsilateral hip arthroplasty scheduled soon (DEF-PRE-ARTHROPLASTY)"
        in first["Reasons (rules)"]
    )


@pytest.mark.slow  # the 100 referrals over every Synthea bundle
def test_malformed_referrals_are_rows_naming_the_file_and_row(reports: dict) -> None:
    errors = {r["Patient name"]: r for r in reports["csv"] if r["Status"] == "cannot evaluate"}
    assert set(errors) == {"Wrong Site", "Bad Date", "No File", "Broken File", "Same Id", "Extra Cell"}
    assert "referrals.csv row 96: target 'elbow' is not one of" in errors["Wrong Site"]["What to do"]
    assert "'next tuesday' is not an ISO 8601 date" in errors["Bad Date"]["What to do"]
    assert re.search(r"referrals.csv:98: cannot read .*nobody.json", errors["No File"]["What to do"])
    assert "referrals.csv:99: not valid JSON" in errors["Broken File"]["What to do"]
    assert "referral id 'R001' is used by an earlier row" in errors["Same Id"]["What to do"]
    assert "different number of cells than the header" in errors["Extra Cell"]["What to do"]
    assert all(r["What to do"].startswith("Fix the input, then run the worklist again: ") for r in errors.values())


@pytest.mark.slow  # the 100 referrals over every Synthea bundle
def test_ready_rows_say_the_guidance_and_the_reports_agree(reports: dict) -> None:
    from openpyxl import load_workbook

    ready = [r for r in reports["csv"] if r["Status"] == "ready"]
    assert all(r["What to do"].startswith("Can go ahead. Use ") for r in ready)
    sheet = load_workbook(reports["out"]["xlsx"]).active
    cells = [[c.value if c.value is not None else "" for c in row] for row in sheet.iter_rows()]
    assert [list(r.values()) for r in reports["csv"]] == cells[1:] and cells[0] == list(reports["csv"][0].keys())
    assert sheet.freeze_panes == "A2" and sheet.auto_filter.ref
    page = reports["out"]["html"].read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the HTML report must not fetch anything"
    for row in reports["csv"]:
        if row["Decision id"]:
            assert row["Explanation"] == f"report.html#explain-{row['Decision id']}"
            assert f'id="explain-{row["Decision id"]}"' in page
    assert page.count("<tr data-status=") == 100


@pytest.mark.slow  # the 100 referrals over every Synthea bundle
def test_the_ten_example_rows(reports: dict, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a check: prints one row of every kind, for people reading the test output."""
    table = reports["csv"]
    picks, seen = [], set()
    for row in table:
        key = (row["Status"], row["What to do"][:25])
        if key not in seen and len(picks) < 10:
            seen.add(key)
            picks.append(row)
    for row in table:
        if len(picks) < 10 and all(row["What to do"] != p["What to do"] for p in picks):
            picks.append(row)
    with capsys.disabled():
        for row in picks:
            print(f"\n{row['Referral']} {row['Patient name']!r} [{row['Status']}] {row['What to do'][:300]}")
    assert len(picks) == 10


def test_a_few_referrals_get_every_status_from_the_decisions(tmp_path: Path) -> None:
    """The fast suite's worklist: one referral of each status and four malformed ones, checked
    against the batch engine's rows as the 100-referral run is."""
    (tmp_path / "synthea-r4-sample").symlink_to(FIXTURES / "synthea-r4-sample")
    shutil.copy(ORDER_BUNDLE, tmp_path / "order.json")
    (tmp_path / "broken.json").write_text('{"resourceType": "Bundle", "entry": [')
    sample = "synthea-r4-sample/"
    order = ["hip-intra-articular", "right", "therapeutic", "2020-01-20", AS_OF]
    lines = [
        HEADER,
        ["K1", "Alberto Armstrong", sample + "Alberto_Armstrong_dc9335d0-bbdd-4120-8ae9-baa6604343b6.json", *order],
        ["K2", "Alejandro Riojas", sample + "Alejandro_Riojas_a9fcc685-c7a2-4474-bf25-26c8fe4b48f9.json", *order],
        ["K3", "Marsha Hayes", sample + "Marsha_Hayes_25e83417-4519-4f8b-b2b0-35c9c87003a1.json", *order],
        ["K4", "Emery Purdy", EMERY, "hip-intra-articular", "left", "therapeutic", "2021-08-15", "2021-01-27T00:00:00Z"],
        ["K5", "Pat Order", "order.json", "", "", "", "2025-06-20", "2025-06-02T09:00:00Z"],
        ["K6", "Wrong Site", "order.json", "elbow", "right", "therapeutic", "2020-01-20", AS_OF],
        ["K7", "Bad Date", "order.json", "hip-intra-articular", "right", "therapeutic", "next tuesday", AS_OF],
        ["K8", "Broken File", "broken.json", *order],
        ["K1", "Same Id", "order.json", *order],
    ]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    (tmp_path / "referrals.csv").write_text(buffer.getvalue())
    out = {fmt: tmp_path / f"report.{fmt}" for fmt in ("html", "csv")}
    referrals = str(tmp_path / "referrals.csv")
    outs = [a for p in out.values() for a in ("--out", str(p))]
    result = CliRunner().invoke(main, ["worklist", referrals, "--jobs", "1", *outs])
    assert result.exit_code == 0, result.output
    batch = CliRunner().invoke(main, ["batch", referrals, str(tmp_path / "batch"), "--jobs", "1"])
    assert batch.exit_code == 0, batch.output
    rows = {r["referralId"]: r for r in output.read_rows(tmp_path / "batch")}
    with out["csv"].open(encoding="utf-8-sig", newline="") as fh:
        table = {r["Patient name"]: r for r in csv.DictReader(fh)}
    assert len(table) == 9 and "9 referrals:" in result.output
    for row in table.values():
        assert row["Status"] == _expected_status(rows[row["Referral"]]), row
    assert {name: row["Status"] for name, row in table.items() if row["Status"] != "cannot evaluate"} == {
        "Alberto Armstrong": "ready", "Alejandro Riojas": "deferred", "Marsha Hayes": "needs clinician review",
        "Emery Purdy": "needs data", "Pat Order": "deferred",
    }  # fmt: skip
    todo = {name: row["What to do"] for name, row in table.items()}
    assert todo["Alberto Armstrong"].startswith("Can go ahead. Use ")
    assert todo["Alejandro Riojas"].startswith("Do not book: the record says the patient has died.")
    assert todo["Emery Purdy"].startswith("Haemoglobin A1c needed, taken on or after 16 February 2021 and by 15 August 2021")
    assert "INR needed, taken on or after 13 June 2025 and by 20 June 2025 (the result of 30 May 2025" in todo["Pat Order"]
    assert "By the planned date, 20 June 2025: Hip replacement surgery is planned soon: not now." in todo["Pat Order"]
    assert "referrals.csv row 7: target 'elbow' is not one of" in todo["Wrong Site"]
    assert "'next tuesday' is not an ISO 8601 date" in todo["Bad Date"]
    assert "referrals.csv:9: not valid JSON" in todo["Broken File"]
    assert "referral id 'K1' is used by an earlier row" in todo["Same Id"]
    page = out["html"].read_text()
    assert page.count("<tr data-status=") == 9
    assert all(f'id="explain-{row["Decision id"]}"' in page for row in table.values() if row["Decision id"])


def test_a_folder_of_bundles_with_their_own_orders_needs_no_csv(tmp_path: Path) -> None:
    shutil.copy(ORDER_BUNDLE, tmp_path / "order.json")
    result = CliRunner().invoke(main, ["worklist", str(tmp_path), "--as-of", "2025-06-02T09:00:00Z",
                                       "--out", str(tmp_path / "r.csv"), "--link-base", "http://localhost:8080"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r.csv").read_text(encoding="utf-8-sig"))))
    assert [r["Status"] for r in rows] == ["ready"] and rows[0]["Explanation"].startswith("http://localhost:8080/decisions/dec-")
    bad = CliRunner().invoke(main, ["worklist", str(tmp_path), "--out", str(tmp_path / "r.pdf")])
    assert bad.exit_code == 2 and "extension" in bad.output


def test_the_page_reads_only_uploads_and_the_allowed_folder(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from needlepoint.rulesets import bundled_rulesets_dir, load_ruleset
    from needlepoint.worklist.web import JobStore, create_worklist_app

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(ORDER_BUNDLE, allowed / "order.json")
    (tmp_path / "secret.json").write_bytes(ORDER_BUNDLE.read_bytes())
    ruleset = load_ruleset(bundled_rulesets_dir() / "hip-injection")
    store = JobStore(tmp_path / "state", lambda: ruleset, allow_dir=allowed, jobs=1)
    client = TestClient(create_worklist_app(store))
    body = "referral_id,bundle\nok,order.json\nout,../secret.json\nabs,/etc/hostname\n"
    response = client.post(
        "/jobs", files=[("files", ("refs.csv", body, "text/csv"))], data={"as_of": "2025-06-02T09:00:00Z"}, follow_redirects=False
    )
    assert response.status_code == 303
    job = response.headers["location"].rsplit("/", 1)[1]
    for _ in range(200):
        if store.status(job)["state"] in ("done", "failed"):
            break

        time.sleep(0.05)
    rows = {r.referral_id: r for r in store.rows(job)}
    assert rows["ok"].status == "ready"
    assert "outside the folders this server may read" in rows["out"].error and "outside" in rows["abs"].error
    exported = client.get(f"/jobs/{job}/export.csv", params={"status": "ready"}).text
    assert exported.count("\r\n") == 2 and "/jobs/" in exported
    page = client.get(f"/jobs/{job}/decisions/{rows['ok'].decision_id}").text
    assert "Why Needlepoint suggested this" in page and "Back to the worklist" in page
    refused = client.post("/jobs", data={"folder": "../"}, follow_redirects=False)
    assert "not inside the folder this server may read" in store.status(refused.headers["location"].rsplit("/", 1)[1])["message"]
