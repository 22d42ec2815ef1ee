"""Reserved memory explained (issue 18 item 5): the per-phase attribution from allocator counters, and the option
that empties the allocator cache where SGLang's pipeline would (CUDA calls faked: no GPU here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from harness.cell.measure import reserved_attribution
from harness.cell.worker import cache_release, cap_check, release_after_packing, release_point
from harness.common.contract import CellRecord
from harness.common.units import MIB
from harness.run.cell import spec_for_child

LAYERWISE = {"text_encoder": "cpu-offload", "dit": "layerwise-from-host", "vae": "resident"}
RESIDENT = {"text_encoder": "resident", "dit": "resident", "vae": "resident"}


def test_attribution_splits_the_gap_into_cached_split_and_unexplained() -> None:
    start = {"reserved_bytes": 9000 * MIB, "allocated_bytes": 1000 * MIB}  # 8,000 MiB kept from the encoder
    end = {"reserved_peak_bytes": 12000 * MIB, "allocated_peak_bytes": 2000 * MIB, "inactive_split_peak_bytes": MIB}
    segments = [{"stream": 0, "total_size": 10000 * MIB}, {"stream": 7, "total_size": 2000 * MIB}]
    out = reserved_attribution(start, end, segments)
    assert out["gap_bytes"] == 10000 * MIB
    assert out["cached_from_earlier_bytes"] == 8000 * MIB and out["inactive_split_peak_bytes"] == MIB
    assert out["unexplained_bytes"] == 1999 * MIB
    assert out["reserved_by_stream_bytes"] == {"0": 10000 * MIB, "7": 2000 * MIB}
    assert "reserved_by_stream_bytes" not in reserved_attribution(start, end)


@pytest.mark.parametrize(("phase", "placements", "expected"), [
    ("encode", LAYERWISE, True), ("encode", RESIDENT, False),
    ("denoise", LAYERWISE, True), ("denoise", RESIDENT, False),
    ("decode", RESIDENT, True), ("load", LAYERWISE, False),
])
def test_release_points_follow_sglang(phase: str, placements: dict[str, str], expected: bool) -> None:
    assert release_point(phase, placements) is expected


def test_cache_release_empties_the_cache_and_records_what_it_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    reserved = iter([500 * MIB, 120 * MIB])
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: next(reserved))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    release = cache_release(LAYERWISE, SimpleNamespace(is_cuda=True, torch="cuda:0"))
    rec: dict[str, Any] = {}
    release("encode", rec)
    assert calls == ["empty_cache"] and rec["empty_cache_freed_bytes"] == 380 * MIB
    release("load", rec := {})
    assert calls == ["empty_cache"] and rec == {}


def test_worker_records_which_mechanism_ran(tmp_path: Path) -> None:
    from harness.cell.worker import run_cell
    from harness.plan.scenario import expand, load_scenario

    source = Path(__file__).resolve().parent.parent / "scenarios" / "cpu" / "wan_tiny.toml"
    path = tmp_path / "s.toml"
    path.write_text(source.read_text().replace("[flags]", "[run]\nempty_cache_between_phases = true\n\n[flags]"))
    cell = next(c for c in expand(load_scenario(path)) if c.card.name == "native"
                and c.requested.dit_layerwise_offload and c.requested.dit_cpu_offload)
    rec = run_cell(dataclasses.replace(spec_for_child(cell, "cpu"), warmup=0, rounds=1)).to_dict()
    assert rec["status"] == "ok", (rec["reason"], rec.get("traceback"))
    assert rec["cache_release"] == {"mechanism": "torch.cuda.empty_cache", "after": ["denoise", "decode"],
                                    "after_packing_freed_bytes": None}
    assert "empty_cache_freed_bytes" not in rec["phases"]["denoise"]  # the CPU profile has no allocator cache


def test_release_after_packing_only_for_a_dit_placed_through_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    reserved = iter([45_729 * MIB + 13_900 * MIB, 13_900 * MIB])
    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: next(reserved))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    cuda = SimpleNamespace(is_cuda=True, torch="cuda:0")
    assert release_after_packing(LAYERWISE, cuda) is None and calls == []  # from the host: nothing was cached
    from_device = {**LAYERWISE, "dit": "layerwise-from-device"}
    assert release_after_packing(from_device, SimpleNamespace(is_cuda=False, torch="cpu")) is None
    assert release_after_packing(from_device, cuda) == 45_729 * MIB and calls == ["empty_cache"]


def _tiny_cell(tmp_path: Path, run: str, **where: bool) -> Any:
    from harness.plan.scenario import expand, load_scenario

    source = Path(__file__).resolve().parent.parent / "scenarios" / "cpu" / "wan_tiny.toml"
    text = source.read_text().replace('cards = [{ name = "tiny-5m", mib = 5 }, "native"]', 'cards = ["native"]')
    text = text.replace('cards = ["tiny-5m"]', 'cards = ["native"]').replace("[flags]", f"[run]\n{run}\n\n[flags]")
    path = tmp_path / "s.toml"
    path.write_text(text)
    cell = next(c for c in expand(load_scenario(path))
                if all(getattr(c.requested, k) == v for k, v in where.items()))
    return dataclasses.replace(spec_for_child(cell, "cpu"), warmup=0, rounds=1)


def test_a_runtime_cap_bounds_the_phases_after_the_load_only(tmp_path: Path) -> None:
    from harness.cell.worker import run_cell

    roomy = run_cell(_tiny_cell(tmp_path, "runtime_cap_mib = 1000\nempty_cache_after_packing = true",
                                dit_cpu_offload=False, dit_layerwise_offload=True)).to_dict()
    assert roomy["status"] == "ok", (roomy["reason"], roomy.get("traceback"))
    assert roomy["placements"]["dit"] == "layerwise-from-device"
    assert roomy["cap"]["applied_after"] == "load" and roomy["cap"]["cap_bytes"] == 1000 * MIB
    assert roomy["cache_release"]["after_packing_freed_bytes"] is None  # the CPU profile has no allocator cache
    # 1 MiB is less than the weights the load placed (the CPU ledger counts weights only): the load still completes,
    # the cap not being on yet, and the first layer the denoise streams in does not
    tight = run_cell(_tiny_cell(tmp_path, "runtime_cap_mib = 1", dit_cpu_offload=False,
                                dit_layerwise_offload=True)).to_dict()
    assert (tight["status"], tight["failed_phase"]) == ("oom", "denoise"), tight["reason"]
    assert "over the cap of 1048576 bytes" in tight["reason"]


def test_a_cap_applied_after_the_load_is_checked_on_the_runtime_phases_only() -> None:
    """Qwen-Image-Edit with its DiT placed through the device: NVML 53,214 MiB at load, 21,818 at run time, under
    a runtime cap of 22,490 MiB (H200 session 8)."""
    phases = {"load": {"nvml_proc_peak_bytes": 53_214 * MIB}, "encode": {"nvml_proc_peak_bytes": 21_818 * MIB},
              "denoise": {"nvml_proc_peak_bytes": 21_700 * MIB}}
    rec = {"schema_version": 2, "cell_id": "s/native/x", "status": "ok", "phases": phases,
           "cap": {"cap_bytes": 22_490 * MIB, "applied_after": "load"}}
    assert cap_check(CellRecord.from_dict(rec)) == {"nvml_proc_peak_bytes": 21_818 * MIB, "within_cap": True}
    del rec["cap"]["applied_after"]  # a card cap: the load counts
    assert cap_check(CellRecord.from_dict(rec)) == {"nvml_proc_peak_bytes": 53_214 * MIB, "within_cap": False}
    rec["phases"] = {}
    assert cap_check(CellRecord.from_dict(rec))["within_cap"] is None  # NVML measured nothing: not judged


def test_drift_prints_the_attribution_per_phase() -> None:
    from harness.analyze.drift import render

    att = reserved_attribution({"reserved_bytes": 3 * MIB, "allocated_bytes": MIB},
                               {"reserved_peak_bytes": 10 * MIB, "allocated_peak_bytes": 4 * MIB}, [])
    rec = {"schema_version": 2, "cell_id": "s/c/x", "status": "ok",
           "phases": {"denoise": {"reserved_attribution": att, "empty_cache_freed_bytes": MIB}},
           "cache_release": {"mechanism": "torch.cuda.empty_cache"},
           "telemetry": {"rounds": [{"round": 0, "steady_step_ms": 1.0}]}}
    text = render([CellRecord.from_dict(rec)])
    assert "cache release: torch.cuda.empty_cache" in text
    assert "| denoise | 10 " in text and "| 6 " in text and "| 2 " in text  # gap 6, cached 2 (MiB)
