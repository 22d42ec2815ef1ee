"""Where the scenario files and the baselines are, in a checkout and in an installed wheel.

In a checkout (this package beside `pyproject.toml` and `scenarios/`): its `scenarios/` and `results/baselines/`.
Installed from a wheel (`pip install .`): the scenario folder that `setup.py` ships inside the package
(`harness/_shipped/scenarios`, the pytest glue included, so `offload-bench bench` runs the same suite), and
`results/baselines` under the working folder: baselines are per machine and written by `offload-bench baseline`,
so they never live in site-packages. The committed GPU records ship too (`harness/_shipped/results`), for
`advise`. `--scenarios` / `--baselines-dir` override both.
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


def local_scenario_file(recorded: str | None) -> Path | None:
    """The scenario file a record names, as this checkout has it: the same path under this checkout's scenarios
    folder first, else the recorded path itself; None if neither exists.

    This checkout's copy first, because a recorded absolute path can name another checkout's working copy: the GPU
    box runs in /work/main, so a worktree elsewhere on this machine evaluated its reports against main's files."""
    if not recorded:
        return None
    path = Path(recorded)
    if "scenarios" in path.parts:
        local = scenarios_dir() / Path(*path.parts[path.parts.index("scenarios") + 1:])
        if local.exists():
            return local
    return path if path.exists() else None
