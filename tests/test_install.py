"""Installs like a tool: a real wheel (not editable) in a fresh virtual environment, used from a folder outside
the checkout. The environment sees the system's site-packages (torch and the rest are not downloaded) but its own
`harness` comes first; `pip` builds without isolation and installs without an index, so nothing is fetched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.common import exitcodes

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NOT_SOURCE = shutil.ignore_patterns(".git", "results", "build", "*.egg-info", "__pycache__", ".*cache", ".hypothesis",
                                    ".benchmarks", ".whl", ".engine", ".venv")

pytestmark = pytest.mark.slow


def _run(args: list[str | Path], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a venv holding offload-bench from a wheel built off a copy of the checkout (a build in the
    checkout itself would leave build/ there)."""
    root = tmp_path_factory.mktemp("install")
    shutil.copytree(REPO, root / "src", ignore=NOT_SOURCE)
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                  root / "wheel", root / "src"], root)  # an absolute path: a bare name would be a PyPI project
    assert built.returncode == 0, built.stderr
    wheel = next((root / "wheel").glob("offload_bench-*.whl"))
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root / "venv"], root)
    assert made.returncode == 0, made.stderr
    installed = _run([sys.executable, "-m", "pip", "--python", root / "venv" / "bin" / "python", "install", "-q",
                      "--no-deps", "--no-index", wheel], root)
    assert installed.returncode == 0, installed.stderr
    return root / "venv" / "bin"


def test_wheel_ships_the_scenario_suite(venv: Path, tmp_path: Path) -> None:
    where = _run([venv / "python", "-c", "import harness, harness.common.locations as l; print(harness.__file__); "
                  "print(l.scenarios_dir()); print(l.baselines_dir())"], tmp_path)
    assert where.returncode == 0, where.stderr
    package, scenarios, baselines = where.stdout.split()
    assert Path(package).is_relative_to(venv.parent), f"harness imported from {package}, not the wheel"
    shipped = {p.relative_to(scenarios).as_posix() for p in Path(scenarios).rglob("*") if p.suffix in (".toml", ".py")}
    source = {p.relative_to(REPO / "scenarios").as_posix() for p in (REPO / "scenarios").rglob("*")
              if p.suffix in (".toml", ".py")}
    assert shipped == source
    assert baselines == "results/baselines"  # the working folder's, never site-packages


def test_installed_list_runs_from_another_folder(venv: Path, tmp_path: Path) -> None:
    shipped = _run([venv / "python", "-c", "import harness.common.locations as l; print(l.scenarios_dir())"], tmp_path)
    # the CPU folder: the GPU files' engine policies ask installed SGLang releases, a minute for the whole suite
    listed = _run([venv / "offload-bench", "list", "--scenarios", Path(shipped.stdout.strip()) / "cpu"], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "qwen-image-edit-tiny/tiny-6m/cpu1-lw1-te0-vae0-pf1-pin1" in listed.stdout
    missing = _run([venv / "offload-bench", "list", "--scenarios", tmp_path / "nowhere"], tmp_path)
    assert missing.returncode == exitcodes.USAGE
    assert missing.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such scenarios folder"


def test_installed_report_baseline_and_compare_from_another_folder(venv: Path, tmp_path: Path) -> None:
    run = tmp_path / "run.records.jsonl"
    shutil.copy(FIXTURES / "cpu-qwen-image-edit-tiny.records.jsonl", run)
    tool = venv / "offload-bench"
    report = _run([tool, "report", run, "--write", "--no-plots"], tmp_path)
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "run.report.md").read_text().startswith("# offload-bench run")
    first = _run([tool, "compare", run], tmp_path)
    assert first.returncode == exitcodes.NO_BASELINE, first.stderr
    assert "results/baselines/cpu.json does not exist" in first.stderr
    assert first.stderr.rstrip().endswith(f"make one from this run with: offload-bench baseline {run}")
    made = _run([tool, "baseline", run], tmp_path)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "results" / "baselines" / "cpu.json").is_file()
    again = _run([tool, "compare", run, "--write"], tmp_path)
    assert again.returncode == exitcodes.OK, again.stdout + again.stderr
    assert (tmp_path / "run.compare.md").is_file()
