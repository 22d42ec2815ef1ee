"""The scenario suite as a person runs it: pytest options from the repository root, a bare `pytest` running the
unit tests only, a bench run that writes nothing outside its run folder, and progress shown while a cell runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import tiny_scenario_file

REPO = Path(__file__).resolve().parent.parent


def _pytest(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST") and k != "PYTEST_ADDOPTS"}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_options_parse_from_the_repository_root() -> None:
    """`pytest --bench-profile cpu ...` used to stop with 'unrecognized arguments' unless scenarios/ was the first
    path: the options lived in scenarios/conftest.py only."""
    proc = _pytest(["--bench-profile", "cpu", "--bench-results", "results", "--collect-only", "-q",
                    "tests/test_bench_session.py"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_bench_options_parse_from_the_repository_root" in proc.stdout


def test_bare_pytest_collects_the_unit_tests_only() -> None:
    ini = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert ini["testpaths"] == ["tests"]


@pytest.mark.slow
def test_bench_run_writes_only_its_run_folder_and_shows_progress_live(tmp_path: Path) -> None:
    """`make bench` used to leave results/pytest-benchmark.json beside the runs (untracked in the checkout), and every
    progress line was captured and shown after the run; now pytest-benchmark's JSON is in the run folder and the
    runner's lines go through pytest's terminal writer while the cell runs."""
    folder = tmp_path / "scenarios"
    folder.mkdir()
    tiny_scenario_file(folder, "one", {"dit_cpu_offload": [True], "dit_layerwise_offload": [True]})
    results = tmp_path / "results"
    # the cell's load phase takes 2.5 s longer (OFFLOAD_BENCH_FAULT's `pause`): a CPU cell from the fork server ends
    # in under a second, before the first progress line is due (CI failed on exactly that)
    env = {"OFFLOAD_BENCH_PROGRESS_S": "1", "OFFLOAD_BENCH_FAULT": "load:pause"}
    os.environ.update(env)
    try:
        proc = _pytest(["scenarios", "--bench-profile", "cpu", "--bench-results", str(results),
                        "--bench-scenarios-dir", str(folder), "--bench-run-id", "r1", "--show-capture=no"])
    finally:
        for key in env:
            os.environ.pop(key)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file())
    assert all(p.startswith("runs/r1/") for p in written), written
    assert "runs/r1/pytest-benchmark.json" in written and "runs/r1/records.jsonl" in written
    assert "runs/r1/verdicts.json" in written  # the session's end judged the run (its scenario expects nothing)
    assert '"fullname": "scenarios/test_offload_matrix.py::test_cell[one/native/' in (
        results / "runs" / "r1" / "pytest-benchmark.json").read_text()
    # with --show-capture=no, captured output is never printed: these lines came through the terminal writer, and
    # with OFFLOAD_BENCH_PROGRESS_S=1 the running cell said its phase and elapsed time at least once
    cell = "one/native/cpu1-lw1-te0-vae0-pf1-pin1"
    assert f"[cell 1/1, 0 left, 0 s, run ETA after the first cell] {cell}: starting" in proc.stdout
    assert f"{cell}: phase " in proc.stdout and "[worker " in proc.stdout


def test_cpu_baseline_is_ignored_by_git() -> None:
    """`make baseline` on a CPU box writes results/baselines/cpu.json: this machine's own, never committed."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "-q", "results/baselines/cpu.json"], cwd=REPO)
    assert proc.returncode == 0
    tracked = subprocess.run(["git", "check-ignore", "-q", "results/baselines/nvidia-h100-80gb-hbm3.json"], cwd=REPO)
    assert tracked.returncode == 1


def test_a_relative_results_folder_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed offload-bench's default is ./results, and the cell child runs in the package's folder: the
    child was handed a cell.json path relative to another folder and every cell crashed ("child exited with code 1
    without writing a record")."""
    from harness.run.folder import Run

    monkeypatch.chdir(tmp_path)
    run = Run.create(Path("results"), "cpu", "r")
    assert run.run_dir == tmp_path / "results" / "runs" / "r" and run.records_path.is_absolute()


def test_bench_model_copies_the_scenarios_of_its_pipeline(tmp_path: Path) -> None:
    """`bench --model M`: the suite's scenarios of M's pipeline, copied with M as their model (the others left
    out); a model of no scenario's pipeline is one line."""
    from harness.cli import Stop, model_scenarios
    from harness.plan.scenario import load_scenario

    out = model_scenarios(REPO / "scenarios", "wan-tiny", tmp_path)
    copies = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.toml"))
    assert "cpu/wan_tiny.toml" in copies and not any("flux" in c or "qwen" in c for c in copies)
    assert all('\nmodel = "wan-tiny"' in (out / c).read_text() for c in copies)
    assert load_scenario(out / "cpu" / "wan_tiny.toml").model == "wan-tiny"
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "one.toml").write_text((REPO / "scenarios" / "cpu" / "flux_tiny.toml").read_text())
    with pytest.raises(Stop, match=r"no scenario under .* runs the wan pipeline"):
        model_scenarios(suite, "wan-tiny", tmp_path)


@pytest.mark.slow
def test_bench_model_runs_the_suite_on_a_pipeline_folder(tmp_path: Path) -> None:
    """`offload-bench bench --model FOLDER` (issue 29): the wan-tiny scenario on a Wan folder written by
    save_pretrained (bfloat16, so the weight ledger and the scenario's expectations are the twin's), its native
    card's cells and set-level checks pass, each record on the folder."""
    import json

    from tests.pipeline_folders import write_pipeline_folder

    folder = write_pipeline_folder(tmp_path / "my-wan", "wan-tiny", dtype="bfloat16")
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "harness", "bench", "--model", str(folder), "--profile", "cpu",
                           "--results", str(results), "--bench-scenario", "wan-tiny", "--bench-run-id", "r1",
                           "-k", "native"], cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OFFLOAD_BENCH_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "5 passed" in proc.stdout  # 4 cells and the native card's expectations
    records = [json.loads(line) for line in (results / "runs" / "r1" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["model"] for r in records} == {str(folder.resolve())}
    assert {r["status"] for r in records} == {"ok"}
    assert (results / "model-scenarios" / "my-wan" / "cpu" / "wan_tiny.toml").is_file()
