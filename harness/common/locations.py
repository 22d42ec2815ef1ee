"""Where the scenario files and the baselines are, in a checkout and in an installed wheel.

In a checkout (this package beside `pyproject.toml` and `scenarios/`): its `scenarios/` and `results/baselines/`.
Installed from a wheel (`pip install .`): the scenario folder that `setup.py` ships inside the package
(`harness/_shipped/scenarios`, the pytest glue included, so `offload-bench bench` runs the same suite), and
`results/baselines` under the working folder: baselines are per machine and written by `offload-bench baseline`,
so they never live in site-packages. The committed GPU records ship too (`harness/_shipped/results`), for
`advise`. `--scenarios` / `--baselines-dir` override both.

One-off experiment scenarios live in a checkout's `experiments/scenarios/`, outside the suite that `bench` runs
(docs/scenarios.md); a record names the file it ran from, so reading a record looks in both folders.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # harness/, this module sits in harness/common/
SHIPPED = PACKAGE / "_shipped"  # filled by setup.py's build_py, in a wheel only


def cache_root() -> Path:
    """The harness's cache (`OFFLOAD_BENCH_CACHE`, else ~/.cache/offload-bench): synthetic checkpoints, the SGLang
    releases, the sized checkpoint stand-ins."""
    return Path(os.environ.get("OFFLOAD_BENCH_CACHE", Path.home() / ".cache" / "offload-bench")).expanduser()


def checkout() -> Path | None:
    """The source checkout this package runs from, or None when it is installed from a wheel."""
    root = PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() and (root / "scenarios").is_dir() else None


def scenarios_dir() -> Path:
    root = checkout()
    return root / "scenarios" if root is not None else SHIPPED / "scenarios"


def baselines_dir() -> Path:
    root = checkout()
    return root / "results" / "baselines" if root is not None else Path("results") / "baselines"


def records_glob() -> str:
    """The committed GPU records (results/<gpu>/*.records.jsonl) that `advise` takes measured rows from: the
    checkout's, or the copy a wheel ships beside its scenarios."""
    root = checkout()
    base = root / "results" if root is not None else SHIPPED / "results"
    return str(base / "**" / "*.records.jsonl")


def experiment_scenarios_dir() -> Path | None:
    """The checkout's one-off experiment scenarios (`experiments/scenarios/`), None from a wheel (it ships the suite
    only)."""
    root = checkout()
    return root / "experiments" / "scenarios" if root is not None else None


def scenario_folders() -> list[Path]:
    """Where a recorded scenario file is looked for: the suite's folder, then the experiments' (if there is one)."""
    experiments = experiment_scenarios_dir()
    return [scenarios_dir(), *([experiments] if experiments is not None and experiments.is_dir() else [])]


def local_scenario_file(recorded: str | None) -> Path | None:
    """The scenario file a record names, as this checkout has it: the same path under this checkout's scenario
    folders first (`scenario_folders`), else the one file of that name in them (a scenario moved between the
    suite and the experiments: its records keep the path it ran from), else the recorded path itself; None if none
    exists.

    This checkout's copy first, because a recorded absolute path can name another checkout's working copy: the GPU
    box runs in /work/main, so a worktree elsewhere on this machine evaluated its reports against main's files."""
    if not recorded:
        return None
    path = Path(recorded)
    if "scenarios" in path.parts:
        relative = Path(*path.parts[path.parts.index("scenarios") + 1:])
        folders = scenario_folders()
        local = next((f / relative for f in folders if (f / relative).exists()), None)
        if local is not None:
            return local
        same_name = [p for f in folders for p in sorted(f.rglob(path.name))]
        if len(same_name) == 1:
            return same_name[0]
    return path if path.exists() else None
