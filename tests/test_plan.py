"""The planner (harness.plan.planner), advise and their hooks: against the committed GPU records, and by physics."""

from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from harness.analyze.expect import plan_within_verdict
from harness.common.contract import CellRecord, LayerPool, RecordError, as_record, is_probe
from harness.common.flags import OffloadFlags
from harness.common.records import read_cell_records
from harness.common.units import GIB
from harness.models import get_model, model_names
from harness.plan.advise import advise, combinations, describe
from harness.plan.planner import (
    WARM_KERNELS_BYTES,
    PlanError,
    Workload,
    check_record,
    fit,
    load_data,
    machine_profile,
    measured,
    plan,
    plan_entry,
    plan_for_record,
    plan_rows,
    steady_steps,
)
from harness.plan.scenario import CARDS, ScenarioError, load_scenario
from tests.helpers import planned, planned_records

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"
FULL_MODELS = [m for m in model_names() if "tiny" not in m]
BOTH_ON = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, dit_offload_prefetch_size=4)
LAYERWISE_ONLY = OffloadFlags(dit_layerwise_offload=True, dit_offload_prefetch_size=4)
CAP_5090 = CARDS["rtx5090-32g"]


def _records(pattern: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted(glob.glob(str(RESULTS / pattern))):
        out += [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in out if not r.get("same_as")]


def _gpu_records() -> list[dict[str, Any]]:
    """The committed GPU cells, capacity probes left out: a search puts its probes where the fate flips, so a 1 %
    peak error there flips a probe's planned fate (FLUX's DiT-whole probes: planned to fit up to 1280, OOM from
    1088); how far the plan's largest value is from the measured one is the capacity table's "plan error"
    (tests/test_capacity.py reads the committed search back)."""
    return [r for r in _records("h*/*.records.jsonl") if r.get("device") == "cuda" and not is_probe(r["scenario"])]


# Cells the planner is known to get wrong, each with what it predicts, what ran, and why; the test below fails
# when one is no longer a miss, so a fixed planner takes its entry out.
KNOWN_MISSES = {
    # H200 session 7: on a card of its allocated peak x 1.1 + context (16,835 MiB) the allocator held the denoise
    # at 15,606 MiB reserved (17,282 uncapped); the allocator model gives cached blocks back only when a request
    # passes the limit and keeps FLUX's two-layer-size segment overhead (planned 16,687 after giving back, over
    # the 16,098 MiB limit): planned OOM in denoise, ran. A conservative miss, under a tight cap only.
    "reserved-capped-flux-lwc-all-4090/alloc1.1-16835m/cpu1-lw1-te1-vae0-pf5-pin1-res0.25-lwc-all": "denoise",
    # H200 session 8: FLUX's VAE decode at 3072-3264 px under a cap of its allocated peak x 1.1 + context. The
    # plan's decode activations, fitted per pixel at 1024 px, come to 21.7 GiB at 3072 px, what the one uncapped
    # 3072 px decode allocated (22,223 MiB); under these caps the decode allocated 16,461-21,143 MiB with 10-26
    # allocator retries; torch's cuDNN convolutions fall back to algorithms with smaller workspaces when one does
    # not fit, which would explain both. Planned OOM in decode, ran. Conservative, under tight caps only (the
    # 3072 px cell without the release did run out in decode).
    "reserved-capped-flux-capacity-3136/alloc1.1-22181m/cpu1-lw1-te1-vae0-pf1-pin1": "decode",
    "reserved-capped-flux-capacity-3264/alloc1.1-23942m/cpu1-lw1-te1-vae0-pf1-pin1": "decode",
    "reserved-released-flux-capacity-3072/alloc1.1-18792m/cpu1-lw1-te1-vae0-pf1-pin1": "decode",
}


def test_known_misses_are_still_misses() -> None:
    records = {r["cell_id"]: r for r in _records("h*/*.records.jsonl") if r["cell_id"] in KNOWN_MISSES}
    assert set(records) == set(KNOWN_MISSES)
    for cell, planned_oom in KNOWN_MISSES.items():
        c = check_record(planned(_without_stored_plan(records[cell])))
        assert not c.verdict_ok and c.predicted_oom_phase == planned_oom, cell


# ------------------------------------------------------------------------------------------ data and speed


@pytest.mark.parametrize("model", model_names())
def test_weights_data_is_the_zoo_built_on_meta(model: str) -> None:
    """plan_data.json's weights are what harness.models.sizes reads from the module on meta: a zoo change that
    leaves them stale fails here (refresh with `python -m harness.models.sizes --write`)."""
    from harness.models.sizes import model_weights

    assert load_data()["weights"][model] == model_weights(model)


def test_weights_data_matches_what_records_measured() -> None:
    qwen = load_data()["weights"]["qwen-image-edit"]
    record = next(r for r in _records("h100/qwen-image-edit-5090-s2.records.jsonl") if r["status"] == "ok")
    assert qwen["dit"]["weight_bytes"] == record["components"]["dit"]["weight_bytes"]
    assert qwen["dit"]["groups"]["transformer_blocks"]["host_bytes"] == \
        record["components"]["dit"]["layerwise"]["host_bytes"]
    assert qwen["dit"]["groups"]["transformer_blocks"]["layer_bytes"] == \
        record["components"]["dit"]["layerwise"]["largest_layer_bytes"]


def test_fits_are_what_plan_fit_makes_of_the_committed_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed fits come from the committed records, not from hand edits."""
    monkeypatch.chdir(REPO)
    records = [(path, CellRecord.from_json(line)) for path in sorted(glob.glob("results/h*/*.records.jsonl"))
               for line in Path(path).read_text().splitlines()]
    data = load_data()
    assert fit(records) == {"fits": data["fits"], "machines": data["machines"]}


def test_planner_imports_no_torch() -> None:
    code = ("import sys, harness.plan.planner, harness.plan.advise, harness.plan.plan_cli\n"
            "import harness.cli, harness.run.runner\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_plan_command_prints_its_table_in_under_two_seconds() -> None:
    cmd = [sys.executable, "-m", "harness", "plan", "--model", "qwen-image-edit", "--card", "rtx5090-32g"]
    times = []
    for _ in range(2):  # the best of two: the box is shared
        start = time.monotonic()
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        times.append(time.monotonic() - start)
    assert min(times) < 2.0, times
    assert "dit_cpu_offload + layerwise (prefetch 4)" in out.stdout
    assert "load needs" in out.stdout


# ------------------------------------------------------------------------------- against the GPU records


def test_every_committed_gpu_cell_gets_the_fate_the_plan_predicts() -> None:
    checks = [c for r in _gpu_records() if r["status"] in ("ok", "oom") and r["cell_id"] not in KNOWN_MISSES
              and (c := check_record(planned(r)))]
    assert len(checks) >= 40
    wrong = [f"{c.cell}: planned {c.predicted_oom_phase}, got {c.status} {c.failed_phase}"
             for c in checks if not c.verdict_ok]
    assert not wrong


# Cells whose peaks the plan is known to miss (allocated peak of a phase by more than 3 %, reserved peak by more than
# 5 %), each with the measured error and why; the peak tests below leave them out, and the test after them fails
# when one is no longer a miss. KNOWN_MISSES (fates) are listed here too when their peaks are off.
_FLUX_HIGH_RES = ("H200 session 8, FLUX 3072-3264 px (36,864-41,616 tokens; the activation fit's cells are 1024 px, "
                  "4,096 tokens): denoise allocated +6.0 to +7.2 % over the plan, capped or not (the per-token fit is "
                  "linear); under a cap of allocated x 1.1 the decode allocated 17-27 % under the plan, which is what "
                  "the one uncapped 3072 px decode allocated (22,223 MiB: torch's cuDNN convolutions fall back to "
                  "smaller workspaces when one does not fit)")
PLAN_OUTLIERS = {
    "reserved-capped-flux-capacity-3072/alloc1.1-18792m/cpu1-lw1-te1-vae0-pf1-pin1": _FLUX_HIGH_RES,
    "reserved-capped-flux-capacity-3136/alloc1.1-22181m/cpu1-lw1-te1-vae0-pf1-pin1": _FLUX_HIGH_RES,
    "reserved-capped-flux-capacity-3264/alloc1.1-23942m/cpu1-lw1-te1-vae0-pf1-pin1": _FLUX_HIGH_RES,
    "reserved-released-flux-capacity-3072/alloc1.1-18792m/cpu1-lw1-te1-vae0-pf1-pin1": _FLUX_HIGH_RES,
    # the only uncapped FLUX cell: its decode reserved 38,554 MiB for 22,223 allocated (28 cached from earlier, no
    # allocator retries), the plan 22,587: consistent with cuDNN taking larger workspaces when nothing caps them;
    # under a card (18,792 MiB) the same decode reserved 17,830
    "reserved-released-flux-capacity-3072/native/cpu1-lw1-te1-vae0-pf1-pin1": _FLUX_HIGH_RES,
    # a KNOWN_MISSES fate (planned OOM in denoise under its tight cap): its reserved peak, 15,606 MiB, is 11.9 %
    # under what the plan says it would need
    "reserved-capped-flux-lwc-all-4090/alloc1.1-16835m/cpu1-lw1-te1-vae0-pf5-pin1-res0.25-lwc-all": "see KNOWN_MISSES",
}


@functools.cache  # every committed record planned once for the tests that read it
def _peak_errors() -> dict[tuple[str, str], float]:
    """|measured / planned - 1| of the allocated peak of every completed phase of every committed GPU cell."""
    out = {}
    for r in _gpu_records():
        p = plan_for_record(as_record(r)) if r["model"] in FULL_MODELS else None
        if p is None or r["status"] not in ("ok", "oom"):
            continue
        for phase in p.phases:
            got = (r["phases"].get(phase.phase) or {}).get("alloc_peak_allocated_bytes")
            if got is None or (r["status"] == "oom" and phase.phase == r["failed_phase"]):
                continue
            out[(r["cell_id"], phase.phase)] = abs(got / phase.allocated_bytes - 1)
    return out


def test_known_plan_outliers_are_still_outliers() -> None:
    allocated, reserved = _peak_errors(), _reserved_errors()
    for cell in PLAN_OUTLIERS:
        worst_phase = max(e for (c, _), e in allocated.items() if c == cell)
        assert worst_phase > 0.03 or reserved.get(cell, 0.0) > 0.05, cell


def test_allocated_peaks_of_every_phase_within_two_and_a_half_percent() -> None:
    """The additive part of the plan (weights by placement + window + activations) against the allocator's
    allocated peaks of every phase that completed, on every committed GPU cell of our runtime. The tiny twins'
    cells are left out: a few MiB each, their phases are the allocator's block rounding (up to 12 % here)."""
    worst = max(e for (cell, _), e in _peak_errors().items() if cell not in PLAN_OUTLIERS)
    # the worst: 1.8 % (2.9 % before the capped load's warm-up workspace was planned, session 8), FLUX's decode
    # with the VAE streamed (H200): the plan holds its two largest up blocks
    # (63 MiB) and the activations of the FLUX cells with a resident VAE (2,475 MiB); at the measured peak, in
    # the last up block at full size, the window is that block and the next call's first (34 MiB)
    assert worst < 0.03


def test_qwen_5090_cells_reproduce_their_verdicts_within_tolerance() -> None:
    """The #26925 matrix on the 31.36 GiB cap, current code (session 2 on the H100, SGLang 0.5.23 on the H200):
    both-on fits (peaks within 5 %, step within 10 %), layerwise-only and resident OOM at load, DiT CPU offload
    alone in denoise."""
    records = _records("h100/qwen-image-edit-5090-s2.records.jsonl") + \
        _records("h200/qwen-image-edit-5090-sglang-0.5.23.records.jsonl")
    seen = set()
    for r in records:
        c = check_record(planned(r))
        assert c is not None and c.verdict_ok, r["cell_id"]
        eff = OffloadFlags.from_mapping(r["effective"])
        if eff.dit_layerwise_offload and eff.dit_cpu_offload:
            assert c.predicted_oom_phase is None
            assert abs(c.load_error) < 0.01 and abs(c.runtime_error) < 0.05 and abs(c.step_error) < 0.10
            seen.add("both")
        elif eff.dit_layerwise_offload:
            assert c.predicted_oom_phase == "load" == r["failed_phase"]
            # the NVML peak at the OOM (32,074 MiB) is the cap; the plan's need is the whole pipeline resident
            assert r["phases"]["load"]["nvml_proc_peak_bytes"] < CAP_5090 < c.predicted_load
            seen.add("layerwise-only")
        elif eff.dit_cpu_offload:
            assert c.predicted_oom_phase == "denoise" and abs(c.load_error) < 0.01
    assert seen == {"both", "layerwise-only"}


def test_plan_line_names_the_phase_and_the_need() -> None:
    p = plan("qwen-image-edit", LAYERWISE_ONLY, CAP_5090, Workload(), card="rtx5090-32g")
    assert p.oom_phase == "load"
    assert p.oom_line() == f"load needs {p.phase('load').device_bytes / GIB:.1f} GiB > 31.36 GiB"
    both = plan("qwen-image-edit", BOTH_ON, CAP_5090, Workload(), card="rtx5090-32g")
    assert both.fits and both.oom_line() is None


# ------------------------------------------------------------------------------------------------- physics


def _grid() -> list[tuple[str, str, OffloadFlags]]:
    return [(m, c, f) for m in model_names() for c in CARDS for f in combinations()]


def test_plans_are_deterministic() -> None:
    for model, card, flags in _grid()[::7]:
        a = plan(model, flags, CARDS[card], Workload(), card=card)
        b = plan(model, flags, CARDS[card], Workload(), card=card)
        assert a == b and json.dumps(a.as_dict(), sort_keys=True) == json.dumps(b.as_dict(), sort_keys=True)


@pytest.mark.parametrize("switch", ["dit_cpu_offload", "text_encoder_cpu_offload", "vae_cpu_offload",
                                    "dit_layerwise_offload"])
def test_more_offload_never_raises_the_planned_peak(switch: str) -> None:
    """Turning an offload switch on never raises the planned device peak nor loses a fit. The tiny twins are
    left out for layerwise: there the DiT's non-layer weights, which stay on the device through decode (a
    CPU-offloaded DiT leaves it), outweigh the window, so layerwise really can peak a few KiB higher. So is the
    peak of layerwise without dit_cpu_offload: the whole DiT is materialised and packed to the host, and its
    freed tensor-sized blocks hold none of the decode's large requests (measured, Qwen-Image-Edit uncapped:
    59,634 MiB reserved against 57,600 resident on the H200, 61,708 against 57,602 on the H100)."""
    models = FULL_MODELS if switch == "dit_layerwise_offload" else model_names()
    for model in models:
        for card, cap in CARDS.items():
            for flags in combinations():
                if getattr(flags, switch):
                    continue
                more = replace(flags, **{switch: True})
                if switch == "dit_layerwise_offload":
                    more = replace(more, dit_offload_prefetch_size=1.0)
                a, b = plan(model, flags, cap, Workload()), plan(model, more, cap, Workload())
                assert b.fits or not a.fits, (model, card, flags.label(), more.label())
                from_device = switch == "dit_layerwise_offload" and not flags.dit_cpu_offload
                if a.fits and b.fits and not from_device:
                    assert b.peak_device_bytes <= a.peak_device_bytes, (model, card, flags.label(), more.label())


def test_smaller_prefetch_never_raises_the_planned_peak() -> None:
    for model in model_names():
        for cpu in (False, True):
            peaks = [plan(model, replace(BOTH_ON, dit_cpu_offload=cpu, dit_offload_prefetch_size=float(pf)), None,
                          Workload()).runtime_peak_bytes for pf in (1, 2, 4, 8, 16)]
            assert peaks == sorted(peaks), (model, cpu)


def test_more_resident_layers_never_raise_step_time_nor_lower_the_peak() -> None:
    for model in FULL_MODELS:
        layers = max(g["layers"] for g in load_data()["weights"][model]["dit"]["groups"].values())
        for policy in ("leading", "strided"):
            flags = replace(BOTH_ON, dit_layerwise_residency_policy=policy)
            plans = [plan(model, flags, None, Workload(), resident_layers=r) for r in range(0, layers + 1, 5)]
            steps = [p.step_s for p in plans]
            assert steps == sorted(steps, reverse=True), (model, policy, steps)
            streamed = [p.streamed_bytes_per_forward for p in plans]
            assert streamed == sorted(streamed, reverse=True)
            peaks = [p.runtime_peak_bytes for p in plans]
            assert peaks == sorted(peaks), (model, policy)
            assert len({p.load_peak_bytes for p in plans}) == 1  # kept layers arrive with the first forward


def test_resident_layers_come_from_the_flags() -> None:
    """`dit_layerwise_resident_layers` is read per streamed group as the runtime reads it: a count, or a fraction
    of the group (harness.common.flags.resident_layer_count)."""
    for value, kept in ((30, 30), (0.5, 30), (0.8, 48), (0, 0), (99, 60)):
        flags = replace(BOTH_ON, dit_layerwise_resident_layers=float(value))
        p = plan("qwen-image", flags, None, Workload())
        assert p.resident_layers == kept
        assert p.streamed_bytes_per_forward == (60 - kept) * 679662592
    flux = plan("flux-dev", replace(BOTH_ON, dit_layerwise_resident_layers=0.5), None, Workload())
    assert flux.resident_layers == round(0.5 * 19) + 19  # each group its own share


def test_the_resident_layers_sweep_on_the_5090_cap_is_within_three_percent() -> None:
    """H200, Qwen-Image 20B on the 5090 cap: resident 0 .. 42 layers, leading and strided, prefetch 1 / 4 / 16.
    Leading residency leaves the kept layers' compute without a transfer to hide (0.890 s against 0.741 s strided
    at 0.5), which the plan's step follows; the 0.8 cell runs out of memory in denoise, as planned. The session-5
    rerun measured prefetch 4 with half kept at 0.879 s/step against 0.819 in session 4 (history/), the other
    cells within 3 % of their session-4 steps: that cell is held to 6 %."""
    records = _records("h200/qwen-image-resident-5090.records.jsonl")
    assert len(records) == 11  # session 5's rerun added 0.5 kept with the text encoder streamed (-lwc-te)
    for r in records:
        c = check_record(planned(_without_stored_plan(r)))
        assert c is not None and c.verdict_ok, r["cell_id"]
        if r["status"] == "ok":
            slower_rerun = r["cell_id"].endswith("-pf4-pin1-res0.5")
            assert abs(c.step_error) < (0.06 if slower_rerun else 0.03), (r["cell_id"], c.step_error)
            assert c.runtime_error is None or abs(c.runtime_error) < 0.04, (r["cell_id"], c.runtime_error)


def test_reserved_peaks_of_every_full_model_cell_within_five_percent() -> None:
    """Reserved load and runtime peaks of every committed GPU cell of a full model, the planner as it is now
    against the record (not the plan the run stored: the H200 session-5 runs stored their runtime's older plans).
    The misses the plan used to have are physical: layer buffers of two sizes split each other's segments (FLUX),
    the runtime before abd7f47 took layer buffers from the copy stream's pool (Wan prefetch 2: +22.7 %, Qwen-Image
    decode over a freed window: +23.9 %), and the VAE decode's largest request fits no layer segment (FLUX
    both-on with resident encoders: +8.0 %, its NVML trace puts 1,026 MiB of it in the decode; now +2.4 %)."""
    worst = {cell: e for cell, e in _reserved_errors().items() if cell not in PLAN_OUTLIERS}
    assert worst["flux-dev-4090/rtx4090-24g/cpu1-lw1-te0-vae0-pf5-pin1"] < 0.03
    assert max(worst.values()) < 0.05, max(worst.items(), key=lambda kv: kv[1])


def test_cells_that_stream_the_text_encoder_or_vae_are_within_five_percent() -> None:
    """H200 session 5: FLUX.1-dev on the 4090 cap with the text encoder and VAE streamed (and a quarter of the DiT
    kept), Qwen-Image on the 5090 cap with the text encoder streamed and half the DiT kept. Their runs stored a
    plan error (the planner refused them then); planned now: load -1.2 / 0.0 %, runtime -2.4 .. +2.1 %, step
    within 2.1 %. The decode's 1,026 / 1,540 MiB request, in no layer segment, is what lifts the runtime peak
    over denoise (without it: -10 %)."""
    records = [r for r in _records("h200/flux-dev-4090.records.jsonl")
               + _records("h200/qwen-image-resident-5090.records.jsonl") if "-lwc-" in r["cell_id"]]
    streamed = [r for r in records if r["effective"]["layerwise_offload_components"]]
    assert len(streamed) == 3
    for r in streamed:
        c = check_record(planned(r))
        assert c.source == "derived" and c.verdict_ok and c.not_planned is None, r["cell_id"]
        assert abs(c.load_error) < 0.02 and abs(c.runtime_error) < 0.05 and abs(c.step_error) < 0.03, r["cell_id"]
        if r["model"] == "flux-dev" and "res" not in r["cell_id"]:
            p = plan_for_record(as_record(r))
            assert p.phase("decode").reserved_bytes > p.phase("denoise").reserved_bytes  # measured: +1,026 MiB


@functools.cache
def _reserved_errors() -> dict[str, float]:
    """Per committed GPU cell of a full model: the larger |measured / planned - 1| of its reserved load and runtime
    peaks, planned by this checkout."""
    worst: dict[str, float] = {}
    for r in _gpu_records():
        c = check_record(planned(_without_stored_plan(r))) if r["model"] in FULL_MODELS else None
        for err in (c.load_error, c.runtime_error) if c else ():
            if err is not None:
                worst[r["cell_id"]] = max(worst.get(r["cell_id"], 0.0), abs(err))
    return worst


def _without_stored_plan(record: dict[str, Any]) -> dict[str, Any]:
    """The record as the planner of this checkout plans it (`check_record` prefers the plan the run stored)."""
    return {k: v for k, v in record.items() if k != "plan"}


def test_records_of_the_copy_stream_pool_runtime_are_planned_as_it_ran() -> None:
    """Wan2.1-14B, DiT CPU offload + layerwise prefetch 2, the text encoder offloaded: the copy-stream layer pool
    runtime (`results/h100/wan21-14b-h100.records.jsonl`) took its four 672 MiB layer buffers on the copy stream,
    whose pool could not use the encoder's freed 11.1 GiB block (14,510 MiB reserved against 11,822 at encode);
    the compute-stream runtime at prefetch 1 (`results/h100/wan21-14b-peer.records.jsonl`) fits its window into
    that block (11,822 MiB). The records say which ran (`layer_pool`, told at migration), not their dates."""
    copy_pool = next(r for r in _records("h100/wan21-14b-h100.records.jsonl") if "cpu1-lw1" in r["cell_id"])
    compute_pool = next(r for r in _records("h100/wan21-14b-peer.records.jsonl") if "cpu1-lw1" in r["cell_id"])
    assert as_record(copy_pool).layer_pool is LayerPool.COPY_STREAM
    assert as_record(compute_pool).layer_pool is LayerPool.COMPUTE_STREAM
    for r in (copy_pool, compute_pool):
        c = check_record(planned(r))
        assert c is not None and abs(c.runtime_error) < 0.005, (r["cell_id"], c.runtime_error)
    as_compute_pool = plan_for_record(replace(as_record(copy_pool), layer_pool=LayerPool.COMPUTE_STREAM))
    assert as_compute_pool is not None
    assert as_compute_pool.runtime_peak_bytes < 0.85 * check_record(planned(copy_pool)).measured_runtime


def test_the_layer_pool_is_told_by_what_a_record_shows_and_kept_through_a_round_trip() -> None:
    """A v1 record without a backend was written by the copy-stream runtime; the field is written only off its
    default, so every other record keeps its bytes."""
    v1 = {"schema_version": 1, "cell_id": "s/c/x", "status": "ok"}
    assert as_record(v1).layer_pool is LayerPool.COPY_STREAM
    assert as_record({**v1, "backend": "harness"}).layer_pool is LayerPool.COMPUTE_STREAM
    copy_pool = as_record(v1)
    assert json.loads(copy_pool.to_json())["layer_pool"] == "copy-stream"
    assert CellRecord.from_json(copy_pool.to_json()) == copy_pool
    assert "layer_pool" not in json.loads(as_record({**v1, "backend": "harness"}).to_json())


def test_layer_segments_one_size_is_the_window_two_sizes_more() -> None:
    """One layer size: the window's 2p buffers, each in its own 2 MiB-rounded segment. FLUX's two sizes at
    prefetch 5: single-block buffers split freed double-block segments, so the next double block takes a new one."""
    from harness.common.units import MIB
    from harness.plan.planner import streaming
    from harness.plan.segments import segment_size, window_segment_bytes

    qwen = load_data()["weights"]["qwen-image"]["dit"]["groups"]["transformer_blocks"]
    assert window_segment_bytes(((60, 4, qwen["layer_bytes"]),)) == 8 * segment_size(qwen["layer_bytes"])
    dit = load_data()["weights"]["flux-dev"]["dit"]
    flux = streaming(dit, 5, 0, get_model("flux-dev").components["dit"].layer_groups)
    assert flux.window_bytes == 10 * 679_662_592 + 5 * 283_183_616  # doubles k and k+1, the singles' window 0
    assert flux.segment_bytes == 8450 * MIB > flux.window_bytes


def test_the_segment_cache_splits_best_fit_and_merges_within_a_segment() -> None:
    """The caching allocator's rules the replay relies on: best fit, split, a segment never joins another."""
    from harness.common.units import MIB
    from harness.plan.segments import SegmentCache

    pool = SegmentCache()
    big = pool.malloc(100 * MIB)
    pool.free(big)
    small = pool.malloc(40 * MIB)  # takes the freed 100 MiB block and splits it
    assert pool.reserved == 100 * MIB
    again = pool.malloc(100 * MIB)  # 60 MiB left there: a new segment
    assert pool.reserved == 200 * MIB
    pool.free(small)  # merges back with the 60 MiB rest: one whole 100 MiB block again
    assert sorted(b.size for b in pool.blocks if b.free) == [100 * MIB]
    pool.free(again)
    assert pool.malloc(150 * MIB) and pool.reserved == 350 * MIB  # two free 100 MiB segments never join


def test_batched_cfg_streams_once_a_step_with_twice_the_activations() -> None:
    two = plan("qwen-image", BOTH_ON, None, Workload())
    one = plan("qwen-image", BOTH_ON, None, Workload(cfg_batch=True))
    assert one.workload.dit_calls_per_step == 1 and two.workload.dit_calls_per_step == 2
    assert one.phase("denoise").activation_bytes == pytest.approx(2 * two.phase("denoise").activation_bytes, abs=1)
    assert one.step_s < two.step_s  # transfer-bound: half the bytes a step
    assert one.compute_s_per_forward == pytest.approx(2 * two.compute_s_per_forward)
    record = next(r for r in _records("h100/qwen-image-edit-5090-s2.records.jsonl") if r["status"] == "ok")
    batched = plan_for_record(as_record({**record, "run_options": {"cfg_batch": True}}))
    assert batched.workload.cfg_batch and not plan_for_record(as_record(record)).workload.cfg_batch


def test_empty_cache_between_phases_gives_cached_blocks_back() -> None:
    flags = replace(BOTH_ON, text_encoder_cpu_offload=True)
    kept = plan("wan2.1-t2v-14b", flags, None, Workload(480, 832, 81, 5.0))
    emptied = plan("wan2.1-t2v-14b", flags, None, Workload(480, 832, 81, 5.0, empty_cache=True))
    assert emptied.phase("decode").reserved_bytes < kept.phase("decode").reserved_bytes
    assert [p.allocated_bytes for p in emptied.phases] == [p.allocated_bytes for p in kept.phases]


def test_the_release_after_packing_takes_the_loads_cache_out_of_the_runtime_peak() -> None:
    """H200 session 8, Qwen-Image-Edit layerwise without DiT CPU offload: runtime reserved 59,634 MiB kept, 21,060
    with the release (planned uncapped: 4.4 % over it); a DiT loaded from the host has nothing to release. The
    record ran under a runtime cap, which the planner does not model: it is not judged."""
    device_placed = replace(LAYERWISE_ONLY, text_encoder_cpu_offload=False)
    kept = plan("qwen-image-edit", device_placed, None, Workload())
    released = plan("qwen-image-edit", device_placed, None, Workload(empty_cache_after_packing=True))
    assert kept.placements["dit"] == "layerwise-from-device"
    assert released.runtime_peak_bytes < kept.runtime_peak_bytes - 30 * 2**30
    assert released.load_peak_bytes == kept.load_peak_bytes
    from_host = [plan("qwen-image-edit", BOTH_ON, None, Workload(empty_cache_after_packing=on)) for on in (False, True)]
    assert from_host[0].runtime_peak_bytes == from_host[1].runtime_peak_bytes
    record = _records("h200/reserved-device-placed.records.jsonl")[0]
    assert record["run_options"]["runtime_cap_mib"] == 22490
    assert "runtime_cap_mib" in check_record(planned(record)).not_planned


def test_memory_terms_add_up_to_the_model_bytes() -> None:
    """At rest (after the call) the device holds what is not offloaded and the host the rest: their sum is the
    model's bytes, plus the layer regions' alignment padding under layerwise."""
    for model in model_names():
        w = load_data()["weights"][model]
        total = sum(w[r]["weight_bytes"] for r in ("text_encoder", "dit", "vae"))
        padding = sum(g["host_bytes"] for g in w["dit"]["groups"].values()) - \
            (w["dit"]["weight_bytes"] - w["dit"]["non_layer_bytes"])
        for flags in combinations():
            for pin in (True, False):
                p = plan(model, replace(flags, pin_cpu_memory=pin), None, Workload())
                at_rest = p.phase("decode").weight_bytes - (w["vae"]["weight_bytes"] if flags.vae_cpu_offload else 0)
                host = p.host_pinned_bytes + p.host_pageable_bytes
                assert (p.host_pinned_bytes == 0) != pin or host == 0
                assert at_rest + host == total + (padding if flags.dit_layerwise_offload else 0), \
                    (model, flags.label())


def test_pageable_copies_make_layerwise_steps_slower_by_the_machine_rates() -> None:
    pinned = plan("qwen-image-edit", BOTH_ON, None, Workload())
    pageable = plan("qwen-image-edit", replace(BOTH_ON, pin_cpu_memory=False), None, Workload())
    m = machine_profile()
    assert pageable.step_s / pinned.step_s == pytest.approx(m.pinned_h2d_gbps / m.pageable_h2d_gbps, rel=1e-6)


def test_larger_images_cost_more_memory_and_time() -> None:
    small = plan("qwen-image", BOTH_ON, None, Workload(768, 768))
    large = plan("qwen-image", BOTH_ON, None, Workload(1536, 1536))
    assert large.runtime_peak_bytes > small.runtime_peak_bytes
    assert large.compute_s_per_forward > small.compute_s_per_forward
    frames = [plan("wan2.1-t2v-14b", BOTH_ON, None, Workload(480, 832, f, 5.0)) for f in (17, 49, 81)]
    assert [p.phase("denoise").activation_bytes for p in frames] == \
        sorted(p.phase("denoise").activation_bytes for p in frames)


def test_a_model_without_records_borrows_its_dit_twin_or_says_so() -> None:
    edit = plan("qwen-image-edit", BOTH_ON, None, Workload())
    assert not edit.notes
    data = load_data()
    no_edit_fits = {**data, "fits": {k: v for k, v in data["fits"].items() if k != "qwen-image-edit"}}
    borrowed = plan("qwen-image-edit", BOTH_ON, None, Workload(), data=no_edit_fits)
    assert any("from qwen-image" in n for n in borrowed.notes)
    nothing = plan("qwen-image-edit", BOTH_ON, None, Workload(), data={**data, "fits": {}})
    assert any("no records" in n for n in nothing.notes)


# -------------------------------------------------------------------------------------- records and checks


def _planner_fails_for(monkeypatch: pytest.MonkeyPatch, flags: OffloadFlags) -> None:
    """The planner raises PlanError for cells of these effective flags (a gap in its data) and plans the others."""
    from harness.plan.planner import model as planner_model

    real = planner_model.plan

    def plan_or_fail(name: str, effective: OffloadFlags, *args: Any, **kwargs: Any) -> Any:
        if effective == flags:
            raise PlanError(f"no data for {effective.label()}")
        return real(name, effective, *args, **kwargs)

    monkeypatch.setattr(planner_model, "plan", plan_or_fail)


def test_plan_entry_is_the_records_plan_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    record = next(r for r in _records("h100/qwen-image-edit-5090-s2.records.jsonl") if r["status"] == "ok")
    entry = plan_entry(as_record(record))
    assert entry is not None and entry["fits"] and entry["placements"]["dit"] == "layerwise-from-host"
    assert check_record(planned({**record, "plan": entry})).source == "recorded"
    assert check_record(planned(record)).source == "derived"
    _planner_fails_for(monkeypatch, as_record(record).effective)
    assert plan_entry(as_record(record)) == {"error": f"PlanError: no data for {as_record(record).effective.label()}"}
    assert plan_entry(as_record({**record, "backend": "diffusers-group"})) is None


def test_a_plan_is_derived_once_on_read_and_the_report_only_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older record (no stored plan) gets its plan when the run is read (`readout`), marked derived; a stored
    plan stays as the run stored it; rendering the report then plans nothing."""
    from harness.analyze.readout import read_run
    from harness.analyze.report import render
    from harness.plan.planner import model as planner_model

    old = read_run(RESULTS / "h100/qwen-image-edit-5090-s2.records.jsonl").records
    assert all(r.plan is None or r.plan["derived"] for r in old) and any(r.plan for r in old)
    stored = read_run(RESULTS / "h200/advise-pick.records.jsonl").records
    assert all(r.plan is not None and "derived" not in r.plan for r in stored)

    def no_planning(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the report planned a cell")

    monkeypatch.setattr(planner_model, "plan_for_record", no_planning)
    assert "| derived" in render(old)
    stored_table = render(stored).split("Plan vs measured")[1]
    assert "| recorded" in stored_table and "| derived" not in stored_table


def test_a_record_with_flags_no_reader_can_read_names_the_field() -> None:
    """Flags are typed when a record is read: a value no flag takes makes the line unreadable, naming the record and
    the section, before any planner or report sees it."""
    record = next(r for r in _records("h100/qwen-image-edit-5090-s2.records.jsonl") if r["status"] == "ok")
    broken = {**record, "effective": {**record["effective"], "dit_cpu_offload": "maybe"}}
    with pytest.raises(RecordError, match=r"effective.*dit_cpu_offload"):
        as_record(broken)


def test_a_cell_the_planner_cannot_plan_is_shown_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """A report or an expectation over a cell the planner cannot plan (here a gap in its data; the runner stored
    the error as the record's plan) shows the cell with the reason and judges the others."""
    from harness.analyze.report import render

    records = _records("h100/qwen-image-edit-5090-s2.records.jsonl")
    i, good = next((i, r) for i, r in enumerate(records) if r["status"] == "ok")
    _planner_fails_for(monkeypatch, as_record(good).effective)
    broken = {**good, "plan": plan_entry(as_record(good))}
    records[i] = broken
    c = check_record(planned(broken))
    assert c is not None and c.not_planned.startswith("PlanError: ") and c.verdict_ok
    assert c.predicted_load is None and c.measured_load == good["phases"]["load"]["alloc_peak_reserved_bytes"]
    row = next(r for r in plan_rows(planned_records(records)) if r["cell"] == good["cell_id"])
    assert row["fate planned / measured"] == "not planned / ok" and row["plan"].startswith("not planned: PlanError")
    verdict = plan_within_verdict("rtx5090-32g", planned_records(records), {"peak": 0.05, "time": 0.10})
    assert verdict.passed and f"{broken['cell_id'].rsplit('/', 1)[-1]} not planned: PlanError" in verdict.message
    assert "not planned: PlanError" in render(planned_records(records))


def test_plan_within_fails_a_cell_that_strays(tmp_path: Path) -> None:
    records = _records("h100/qwen-image-edit-5090-s2.records.jsonl")
    tolerance = {"peak": 0.05, "time": 0.10}
    assert plan_within_verdict("rtx5090-32g", planned_records(records), tolerance).passed
    slow = []
    for r in records:
        if r["status"] == "ok":
            r = json.loads(json.dumps(r))
            r["phases"]["denoise"]["step_ms"] = [s * 1.2 for s in r["phases"]["denoise"]["step_ms"]]
        slow.append(r)
    verdict = plan_within_verdict("rtx5090-32g", planned_records(slow), tolerance)
    assert not verdict.passed and "step" in verdict.message
    fat = [{**r, "phases": {**r["phases"], "load": {**r["phases"]["load"],
            "alloc_peak_reserved_bytes": r["phases"]["load"]["alloc_peak_reserved_bytes"] * 1.1}}}
           if r["status"] == "ok" else r for r in records]
    assert "load peak" in plan_within_verdict("rtx5090-32g", planned_records(fat), tolerance).message
    fate = [{**r, "status": "ok", "failed_phase": None} if r["status"] == "oom" else r for r in records]
    assert "planned OOM in load" in plan_within_verdict("rtx5090-32g", planned_records(fate), tolerance).message
    cpu = [{**r, "device": "cpu"} for r in records]
    assert plan_within_verdict("rtx5090-32g", planned_records(cpu), tolerance).passed


def test_scenario_plan_within_is_parsed_and_checked(tmp_path: Path) -> None:
    src = (REPO / "scenarios" / "cpu" / "qwen_image_edit_tiny.toml").read_text()
    ok = tmp_path / "ok.toml"
    ok.write_text(src.replace("[expect]\n", "[expect]\nplan_within = { peak = 0.05, time = 0.10 }\n", 1))
    assert load_scenario(ok).expect.plan_within == {"peak": 0.05, "time": 0.10}
    for bad in ("{ peak = -1 }", "{ memory = 0.05 }", "0.05", "{ peak = true }"):
        path = tmp_path / "bad.toml"
        path.write_text(src.replace("[expect]\n", f"[expect]\nplan_within = {bad}\n", 1))
        with pytest.raises(ScenarioError, match=r"expect\.plan_within"):
            load_scenario(path)


def test_report_has_the_predicted_vs_measured_table() -> None:
    from harness.analyze.report import render

    records = _records("h100/qwen-image-edit-5090-s2.records.jsonl")
    text = render(planned_records(records))
    assert "Plan vs measured" in text and "oom in load / oom in load" in text
    rows = plan_rows(planned_records(records))
    both = next(r for r in rows if "cpu1-lw1" in r["cell"])
    assert both["fate planned / measured"] == "fits / ok" and both["error  "].endswith("%")


# ------------------------------------------------------------------------------------------------ advise


def test_advise_qwen_5090_ranks_both_on_and_explains_layerwise_only() -> None:
    a = advise("qwen-image-edit", "rtx5090-32g", CAP_5090, Workload(), records_glob=None)
    assert a.fastest is not None and a.fastest.plan.flags.dit_cpu_offload and a.fastest.plan.flags.dit_layerwise_offload
    lines = {describe(o.plan.flags): o.oom_line for o in a.not_fitting}
    assert lines["layerwise (prefetch 4) (without dit_cpu_offload)"].startswith("load needs ")
    assert lines["dit_cpu_offload"].startswith("denoise needs ")
    assert all(o.measurement is None for o in a.options)
    steps = [o.step_s for o in a.fitting]
    assert steps == sorted(steps)


def test_advise_uses_committed_measurements_and_says_so() -> None:
    from harness.plan.advise import render

    a = advise("qwen-image-edit", "rtx5090-32g", CAP_5090, Workload(),
               records_glob=str(RESULTS / "h*" / "qwen-image-edit-5090*.records.jsonl"))
    measured = [o for o in a.options if o.measurement is not None]
    assert len(measured) >= 4
    # effective flags carry SGLang's final layerwise list (["dit"] here); the combination is the both-on one
    both = next(o for o in measured
                if replace(o.plan.flags, layerwise_offload_components=None) == replace(BOTH_ON, pin_cpu_memory=True))
    assert both.runs and both.step_s == both.measurement.step_s
    text = render(a, all_rows=True)
    assert "measured numbers from committed records" in text and "ran out of memory in load (measured" in text


def test_advise_flux_4090_puts_the_hairline_fit_behind_the_margin() -> None:
    """DiT + encoder CPU offload ran on the 4090 cap at 24,202 of 24,207 MiB (NVML), 0.181 s/step: the fastest cell
    that ran, but inside the margin. Keeping 3/4 of the layers resident is planned as fast (compute-bound) with
    4.5 GiB to spare, so it leads; without resident layers, both-on with resident encoders (measured 0.434 s)."""
    glob_ = str(RESULTS / "h100" / "flux-dev-4090.records.jsonl")
    a = advise("flux-dev", "rtx4090-24g", CARDS["rtx4090-24g"], Workload(true_cfg_scale=1.0), records_glob=glob_)
    assert "dit_cpu_offload + text_encoder_cpu_offload" in [describe(o.plan.flags) for o in a.tight]
    hairline = next(o for o in a.tight if describe(o.plan.flags) == "dit_cpu_offload + text_encoder_cpu_offload")
    assert hairline.measurement is not None and hairline.step_s == pytest.approx(0.181, abs=0.001)
    assert a.fastest.plan.flags.dit_layerwise_resident_layers > 0
    assert a.fastest.step_s == pytest.approx(hairline.step_s, rel=0.02)
    plain = [o for o in a.fitting if not o.plan.flags.dit_layerwise_resident_layers]
    assert describe(plain[0].plan.flags) == "dit_cpu_offload + layerwise (prefetch 5)"
    assert plain[0].measurement is not None and plain[0].step_s == pytest.approx(0.434, abs=0.001)


def test_cli_advise_and_bad_arguments() -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "harness", *args], cwd=REPO, capture_output=True, text=True)

    out = run("advise", "--model", "flux-dev", "--card", "rtx4090-24g", "--records", "")
    assert out.returncode == 0 and "fastest that fits" in out.stdout
    out = run("plan", "--model", "wan2.1-t2v-14b", "--card", "rtx5090-32g", "--resolution", "832x480",
              "--frames", "81", "--flags", "dit_cpu_offload=true,dit_layerwise_offload=true,"
              "text_encoder_cpu_offload=true,dit_offload_prefetch_size=1", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["fits"] is True
    for args in (("plan", "--model", "nope"), ("plan", "--model", "flux-dev", "--card", "rtx9090"),
                 ("advise", "--model", "flux-dev", "--resolution", "1000x1000"),
                 ("plan", "--model", "flux-dev", "--flags", "dit_cpu_offload=maybe")):
        out = run(*args)
        assert out.returncode == 2 and out.stderr.startswith("error:"), (args, out.stderr)


def test_every_model_card_and_combination_plans() -> None:
    for model in model_names():
        spec = get_model(model)
        w = Workload(frames=81 if spec.family == "wan" else 1)
        for card, cap in CARDS.items():
            for flags in combinations():
                p = plan(model, flags, cap, w, card=card)
                assert p.step_s is None or p.step_s > 0
                assert all(ph.reserved_bytes >= ph.allocated_bytes >= 0 for ph in p.phases), (model, flags.label())


def test_a_streamed_text_encoder_or_vae_holds_its_non_layer_weights_and_its_window() -> None:
    """A text encoder or VAE that `layerwise_offload_components` streams (its CPU-offload flag cleared) keeps its
    weights outside the layer groups on the device from load on, and in the phase that runs it adds its window
    (p streamed layers computing, p in flight; per-component prefetch 0 -> one layer) and resident layers; its
    layer regions are pinned host bytes. FLUX: T5 blocks of 368 MiB, CLIP's window 0 held while T5 runs."""
    data = load_data()["weights"]["flux-dev"]
    te, vae = data["text_encoder"], data["vae"]
    t5, clip = te["groups"]["t5.encoder.block"]["layer_bytes"], te["groups"]["clip.encoder.layers"]["layer_bytes"]
    flags = replace(BOTH_ON, dit_offload_prefetch_size=5, text_encoder_cpu_offload=False,
                    layerwise_offload_components=("text_encoder", "vae"))
    p = plan("flux-dev", flags, CARDS["rtx4090-24g"], Workload(true_cfg_scale=1.0), data={**load_data(), "fits": {}})
    assert p.placements == {"text_encoder": "layerwise-from-host", "dit": "layerwise-from-host",
                            "vae": "layerwise-from-host"}
    non_layer = te["non_layer_bytes"] + vae["non_layer_bytes"] + data["dit"]["non_layer_bytes"]
    assert p.phase("load").weight_bytes == non_layer and p.phase("load").window_bytes == 0
    assert p.phase("encode").window_bytes == 2 * t5 + clip
    assert p.phase("decode").window_bytes == 2 * vae["groups"]["decoder.up_blocks"]["layer_bytes"]
    assert p.host_pinned_bytes == sum(g["host_bytes"] for c in (te, vae, data["dit"]) for g in c["groups"].values())
    kept = replace(flags, layerwise_resident_layers=(("text_encoder", 0.5),), layerwise_prefetch_size=(("vae", 2),))
    q = plan("flux-dev", kept, CARDS["rtx4090-24g"], Workload(true_cfg_scale=1.0), data={**load_data(), "fits": {}})
    assert q.phase("encode").weight_bytes == p.phase("encode").weight_bytes + 6 * clip + 12 * t5
    # a group's layers are counted at its largest (the VAE's up blocks shrink 33 -> 2.5 MiB): an upper bound
    assert q.phase("decode").window_bytes == 4 * vae["groups"]["decoder.up_blocks"]["layer_bytes"]  # 2 x 2 of 4
    assert q.phase("denoise") == p.phase("denoise") and q.host_pinned_bytes == p.host_pinned_bytes


def test_advise_h200_flux_picks_the_measured_resident_cell_and_ignores_a_probes_single_step() -> None:
    """Session 6 on the H200: advise's pick for FLUX.1-dev on the 4090 cap (3/4 of the layers kept, strided) ran at
    0.178 s/step, 19,524 MiB reserved; DiT + encoder CPU offload ran 2 % faster (0.174 s) but at 24,202 MiB NVML,
    inside the margin, and OOMed at 1088x1088 in the capacity search. The 1024x1024 capacity probe of that cell is
    newer but ran one step (0.340 s, one-off costs included): its peaks count, its step does not."""
    glob_ = str(RESULTS / "h200" / "*.records.jsonl")
    a = advise("flux-dev", "rtx4090-24g", CARDS["rtx4090-24g"], Workload(true_cfg_scale=1.0), records_glob=glob_)
    assert a.fastest is not None and a.fastest.plan.flags.dit_layerwise_resident_layers == 0.75
    assert a.fastest.measurement is not None and a.fastest.step_s == pytest.approx(0.178, abs=0.001)
    hairline = next(o for o in a.tight if describe(o.plan.flags) == "dit_cpu_offload + text_encoder_cpu_offload")
    assert hairline.step_s == pytest.approx(0.174, abs=0.001)
    assert "advise-pick" in hairline.measurement.source


def test_a_single_step_record_gives_peaks_but_no_step() -> None:
    probe = next(r for r in read_cell_records(RESULTS / "h200" / "flux-dev-capacity-4090.records.jsonl").records
                 if r.status.value == "ok")
    assert steady_steps(probe) == 0 and probe.median_step_s() is not None
    m = measured(probe)
    assert m.step_s is None and m.runtime_peak is not None and m.load_peak is not None


@pytest.mark.parametrize("te_offload, cls", [(False, "resident"), (True, "offloaded")])
def test_a_plan_uses_the_memory_fits_of_its_text_encoder_placement(te_offload: bool, cls: str) -> None:
    """Qwen-Image's records of both text-encoder placements give two sets of memory fits (one median over both
    flipped with the records' mix); a plan takes the set of its own placement, exactly as if it were the only one."""
    data = load_data()
    split = data["fits"]["qwen-image"]
    assert set(split["by_text_encoder"]) == {"offloaded", "resident"}
    flat = {k: v for k, v in split.items() if k != "by_text_encoder"} | split["by_text_encoder"][cls]
    flags = replace(BOTH_ON, text_encoder_cpu_offload=te_offload)
    planned = plan("qwen-image", flags, None, Workload(), data=data)
    alone = plan("qwen-image", flags, None, Workload(), data={**data, "fits": {**data["fits"], "qwen-image": flat}})
    assert planned.phases == alone.phases
    other = "offloaded" if cls == "resident" else "resident"
    wrong = {**flat, **split["by_text_encoder"][other]}
    assert plan("qwen-image", flags, None, Workload(), data={**data, "fits": {**data["fits"], "qwen-image": wrong}}
                ).phases != planned.phases


def test_a_capped_cards_load_holds_the_kernel_warm_up_workspace() -> None:
    """H200 session 8: a capped cell's load allocated exactly 32 MiB more than the same uncapped cell's (FLUX 3072
    px, Wan both-on): measure.warm_kernels' cuBLAS workspace. The plan adds it at load under a cap, and the fit takes
    it out of a capped record's base."""
    flags = replace(BOTH_ON, text_encoder_cpu_offload=True)
    capped = plan("wan2.1-t2v-14b", flags, 13_659 * 2**20, Workload(480, 832, 81, 5.0))
    uncapped = plan("wan2.1-t2v-14b", flags, None, Workload(480, 832, 81, 5.0))
    assert capped.phase("load").allocated_bytes - uncapped.phase("load").allocated_bytes == WARM_KERNELS_BYTES
    assert capped.phase("encode").allocated_bytes == uncapped.phase("encode").allocated_bytes
