"""Shared fixtures for the CPU unit tests.

Every test session writes synthetic checkpoints to a temporary cache, never to ~/.cache/offload-bench.
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
    folder = tmp_path_factory.mktemp("offload-bench-cache")
    old = os.environ.get("OFFLOAD_BENCH_CACHE")
    os.environ["OFFLOAD_BENCH_CACHE"] = str(folder)
    try:
        yield folder
    finally:
        if old is None:
            os.environ.pop("OFFLOAD_BENCH_CACHE", None)
        else:
            os.environ["OFFLOAD_BENCH_CACHE"] = old


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
