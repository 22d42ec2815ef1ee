"""Baselines: metrics extracted from records, write/read round trip, refresh, SKU rules, corrupt files."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from harness import cli
from harness.analyze.baseline import (
    DEFAULT_IMPROVEMENT_THRESHOLD,
    DEFAULT_TOLERANCES,
    BaselineError,
    baseline_path,
    build_baseline,
    cell_metrics,
    read_baseline,
    run_cells,
    write_baseline,
)
from harness.common.contract import CellRecord
from tests.helpers import as_records, cell_records

FIXTURES = Path(__file__).parent / "fixtures"
H100 = FIXTURES / "h100-qwen-image-edit-5090.records.jsonl"
CPU = FIXTURES / "cpu-qwen-image-edit-tiny.records.jsonl"
H100_SKU = "nvidia-h100-80gb-hbm3"
OK_CELL = "qwen-image-edit-5090/native/cpu1-lw1-te0-vae0-pf4-pin1"
OOM_LOAD_CELL = "qwen-image-edit-5090/rtx5090-32g/cpu0-lw0-te0-vae0-pf4-pin1"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def by_id(path: Path) -> dict[str, CellRecord]:
    return {r.cell_id: r for r in cell_records(path)}


def test_default_tolerances_are_sglang_diffusions():
    assert DEFAULT_TOLERANCES["load_peak_reserved_bytes"] == 0.01
    assert DEFAULT_TOLERANCES["runtime_peak_reserved_bytes"] == 0.02
    assert DEFAULT_TOLERANCES["nvml_proc_peak_bytes"] == 0.02
    assert DEFAULT_TOLERANCES["e2e_ms"] == 0.25
    assert DEFAULT_TOLERANCES["denoise_ms"] == 0.25
    assert DEFAULT_TOLERANCES["denoise_steady_step_ms"] == 0.30
    assert DEFAULT_TOLERANCES["load_ms"] == 0.40
    assert DEFAULT_IMPROVEMENT_THRESHOLD == 0.20


def test_cuda_cell_metrics_come_from_the_phases():
    rec = by_id(H100)[OK_CELL]
    ph = rec.to_dict()["phases"]
    m = cell_metrics(rec)
    assert m["load_peak_reserved_bytes"] == ph["load"]["alloc_peak_reserved_bytes"]
    assert m["runtime_peak_reserved_bytes"] == max(ph[p]["alloc_peak_reserved_bytes"] for p in ("encode", "denoise",
                                                                                               "decode"))
    assert m["nvml_proc_peak_bytes"] == max(ph[p]["nvml_proc_peak_bytes"] for p in ph)
    assert m["e2e_ms"] == pytest.approx(sum(ph[p]["time_ms"] for p in ("encode", "denoise", "decode")))
    assert m["load_ms"] == ph["load"]["time_ms"]
    assert m["denoise_ms"] == ph["denoise"]["time_ms"]
    assert m["denoise_steady_step_ms"] == pytest.approx(statistics.median(ph["denoise"]["step_ms"][1:]))
    assert not any("ledger" in k for k in m)


def test_failed_cell_keeps_only_what_it_measured():
    m = cell_metrics(by_id(H100)[OOM_LOAD_CELL])
    assert set(m) == {"load_peak_reserved_bytes", "nvml_proc_peak_bytes", "load_ms"}


def test_cpu_cell_metrics_name_the_ledger_counter():
    recs = records(CPU)
    ok = next(r for r in recs if r["status"] == "ok")
    m = cell_metrics(CellRecord.from_dict(ok))
    assert m["load_peak_ledger_bytes"] == ok["phases"]["load"]["ledger_peak_bytes"]
    assert m["runtime_peak_ledger_bytes"] == max(ok["phases"][p]["ledger_peak_bytes"]
                                                 for p in ("encode", "denoise", "decode"))
    assert "nvml_proc_peak_bytes" not in m
    assert not any("reserved" in k for k in m)


def test_baseline_cli_round_trip(tmp_path, capsys):
    assert cli.main(["baseline", str(H100), "--baselines-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    path = tmp_path / f"{H100_SKU}.json"
    assert str(path) in out and "10 cells" in out
    baseline = read_baseline(path)
    data = baseline.to_dict()
    assert data["schema_version"] == 1
    assert data["sku"] == H100_SKU
    assert data["source"]["run_id"] == "big"
    assert data["machine"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert data["machine"]["sku"] == H100_SKU
    assert data["tolerances"] == DEFAULT_TOLERANCES
    assert data["improvement_threshold"] == DEFAULT_IMPROVEMENT_THRESHOLD
    assert data["created"]
    expected = run_cells(cell_records(H100), H100_SKU)
    assert set(baseline.cells) == set(expected) == {r["cell_id"] for r in records(H100)}
    for cell_id, cell in baseline.cells.items():
        assert cell.status == expected[cell_id].status
        assert cell.failed_phase == expected[cell_id].failed_phase
        assert cell.metrics == expected[cell_id].metrics
    assert baseline.cells[OOM_LOAD_CELL].fate == "oom in load"
    # the file is plain JSON that reads back to the same dict, and is written back byte for byte
    assert json.loads(path.read_text()) == data
    rewritten = tmp_path / "again.json"
    write_baseline(rewritten, baseline)
    assert rewritten.read_text() == path.read_text()


def test_run_folder_is_accepted(tmp_path, capsys):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "records.jsonl").write_text(H100.read_text())
    assert cli.main(["baseline", str(run), "--baselines-dir", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / f"{H100_SKU}.json").exists()


def test_refresh_keeps_hand_tuned_tolerances_and_merge_keeps_other_cells(tmp_path, capsys):
    path = baseline_path(H100_SKU, tmp_path)
    assert cli.main(["baseline", str(H100), "--baselines-dir", str(tmp_path)]) == 0
    data = json.loads(path.read_text())
    data["tolerances"]["e2e_ms"] = 0.5
    data["improvement_threshold"] = 0.1
    data["cells"]["other-scenario/native/cpu1"] = {"status": "ok", "failed_phase": None, "metrics": {"e2e_ms": 1.0}}
    path.write_text(json.dumps(data))

    assert cli.main(["baseline", str(H100), "--baselines-dir", str(tmp_path), "--merge"]) == 0
    merged = read_baseline(path)
    assert merged.tolerances["e2e_ms"] == 0.5
    assert merged.improvement_threshold == 0.1
    # the hand-added cell is kept as it was written: no keys added
    assert json.loads(path.read_text())["cells"]["other-scenario/native/cpu1"] == {
        "status": "ok", "failed_phase": None, "metrics": {"e2e_ms": 1.0}}

    assert cli.main(["baseline", str(H100), "--baselines-dir", str(tmp_path)]) == 0
    refreshed = read_baseline(path)
    assert refreshed.tolerances["e2e_ms"] == 0.5
    assert "other-scenario/native/cpu1" not in refreshed.cells
    assert "refreshed" in capsys.readouterr().out


def test_cpu_run_makes_a_cpu_baseline(tmp_path, capsys):
    assert cli.main(["baseline", str(CPU), "--baselines-dir", str(tmp_path)]) == 0
    data = read_baseline(tmp_path / "cpu.json")
    assert data.sku == "cpu"
    ok = [c for c in data.cells.values() if c.status == "ok"]
    assert ok and all("runtime_peak_ledger_bytes" in c.metrics for c in ok)


def test_mixed_skus_are_refused_unless_one_is_picked(tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(H100.read_text() + CPU.read_text())
    assert cli.main(["baseline", str(mixed), "--baselines-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "several SKUs" in err and "--sku" in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.json"))
    assert cli.main(["baseline", str(mixed), "--baselines-dir", str(tmp_path), "--sku", "cpu"]) == 0
    data = read_baseline(tmp_path / "cpu.json")
    assert all(k.startswith("qwen-image-edit-tiny") for k in data.cells)
    assert cli.main(["baseline", str(mixed), "--baselines-dir", str(tmp_path), "--sku", "nvidia-a100"]) == 2
    assert "no records of SKU 'nvidia-a100'" in capsys.readouterr().err


def test_refresh_refuses_a_baseline_of_another_sku(tmp_path):
    cpu_base = build_baseline(cell_records(CPU))
    with pytest.raises(BaselineError, match="refusing to mix SKUs"):
        build_baseline(cell_records(H100), previous=cpu_base)


def test_skipped_cells_are_left_out():
    recs = records(H100)
    recs[0] = dict(recs[0], status="skipped")
    data = build_baseline(as_records(recs))
    assert recs[0]["cell_id"] not in data.cells


def _valid() -> dict:
    return build_baseline(cell_records(H100), source=str(H100)).to_dict()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema_version=99), "schema_version is 99"),
        (lambda d: d.pop("cells"), "missing key(s): cells"),
        (lambda d: d.pop("tolerances"), "missing key(s): tolerances"),
        (lambda d: d["tolerances"].update(e2e_ms="lots"), "tolerances must map"),
        (lambda d: d["tolerances"].update(e2e_ms=-0.1), "tolerances must map"),
        (lambda d: d.update(improvement_threshold=None), "improvement_threshold"),
        (lambda d: next(iter(d["cells"].values())).pop("metrics"), "missing key(s): metrics"),
        (lambda d: next(iter(d["cells"].values())).update(status="melted"), "status 'melted'"),
        (lambda d: next(iter(d["cells"].values())).update(failed_phase="warmup"), "failed_phase 'warmup'"),
        (lambda d: next(iter(d["cells"].values()))["metrics"].update(e2e_ms="fast"), "metrics must map"),
        (lambda d: d.update(cells=[]), "cells must be an object"),
    ],
)
def test_malformed_baselines_are_one_line_errors_naming_the_file(tmp_path, mutate, message):
    data = _valid()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(BaselineError) as e:
        read_baseline(path)
    text = str(e.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ("[1, 2]", "a baseline is a JSON object"), ("", "not valid JSON")],
)
def test_unreadable_baselines(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(BaselineError, match=message):
        read_baseline(path)


def test_missing_baseline_file(tmp_path):
    with pytest.raises(BaselineError, match="no such baseline file"):
        read_baseline(tmp_path / "nope.json")


def test_refresh_over_a_corrupt_file_is_a_clear_error(tmp_path, capsys):
    path = baseline_path(H100_SKU, tmp_path)
    path.write_text("{ corrupt")
    assert cli.main(["baseline", str(H100), "--baselines-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}: not valid JSON") and "delete it" in err
    assert len(err.splitlines()) == 1
    assert path.read_text() == "{ corrupt"


def test_corrupt_fixture_files_are_refused(tmp_path):
    for name in ("bad-json.json", "wrong-schema.json", "missing-keys.json"):
        with pytest.raises(BaselineError, match=name):
            read_baseline(FIXTURES / "baselines" / name)


@pytest.mark.parametrize("path", [*sorted((FIXTURES.parent.parent / "results" / "baselines").glob("*.json")),
                                  FIXTURES / "baselines" / f"{H100_SKU}.json"], ids=lambda p: p.name)
def test_committed_baselines_write_back_as_the_same_json(tmp_path, path):
    """Read into a Baseline and written again, a committed file (cells without portable_spec_hash or spread)
    is the same JSON: no key added, none dropped."""
    out = tmp_path / "again.json"
    write_baseline(out, read_baseline(path))
    assert json.loads(out.read_text()) == json.loads(path.read_text())
