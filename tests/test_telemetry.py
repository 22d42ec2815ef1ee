"""Issue 18's instruments on the CPU: per-step machine readings (NVML faked), allocator and host state per round,
the sampler interval option, per-round spread, and the copy timeline of our layerwise runtime."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from harness.cell import measure
from harness.cell.offload.timeline import CopySpan, per_step, summary
from harness.cell.worker import round_times, spread
from harness.plan.scenario import ScenarioError, expand, load_scenario
from harness.run.runner import spec_for_child

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "cpu" / "qwen_image_edit_tiny.toml"


class _NvmlError(Exception):
    pass


class _FakePynvml:
    """The pynvml calls machine_state makes; power is not supported on this board."""

    NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0

    def nvmlDeviceGetClockInfo(self, h: Any, kind: int) -> int:
        return {1: 1980, 2: 3201}[kind]

    def nvmlDeviceGetTemperature(self, h: Any, kind: int) -> int:
        return 61

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        raise _NvmlError("Not Supported")

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: Any) -> int:
        return 0x4 | 0x40


class _FakeNvml:
    handle = object()
    _nv = _FakePynvml()


def test_machine_state_reads_every_field_and_says_why_one_is_null() -> None:
    values, missing = measure.machine_state(_FakeNvml())  # type: ignore[arg-type]
    assert values["sm_clock_mhz"] == 1980 and values["mem_clock_mhz"] == 3201 and values["temperature_c"] == 61
    assert values["power_w"] is None and missing == {"power_w": "_NvmlError: Not Supported"}
    assert values["throttle_reasons"] == 0x44
    assert values["throttle_reason_names"] == ["sw_power_cap", "hw_thermal_slowdown"]


def test_machine_state_without_nvml_is_all_null_with_a_reason() -> None:
    values, missing = measure.machine_state(None)
    assert set(values) == set(measure.MACHINE_FIELDS) and all(v is None for v in values.values())
    assert set(missing) == set(measure.MACHINE_FIELDS) and "no NVML" in missing["sm_clock_mhz"]


def test_throttle_names_keeps_unknown_bits() -> None:
    assert measure.throttle_names(0) == []
    assert measure.throttle_names(0x1 | 0x1000) == ["gpu_idle", "0x1000"]


def test_allocator_stats_names_the_counters() -> None:
    stats = {"allocated_bytes.all.peak": 10, "reserved_bytes.all.peak": 20, "num_alloc_retries": 2,
             "segment.all.current": 3, "inactive_split_bytes.all.current": 5, "unrelated": 1}
    assert measure.allocator_stats(stats) == {"allocated_peak_bytes": 10, "reserved_peak_bytes": 20,
                                              "num_alloc_retries": 2, "segments": 3, "inactive_split_bytes": 5}


def test_host_memory_state_reads_page_cache_and_dirty_bytes() -> None:
    text = "MemTotal: 100 kB\nMemAvailable:  50 kB\nCached:   7 kB\nDirty:  2 kB\nWriteback: 0 kB\n"
    assert measure.host_memory_state(text) == {"mem_available_bytes": 50 * 1024, "page_cache_bytes": 7 * 1024,
                                               "dirty_bytes": 2 * 1024, "writeback_bytes": 0}
    assert "page_cache_bytes" in measure.host_memory_state()  # this Linux box


def test_sampler_off_starts_no_thread_but_still_samples_at_phase_boundaries() -> None:
    sampler = measure.Sampler(None, interval_s=0)
    sampler.start()
    assert not sampler.is_alive()
    sampler.enter("load")
    assert sampler.phase_peaks("load")["rss_peak_bytes"] > 0


def test_spread_of_rounds() -> None:
    assert spread([100.0]) is None and spread([None, 5.0]) is None
    s = spread([100.0, 106.0, 103.0])
    assert s == {"n": 3, "min": 100.0, "median": 103.0, "max": 106.0, "max_over_min": 1.06, "relative": 0.0583}


def test_round_times_gives_steady_step_medians_and_their_spread() -> None:
    def rnd(steps: list[float]) -> dict[str, Any]:
        return {"encode": {"time_ms": 1.0}, "denoise": {"time_ms": sum(steps), "step_ms": steps},
                "decode": {"time_ms": 1.0}}

    out = round_times([rnd([50, 10, 10, 12]), rnd([40, 10, 11, 11]), rnd([40, 12, 12, 13])], warmup=1)
    assert out["steady_step_ms"] == [11.0, 12.0]  # steps 2..n of the measured rounds only
    assert out["spread"]["steady_step_ms"]["relative"] == round(1 / 11.5, 4)


def _run_table(tmp_path: Path, table: str) -> Path:
    text = SCENARIO.read_text().replace('name = "qwen-image-edit-tiny"', 'name = "tiny-run-options"')
    path = tmp_path / "s.toml"
    path.write_text(text.replace("[flags]", f"[run]\n{table}\n\n[flags]"))
    return path


def test_run_options_enter_the_spec_only_when_set(tmp_path: Path) -> None:
    plain = expand(load_scenario(SCENARIO))[0].spec("cpu").as_dict()
    assert "run" not in plain  # spec hashes of scenarios without [run] are as they were
    cell = expand(load_scenario(_run_table(tmp_path, "sampler_interval_ms = 0\ncopy_timeline = true")))[0]
    assert cell.spec("cpu").run.changed() == {"sampler_interval_ms": 0.0, "copy_timeline": True}


@pytest.mark.parametrize(("table", "field"), [
    ("sampler_interval_ms = -1", "run.sampler_interval_ms"),
    ("copy_timeline = 1", "run.copy_timeline"),
    ("cfg_batch = [true, true]", "run.cfg_batch"),
    ("bogus = 1", "run.bogus"),
    ("empty_cache_after_packing = 1", "run.empty_cache_after_packing"),
    ("runtime_cap_mib = -1", "run.runtime_cap_mib"),
    ("runtime_cap_mib = 1.5", "run.runtime_cap_mib"),
])
def test_bad_run_options_name_the_field(tmp_path: Path, table: str, field: str) -> None:
    with pytest.raises(ScenarioError, match=field):
        load_scenario(_run_table(tmp_path, table))


def test_the_runtime_cap_is_refused_beside_a_capped_card_and_enters_the_spec(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"run\.runtime_cap_mib.*already capped"):
        load_scenario(_run_table(tmp_path, "runtime_cap_mib = 100"))  # this scenario has a capped card
    path = _run_table(tmp_path, "runtime_cap_mib = 100\nempty_cache_after_packing = true")
    path.write_text(re.sub(r"(?m)^cards = .*$", 'cards = ["native"]', path.read_text()))
    cell = expand(load_scenario(path))[0]
    assert cell.spec("cpu").run.changed() == {"empty_cache_after_packing": True, "runtime_cap_mib": 100}


def test_the_release_after_packing_is_refused_where_no_dit_is_placed_through_the_device(tmp_path: Path) -> None:
    path = _run_table(tmp_path, "empty_cache_after_packing = true")
    text = path.read_text().replace("dit_cpu_offload = [false, true]", "dit_cpu_offload = [true]")
    path.write_text(text.split("[expect]")[0])  # its expectations name the cells left out
    with pytest.raises(ScenarioError, match=r"run\.empty_cache_after_packing.*nothing to release"):
        load_scenario(path)


def test_copy_timeline_per_step_busy_gaps_bytes_and_copy_limit() -> None:
    # step 1: 0..10 ms, copies 1..3 and 4..6 (gap 1 ms, lead-in 1, tail 4); step 2: 10..20, a copy 18..22 crossing
    spans = [CopySpan(1, 3, 2_000_000), CopySpan(4, 6, 2_000_000), CopySpan(18, 22, 4_000_000)]
    steps = per_step(spans, [0.0, 10.0, 20.0], link_gbps=1.0)
    first, second = steps
    assert first["busy_ms"] == 4.0 and first["busy_fraction"] == 0.4 and first["bytes"] == 4_000_000
    assert (first["lead_in_ms"], first["idle_gaps"], first["idle_gap_ms"], first["tail_ms"]) == (1.0, 1, 1.0, 4.0)
    assert first["busy_gbps"] == 1.0 and first["copy_limit_ms"] == 4.0 and first["pct_of_copy_limit"] == 40.0
    assert second["busy_ms"] == 2.0 and second["bytes"] == 2_000_000  # half of the crossing copy
    assert summary(steps)["steady_median_busy_fraction"] == 0.2


def test_copy_timeline_overlapping_copies_count_once() -> None:
    steps = per_step([CopySpan(0, 4, 1), CopySpan(2, 6, 1)], [0.0, 10.0])
    assert steps[0]["busy_ms"] == 6.0 and steps[0]["idle_gaps"] == 0


def test_worker_records_telemetry_per_round_and_copy_timeline(tmp_path: Path, capsys: Any) -> None:
    from harness.cell.worker import run_cell

    path = _run_table(tmp_path, "copy_timeline = true\nsampler_interval_ms = 100")
    cell = next(c for c in expand(load_scenario(path)) if c.card.name == "native"
                and c.requested.label().startswith("cpu1-lw1"))
    rec = run_cell(dataclasses.replace(spec_for_child(cell, "cpu"), warmup=1, rounds=2)).to_dict()
    assert rec["status"] == "ok", (rec["reason"], rec.get("traceback"))
    assert rec["run_options"]["sampler_interval_ms"] == 100.0 and rec["copy_timeline"]["enabled"]
    fill = rec["components"]["dit"]["layerwise"]["fill"]  # issue 18 item 6: the setup fill, measured
    assert fill["threads"] == 16 and fill["overlap_pin"] and fill["regions"] > 0 and fill["read_thread_s"] > 0
    rounds = rec["telemetry"]["rounds"]
    assert [r["warmup"] for r in rounds] == [True, False, False]
    for r in rounds:
        assert len(r["step_machine"]["steps"]) == 2 and r["step_machine"]["steps"][0]["sm_clock_mhz"] is None
        assert "no NVML" in r["step_machine"]["unavailable"]["temperature_c"]
        assert r["host"]["page_cache_bytes"] > 0 and "pinned_requested_bytes" in r["host"]
        timeline = r["copy_timeline"]["steps"]
        assert len(timeline) == 2 and all(s["copies"] > 0 and s["bytes"] > 0 for s in timeline)
    # every layer crosses twice a step (true CFG: two forwards)
    layer_bytes = rec["components"]["dit"]["layerwise"]["host_bytes"]
    assert abs(rounds[1]["copy_timeline"]["steps"][1]["bytes"] - 2 * layer_bytes) <= layer_bytes
    assert "step_machine" not in rec["phases"]["denoise"] and "copy_timeline" not in rec["phases"]["denoise"]
    assert rec["rounds"]["spread"]["steady_step_ms"]["n"] == 2

    # python -m harness.analyze.drift reads it back: one row per round, the spread, the null fields' reason
    from harness.analyze import drift

    run = tmp_path / "x.records.jsonl"
    run.write_text(json.dumps(rec) + "\n")
    assert drift.main([str(run)]) == 0
    text = capsys.readouterr().out
    assert "1 (warm-up)" in text and "| 3 " in text and "max/min" in text and "no NVML handle" in text


def test_the_drift_analysis_names_the_cause_from_the_committed_h200_rounds() -> None:
    """Session 6 on the H200: the Qwen-Image-Edit 5090 both-on rounds spread 2.4-3.3 % with the SM clock flat at
    1,980 MHz and the copy engine busy 99.99 % of every round, step x delivered GB/s constant: the link. The FLUX
    cell of session 5 that spread 4.7 % had no copy timeline: not attributed, and said so. A spread under 1 %
    is not attributed at all; a round whose SM clock fell is the clocks'."""
    from harness.analyze.drift import spread_cause
    from harness.common.records import read_cell_records

    h200 = Path(__file__).resolve().parent.parent / "results" / "h200"
    drift = {r.scenario: r for r in read_cell_records(h200 / "drift.records.jsonl").records}
    for name in ("drift-qwen-5090-sampler10", "drift-qwen-5090-sampler100", "drift-qwen-5090-sampler-off"):
        assert "from the PCIe link" in (spread_cause(drift[name]) or ""), name
    assert "noise floor" in (spread_cause(drift["drift-flux-4090"]) or "")
    flux5 = next(r for r in read_cell_records(h200 / "flux-dev-4090.records.jsonl").records
                 if r.cell_id.endswith("cpu1-lw1-te0-vae0-pf5-pin1"))
    assert "not attributed" in (spread_cause(flux5) or "") and "no copy timeline" in (spread_cause(flux5) or "")
    slowed = json.loads(drift["drift-qwen-5090-sampler10"].to_json())
    worst = max((r for r in slowed["telemetry"]["rounds"] if not r["warmup"]), key=lambda r: r["steady_step_ms"])
    for step in worst["step_machine"]["steps"]:
        step["sm_clock_mhz"] = 1500
    from harness.common.contract import CellRecord

    assert "clocks moving" in (spread_cause(CellRecord.from_json(json.dumps(slowed))) or "")
