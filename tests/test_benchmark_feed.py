"""What the scenario suite feeds pytest-benchmark: one benchmark per cell that ran (a `same_as` copy is not a
second benchmark of the same rounds), and a GPU scenario with fewer than 3 measured rounds says why, at load time
and in each benchmark's extra_info."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.common.contract import SCHEMA_VERSION, CellRecord
from harness.plan.scenario import Cell, ScenarioError, expand, load_scenario
from scenarios import test_offload_matrix as matrix
from tests.helpers import base_scenario, mutate, to_toml

REPO = Path(__file__).resolve().parent.parent
PEER = REPO / "scenarios" / "gpu" / "qwen_image_peer.toml"


class FakeBenchmark:
    """The part of pytest-benchmark's fixture that test_cell touches."""

    def __init__(self) -> None:
        self.disabled = False
        self.extra_info: dict[str, Any] = {}
        self.pedantic_rounds: list[int] = []
        self._timer: Any = None

    def pedantic(self, target: Any, rounds: int, iterations: int, warmup_rounds: int) -> None:
        for _ in range(rounds):
            target()
        self.pedantic_rounds.append(rounds)


class FakeBench:
    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def get(self, cell: Cell) -> CellRecord:
        return CellRecord.from_dict({**self.record, "cell_id": cell.cell_id, "card": cell.card.as_dict(),
                                     "requested": cell.requested.as_dict()})


def _ok_record(rounds: int) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "status": "ok", "rounds": {"e2e_ms": [1000.0 + i for i in range(rounds)]},
            "phases": {}}


def test_a_same_as_copy_is_not_a_second_benchmark() -> None:
    cells = expand(load_scenario(PEER))
    copy = next(c for c in cells if c.same_as is not None)
    source = next(c for c in cells if c.cell_id == copy.same_as)
    ran, copied = FakeBenchmark(), FakeBenchmark()
    matrix.test_cell(source, FakeBench(_ok_record(1)), ran)
    matrix.test_cell(copy, FakeBench(_ok_record(1)), copied)
    assert ran.pedantic_rounds == [1]
    assert copied.pedantic_rounds == [] and copied.extra_info == {}


def test_few_rounds_say_why_in_extra_info() -> None:
    cell = next(c for c in expand(load_scenario(PEER)) if c.same_as is None)
    benchmark = FakeBenchmark()
    matrix.test_cell(cell, FakeBench(_ok_record(1)), benchmark)
    assert benchmark.extra_info["few_rounds"] == load_scenario(PEER).few_rounds
    enough = FakeBenchmark()
    matrix.test_cell(cell, FakeBench(_ok_record(3)), enough)
    assert enough.pedantic_rounds == [3] and "few_rounds" not in enough.extra_info


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(to_toml(data))
    return path


def test_a_gpu_scenario_with_fewer_than_three_rounds_must_say_why(tmp_path: Path) -> None:
    gpu = mutate(mutate(base_scenario(), ("profile",), "gpu"), ("rounds",), 1)
    with pytest.raises(ScenarioError, match=r"s\.toml: rounds: 1 measured round\(s\) feed pytest-benchmark"):
        load_scenario(_write(tmp_path, gpu))
    assert load_scenario(_write(tmp_path, mutate(gpu, ("few_rounds",), "a smoke test"))).few_rounds == "a smoke test"
    assert load_scenario(_write(tmp_path, mutate(gpu, ("rounds",), 3))).few_rounds is None
    with pytest.raises(ScenarioError, match="few_rounds: rounds = 3 is at least 3"):
        load_scenario(_write(tmp_path, mutate(mutate(gpu, ("rounds",), 3), ("few_rounds",), "why")))
    load_scenario(_write(tmp_path, mutate(base_scenario(), ("rounds",), 1)))  # CPU: times are not compared


@pytest.mark.parametrize("path", sorted([*(REPO / "scenarios" / "gpu").glob("*.toml"),
                                          *(REPO / "experiments" / "scenarios").glob("*.toml")]), ids=lambda p: p.name)
def test_committed_gpu_scenarios_measure_three_rounds_or_say_why(path: Path) -> None:
    import tomllib

    data = tomllib.loads(path.read_text())
    # a capacity search's probes are pass/fail cells of `python -m harness capacity`, never benchmarks
    assert data.get("rounds", 1) >= 3 or data.get("few_rounds") or "capacity" in data, path
