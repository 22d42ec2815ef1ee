"""The child process of one cell: `python -m harness.cell.worker --cell CELL.json --out RECORD.json`.

It runs one flag combination end to end in a fresh process (allocator pools, pinned caches, hooks and CUDA
context all start clean) and writes exactly one record to --out, whatever happens: ok, oom with the phase, or
error with the exception. The parent never parses stdout; if no record appears the parent records a crash.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from harness.common.contract import (
    MEASURED_PHASES,
    ROLES,
    RUNTIME_PHASES,
    CellRecord,
    CellSpec,
    Phase,
    PhaseStats,
    Placement,
    RunOptions,
    Status,
    median_step,
)
from harness.common.flags import OffloadFlags
from harness.common.records import now_iso, write_json_atomic

# When this module started running: with the parent's `spawned_at` (in the cell spec) it gives the process start
# (interpreter, site packages, runpy), the first part of a cell's fixed cost (`record.overhead`).
MODULE_STARTED_AT = time.time()

# Faults the CPU tests inject to prove every fate is recorded (issue: nothing lost, nothing hangs).
FAULT_ENV = "OFFLOAD_BENCH_FAULT"  # "<phase>:<raise|hang|tree|sigkill|segv|oom|enospc|pause>"
# `pause` is no fault: the phase takes PAUSE_S longer, so a test sees the parent's progress line while a cell runs
# (a CPU cell from the fork server ends in under a second, before the first line is due).
PAUSE_S = 2.5


def _progress(msg: str) -> None:
    print(f"[worker {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _phase_start_hook(spec: str | None) -> Any:
    """Announces each phase on the log (the runner reads it to name the phase of a crash or timeout) and, in
    tests, injects the fault named by OFFLOAD_BENCH_FAULT."""
    phase, _, kind = (spec or "").partition(":")

    def inject(name: str) -> None:
        _progress(f"phase {name}")
        if not spec or name != phase:
            return
        if kind == "pause":
            time.sleep(PAUSE_S)
            return
        if kind == "raise":
            raise RuntimeError(f"injected fault in phase {name}")
        if kind == "tree":  # a hang with two grandchildren, one of which left the group: a timeout kills both
            stay = subprocess.Popen(["sleep", "600"])
            left = subprocess.Popen(["sleep", "601"], start_new_session=True)
            _progress(f"fault tree: grandchildren {stay.pid} {left.pid}")
        if kind in ("hang", "tree"):
            while True:
                time.sleep(1)
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "segv":  # a real segmentation fault (a native crash), not a signal sent
            import ctypes

            ctypes.string_at(0)
        if kind == "oom":
            from harness.cell.offload.memory import SimulatedOutOfMemoryError

            raise SimulatedOutOfMemoryError(f"injected out-of-memory in phase {name}")
        if kind == "enospc":  # the disk filled under the child (another process): it dies as writing its record
            print(f"OSError: [Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}: 'record.json' (injected in phase "
                  f"{name})", file=sys.stderr, flush=True)
            os._exit(1)
        raise ValueError(f"{FAULT_ENV}: unknown fault kind {kind!r}")

    return inject


def _new_record(spec: CellSpec) -> tuple[OffloadFlags, CellRecord]:
    """The cell's record header (`CellRecord.begin`: the spec and the resolution the parent made; the child never
    resolves a policy itself), and the effective flags it runs."""
    record = CellRecord.begin(spec, Status.ERROR, created=now_iso())
    return record.effective, record


def _refusal(spec: CellSpec, record: CellRecord) -> str | None:
    """Why this machine cannot run the cell at all (the record says so), or None. Guards run here, before any
    CUDA context: a cell this machine cannot hold now is skipped, with numbers."""
    import torch

    from harness.cell.guards import GuardConfigError, check_cell

    overhead = record.overhead if record.overhead is not None else {}
    if spec.device == "cuda" and not torch.cuda.is_available():
        record.reason = "cell asks for CUDA but torch.cuda.is_available() is False"
        return "error"
    needs_cuda = record.placements["dit"].needs_cuda
    if needs_cuda and spec.device != "cuda":
        # diffusers' streamed group offload has no CPU form (apply_group_offloading refuses use_stream off CUDA),
        # and SGLang's manager disables itself without CUDA: a fact of this profile, not a failure of the cell.
        record.status, record.reason = Status.SKIPPED, f"{needs_cuda} (backend {spec.backend}, device {spec.device})"
        return "skipped"
    t_guards = time.perf_counter()
    try:
        guard = check_cell(spec, record.placements)
    except GuardConfigError as e:
        record.failed_phase, record.reason = Phase.SETUP, f"GuardConfigError: {e}"
        return "error"
    record.guard = guard.as_dict()
    overhead["guards_s"] = _since(t_guards)
    if guard.skip:
        record.status, record.reason = Status.SKIPPED, guard.reason
        return "skipped by guard"
    if spec.device == "cuda":
        # The CUDA context, made and timed here, not by a cell-local H2D probe: without that probe (the runner
        # passes its measurement down) the load phase would otherwise pay for it.
        t_cuda = time.perf_counter()
        torch.cuda.init()
        torch.cuda.synchronize()
        overhead["cuda_init_s"] = _since(t_cuda)
    return None


def run_cell(spec: CellSpec) -> CellRecord:
    """Runs one cell and returns its record (never raises for failures inside the run).

    `record.overhead` is the cell's fixed cost, in seconds, part by part: process_start_s (parent's spawn to this
    module; the runner names it fork_s for a child of the fork server, which sets MODULE_STARTED_AT at the fork),
    imports_s (torch and the harness stack), guards_s, cuda_init_s (the CUDA context, made here so that no
    measured phase pays for it), h2d_probe_s (0 when the runner passed down an earlier cell's probe),
    checkpoint_s, warmup_s (the scenario's warm-up rounds), measured_s (the load phase and the measured rounds:
    what the record's numbers come from) and child_s (module start to record); the runner adds teardown_s,
    fixed_s (its elapsed_s minus measured_s) and other_s (fixed_s minus the named parts)."""
    t_imports = time.perf_counter()
    import torch  # noqa: F401  (timed: imports_s)

    import harness.cell.measure
    import harness.cell.pipeline  # noqa: F401

    overhead: dict[str, Any] = {"imports_s": _since(t_imports)}
    if spec.spawned_at is not None:
        overhead["process_start_s"] = round(max(MODULE_STARTED_AT - spec.spawned_at, 0.0), 3)
    started = time.monotonic()
    flags, record = _new_record(spec)
    record.overhead = overhead
    refused = _refusal(spec, record)
    if refused is not None:
        if record.status is Status.SKIPPED:
            _progress(f"{spec.cell_id}: {refused}: {record.reason}")
        record.child_elapsed_s = round(time.monotonic() - started, 3)
        return record
    _measure(spec, flags, record)
    record.child_elapsed_s = round(time.monotonic() - started, 3)
    overhead["child_s"] = round(time.time() - MODULE_STARTED_AT, 3)
    return record


def non_finite_outputs(outputs: dict[str, Any] | None) -> list[str]:
    """The outputs' stats (latents_stats, image_stats) that say finite: false."""
    return [key for key in ("latents_stats", "image_stats")
            if isinstance((outputs or {}).get(key), dict) and outputs[key].get("finite") is False]  # type: ignore[index]


def _since(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def _measure(spec: CellSpec, flags: OffloadFlags, record: CellRecord) -> None:
    """Loads the cell and runs its rounds under the meter, recording the fate in `record`."""
    import torch

    from harness.cell.measure import Meter, Nvml, Sampler, host_rss_bytes, machine_state, run_end_stats
    from harness.cell.offload.memory import Device

    device = Device(spec.device)
    nvml = Nvml(torch.cuda.current_device()) if device.is_cuda else None
    sampler = Sampler(nvml, interval_s=spec.run.sampler_interval_ms / 1e3)
    sampler.start()
    record.rss_start_bytes = host_rss_bytes()
    meter = Meter(device, sampler, on_enter=_phase_start_hook(os.environ.get(FAULT_ENV)),
                  step_probe=lambda: machine_state(nvml))
    try:
        _load_and_run(spec, flags, record, meter, nvml)
        record.status = Status.OK
        non_finite = non_finite_outputs(record.outputs)
        if non_finite:  # a NaN or inf output is garbage, never `ok` (issue #30: true_cfg_scale = 1e308 passed)
            record.status, record.failed_phase = Status.ERROR, Phase.DECODE
            record.reason = (f"non-finite output: {' and '.join(non_finite)} hold NaN or inf (outputs.<name>.finite "
                             "is false); the run finished but its result is garbage")
    except torch.OutOfMemoryError as e:
        record.status, record.failed_phase = Status.OOM, meter.failed_phase or Phase.SETUP
        record.reason = str(e).strip().splitlines()[0][:500]
    except Exception as e:
        record.status, record.failed_phase = Status.ERROR, meter.failed_phase or Phase.SETUP
        record.reason = f"{type(e).__name__}: {str(e).strip()[:500]}"
        record.traceback = traceback.format_exc()[-4000:]
    finally:
        sampler.stop()
    record.phases = {name: PhaseStats.from_dict(p) for name, p in meter.phases.items()}
    record.trace = [list(row) for row in sampler.trace[-2000:]]  # as JSON reads it back
    record.ru_maxrss_bytes = run_end_stats()["ru_maxrss_bytes"]
    record.rss_end_bytes = host_rss_bytes()
    if record.cap and device.is_cuda:
        record.cap.update(cap_check(record))


def _load_and_run(spec: CellSpec, flags: OffloadFlags, record: CellRecord, meter: Any, nvml: Any) -> None:
    from harness.cell.checkpoint import ensure_checkpoint, folder_checkpoint
    from harness.cell.measure import apply_card_cap, machine_info
    from harness.models import get_model

    device = meter.device
    record.machine = machine_info(device, nvml, spec.pinned_h2d_probe)
    overhead = record.overhead if record.overhead is not None else {}
    overhead["h2d_probe_s"] = record.machine.get("pinned_h2d_probe_s")
    meter.link_gbps = record.machine.get("pinned_h2d_gbps")
    if spec.card.cap_bytes:
        record.cap = apply_card_cap(int(spec.card.cap_bytes), device, nvml)
    model = get_model(spec.model)
    t0 = time.perf_counter()
    # a pipeline folder's components are read from its files (harness.models.folder), the zoo's from synthetic ones
    # each synthetic file's content is checked against its generation-time digest (CheckpointDigestError: the cell
    # fails); what the check did goes to components.<role>.checkpoint
    integrity: dict[str, dict[str, Any]] = {role: {} for role in model.components}
    ckpts = {role: folder_checkpoint(model, role) if "folder" in model.extra
             else ensure_checkpoint(c, seed=0, progress=_progress, integrity=integrity[role])
             for role, c in model.components.items()}
    record.checkpoint_s = overhead["checkpoint_s"] = round(time.perf_counter() - t0, 3)
    if device.is_cuda:
        import torch

        # A checkpoint generated here (on the GPU, the first cell of a model) leaves its blocks cached in the
        # allocator, and reserved bytes are a phase's peak counter: on the H200 the first cell of
        # qwen-image-resident-5090 reported load 3,166 MiB reserved where every other cell had 384, and a
        # denoise peak 2.7 GiB too high, which failed prefetch_peak (pf1 16,676 > pf4 13,894 MiB).
        torch.cuda.empty_cache()
    t_load = time.perf_counter()
    comps = _load(spec, flags, record, meter, model, ckpts)
    for role, section in (record.components or {}).items():
        # a pipeline folder's files have no generation-time digest: said as such, never as verified
        section["checkpoint"] = integrity.get(role) or {"verified": None, "why": "pipeline folder: no digest"}
    overhead["measured_s"] = time.perf_counter() - t_load
    _settle_after_load(spec.run, record, meter, comps, nvml)
    out = _run_rounds(spec, record, meter, model, comps)
    latents = out.pop("final_latents")
    if spec.latents_out:
        import torch

        torch.save(latents, spec.latents_out)
        record.latents_path = spec.latents_out  # what expect.close_output_rtol compares
    record.outputs = out


def cap_check(record: CellRecord) -> dict[str, Any]:
    """The NVML per-process peak against the record's cap: over every phase, or over the runtime phases for a cap
    applied after the load (run option runtime_cap_mib); within_cap None when NVML measured nothing."""
    phases = RUNTIME_PHASES if record.capped_after_load else MEASURED_PHASES
    peak = record.phase_max("nvml_proc_peak_bytes", phases) or 0
    return {"nvml_proc_peak_bytes": peak, "within_cap": peak <= (record.cap or {})["cap_bytes"] if peak else None}


def _settle_after_load(options: RunOptions, record: CellRecord, meter: Any, comps: dict[str, Any], nvml: Any) -> None:
    """The run options that act between the load and the first round: the release after packing a DiT placed
    through the device, the runtime cap, the copy recorder and the release points of the rounds. Its time (the
    release, the cap's kernel warm-up) is in no phase: the record's overhead keeps it as settle_s."""
    t0 = time.perf_counter()
    device = meter.device
    after_packing = release_after_packing(record.placements, device) if options.empty_cache_after_packing else None
    if options.runtime_cap_mib:
        from harness.cell.measure import apply_card_cap

        record.cap = {**apply_card_cap(int(options.runtime_cap_mib) * 2**20, device, nvml),
                      "applied_after": Phase.LOAD.value}
    record.copy_timeline = attach_copy_recorder(comps["dit"], device, options.copy_timeline)
    if options.empty_cache_between_phases:
        meter.on_exit = cache_release(record.placements, device)
    record.cache_release = {
        "mechanism": "torch.cuda.empty_cache" if options.empty_cache_between_phases else "none",
        "after": [p.value for p in RUNTIME_PHASES if release_point(p, record.placements)]
        if options.empty_cache_between_phases else [],
        "after_packing_freed_bytes": after_packing,
    }
    if record.overhead is not None:
        record.overhead["settle_s"] = round(time.perf_counter() - t0, 3)


def _load(spec: CellSpec, flags: OffloadFlags, record: CellRecord, meter: Any, model: Any,
          ckpts: dict[str, Path]) -> dict[str, Any]:
    from harness.cell.offload import memory
    from harness.cell.offload.loader import load_component

    memory.SETUP = memory.SetupOptions(int(spec.run.setup_threads), bool(spec.run.setup_overlap_pin))
    comps: dict[str, Any] = {}
    with meter.phase(Phase.LOAD):
        for role in ROLES:
            _progress(f"loading {role} ({record.placements[role]})")
            comps[role] = load_component(
                model.components[role], ckpts[role], record.placements[role], meter.device,
                pin=bool(flags.pin_cpu_memory), prefetch_size=flags.dit_offload_prefetch_size,
                backend=spec.backend, flags=flags,
            )
        # host memory a runtime pinned itself (SGLang's managers), read at this and every later phase end; only
        # the DiT runs on an engine, so no two components report the same counter
        meter.host_probe = lambda: {k: v for c in comps.values() for k, v in c.host_counters().items()}
    record.components = {role: c.describe() for role, c in comps.items()}
    # Weights each component holds on the device, read at every phase start and end (the invariants).
    meter.probe = lambda: {role: c.device_weight_bytes(meter.device) for role, c in comps.items()}
    return comps


def _run_rounds(spec: CellSpec, record: CellRecord, meter: Any, model: Any, comps: dict[str, Any]) -> dict[str, Any]:
    from harness.cell.pipeline import run_pipeline

    warmup, total = spec.warmup, spec.warmup + spec.rounds
    per_round: list[dict[str, Any]] = []
    telemetry: list[dict[str, Any]] = []
    record.telemetry = {"sampler_interval_ms": spec.run.sampler_interval_ms, "rounds": telemetry}
    overhead = record.overhead if record.overhead is not None else {}
    warmup_s, measured_s = 0.0, overhead.get("measured_s", 0.0)
    for r in range(total):
        t_round = time.perf_counter()
        if total > 1:
            _progress(f"round {r + 1}/{total}" + (" (warm-up)" if r < warmup else ""))
        meter.phases = {"load": meter.phases["load"]}
        out = run_pipeline(model, comps, spec.settings, meter.device, meter, progress=_progress)
        per_round.append({k: v for k, v in meter.phases.items() if k != "load"})
        telemetry.append(round_telemetry(per_round[-1], r, warmup))
        if r < warmup:
            warmup_s += time.perf_counter() - t_round
        else:
            measured_s += time.perf_counter() - t_round
    overhead.update(warmup_s=round(warmup_s, 3), measured_s=round(measured_s, 3))
    meter.phases = merge_rounds(meter.phases["load"], per_round, warmup)
    record.rounds = round_times(per_round, warmup)
    return out


_TIME_KEYS = ("time_ms", "wall_ms")

def attach_copy_recorder(dit: Any, device: Any, wanted: bool) -> dict[str, Any]:
    """Under `copy_timeline`, gives our layerwise runtime a copy recorder; the record says whether one ran."""
    if not wanted:
        return {"enabled": False}
    from harness.cell.offload.layerwise import LayerwiseRuntime
    from harness.cell.offload.timeline import CopyRecorder

    if not isinstance(dit.runtime, LayerwiseRuntime):
        return {"enabled": False, "reason": f"the DiT is not streamed by our runtime ({dit.placement})"}
    dit.runtime.copy_recorder = CopyRecorder(device.is_cuda)
    return {"enabled": True, "clock": "CUDA events on the copy stream" if device.is_cuda else "host clock"}


def release_point(phase: str, placements: dict[str, Placement]) -> bool:
    """Whether SGLang's pipeline empties the allocator cache after `phase` (0.5.23: ComponentManager empties it
    after releasing an offloaded or layerwise component's storage, gpu_worker at the end of each request): after
    encode when the text encoder is offloaded, after denoise when the DiT is not resident, after decode always."""
    if phase == Phase.ENCODE:
        return placements["text_encoder"] != Placement.RESIDENT
    if phase == Phase.DENOISE:
        return placements["dit"] != Placement.RESIDENT
    return phase == Phase.DECODE


def cache_release(placements: dict[str, Placement], device: Any) -> Any:
    """The Meter's on_exit under `empty_cache_between_phases`: `torch.cuda.empty_cache()` at SGLang's release
    points, recording in the phase the reserved bytes it handed back to the driver."""

    def release(phase: str, rec: dict[str, Any]) -> None:
        if device.is_cuda and release_point(phase, placements):
            rec["empty_cache_freed_bytes"] = empty_cache_freed(device)

    return release


def empty_cache_freed(device: Any) -> int:
    """`torch.cuda.empty_cache()`; the reserved bytes it handed back to the driver."""
    import torch

    before = torch.cuda.memory_reserved(device.torch)
    torch.cuda.empty_cache()
    return before - torch.cuda.memory_reserved(device.torch)


def release_after_packing(placements: dict[str, Placement], device: Any) -> int | None:
    """Under `empty_cache_after_packing`: `torch.cuda.empty_cache()` once the load of a DiT placed through the
    device has packed it into host regions; the reserved bytes handed back to the driver (None: not such a DiT or
    not CUDA, nothing ran)."""
    if placements.get("dit") != Placement.LAYERWISE_FROM_DEVICE or not device.is_cuda:
        return None
    return empty_cache_freed(device)


# Per-round phase keys that move to record["telemetry"] (they are per round; the merged phases keep one round).
_PER_ROUND_KEYS = ("step_machine", "copy_timeline")


def round_telemetry(phases: dict[str, dict[str, Any]], index: int, warmup: int) -> dict[str, Any]:
    """What one pipeline call showed of the machine: per-step readings and copy timeline (moved out of its denoise
    phase), the allocator's counters at each phase end, and the host's page cache and pinned bytes at its end."""
    from harness.cell.measure import host_memory_state, kernel_locked_bytes
    from harness.cell.offload.memory import PINNED

    denoise = phases.get("denoise") or {}
    out: dict[str, Any] = {"round": index, "warmup": index < warmup, "step_ms": denoise.get("step_ms"),
                           "steady_step_ms": steady_median(denoise.get("step_ms") or [])}
    for key in _PER_ROUND_KEYS:
        if key in denoise:
            out[key] = denoise.pop(key)
    allocator = {name: rec["allocator"] for name, rec in phases.items() if "allocator" in rec}
    if allocator:
        out["allocator"] = allocator
        out["alloc_peak_allocated_bytes"] = max(rec.get("allocated_peak_bytes", 0) for rec in allocator.values())
        out["alloc_peak_reserved_bytes"] = max(rec.get("reserved_peak_bytes", 0) for rec in allocator.values())
    out["host"] = {**host_memory_state(), **PINNED.snapshot(), **kernel_locked_bytes()}
    return out


def steady_median(step_ms: list[float]) -> float | None:
    """The median of steps 2..n (the first step pays one-off costs), or of the one step there is."""
    median = median_step(step_ms, skip_first=True)
    return None if median is None else round(median, 3)


def spread(values: list[float | None]) -> dict[str, Any] | None:
    """min / median / max of per-round values and their relative spread (max - min) / median; None under 2."""
    known = [v for v in values if isinstance(v, int | float)]
    if len(known) < 2:
        return None
    mid = statistics.median(known)
    return {"n": len(known), "min": min(known), "median": round(mid, 3), "max": max(known),
            "max_over_min": round(max(known) / min(known), 4) if min(known) > 0 else None,
            "relative": round((max(known) - min(known)) / mid, 4) if mid > 0 else None}



def merge_rounds(load: dict[str, Any], per_round: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """One phases dict for the record: memory counters are the max over every round (a peak in the warm-up is
    still a peak); times are the median over the measured rounds; per-step times come from the last round."""
    merged: dict[str, Any] = {"load": load}
    measured = per_round[warmup:] or per_round
    for name in per_round[0]:
        recs = [r[name] for r in per_round if name in r]
        out: dict[str, Any] = {}
        for key in recs[-1]:
            values = [r[key] for r in recs if isinstance(r.get(key), int | float)]
            if key in _TIME_KEYS:
                timed = sorted(r[name][key] for r in measured if name in r and key in r[name])
                out[key] = timed[len(timed) // 2] if timed else None
            elif values and key.endswith("_bytes"):
                out[key] = max(values)
            else:
                out[key] = recs[-1][key]
        merged[name] = out
    return merged


def round_times(per_round: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Per measured round: each phase's CUDA-event time and their sum (the e2e time pytest-benchmark reports)."""
    measured = per_round[warmup:]
    out: dict[str, Any] = {"warmup": warmup, "rounds": len(measured)}
    for phase in ("encode", "denoise", "decode"):
        out[f"{phase}_ms"] = [r.get(phase, {}).get("time_ms") for r in measured]
    out["e2e_ms"] = [round(sum(r.get(p, {}).get("time_ms") or 0 for p in ("encode", "denoise", "decode")), 3)
                     for r in measured]
    # Steady step time per measured round (median of steps 2..n) and the spread of each per-round series across
    # rounds: what compare widens or narrows its timing tolerance by (harness.analyze.compare).
    out["steady_step_ms"] = [steady_median(r.get("denoise", {}).get("step_ms") or []) for r in measured]
    out["spread"] = {key: spread(out[key]) for key in ("steady_step_ms", "denoise_ms", "e2e_ms")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cell", required=True, type=Path, help="cell spec JSON written by the runner")
    parser.add_argument("--out", required=True, type=Path, help="where to write this cell's record")
    args = parser.parse_args(argv)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    spec = CellSpec.from_json(args.cell.read_text())
    record = run_cell(spec)
    # when the record left this process: the runner takes the rest (interpreter and CUDA teardown) as teardown_s
    record.overhead = {**(record.overhead or {}), "record_at": time.time()}
    write_json_atomic(args.out, record.to_dict())
    _progress(f"{spec.cell_id}: {record.fate}")
    return 0


def exit_now(code: int) -> None:
    """Ends the child without the interpreter's teardown. Its record is on disk (written and fsynced), its latents
    saved and its log flushed; what teardown would do (finalise torch, transformers and diffusers, free host
    regions, destroy the CUDA context) the kernel and the driver do at process exit anyway. Measured on the shared
    2-core CPU box: 7.3 s from record written to exit with the teardown, 0.2 s without (tiny Flux cell)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
