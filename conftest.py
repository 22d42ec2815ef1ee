"""The repository root: registers the scenario suite's `--bench-*` options for any pytest run from here
(harness.pytest_options), so they parse before or without `scenarios` on the command line. A bare `pytest` runs
the unit tests only (pyproject: testpaths); the suite is `pytest scenarios` (`make bench`)."""

from __future__ import annotations

import pytest

from harness.pytest_options import add_options


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)
