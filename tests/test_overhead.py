"""A cell's fixed cost (record["overhead"]) and the pinned H2D probe measured once per run and GPU: the first cell on
a GPU probes, the runner passes its figure to the later cells on that GPU through the cell spec."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness.analyze.overhead import fixed_cost
from harness.cell import measure
from harness.common.contract import H2D_PROBE_SPEC_KEY, CellRecord, Status
from harness.plan.scenario import expand, load_scenario
from harness.run import runner
from harness.run.runner import Run, child_spec, finish_overhead, remember_h2d_probe
from tests.helpers import TINY_SCENARIO


@pytest.fixture
def cell():
    return expand(load_scenario(TINY_SCENARIO))[0]


def _run(tmp_path: Path, device: str = "cuda") -> Run:
    return Run(tmp_path / "run", device, "r1")


def _probed(cell_id: str, source: str = "this cell") -> CellRecord:
    return CellRecord(cell_id, Status.OK, machine={"pinned_h2d_gbps": 55.3, "pinned_h2d_source": source})


def test_the_first_probe_on_a_gpu_is_passed_to_the_later_cells_on_it(tmp_path, cell, monkeypatch):
    monkeypatch.delenv(runner.H2D_PROBE_ENV, raising=False)
    run = _run(tmp_path)
    # nothing measured yet: the cell probes
    assert H2D_PROBE_SPEC_KEY not in child_spec(run, cell, tmp_path, "0").as_dict()
    remember_h2d_probe(run, "0", _probed("a/b/first"))
    remember_h2d_probe(run, "0", _probed("a/b/second"))  # the first figure stays
    assert child_spec(run, cell, tmp_path, "0").as_dict()[H2D_PROBE_SPEC_KEY] == {"gbps": 55.3, "cell_id": "a/b/first"}
    assert H2D_PROBE_SPEC_KEY not in child_spec(run, cell, tmp_path, "1").as_dict()  # another GPU probes for itself
    monkeypatch.setenv(runner.H2D_PROBE_ENV, "each")  # the A/B: every cell probes, as before
    assert H2D_PROBE_SPEC_KEY not in child_spec(run, cell, tmp_path, "0").as_dict()


def test_a_passed_down_figure_is_not_passed_on_as_a_measurement(tmp_path):
    run = _run(tmp_path)
    remember_h2d_probe(run, "0", _probed("a/b/c", source="passed down by the runner (measured by x)"))
    remember_h2d_probe(run, "1", CellRecord("crashed", Status.CRASH, machine={}))
    assert run.h2d_probes == {}
    cpu = _run(tmp_path, "cpu")
    remember_h2d_probe(cpu, None, _probed("a/b/c"))
    assert cpu.h2d_probes == {}


def test_the_probe_result_in_the_spec_does_not_change_the_spec_hash(tmp_path, cell):
    run = _run(tmp_path)
    before = cell.spec_hash("cuda")
    remember_h2d_probe(run, "0", _probed("a/b/first"))
    spec = child_spec(run, cell, tmp_path, "0").as_dict()
    plain = cell.spec("cuda").as_dict()
    resolution = {"resolution"} if "resolution" not in plain else set()  # passed down, outside the hash
    assert {k for k in spec if k not in plain} == {"latents_out", H2D_PROBE_SPEC_KEY, "spawned_at", *resolution}
    assert cell.spec_hash("cuda") == before  # a resumed run still finds the cells it recorded


def test_the_child_takes_a_passed_down_probe_instead_of_probing(monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("probed although the runner passed the figure down")

    monkeypatch.setattr(measure, "pinned_h2d_gbps", no_probe)
    cuda = SimpleNamespace(is_cuda=True)
    got = measure.h2d_probe(cuda, {"gbps": 55.3, "cell_id": "a/b/first"})  # type: ignore[arg-type]
    assert got["pinned_h2d_gbps"] == 55.3 and got["pinned_h2d_probe_s"] == 0.0
    assert "a/b/first" in got["pinned_h2d_source"]
    monkeypatch.setattr(measure, "pinned_h2d_gbps", lambda device: 54.0)
    measured = measure.h2d_probe(cuda, None)  # type: ignore[arg-type]
    assert measured["pinned_h2d_gbps"] == 54.0 and measured["pinned_h2d_source"] == "this cell"
    assert measure.h2d_probe(SimpleNamespace(is_cuda=False), None) == {}  # type: ignore[arg-type]


def test_finish_overhead_adds_what_only_the_parent_sees():
    record = CellRecord("s/c/x", Status.OK, overhead={
        "process_start_s": 1.0, "imports_s": 4.0, "cuda_init_s": 2.0, "h2d_probe_s": 0.5, "checkpoint_s": 0.5,
        "warmup_s": 1.0, "measured_s": 3.0, "record_at": 100.0})
    finish_overhead(record, elapsed_s=14.0, exited_at=101.5)
    o = record.overhead
    assert "record_at" not in o
    assert (o["teardown_s"], o["fixed_s"], o["other_s"]) == (1.5, 11.0, 0.5)
    crash = CellRecord("s/c/x", Status.CRASH)
    finish_overhead(crash, 3.0, 0.0)
    assert crash.overhead is None


def test_fixed_cost_of_records_with_and_without_overhead():
    def record(**fields: Any) -> CellRecord:
        return CellRecord.from_dict({"schema_version": 2, "cell_id": "s/c/x", "status": "ok", **fields})

    new = {"elapsed_s": 14.0, "overhead": {"fixed_s": 11.0, "measured_s": 3.0}}
    assert fixed_cost(record(**new)) == {"elapsed_s": 14.0, "fixed_s": 11.0, "measured_s": 3.0, "estimated": False}
    old = record(elapsed_s=16.0, rounds={"warmup": 0, "rounds": 1},
                 phases={"load": {"wall_ms": 1000}, "encode": {"wall_ms": 500}, "denoise": {"wall_ms": 1000},
                         "decode": {"wall_ms": 500}})
    assert fixed_cost(old) == {"elapsed_s": 16.0, "measured_s": 3.0, "fixed_s": 13.0, "estimated": True}
    assert fixed_cost(record(**new, same_as="x")) is None and fixed_cost(record(**new, status="oom")) is None


def test_the_fork_server_start_is_named_once_beside_the_median():
    from harness.analyze.overhead import rows, server_start_line

    def record(cell_id: str, status: str, **overhead: Any) -> CellRecord:
        return CellRecord.from_dict({"schema_version": 2, "cell_id": cell_id, "status": status, "elapsed_s": 2.0,
                                     "overhead": {"start": "fork-server", "fixed_s": 0.4, "measured_s": 1.6,
                                                  **overhead}})

    records = [record("s/c/a", "oom", server_start_s=8.5), record("s/c/b", "ok", fork_s=0.03)]
    assert server_start_line(records) == "fork server start: 8.50 s, in s/c/a (once per run and server)\n"
    [row] = rows(records)  # the oom cell has no fixed cost row; its server start is still said
    assert row["start"] == "fork-server" and row["fork"] == 0.03 and row["server start"] is None
    assert server_start_line([record("s/c/b", "ok")]) == ""
