"""Fitting the planner's data from GPU records: every model's activation coefficients, base, slack and forward time,
and each SKU's machine profile (`fit`; written to `harness/models/plan_data.json` by
`python -m harness plan-fit RECORDS... --write`).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.common.contract import (
    CellRecord,
    LayerPool,
    Phase,
    Placement,
    Status,
    is_probe,
)
from harness.models import get_model
from harness.plan.planner.judge import RESERVED, generated_on_device, gpu_cell_that_ran, measured
from harness.plan.planner.model import (
    DIT_PLACEMENTS,
    PHASES,
    RUNTIME_PHASES,
    Drivers,
    Machine,
    Plan,
    Workload,
    dit_flops,
    drivers,
    load_data,
    model_weights,
    plan,
    text_encoder_class,
    warm_kernels_bytes,
)

# ------------------------------------------------------------------------------------------------- fitting


@dataclass
class _Samples:
    """One model's samples from the records: per-phase activations per unit, load base, slack, timed forwards."""

    base: list[float] = field(default_factory=list)
    encode: list[float] = field(default_factory=list)
    denoise: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)
    decode_block: list[float] = field(default_factory=list)  # the decode's largest request, per pixel
    slack: list[float] = field(default_factory=list)
    compute: list[tuple[int, float, str]] = field(default_factory=list)  # (tokens, s/forward, sku)
    sources: set[str] = field(default_factory=set)
    # the memory samples again, by where the text encoder was (text_encoder_class): see _fit_model
    by_text_encoder: dict[str, _Samples] = field(default_factory=dict)


@dataclass
class _MachineSamples:
    """Per GPU SKU: pinned H2D probes, pageable rates of pin_cpu_memory=false cells, CUDA context bytes, TFLOPS."""

    h2d: dict[str, list[float]] = field(default_factory=dict)
    pageable: dict[str, list[float]] = field(default_factory=dict)
    context: dict[str, list[float]] = field(default_factory=dict)
    tflops: dict[str, list[float]] = field(default_factory=dict)

    def add(self, which: str, sku: str, value: float) -> None:
        getattr(self, which).setdefault(sku, []).append(value)


# a forward of fewer FLOPs says nothing of a machine's rate: the tiny twins' (~1e9 FLOPs in ~13 ms) are bound by
# kernel launches, 0.1 "TFLOPS", and with six of them on the H200 the median rate there fell from 566 to 0.1
LAUNCH_BOUND_FLOPS = 1e12

_FIT_KEYS = {"encode": "encode_per_unit", "denoise": "denoise_per_token", "decode": "decode_per_pixel"}


def fit(records: Iterable[tuple[str, CellRecord]], data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Fits every model's activation coefficients, base, slack and forward time, and each SKU's machine profile,
    from GPU records of harness-backend cells (copies of another cell, `same_as`, count once). `records` pairs
    each record with the records file it came from (a model's fits name their sources).

    Each phase's activations are its allocated peak less the weights the plan puts on the device then (a phase
    that ran out of memory is left out); the coefficient is their median per unit of the phase's driver.
    """
    data = data or load_data()
    samples: dict[str, _Samples] = {}
    machines = _MachineSamples()
    for source, r in records:
        if _fits_from(r, data):
            model_samples = samples.setdefault(str(r.model), _Samples())
            model_samples.sources.add(source)
            _sample_record(r, data, model_samples, machines)
    fits = {model: _fit_model(model, s, data) for model, s in sorted(samples.items())}
    return {"fits": fits, "machines": _fit_machines(machines)}



def _fits_from(r: CellRecord, data: Mapping[str, Any]) -> bool:
    """A record plan-fit learns from: a GPU cell of our runtime that ran or ran out of memory, not a copy, not a
    capacity probe. A probe sits where the fate flips and often far from the scenarios' sizes, where one number
    per unit does not hold: FLUX.1-dev's layerwise denoise took 86.7 KB a token at 1024x1024 and 96-100 KB at
    3072-4032, its decode 2,475 B a pixel at 1024 and 1,797-2,054 at 3072-3520 (H200,
    `results/h200/flux-dev-capacity-4090.records.jsonl`); with the probes
    in, the median moved the scenario cells' plans by up to 3.4 %. The capacity table reports the plan's error."""
    return gpu_cell_that_ran(r) and r.placements.get("dit") in DIT_PLACEMENTS and r.settings is not None \
        and r.model in data.get("weights", {}) and not is_probe(r.scenario)


def _sample_record(r: CellRecord, data: Mapping[str, Any], s: _Samples, machines: _MachineSamples) -> None:
    """One record's samples: what each phase allocated beyond the plan's weights, and its machine's figures."""
    sku = r.sku or ""
    bare = Machine(sku, float(r.h2d_gbps or 1.0), 1.0, 0)
    model = str(r.model)
    # weights only: no activations, base, slack or context, so that what the record shows beyond is theirs
    p = plan(model, r.effective, None, Workload.of(r.settings, r.run_options), machine=bare,
             data={**data, "fits": {}, "machines": {}})
    drv = drivers(get_model(model), p.workload)
    _sample_phases(r, p, drv, s)
    _sample_phases(r, p, drv, s.by_text_encoder.setdefault(text_encoder_class(p.placements), _Samples()))
    _sample_decode_block(r, drv, s)
    cap = r.cap or {}
    if cap.get("context_overhead_bytes"):
        machines.add("context", sku, cap["context_overhead_bytes"])
    gbps = r.h2d_gbps
    if gbps:
        machines.add("h2d", sku, gbps)
    _sample_step(r, p, drv, s, machines, data)


def _sample_phases(r: CellRecord, p: Plan, drv: Drivers, s: _Samples) -> None:
    """Per completed phase: activations per unit of its driver (load: the base), and the load's slack."""
    done = [ph for ph in PHASES if ph in r.phases and not (r.status is Status.OOM and ph == r.failed_phase)]
    units = {"encode": drv.encode_units, "denoise": drv.dit_tokens, "decode": drv.pixels}
    for ph in done:
        alloc = r.phases[ph].alloc_peak_allocated_bytes
        res = r.phases[ph].alloc_peak_reserved_bytes
        if alloc is None:
            continue
        pp = p.phase(ph)
        extra = alloc - pp.weight_bytes - pp.window_bytes
        if ph == "load":
            s.base.append(extra - warm_kernels_bytes(r))
        else:
            getattr(s, ph).append(extra / units[ph] / (p.workload.batch if ph == "denoise" else 1))
        if res is not None and ph == "load" and not generated_on_device(r):
            s.slack.append(res - alloc)


def _sample_decode_block(r: CellRecord, drv: Drivers, s: _Samples) -> None:
    """The VAE decode's largest request, from a cell where nothing but layer buffers' segments and small blocks
    is cached when it decodes (a streamed DiT on the compute stream's pool, no CPU-offloaded component) and the
    decode's allocated peak fits what is reserved: what the decode adds to the reservation then is that one
    request, which no layer segment holds (measured, H200: FLUX.1-dev 1,026 MiB at 1024x1024, Qwen-Image 1,540;
    H100: Qwen-Image-Edit 1,544)."""
    where = r.placements
    if r.status is not Status.OK or where.get("dit") != Placement.LAYERWISE_FROM_HOST \
            or r.layer_pool is LayerPool.COPY_STREAM \
            or generated_on_device(r) or Placement.CPU_OFFLOAD in (where.get("text_encoder"), where.get("vae")):
        return
    reserved = {ph: r.phase_max(RESERVED, (ph,)) for ph in PHASES}
    allocated = r.phase_max("alloc_peak_allocated_bytes", (Phase.DECODE,))
    if None in reserved.values() or allocated is None or allocated > reserved["denoise"]:
        return
    grown = reserved["decode"] - max(reserved[ph] for ph in ("load", "encode", "denoise"))
    if grown > 0:
        s.decode_block.append(grown / drv.pixels)


def _sample_step(r: CellRecord, p: Plan, drv: Drivers, s: _Samples, machines: _MachineSamples,
                 data: Mapping[str, Any]) -> None:
    """A resident or CPU-offloaded DiT's step is its compute; a pageable layerwise one's, the pageable rate."""
    step = measured(r).step_s
    if step is None:
        return
    sku = r.sku or ""
    per_forward = step / p.workload.dit_calls_per_step / p.workload.batch  # one sample's forward
    if p.placements["dit"] in ("resident", "cpu-offload"):
        s.compute.append((drv.dit_tokens, per_forward, sku))
        flops = dit_flops(model_weights(str(r.model), data)["dit"], drv.dit_tokens)
        if flops >= LAUNCH_BOUND_FLOPS:
            machines.add("tflops", sku, flops / per_forward / 1e12)
    elif not r.effective.pin_cpu_memory:
        # every forward streams the layers once, whatever its batch
        machines.add("pageable", sku, p.streamed_bytes_per_forward * p.workload.dit_calls_per_step / step / 1e9)


def _memory_fits(s: _Samples) -> dict[str, Any]:
    """Medians of the memory samples: load base, activations per unit of each runtime phase, load slack."""
    f: dict[str, Any] = {}
    if s.base:
        f["base_bytes"] = round(statistics.median(s.base))
    for ph in RUNTIME_PHASES:
        vals = getattr(s, ph)
        if vals:
            f[_FIT_KEYS[ph]] = round(max(0.0, statistics.median(vals)), 2)
    if s.slack:
        f["reserved_slack_bytes"] = round(statistics.median(s.slack))
    return f


def _fit_model(model: str, s: _Samples, data: Mapping[str, Any]) -> dict[str, Any]:
    """A model's fits: medians of its samples; the timed forward at the most common SKU's median-low tokens.
    With records of both text-encoder placements, the memory fits of each too (`by_text_encoder`), which a plan
    of that placement uses: Qwen-Image allocated 38-57 MiB more at load, 72-122 at encode and 412-459 at denoise
    with its text encoder resident than offloaded, so one median over both flipped with the records' mix (H200:
    the encode coefficient went 596 -> 917 KB a unit with the four resident-encoder records of
    `results/h200/qwen-image-resident-5090.records.jsonl` in)."""
    f: dict[str, Any] = {"sources": sorted(x for x in s.sources if x), **_memory_fits(s)}
    if len(s.by_text_encoder) > 1:
        f["by_text_encoder"] = {k: _memory_fits(v) for k, v in sorted(s.by_text_encoder.items())}
    if s.decode_block:
        f["decode_block_per_pixel"] = round(statistics.median(s.decode_block), 2)
    if s.compute:
        dit = model_weights(model, data)["dit"]
        by_sku = {sku: _timed_forward(s.compute, sku, dit) for sku in sorted({k for _, _, k in s.compute})}
        f["compute"] = by_sku[statistics.mode([k for _, _, k in s.compute])]
        if len(by_sku) > 1:
            # a forward timed on the planned GPU itself beats one scaled from another by the machines' rates: the
            # rates are medians over models (H200 893.8 TFLOPS with FLUX's 723 in it), so Qwen-Image-Edit timed on
            # the H100 and scaled planned its H200 resident step 13 % slow; timed on the H200, -1 %
            f["compute_by_sku"] = by_sku
    return f


def _timed_forward(samples: list[tuple[int, float, str]], sku: str, dit: Mapping[str, Any]) -> dict[str, Any]:
    """The model's timed forward on one GPU: the median at that GPU's median-low token count."""
    tokens = statistics.median_low([t for t, _, k in samples if k == sku])
    times = [v for t, v, k in samples if t == tokens and k == sku]
    sec = statistics.median(times)
    return {"tokens": tokens, "s_per_forward": round(sec, 4), "sku": sku,
            "tflops": round(dit_flops(dit, tokens) / sec / 1e12, 1), "records": len(times)}


def _fit_machines(m: _MachineSamples) -> dict[str, Any]:
    """Each SKU's profile: medians of its records' figures; a SKU without its own pageable or context figure
    takes another SKU's."""
    machines: dict[str, Any] = {}
    for sku in sorted(m.h2d):
        machines[sku] = {
            "pinned_h2d_gbps": round(statistics.median(m.h2d[sku]), 2),
            # pageable: from a pin_cpu_memory=false layerwise cell, else the H100's measured 6.7 GB/s (run2)
            "pageable_h2d_gbps": round(statistics.median(m.pageable[sku]), 2) if sku in m.pageable else None,
            "context_bytes": round(statistics.median(m.context[sku])) if sku in m.context else None,
            "tflops": round(statistics.median(m.tflops[sku]), 1) if sku in m.tflops else None,
            "source": f"{len(m.h2d[sku])} records",
        }
    known = [v for v in machines.values() if v["pageable_h2d_gbps"]]
    for v in machines.values():
        if v["pageable_h2d_gbps"] is None and known:
            v["pageable_h2d_gbps"] = known[0]["pageable_h2d_gbps"]
            v["source"] += "; pageable H2D from another SKU"
        if v["context_bytes"] is None:
            v["context_bytes"] = next((x["context_bytes"] for x in machines.values() if x["context_bytes"]), 0)
    return machines
