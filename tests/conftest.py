"""Shared fixtures for the CPU unit tests.

Every test session writes synthetic checkpoints to a temporary cache, never to ~/.cache/offload-bench; the SGLang
releases installed there (harness.engine.install) are still found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def checkpoint_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Points OFFLOAD_BENCH_CACHE at a session temp dir (set directly in os.environ, restored afterwards)."""
    from harness.engine.install import engine_root

    folder = tmp_path_factory.mktemp("offload-bench-cache")
    old = {k: os.environ.get(k) for k in ("OFFLOAD_BENCH_CACHE", "OFFLOAD_BENCH_SGLANG_ROOT")}
    # The installed SGLang releases (`make deps`) stay where they are: only the checkpoints move.
    os.environ["OFFLOAD_BENCH_SGLANG_ROOT"] = str(engine_root())
    os.environ["OFFLOAD_BENCH_CACHE"] = str(folder)
    try:
        yield folder
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
