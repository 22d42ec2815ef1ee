"""The HTML pages as a person sees them: rendered for committed GPU records, a CPU run and the history of the
committed H200 runs, opened in headless Chromium (Debian's `chromium`, installed with apt-get where missing):
no script error, every image decodes (naturalWidth > 0), a table sorts both ways on a header click, and a
screenshot is written beside the page: a run page is written into a run folder (the records copied under
tmp_path, the page where `report RUN --write --html` puts it) and its screenshot into that run folder
(OFFLOAD_BENCH_SHOTS=DIR keeps a copy). The page checks itself when opened as `page.html#selftest` and writes
the result into <pre id="selftest-result">, which --dump-dom returns after --virtual-time-budget."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.analyze.history import write_history
from harness.analyze.html import write_html
from harness.cli import beside
from tests.helpers import cell_records

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = "report-screenshot.png"  # not report.png: `report --write` names its plots <stem>-<card>-<kind>.png


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get (as root) is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            pytest.skip(f"installing chromium failed ({' '.join(cmd)}): {proc.stderr.strip()[-300:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get install chromium succeeded but no chromium on PATH")
    return found


BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                 "--enable-logging=stderr", "--v=0"]


def check_in_browser(page: Path, shot: Path) -> dict:
    browser = _chromium()
    proc = subprocess.run([browser, *BROWSER_FLAGS, "--virtual-time-budget=10000", "--dump-dom",
                           page.resolve().as_uri() + "#selftest"], capture_output=True, text=True, timeout=180)
    found = re.search(r'<pre id="selftest-result"[^>]*>(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the page wrote no self-test result:\n{proc.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    result["console"] = console
    subprocess.run([browser, *BROWSER_FLAGS, "--window-size=1600,2200", f"--screenshot={shot}",
                    page.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "no screenshot written"
    return result


def assert_clean(result: dict) -> None:
    assert result["errors"] == [] and result["console"] == [], result
    assert result["images"] > 0 and result["broken"] == [], result
    sort = result["sort"]
    assert sort and sort["ascending"] and sort["descending"], result


@pytest.mark.parametrize("records", ["results/h200/pr-tier.records.jsonl",
                                     "tests/fixtures/cpu-qwen-image-edit-tiny.records.jsonl"])
def test_run_page_in_chromium(records: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # records made elsewhere name their checkout's scenarios
    run = tmp_path / "run"  # a run folder as the runner leaves it: records.jsonl, and report.html beside it
    run.mkdir()
    shutil.copy(REPO / records, run / "records.jsonl")
    page = write_html(cell_records(run / "records.jsonl"), beside(str(run), "report.html"), title=Path(records).name)
    assert page == run / "report.html"  # where `report RUN --write --html` (make report) puts it
    shot = run / SCREENSHOT  # the screenshot goes into the run folder, beside the page it shows
    result = check_in_browser(page, shot)
    assert_clean(result)
    if shots := os.environ.get("OFFLOAD_BENCH_SHOTS"):  # keep the screenshots to look at
        Path(shots).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(shots) / f"run-{Path(records).name.split('.')[0]}.png")


def test_history_page_in_chromium(tmp_path: Path) -> None:
    page = write_history([str(REPO / "results/h200")], tmp_path / "history.html")
    result = check_in_browser(page, tmp_path / "history.png")
    assert_clean(result)
    if shots := os.environ.get("OFFLOAD_BENCH_SHOTS"):
        Path(shots).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "history.png", Path(shots) / "history-h200.png")
