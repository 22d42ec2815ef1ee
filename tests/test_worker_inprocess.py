"""harness.cell.worker.run_cell in this process on the tiny CPU scenario (the subprocess path is tested elsewhere)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from harness.common.contract import PHASES, as_record, migrate
from harness.plan.scenario import expand, load_scenario
from harness.run.cell import spec_for_child

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "cpu" / "qwen_image_edit_tiny.toml"


def test_worker_runs_tiny_cells_in_process_with_same_output_and_lower_peak_if_both_on() -> None:
    from harness.cell.worker import run_cell

    cells = {(c.card.name, c.requested.label()[:8]): c for c in expand(load_scenario(SCENARIO))}
    # One measured round per cell: repetitions (warmup/rounds) only cost time here.
    records = {
        key: run_cell(replace(spec_for_child(cells[key], "cpu"), warmup=0, rounds=1)).to_dict()
        for key in [("native", "cpu1-lw1"), ("native", "cpu0-lw0"), ("tiny-6m", "cpu0-lw1")]
    }

    both = records[("native", "cpu1-lw1")]
    resident = records[("native", "cpu0-lw0")]
    capped = records[("tiny-6m", "cpu0-lw1")]
    for rec in (both, resident):
        assert rec["status"] == "ok", (rec["reason"], rec.get("traceback"))
        assert rec["failed_phase"] is None
        assert set(PHASES) <= set(rec["phases"])
        assert all(rec["phases"][p]["time_ms"] > 0 for p in PHASES)
        assert as_record(rec).peak_counter == "ledger_peak_bytes"
        assert migrate(rec, rec["cell_id"]) == rec
    assert both["placements"]["dit"] == "layerwise-from-host"
    assert resident["placements"]["dit"] == "resident"
    assert both["outputs"]["latents_sha256"] == resident["outputs"]["latents_sha256"]
    assert both["outputs"]["latents_stats"]["finite"]
    for rec in (both, resident):  # the record says each checkpoint's content was checked against its digest
        for role, section in rec["components"].items():
            assert section["checkpoint"]["verified"] in ("generated", "hashed", "unchanged"), role
            assert len(section["checkpoint"]["file_sha256"]) == 64
    assert as_record(both).peaks.peak < as_record(resident).peaks.peak
    assert both["phases"]["load"]["ledger_peak_bytes"] < resident["phases"]["load"]["ledger_peak_bytes"]

    # layerwise alone on the 6 MiB card: the whole DiT is placed first (#26925), and the load runs out
    assert capped["status"] == "oom", (capped["reason"], capped.get("traceback"))
    assert capped["failed_phase"] == "load"
    assert capped["placements"]["dit"] == "layerwise-from-device"
    assert "simulated card" in capped["reason"]
    assert capped["cap"]["cap_bytes"] == 6 * 2**20
    assert migrate(capped, capped["cell_id"]) == capped


def test_cell_on_a_checkpoint_whose_body_changed_fails_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue #30: one byte flipped in a tensor's body (same size, header intact) fails the cell, never runs it."""
    from harness.cell.checkpoint import CheckpointReader, ensure_checkpoint
    from harness.cell.worker import run_cell
    from harness.models import get_model

    monkeypatch.setenv("OFFLOAD_BENCH_CACHE", str(tmp_path))
    cell = next(c for c in expand(load_scenario(SCENARIO)) if c.card.name == "native")
    spec = replace(spec_for_child(cell, "cpu"), warmup=0, rounds=1)
    path = ensure_checkpoint(get_model(spec.model).components["dit"], seed=0, device="cpu")
    reader = CheckpointReader(path)
    e = reader.entries[max(reader.names(), key=reader.nbytes)]
    with open(path, "r+b") as f:
        f.seek(reader.data_start + e.begin)
        byte = f.read(1)
        f.seek(reader.data_start + e.begin)
        f.write(bytes([byte[0] ^ 1]))
    rec = run_cell(spec).to_dict()
    assert rec["status"] == "error" and rec["outputs"] is None
    assert "CheckpointDigestError" in (rec["traceback"] or "")
    assert str(path) in rec["reason"] and "rm -r" in rec["reason"]


@pytest.mark.parametrize(("model", "size", "frames"), [("qwen-image-edit-tiny", 64, 1), ("wan-tiny", 64, 5)])
def test_layerwise_text_encoder_and_vae_compute_what_resident_ones_do(tmp_path: Path, model: str, size: int,
                                                                      frames: int) -> None:
    """Every component streamed ("all": Qwen2.5-VL's or UMT5's layers, the VAE decoder's blocks with its causal
    cache, the DiT's) against the same cell with the encoder and VAE on the device and the DiT CPU-offloaded: the
    same latents and the same image."""
    from harness.analyze.expect import invariant_failures
    from harness.cell.worker import run_cell

    path = tmp_path / "s.toml"
    path.write_text(f'name = "lw-all"\nmodel = "{model}"\nprofile = "cpu"\ncards = ["native"]\nheight = {size}\n'
                    f'width = {size}\nframes = {frames}\nsteps = 2\ntrue_cfg_scale = 4.0\n'
                    '[flags]\ndit_cpu_offload = true\ntext_encoder_cpu_offload = false\nvae_cpu_offload = false\n'
                    '[axes]\nlayerwise_offload_components = ["unset", "all"]\n')
    resident, streamed = (run_cell(replace(spec_for_child(c, "cpu"), warmup=0, rounds=1)).to_dict()
                          for c in expand(load_scenario(path)))
    for rec in (resident, streamed):
        assert rec["status"] == "ok", (rec["reason"], rec.get("traceback"))
    assert set(streamed["placements"].values()) == {"layerwise-from-host"}
    assert resident["placements"] == {"text_encoder": "resident", "dit": "cpu-offload", "vae": "resident"}
    assert streamed["outputs"]["latents_sha256"] == resident["outputs"]["latents_sha256"]
    assert streamed["outputs"]["image_stats"] == resident["outputs"]["image_stats"]
    assert invariant_failures(as_record(streamed)) == []
