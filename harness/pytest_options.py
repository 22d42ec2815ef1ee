"""The scenario suite's pytest options (`--bench-*`), registered from two places.

The repository's root conftest.py registers them for every pytest run from the checkout, so a command line that
names them parses whatever it collects (`pytest --bench-profile cpu scenarios`, or with the options before the
path); scenarios/conftest.py registers them where the suite runs without the checkout's root (the copy an
installed wheel ships, harness.common.locations). Whichever comes second finds them there and adds nothing.
"""

from __future__ import annotations

import pytest

from harness.plan.scenario import TIERS

GROUP = "offload-bench"


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP)
    if any("--bench-results" in option.names() for option in group.options):
        return
    group.addoption("--bench-results", default="results", help="results folder (default: results)")
    group.addoption("--bench-run-id", default=None, help="run id; an existing run's cells that ended are not rerun")
    group.addoption("--bench-profile", default="auto", choices=["auto", "cpu", "gpu"], help="which scenarios run")
    group.addoption("--bench-scenario", action="append", default=[], help="only scenarios with this name (repeat)")
    group.addoption("--bench-scenarios-dir", default=None,
                    help="folder of scenario TOML files, searched recursively (default: the scenarios/ folder)")
    group.addoption("--bench-shard", "--shard", dest="bench_shard", default=None, metavar="I/N",
                    help="only the I-th of N cost-balanced shares of the cells, whole cards each "
                    "(harness/run/shard.py); N machines running 1/N..N/N with one --bench-run-id cover every cell once")
    group.addoption("--bench-tier", "--tier", dest="bench_tier", default=None, choices=TIERS,
                    help="pr: only scenarios with tier = \"pr\"; nightly (the default): every scenario")
