"""`offload-bench run` (issue 29): plan every combination, run the worth-measuring cells, summary with the flags."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_folders import write_pipeline_folder

REPO = Path(__file__).resolve().parent.parent


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OFFLOAD_BENCH_CACHE": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "harness", "run", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=600)


def test_dry_run_lists_the_cells_and_runs_nothing(tmp_path: Path) -> None:
    out = _run(tmp_path, "--model", "flux-tiny", "--card", "tiny=0.05", "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "cells to run on" in out.stdout and "engine default for the card" in out.stdout
    assert "--dit-cpu-offload" in out.stdout and not (tmp_path / "results").exists()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["zoo", "folder"])
def test_one_command_from_an_empty_folder(tmp_path: Path, source: str) -> None:
    model = "flux-tiny" if source == "zoo" else str(
        write_pipeline_folder(tmp_path / "pipe", "flux-tiny", shard_dit=True, dtype="bfloat16"))
    out = _run(tmp_path, "--model", model, "--card", "tiny=0.05", "--steps", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "summary: 2 of 2 measured cells ran" in out.stdout
    assert "flags to paste (SGLang 0.5.23 CLI): --dit-cpu-offload" in out.stdout
    runs = list((tmp_path / "results" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "records.jsonl").is_file()
    report = subprocess.run([sys.executable, "-m", "harness", "report", str(runs[0])], cwd=tmp_path,
                            capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert report.returncode == 0, report.stderr
