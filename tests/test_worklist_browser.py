"""The worklist page in a real headless browser: Debian's chromium driven by Playwright.

``needlepoint worklist --serve`` runs on a loopback port with the test's folder allowed; the test
uploads the 100-referral CSV (:func:`tests.test_worklist.build_worklist`), waits for the run,
filters by status, searches a name, exports CSV, and opens a row's explanation. Screenshots go
to ``tests/artefacts/`` (git-ignored); the worklist's and the explanation's are also copied to
``$NEEDLEPOINT_SHOTS`` when it is set. Skipped without Playwright or chromium
(``scripts/setup-browser`` installs both; ``.ci/run`` runs it).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.test_worklist import build_worklist

REPO = Path(__file__).resolve().parents[1]
ARTEFACTS = REPO / "tests" / "artefacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]  # fmt: skip

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def server(tmp_path: Path):
    """``needlepoint worklist --serve`` on 127.0.0.1, the test folder allowed; yields its URL."""
    folder = tmp_path / "data"
    folder.mkdir()
    build_worklist(folder)
    port = _free_port()
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "service"), str(REPO / "clients"), os.environ.get("PYTHONPATH", "")])
    )
    command = [sys.executable, "-m", "needlepoint.cli", "worklist", "--serve", "--port", str(port), "--allow-dir", str(folder),
               "--state-dir", str(tmp_path / "state"), "--as-of", "2020-01-01T00:00:00Z"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/worklist/"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url, timeout=1).read()
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(f"the server stopped: {process.stdout.read().decode() if process.stdout else ''}")
                time.sleep(0.1)
        yield url, folder
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_upload_filter_search_export_and_explain(server, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (scripts/setup-browser)")
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (scripts/setup-browser)")
    url, folder = server
    ARTEFACTS.mkdir(exist_ok=True)
    shots = Path(os.environ["NEEDLEPOINT_SHOTS"]) if os.environ.get("NEEDLEPOINT_SHOTS") else None
    profile = tempfile.mkdtemp(prefix="needlepoint-chromium-")
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS, accept_downloads=True,
                viewport={"width": 1400, "height": 900},
            )  # fmt: skip
            page = browser.new_page()
            page.goto(url)
            page.get_by_label("Files").set_input_files(str(folder / "referrals.csv"))
            page.screenshot(path=str(ARTEFACTS / "worklist-1-upload.png"))
            page.get_by_role("button", name="Evaluate the worklist").click()
            page.wait_for_selector("#worklist", timeout=180_000)
            count = page.locator("#count")
            sync_api.expect(count).to_have_text("Showing 100 of 100 referrals")
            page.screenshot(path=str(ARTEFACTS / "worklist-2-table.png"), full_page=False)

            # filter by status: only deferred rows remain
            page.get_by_label("Status").select_option("deferred")
            visible = page.locator("#worklist tbody tr:not([hidden])")
            deferred = visible.count()
            assert deferred >= 22
            assert set(visible.locator(".status").all_inner_texts()) == {"deferred"}
            sync_api.expect(count).to_have_text(f"Showing {deferred} of 100 referrals")

            # back to every status; search a name
            page.get_by_label("Status").select_option("")
            page.get_by_label("Search (name, referral, file, words)").fill("emery")
            sync_api.expect(count).to_have_text("Showing 2 of 100 referrals")  # Emery Purdy, referred twice
            assert "Haemoglobin A1c needed, taken on or after 16 February 2021" in page.locator("#worklist tbody").inner_text()

            # sort by status (the header is a button), keyboard only
            page.get_by_label("Search (name, referral, file, words)").fill("")
            page.get_by_role("button", name="Status").focus()
            page.keyboard.press("Enter")
            assert page.locator("th[data-key=rank]").get_attribute("aria-sort") == "ascending"
            assert visible.first.locator(".status").inner_text() == "cannot evaluate"

            # export what the filter shows
            page.get_by_label("Status").select_option("needs data")
            shown = visible.count()
            with page.expect_download() as info:
                page.get_by_role("link", name="CSV").click()
            exported = Path(info.value.path()).read_text(encoding="utf-8-sig")
            rows = list(csv.DictReader(io.StringIO(exported)))
            assert len(rows) == shown >= 2 and {r["Status"] for r in rows} == {"needs data"}
            shutil.copy(info.value.path(), ARTEFACTS / "worklist-export.csv")
            page.screenshot(path=str(ARTEFACTS / "worklist-3-needs-data.png"))

            # open a row's explanation: the CDS Hooks explanation page's renderer
            page.get_by_label("Status").select_option("")
            page.get_by_label("Search (name, referral, file, words)").fill("emery")
            page.screenshot(path=str(ARTEFACTS / "worklist-4-search.png"))
            visible.filter(has_text="15 August 2021").locator("a").click()
            sync_api.expect(page.get_by_role("heading", name="Why Needlepoint suggested this")).to_be_visible()
            assert "CAU-DM-ENHANCED" in page.content()
            page.screenshot(path=str(ARTEFACTS / "worklist-5-explanation.png"), full_page=True)

            # the worklist, unfiltered, as the lead sees it first
            page.goto(url)
            page.locator("a", has_text="referrals.csv").first.click()
            page.wait_for_selector("#worklist")
            page.screenshot(path=str(ARTEFACTS / "worklist-final.png"))
            browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    if shots is not None:
        shots.mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTEFACTS / "worklist-4-search.png", shots / "worklist.png")
        shutil.copy(ARTEFACTS / "worklist-5-explanation.png", shots / "explanation.png")
