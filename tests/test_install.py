"""Installs like a user: a real wheel (not editable) in a fresh virtual environment WITHOUT system site-packages,
with its dependencies at the versions of constraints.txt (torch as the CPU build first, as `make deps` does), used
from an empty folder outside the checkout. What this machine happens to have installed elsewhere cannot hide a
missing dependency, a file missing from the wheel, or a release that must be installed by hand.

The environment is built once per session (a minute or two: torch's CPU wheel and the pinned packages, from pip's
cache after the first time) and the commands then run as a user would type them: --version, list, bench on one
CPU scenario, report, baseline, compare, plan, advise; list and advise also with no SGLang release on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.common import exitcodes
from harness.engine.policy import available_versions

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NOT_SOURCE = shutil.ignore_patterns(".git", "results", "build", "*.egg-info", "__pycache__", ".*cache", ".hypothesis",
                                    ".benchmarks", ".whl", ".engine", ".venv")
TORCH = os.environ.get("OFFLOAD_BENCH_TEST_TORCH", "torch==2.13.0")

pytestmark = pytest.mark.slow


def _run(args: list[str | Path], cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], cwd=cwd, env={**base, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of an isolated venv holding offload-bench from a wheel built off a copy of the checkout (a
    build in the checkout itself would leave build/ there), its dependencies pinned by constraints.txt. The copy
    ships the committed GPU records (results/<gpu>/*.records.jsonl) as the wheel does, nothing else of results/."""
    root = tmp_path_factory.mktemp("install")
    shutil.copytree(REPO, root / "src", ignore=NOT_SOURCE)
    for records in (REPO / "results").glob("*/*.records.jsonl"):
        target = root / "src" / records.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(records, target)
    made = _run([sys.executable, "-m", "venv", root / "venv"], root)
    assert made.returncode == 0, made.stderr
    python = root / "venv" / "bin" / "python"
    torch = _run([python, "-m", "pip", "install", "-q", TORCH], root)
    assert torch.returncode == 0, torch.stderr
    built = _run([python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", root / "wheel", root / "src"], root)
    assert built.returncode == 0, built.stderr
    wheel = next((root / "wheel").glob("offload_bench-*.whl"))
    installed = _run([python, "-m", "pip", "install", "-q", "-c", REPO / "constraints.txt", wheel], root)
    assert installed.returncode == 0, installed.stderr
    return root / "venv" / "bin"


NO_RELEASES = {"OFFLOAD_BENCH_SGLANG_ROOT": "/nonexistent/offload-bench-sglang"}


def test_the_environment_is_isolated_and_pinned(venv: Path, tmp_path: Path) -> None:
    probe = _run([venv / "python", "-c", "import sys; print(sys.flags.no_site, sys.prefix != sys.base_prefix); "
                  "import pytest_benchmark, transformers; print(pytest_benchmark.__version__, "
                  "transformers.__version__)"], tmp_path)
    assert probe.returncode == 0, probe.stderr
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert probe.stdout.split()[2:] == [pins["pytest-benchmark"], pins["transformers"]]
    version = _run([venv / "offload-bench", "--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("offload-bench "), version.stderr


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


@pytest.mark.parametrize("releases", ["installed", "none"])
def test_installed_list_runs_from_another_folder(venv: Path, tmp_path: Path, releases: str) -> None:
    """The whole shipped suite, GPU files included: their sglang@ policies resolve from the releases' recorded
    answers (harness/engine/answers.jsonl ships), with or without a release on the machine."""
    if releases == "installed" and not {"0.5.8", "0.5.23"} <= set(available_versions()):
        pytest.skip("SGLang 0.5.8 and 0.5.23 are not installed here (make deps installs them)")
    listed = _run([venv / "offload-bench", "list"], tmp_path, env=NO_RELEASES if releases == "none" else None)
    assert listed.returncode == 0, listed.stderr
    assert "qwen-image-edit-tiny/tiny-6m/cpu1-lw1-te0-vae0-pf1-pin1" in listed.stdout
    assert "qwen-image-edit-5090-sglang-0.5.8/rtx5090-32g/cpu1-lw1-te0-vae0-pf4-pin1" in listed.stdout
    skipped = [line for line in listed.stdout.splitlines() if line.startswith("skipped ")]
    if releases == "installed":
        assert not skipped, skipped
    else:  # scenarios whose *backend* is a release's layerwise manager need the release itself: one line each
        assert skipped and all(line.endswith("install it with `python -m harness.engine.install 0.5.23`")
                               for line in skipped), skipped
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


def test_installed_bench_plan_and_advise_from_an_empty_folder(venv: Path, tmp_path: Path) -> None:
    """The main job on one CPU scenario, then report / baseline / compare on what it wrote, then the planner: with no
    SGLang release on the machine, from a folder holding nothing."""
    tool = venv / "offload-bench"
    bench = _run([tool, "bench", "--profile", "cpu", "--results", "out", "--bench-scenario", "wan-tiny",
                  "--bench-run-id", "wheel"], tmp_path, env=NO_RELEASES)
    assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-2000:]
    run = tmp_path / "out" / "runs" / "wheel"
    assert (run / "records.jsonl").is_file() and (run / "pytest-benchmark.json").stat().st_size > 0
    report = _run([tool, "report", run, "--write", "--no-plots"], tmp_path)
    assert report.returncode == 0, report.stderr
    made = _run([tool, "baseline", run], tmp_path)
    assert made.returncode == 0, made.stderr
    compared = _run([tool, "compare", run], tmp_path)
    assert compared.returncode == exitcodes.OK, compared.stdout + compared.stderr
    planned = _run([tool, "plan", "--model", "qwen-image-edit", "--card", "rtx5090-32g", "--flags",
                    "dit_cpu_offload=true,dit_layerwise_offload=true"], tmp_path, env=NO_RELEASES)
    assert planned.returncode == 0, planned.stderr
    advised = _run([tool, "advise", "--model", "qwen-image-edit", "--card", "rtx5090-32g"], tmp_path,
                   env=NO_RELEASES)
    assert advised.returncode == 0, advised.stderr
    source = next(line for line in advised.stdout.splitlines() if line.startswith("measured rows from:"))
    assert "_shipped/results" in source and "(0 files)" not in source, source
