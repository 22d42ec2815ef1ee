"""Compare: every verdict on baseline cells, then the CLI (exit codes, sections, files, clear errors)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from harness import cli
from harness.analyze.baseline import Baseline, BaselineCell, build_baseline, read_baseline, run_cells
from harness.analyze.compare import (
    CHANGED,
    FIXED,
    IMPROVED,
    LOST,
    MISSING,
    NEW,
    NOT_COMPARED,
    REGRESSED,
    WITHIN,
    Check,
    CheckSpecError,
    compare,
    gab_entries,
    relative_change,
    render,
)
from harness.common.contract import Status
from tests.helpers import BASELINES, CPU, H100, OK, SKU, VARIANT, S, cell_records

OK2 = f"{S}/native/cpu0-lw0-te0-vae0-pf4-pin1"
OOM_LOAD = f"{S}/rtx5090-32g/cpu0-lw0-te0-vae0-pf4-pin1"
OOM_DENOISE = f"{S}/rtx5090-32g/cpu1-lw0-te0-vae0-pf4-pin1"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture()
def baseline() -> Baseline:
    return build_baseline(cell_records(H100))


@pytest.fixture()
def current() -> dict[str, BaselineCell]:
    return run_cells(cell_records(H100), SKU)


def rows_of(comp, cell_id):
    return {r.metric: r for r in comp.rows if r.cell_id == cell_id}


def cell_of(comp, cell_id):
    return next(c for c in comp.cells if c.cell_id == cell_id)


# ------------------------------------------------------------------------------------------------ Check


@pytest.mark.parametrize(
    ("spec", "metric", "tol"),
    [
        ("load_peak_reserved_bytes:+1%", "load_peak_reserved_bytes", 0.01),
        ("e2e_ms:25%", "e2e_ms", 0.25),
        ("denoise_steady_step_ms : +2.5 %", "denoise_steady_step_ms", 0.025),
        ("load_ms:0.4", "load_ms", 0.4),
    ],
)
def test_check_parse(spec, metric, tol):
    check = Check.parse(spec)
    assert check.metric == metric and check.tolerance == pytest.approx(tol)


@pytest.mark.parametrize("spec", ["e2e_ms", "e2e_ms:-5%", ":+1%", "e2e_ms:+x%", "e2e ms:+1%"])
def test_check_parse_rejects(spec):
    with pytest.raises(CheckSpecError, match="METRIC:\\+N%"):
        Check.parse(spec)


def test_check_fails():
    check = Check.parse("load_peak_reserved_bytes:+1%")
    assert check.fails(1000, 1010) is None  # exactly at the tolerance: still passes
    assert check.fails(1000, 900) is None
    why = check.fails(1000, 1011)
    assert why is not None and "regressed by +1.1 %" in why and "> +1 %" in why
    assert Check("e2e_ms", 0.25).fails(0, 0) is None
    assert Check("e2e_ms", 0.25).fails(0, 1) is not None
    assert relative_change(0, 5) == math.inf


# ------------------------------------------------------------------------------------------------ pure verdicts


def test_identical_run_passes(baseline, current):
    comp = compare(baseline, current)
    assert not comp.failed and comp.exit_code == 0
    assert {c.verdict for c in comp.cells} == {"unchanged"}
    assert {r.verdict for r in comp.rows} == {WITHIN, NOT_COMPARED}
    assert all(r.change == 0 for r in comp.rows)


def test_regressed_beyond_tolerance(baseline, current):
    current[OK].metrics["load_peak_reserved_bytes"] *= 1.015  # tolerance 1 %
    current[OK].metrics["runtime_peak_reserved_bytes"] *= 1.015  # tolerance 2 %
    comp = compare(baseline, current)
    rows = rows_of(comp, OK)
    assert rows["load_peak_reserved_bytes"].verdict == REGRESSED
    assert rows["load_peak_reserved_bytes"].change == pytest.approx(0.015)
    assert rows["runtime_peak_reserved_bytes"].verdict == WITHIN
    assert comp.failed and comp.exit_code == 1
    assert any("load_peak_reserved_bytes regressed" in f for f in comp.failures)


@pytest.mark.parametrize(
    ("metric", "factor", "verdict"),
    [
        ("e2e_ms", 1.24, WITHIN),
        ("e2e_ms", 1.26, REGRESSED),
        ("denoise_steady_step_ms", 1.29, WITHIN),
        ("denoise_steady_step_ms", 1.31, REGRESSED),
        ("load_ms", 1.39, WITHIN),
        ("load_ms", 1.41, REGRESSED),
        ("nvml_proc_peak_bytes", 1.021, REGRESSED),
        ("e2e_ms", 0.85, WITHIN),  # faster, but not beyond the 20 % improvement threshold
        ("e2e_ms", 0.75, IMPROVED),
        ("load_peak_reserved_bytes", 0.5, IMPROVED),  # memory: smaller is better too
        ("load_peak_reserved_bytes", 0.95, WITHIN),
    ],
)
def test_metric_thresholds(baseline, current, metric, factor, verdict):
    current[OK].metrics[metric] *= factor
    comp = compare(baseline, current)
    assert rows_of(comp, OK)[metric].verdict == verdict
    assert comp.failed == (verdict == REGRESSED)


def test_improvement_does_not_fail(baseline, current):
    current[OK].metrics["denoise_ms"] *= 0.5
    comp = compare(baseline, current)
    assert rows_of(comp, OK)["denoise_ms"].verdict == IMPROVED
    assert comp.exit_code == 0
    assert "refresh the baseline" in render(comp)


def test_missing_metric_fails(baseline, current):
    del current[OK].metrics["nvml_proc_peak_bytes"]
    comp = compare(baseline, current)
    row = rows_of(comp, OK)["nvml_proc_peak_bytes"]
    assert row.verdict == MISSING and row.current is None and row.note == "metric not in the run"
    assert comp.exit_code == 1


def test_metric_new_to_the_baseline_is_new(baseline, current):
    del baseline.cells[OK].metrics["denoise_steady_step_ms"]
    comp = compare(baseline, current)
    assert rows_of(comp, OK)["denoise_steady_step_ms"].verdict == NEW
    assert comp.exit_code == 0


def test_missing_cell_fails(baseline, current):
    del current[OK]
    comp = compare(baseline, current)
    assert cell_of(comp, OK).verdict == MISSING
    assert {r.verdict for r in rows_of(comp, OK).values()} == {MISSING}
    assert comp.exit_code == 1
    assert sum(OK in f for f in comp.failures) == 1  # one line for the cell, not one per metric


def test_new_cell_does_not_fail(baseline, current):
    current["qwen-image-edit-5090/native/new-cell"] = copy.deepcopy(current[OK])
    comp = compare(baseline, current)
    assert cell_of(comp, "qwen-image-edit-5090/native/new-cell").verdict == NEW
    assert {r.verdict for r in rows_of(comp, "qwen-image-edit-5090/native/new-cell").values()} == {NEW}
    assert comp.exit_code == 0


def test_cell_that_now_ooms_is_lost(baseline, current):
    cur = current[OK]
    cur.status, cur.failed_phase = Status.OOM, "load"
    cur.metrics = {k: v for k, v in cur.metrics.items() if k.startswith("load")}
    comp = compare(baseline, current)
    cell = cell_of(comp, OK)
    assert cell.verdict == LOST and cell.baseline_fate == "ok" and cell.current_fate == "oom in load"
    # its numbers are not judged as metrics: the fate is the finding
    assert {r.verdict for r in rows_of(comp, OK).values()} == {NOT_COMPARED}
    assert comp.exit_code == 1


@pytest.mark.parametrize("status", ["error", "crash", "timeout"])
def test_any_failure_after_ok_is_lost(baseline, current, status):
    current[OK].status, current[OK].failed_phase = Status(status), "denoise"
    comp = compare(baseline, current)
    assert cell_of(comp, OK).verdict == LOST
    # load got through in both: the load metrics are still compared
    assert rows_of(comp, OK)["load_peak_reserved_bytes"].verdict == WITHIN
    assert rows_of(comp, OK)["e2e_ms"].verdict == NOT_COMPARED
    assert comp.exit_code == 1


def test_cell_that_now_loads_is_fixed(baseline, current):
    current[OOM_LOAD] = copy.deepcopy(current[OK2])
    comp = compare(baseline, current)
    cell = cell_of(comp, OOM_LOAD)
    assert cell.verdict == FIXED and "now runs to the end" in cell.note
    assert comp.exit_code == 0


def test_cell_that_gets_further_is_fixed(baseline, current):
    current[OOM_LOAD].status, current[OOM_LOAD].failed_phase = Status.OOM, "denoise"
    comp = compare(baseline, current)
    assert cell_of(comp, OOM_LOAD).verdict == FIXED
    assert "now loads" in cell_of(comp, OOM_LOAD).note
    assert comp.exit_code == 0


def test_cell_that_fails_earlier_is_lost(baseline, current):
    current[OOM_DENOISE].failed_phase = "load"
    comp = compare(baseline, current)
    assert cell_of(comp, OOM_DENOISE).verdict == LOST
    assert comp.exit_code == 1


def test_same_phase_other_failure_is_changed(baseline, current):
    current[OOM_LOAD].status = Status.CRASH
    comp = compare(baseline, current)
    assert cell_of(comp, OOM_LOAD).verdict == CHANGED
    assert comp.exit_code == 1


def test_failed_in_both_compares_the_phases_both_got_through(baseline, current):
    current[OOM_DENOISE].metrics["load_peak_reserved_bytes"] *= 1.5
    comp = compare(baseline, current)
    rows = rows_of(comp, OOM_DENOISE)
    assert rows["load_peak_reserved_bytes"].verdict == REGRESSED
    assert rows["runtime_peak_reserved_bytes"].verdict == NOT_COMPARED
    assert rows["denoise_ms"].verdict == NOT_COMPARED


def test_overrides_and_baseline_tolerances(baseline, current):
    current[OK].metrics["e2e_ms"] *= 1.3
    assert rows_of(compare(baseline, current), OK)["e2e_ms"].verdict == REGRESSED
    assert rows_of(compare(baseline, current, [Check.parse("e2e_ms:+35%")]), OK)["e2e_ms"].verdict == WITHIN
    baseline.tolerances["e2e_ms"] = 0.4
    assert rows_of(compare(baseline, current), OK)["e2e_ms"].verdict == WITHIN


def test_only_scenarios(baseline, current):
    current = {k: v for k, v in current.items() if k.startswith(f"{S}/")}
    assert compare(baseline, current).exit_code == 1  # legacy cells missing
    assert compare(baseline, current, only_scenarios={S}).exit_code == 0


def test_render_puts_validity_above_metrics(baseline, current):
    current[OK].status, current[OK].failed_phase = Status.OOM, "load"
    text = render(compare(baseline, current), markdown=True)
    assert text.index("## Validity") < text.index(f"| {OK} | lost ") < text.index("## Metrics")
    assert "| cell" in text and "FAIL" in text


def test_gab_entries(current):
    entries = gab_entries(current, SKU)
    assert entries and all(set(e) == {"name", "unit", "value", "extra"} for e in entries)
    names = {e["name"] for e in entries}
    assert f"{OK} e2e_ms" in names and f"{OK} load_peak_reserved_bytes" in names
    assert not any(OOM_LOAD in n for n in names)  # failed cells draw no points
    peak = next(e for e in entries if e["name"] == f"{OK} runtime_peak_reserved_bytes")
    assert peak["unit"] == "MiB" and peak["value"] == pytest.approx(current[OK].metrics[
        "runtime_peak_reserved_bytes"] / 2**20, abs=0.1)
    assert next(e for e in entries if e["name"] == f"{OK} e2e_ms")["unit"] == "ms"


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_identical_run_exits_0(capsys):
    assert cli.main(["compare", str(H100), "--baselines-dir", str(BASELINES)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PASS") and "Every cell ends as it did in the baseline." in out


def test_cli_variant_reports_every_verdict_and_exits_1(tmp_path, capsys):
    md, gab = tmp_path / "compare.md", tmp_path / "gab.json"
    # quiet by default: the verdict, the changed cells and the failing metrics only
    assert cli.main(["compare", str(VARIANT), "--baselines-dir", str(BASELINES)]) == 1
    quiet = capsys.readouterr().out.split("Metrics:", 1)[1]
    assert f"| {REGRESSED} " in quiet and f"| {WITHIN} " not in quiet and f"| {IMPROVED} " not in quiet
    assert "not shown (--all shows every row)" in quiet
    rc = cli.main(["compare", str(VARIANT), "--baselines-dir", str(BASELINES), "--markdown", str(md),
                   "--gab-json", str(gab), "--all"])
    captured = capsys.readouterr()
    assert rc == 1
    out = captured.out
    assert out.startswith("FAIL")
    validity, metrics = out.split("Metrics:", 1)
    lines = {line.split("|")[1].strip(): line for line in validity.splitlines() if line.startswith(f"| {S}")}
    assert "| lost " in lines[f"{S}/rtx5090-32g/cpu1-lw1-te0-vae0-pf4-pin1"]
    assert "| fixed " in lines[f"{S}/rtx5090-32g/cpu1-lw0-te0-vae0-pf4-pin1"]
    assert "| missing " in lines[f"{S}-legacy/rtx5090-32g/cpu1-lw1-te0-vae0-pf4-pin1"]
    assert "| new " in lines[f"{S}/native/cpu1-lw1-te1-vae1-pf4-pin1"]

    def verdict(cell, metric):
        line = next(x for x in metrics.splitlines() if x.startswith(f"| {cell} ") and f"| {metric} " in x)
        return line.split("|")[7].strip()

    assert verdict(f"{S}/native/cpu0-lw0-te0-vae0-pf4-pin1", "load_peak_reserved_bytes") == REGRESSED
    assert verdict(f"{S}/native/cpu1-lw1-te0-vae0-pf4-pin1", "denoise_ms") == IMPROVED
    assert verdict(f"{S}/native/cpu0-lw1-te0-vae0-pf4-pin1", "nvml_proc_peak_bytes") == MISSING
    assert verdict(f"{S}/native/cpu1-lw0-te0-vae0-pf4-pin1", "denoise_ms") == WITHIN
    assert verdict(f"{S}/native/cpu1-lw1-te1-vae1-pf4-pin1", "e2e_ms") == NEW
    assert "FAIL " in captured.err and "Traceback" not in captured.err
    assert "## Validity" in md.read_text() and "## Metrics" in md.read_text()
    entries = json.loads(gab.read_text())
    assert isinstance(entries, list) and all({"name", "unit", "value"} <= set(e) for e in entries)


def test_cli_threshold_override(tmp_path, capsys):
    recs = records(H100)
    for r in recs:
        if r["cell_id"] == OK2:
            r["phases"]["load"]["alloc_peak_reserved_bytes"] = int(r["phases"]["load"]["alloc_peak_reserved_bytes"]
                                                                   * 1.05)
    run = tmp_path / "run.jsonl"
    run.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert cli.main(["compare", str(run), "--baselines-dir", str(BASELINES)]) == 1
    assert cli.main(["compare", str(run), "--baselines-dir", str(BASELINES),
                     "--threshold", "load_peak_reserved_bytes:+10%"]) == 0
    assert cli.main(["compare", str(run), "--baselines-dir", str(BASELINES), "--threshold", "nonsense"]) == 2
    assert "METRIC:+N%" in capsys.readouterr().err


def test_cli_partial_run(tmp_path, capsys):
    run = tmp_path / "run.jsonl"
    run.write_text("".join(line + "\n" for line in H100.read_text().splitlines() if '"scenario":"' + S + '"' in line))
    assert cli.main(["compare", str(run), "--baselines-dir", str(BASELINES)]) == 1
    assert cli.main(["compare", str(run), "--baselines-dir", str(BASELINES), "--partial"]) == 0


def test_cli_unknown_sku_compares_nothing_and_exits_3(tmp_path, capsys):
    md, gab = tmp_path / "c.md", tmp_path / "gab.json"
    rc = cli.main(["compare", str(CPU), "--baselines-dir", str(tmp_path / "none"), "--markdown", str(md),
                   "--gab-json", str(gab)])
    err = capsys.readouterr().err
    assert rc == 3  # exitcodes.NO_BASELINE: a first run on a new SKU must not pass the gate
    assert "no baseline for SKU cpu" in err and "nothing compared" in err
    assert f"python -m harness baseline {CPU} --baselines-dir {tmp_path / 'none'}" in err
    assert len(err.strip().splitlines()) == 2  # "wrote gab.json" and the one-line reason
    assert "nothing compared" in md.read_text()
    assert json.loads(gab.read_text())  # the chart data does not need a baseline


@pytest.mark.parametrize("name", ["bad-json.json", "wrong-schema.json", "missing-keys.json"])
def test_cli_corrupt_baseline_is_one_line_exit_2(tmp_path, capsys, name):
    (tmp_path / f"{SKU}.json").write_text((BASELINES / name).read_text())
    rc = cli.main(["compare", str(H100), "--baselines-dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 2
    err = captured.err.strip()
    assert err.startswith(f"error: {tmp_path / (SKU + '.json')}: ")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert captured.out == ""


@pytest.mark.parametrize("name", ["bad-json.json", "wrong-schema.json", "missing-keys.json"])
def test_cli_explicit_corrupt_baseline(capsys, name):
    assert cli.main(["compare", str(H100), "--baseline", str(BASELINES / name)]) == 2
    err = capsys.readouterr().err
    assert name in err and len(err.strip().splitlines()) == 1


def test_cli_explicit_missing_baseline_is_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert cli.main(["compare", str(H100), "--baseline", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {missing}: no such baseline file"


def test_cli_baseline_of_another_sku_is_exit_2(capsys):
    assert cli.main(["compare", str(CPU), "--baseline", str(BASELINES / f"{SKU}.json")]) == 2
    assert "baseline is for SKU 'nvidia-h100-80gb-hbm3', the run is 'cpu'" in capsys.readouterr().err


def test_cli_missing_run_is_exit_2(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path / "nope.jsonl"), "--baselines-dir", str(BASELINES)]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_fixture_baseline_matches_fixture_records():
    """The checked-in fixture baseline is what `harness baseline` makes of the fixture records."""
    data = read_baseline(BASELINES / f"{SKU}.json")
    fresh = build_baseline(cell_records(H100))
    assert {k: v.metrics for k, v in data.cells.items()} == {k: v.metrics for k, v in fresh.cells.items()}
