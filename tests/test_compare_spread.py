"""compare's timing tolerance from the per-round spread of baseline and run (issue 18), and the fixed tolerance kept
(and said) where the baseline has no spread."""

from __future__ import annotations

import copy
import json

import pytest

from harness import cli
from harness.analyze.baseline import BaselineCell, build_baseline, run_cells, timing_spread
from harness.analyze.compare import REGRESSED, WITHIN, Check, compare, render, spread_tolerance
from harness.common.contract import CellRecord, Status
from tests.helpers import H100, OK, SKU, as_records


def _records() -> list[dict]:
    return [json.loads(line) for line in H100.read_text().splitlines() if line.strip()]


def _with_rounds(records: list[dict], steady: list[float]) -> list[CellRecord]:
    """The fixture records, the ok ones given measured rounds whose steady step medians are `steady`."""
    out = copy.deepcopy(records)
    for r in out:
        if r["status"] == "ok":
            r["rounds"] = {"warmup": 0, "rounds": len(steady), "steady_step_ms": steady,
                           "denoise_ms": [4 * s for s in steady], "e2e_ms": [4 * s + 100 for s in steady]}
    return as_records(out)


def test_timing_spread_of_a_record() -> None:
    def rec(rounds: dict | None) -> CellRecord:
        return CellRecord("s/c/x", Status.OK, rounds=rounds)

    assert timing_spread(rec({"steady_step_ms": [100.0, 102.0, 101.0], "denoise_ms": [400.0], "e2e_ms": [None, 5.0]})
                         ) == {"denoise_steady_step_ms": 0.0198}
    assert timing_spread(rec({"denoise_ms": [400.0, 410.0], "e2e_ms": [500.0, 500.0]})) == {
        "denoise_ms": 0.0247, "e2e_ms": 0.0}  # older records: no step medians, still the phase times
    assert timing_spread(rec(None)) == {}


def test_spread_tolerance_floor_factor_and_the_noisier_side() -> None:
    def cell(spread: dict[str, float]) -> BaselineCell:
        return BaselineCell(Status.OK, None, {}, spread=spread)

    quiet, noisy = cell({"denoise_ms": 0.002}), cell({"denoise_ms": 0.05})
    assert spread_tolerance("denoise_ms", quiet, quiet) == 0.03  # the floor
    assert spread_tolerance("denoise_ms", quiet, noisy) == 0.15  # a noisier run widens
    assert spread_tolerance("denoise_ms", cell({}), noisy) is None  # no spread in the baseline: the fixed one
    assert spread_tolerance("load_ms", noisy, noisy) is None  # one load per cell: no rounds to measure


def test_a_quiet_baseline_catches_a_slowdown_the_fixed_tolerance_let_through() -> None:
    base = build_baseline(_with_rounds(_records(), [1000.0, 1002.0, 1001.0]))
    current = run_cells(_with_rounds(_records(), [1000.0, 1001.0, 1002.0]), SKU)
    current[OK].metrics["denoise_steady_step_ms"] *= 1.05  # within the fixed 30 %, beyond 3 % from a 0.2 % spread
    comp = compare(base, current)
    row = next(r for r in comp.rows if r.cell_id == OK and r.metric == "denoise_steady_step_ms")
    assert row.verdict == REGRESSED and row.tolerance == 0.03 and "spread" in row.note
    assert any("from the measured rounds" in n for n in comp.notes)
    # the same slowdown against the old, fixed tolerance passes
    old = copy.deepcopy(base)
    for cell in old.cells.values():
        cell.spread = {}
    comp_old = compare(old, current)
    assert next(r for r in comp_old.rows if r.cell_id == OK and r.metric == "denoise_steady_step_ms").verdict == WITHIN
    assert any("keep the fixed timing tolerances" in n for n in comp_old.notes)
    assert "keep the fixed timing tolerances" in render(comp_old)


def test_a_noisy_run_widens_the_tolerance() -> None:
    base = build_baseline(_with_rounds(_records(), [1000.0, 1002.0, 1001.0]))
    current = run_cells(_with_rounds(_records(), [1000.0, 1100.0, 1050.0]), SKU)  # 9.5 % spread
    current[OK].metrics["denoise_steady_step_ms"] *= 1.2
    row = next(r for r in compare(base, current).rows if r.cell_id == OK and r.metric == "denoise_steady_step_ms")
    assert row.verdict == WITHIN and row.tolerance == pytest.approx(3 * 0.0952, abs=1e-3)


def test_a_threshold_override_wins_over_the_spread() -> None:
    base = build_baseline(_with_rounds(_records(), [1000.0, 1002.0, 1001.0]))
    current = run_cells(_with_rounds(_records(), [1000.0, 1002.0, 1001.0]), SKU)
    current[OK].metrics["denoise_steady_step_ms"] *= 1.05
    comp = compare(base, current, overrides=[Check("denoise_steady_step_ms", 0.10)])
    row = next(r for r in comp.rows if r.cell_id == OK and r.metric == "denoise_steady_step_ms")
    assert row.verdict == WITHIN and row.tolerance == 0.10


def test_cli_says_which_tolerance_it_used(tmp_path, capsys) -> None:
    run = tmp_path / "x.records.jsonl"
    run.write_text("\n".join(r.to_json() for r in _with_rounds(_records(), [1000.0, 1001.0])) + "\n")
    base_dir = tmp_path / "baselines"
    assert cli.main(["baseline", str(run), "--baselines-dir", str(base_dir)]) == 0
    capsys.readouterr()
    assert cli.main(["compare", str(run), "--baseline", str(base_dir / f"{SKU}.json")]) == 0
    assert "from the measured rounds" in capsys.readouterr().out
