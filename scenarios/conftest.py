"""pytest glue: every scenario file under scenarios/ becomes one test per cell plus one set-level test per card.

`pytest scenarios` (what `make bench` runs) picks the profile from the machine: the GPU scenarios where NVML
sees a GPU, the CPU profile (tiny models, simulated cards) otherwise, and says which in the header. Cells of the
other profile are skipped with the reason. Records go to <results>/runs/<run id>/records.jsonl as each cell ends.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from harness.results import latest_by_cell, read_records
from harness.runner import Run, detect_device, run_cell
from harness.scenario import Cell, Scenario, discover, expand

HERE = Path(__file__).parent


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("offload-bench")
    g.addoption("--bench-results", default="results", help="results folder (default: results)")
    g.addoption("--bench-run-id", default=None, help="run id; an existing run's cells that ended are not rerun")
    g.addoption("--bench-profile", default="auto", choices=["auto", "cpu", "gpu"], help="which scenarios run")
    g.addoption("--bench-scenario", action="append", default=[], help="only scenarios with this name (repeat)")


def _profile(config: pytest.Config) -> str:
    chosen = config.getoption("--bench-profile")
    if chosen == "auto":
        return "gpu" if detect_device() == "cuda" else "cpu"
    return chosen


def _scenarios(config: pytest.Config) -> list[Scenario]:
    wanted = set(config.getoption("--bench-scenario"))
    return [s for s in discover(HERE) if not wanted or s.name in wanted]


def pytest_report_header(config: pytest.Config) -> list[str]:
    profile = _profile(config)
    if profile == "cpu":
        return [
            "offload-bench: no CUDA GPU selected: running the CPU profile (tiny models, simulated cards, "
            "device memory = harness ledger of weight bytes). GPU scenarios are skipped."
        ]
    return ["offload-bench: GPU profile (real models, synthetic checkpoints, CUDA allocator + NVML counters)"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    config = metafunc.config
    profile = _profile(config)
    scenarios = _scenarios(config)

    def marks(s: Scenario) -> list[Any]:
        m: list[Any] = [pytest.mark.gpu] if s.profile == "gpu" else []
        if s.profile != profile:
            why = "no CUDA GPU (CPU profile)" if s.profile == "gpu" else "the GPU profile runs instead"
            m.append(pytest.mark.skip(reason=f"{s.name}: {why}"))
        return m

    if "cell" in metafunc.fixturenames:
        params = [pytest.param(c, id=c.cell_id, marks=marks(s)) for s in scenarios for c in expand(s)]
        metafunc.parametrize("cell", params)
    if "scenario_card" in metafunc.fixturenames:
        params = []
        for s in scenarios:
            m = marks(s)
            if s.xfail:
                m.append(pytest.mark.xfail(reason=s.xfail, strict=True))
            params += [pytest.param((s, card.name), id=f"{s.name}/{card.name}", marks=m) for card in s.cards]
        metafunc.parametrize("scenario_card", params)


MACHINE: dict[str, Any] = {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    runnable = [i for i in items if "cell" in getattr(i, "fixturenames", ()) and not i.get_closest_marker("skip")]
    config._offload_bench_cells = len(runnable)  # type: ignore[attr-defined]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    """pytest-benchmark's machine info knows no GPU: add the child's (name, memory, driver, CUDA, torch, PCIe)."""
    keys = ("gpu", "gpu_memory_bytes", "sku", "driver", "cuda", "torch", "diffusers", "pcie_gen", "pcie_width",
            "pinned_h2d_gbps", "allocator_conf")
    machine_info["offload_bench"] = {k: MACHINE.get(k) for k in keys}


class Records:
    """The session's run: runs a cell on first request, then serves its record."""

    def __init__(self, run: Run, total: int = 0) -> None:
        self.run = run
        self.count = 0
        self.total = total
        self.started = time.monotonic()

    def get(self, cell: Cell) -> dict[str, Any]:
        if cell.same_as is not None and cell.same_as not in self.run.finished():
            source = next(c for c in expand(cell.scenario) if c.cell_id == cell.same_as)
            self.get(source)
        known = self.run.finished().get(cell.cell_id)
        if known is not None and known.get("spec_hash") == cell.spec_hash(self.run.device):
            return known
        self.count += 1
        left = max(self.total - self.count, 0)
        label = f"[cell {self.count}/{self.total}, {left} left, {time.monotonic() - self.started:.0f} s]"
        record = run_cell(self.run, cell, label)
        if record.get("machine") and not MACHINE:
            MACHINE.update(record["machine"])
        return record

    def group(self, scenario: Scenario, card: str) -> list[dict[str, Any]]:
        for cell in expand(scenario):
            if cell.card.name == card:
                self.get(cell)
        recs = latest_by_cell(read_records(self.run.records_path).records).values()
        return [r for r in recs if r["scenario"] == scenario.name and r["card"]["name"] == card]


@pytest.fixture(scope="session")
def bench(request: pytest.FixtureRequest) -> Records:
    config = request.config
    device = "cuda" if _profile(config) == "gpu" else "cpu"
    run = Run.create(Path(config.getoption("--bench-results")), device, config.getoption("--bench-run-id"))
    print(f"\noffload-bench: records -> {run.records_path}")
    return Records(run, getattr(config, "_offload_bench_cells", 0))
