"""The baseline workflow end to end on the CPU profile, as a person runs it (issue #32): a tiny scenario benched,
`baseline` saved from that run, a second run benched and `compare`d against it, and `report --html` of the second
run with its baseline section (the verdict, and the baseline-vs-current figure captioned with the baseline file).
A baseline whose memory figures are edited down is then a regression, in `compare`'s exit code and on the page.

Through `python -m harness ...` in children: the bench needs its own pytest session, and the commands are what the
nightly workflow and `make` call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_scenario_file

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # two bench runs of one tiny cell (each a pytest session and a cell child): ~1 min


def _harness(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST") and k != "PYTEST_ADDOPTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _bench(scenarios: Path, results: Path, run_id: str) -> Path:
    proc = _harness("bench", "--profile", "cpu", "--results", str(results), "--bench-scenarios-dir", str(scenarios),
                    "--bench-run-id", run_id, "-q")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = results / "runs" / run_id
    assert (run / "records.jsonl").is_file()
    return run


def test_bench_baseline_bench_compare_and_the_html_baseline_section(tmp_path: Path) -> None:
    scenarios = tmp_path / "scenarios"
    scenarios.mkdir()
    tiny_scenario_file(scenarios, "e2e-baseline", {"dit_cpu_offload": [True], "dit_layerwise_offload": [False, True]})
    results, baselines = tmp_path / "results", tmp_path / "baselines"
    first = _bench(scenarios, results, "first")

    saved = _harness("baseline", str(first), "--baselines-dir", str(baselines))
    assert saved.returncode == 0, saved.stdout + saved.stderr
    baseline_file = baselines / "cpu.json"
    cells = json.loads(baseline_file.read_text())["cells"]
    assert len(cells) == 2 and all(c.startswith("e2e-baseline/native/") for c in cells)

    second = _bench(scenarios, results, "second")
    compared = _harness("compare", str(second), "--baselines-dir", str(baselines))
    assert compared.returncode == 0, compared.stdout + compared.stderr  # the same cells, the same memory: pass
    verdict = compared.stdout.splitlines()[0]
    assert verdict.startswith(f"PASS: 2 cells vs {baseline_file} (SKU cpu); cells: all as in the baseline; "
                              "metrics: 4 within tolerance"), compared.stdout

    page_path = tmp_path / "second.html"
    report = _harness("report", str(second), "--html", str(page_path), "--baselines-dir", str(baselines))
    assert report.returncode == 0, report.stdout + report.stderr
    page = page_path.read_text()
    assert f"PASS against {baseline_file}: 0 metric(s) regressed, 0 cell(s) lost, changed or missing" in page
    assert 'alt="e2e-baseline on native: baseline vs current"' in page
    assert f"Against the baseline {baseline_file}: per metric and cell" in page

    # the same run against a baseline that remembers half the memory: a regression, said by compare and the page
    data = json.loads(baseline_file.read_text())
    for cell in data["cells"].values():
        cell["metrics"] = {name: value // 2 if name.endswith("_bytes") and value else value
                           for name, value in cell["metrics"].items()}
    baseline_file.write_text(json.dumps(data, indent=1))
    regressed = _harness("compare", str(second), "--baselines-dir", str(baselines))
    assert regressed.returncode == 1, regressed.stdout + regressed.stderr
    assert regressed.stdout.startswith("FAIL: 2 cells vs ") and "regressed" in regressed.stdout.splitlines()[0], \
        regressed.stdout
    report = _harness("report", str(second), "--html", str(page_path), "--baselines-dir", str(baselines))
    assert report.returncode == 0, report.stdout + report.stderr
    assert f"FAIL against {baseline_file}:" in page_path.read_text()
