"""The planner: what a flag combination will cost on a card, before anything runs, without torch or a GPU.

A plan predicts, per phase (load, encode, denoise, decode), the device memory a cell needs, counted as the
records count it:

    allocated = weights on the device in that phase (by placement) + the layerwise window (+ resident layers)
                + activations(phase, workload) + base
    reserved  = what a coarse model of the caching allocator (`_Allocator`) has reserved by the phase's peak
                (it keeps what it reserved, reuses a freed block only for what fits in it, and at the card's
                limit gives the free cached blocks back before an OOM; layer buffers take the segments
                `harness.plan.segments` replays), + the allocator's slack
    device    = reserved + the CUDA context (what NVML counts per process; the card's cap applies to it)

and a cell fits its card when every phase's device bytes stay within the cap (the first that does not is the
phase that would OOM). It also predicts host bytes (pinned, pageable) and the denoise step time by the roofline
(`harness.analyze.roofline`): forwards x max(compute of one forward, streamed bytes / H2D rate) under layerwise offload,
forwards x compute otherwise.

What it reads, all data (`harness/models/plan_data.json`):
- "weights": bytes per component and per streamed layer of every zoo model, computed from the module built on
  meta by `harness.models.sizes` (torch, once; a test checks the file against the zoo);
- "fits": per model, activation bytes per unit of what drives them (DiT tokens per forward for denoise, pixels
  per frame for decode, text tokens or, for an edit model, reference pixels for encode), the base and the
  allocator's slack, and the compute time of one forward at a known token count; fitted from committed GPU
  records by `python -m harness plan-fit RECORDS... --write`;
- "machines": per GPU SKU, the pinned and pageable H2D rates, the CUDA context's bytes and the effective
  TFLOPS, from the same records.

A model without fits of its own borrows those of the model with the same DiT (qwen-image <-> qwen-image-edit);
one without any is planned with zero activations and says so in `notes`.

Resident layers (`dit_layerwise_resident_layers`, a count per streamed group or a fraction of it, as the
runtime reads it; `resident_layers` overrides the flags' value) are copied to the device at the first forward of
a call and dropped when the denoise phase ends (SGLang's "forward" lifetime): they add to the denoise phase's
device bytes and leave the bytes streamed per forward; their host regions stay (pinned like the others).

A text encoder or VAE that `layerwise_offload_components` streams (its CPU-offload flag cleared; the loader's
LAYERWISE_FROM_HOST) is planned as the runtime runs it: its weights outside its layer groups (the zoo's
`layer_groups`: a text encoder's layers, the VAE decoder's up blocks) on the device from load on, and in the phase
that runs it (encode, decode) its window and resident layers, with its own prefetch and resident values (the
per-component maps, `OffloadFlags.layerwise_tuning`); its layer regions are host bytes, pinned with
`pin_cpu_memory`. The VAE decode's largest request (`decode_block_per_pixel`, fitted) fits no layer segment: it
takes a freed component block or reserves its own.

This module imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from harness.common.contract import (
    ROLES,
    Backend,
    Card,
    CellRecord,
    JsonObject,
    LayerPool,
    Placement,
    RunOptions,
    RunSettings,
)
from harness.common.flags import OffloadFlags, prefetch_layers, resident_layer_count
from harness.common.units import GIB
from harness.models import PLAN_DATA_PATH, ModelSpec, get_model
from harness.models.folder import plan_data_with
from harness.plan.segments import window_segment_bytes

PHASES = ("load", "encode", "denoise", "decode")
RUNTIME_PHASES = ("encode", "denoise", "decode")
DIT_PLACEMENTS = ("resident", "cpu-offload", "layerwise-from-host", "layerwise-from-device")
DEFAULT_MACHINE = "nvidia-h100-80gb-hbm3"  # the machine most committed records ran on


class PlanError(ValueError):
    """The planner lacks what it needs (an unknown model, a model without weights data)."""


@dataclass(frozen=True)
class Workload:
    """What one pipeline call computes: the image or video size, the DiT forwards per step, and how the pipeline
    runs them (a scenario's `[run]` options `cfg_batch`, `empty_cache_between_phases` and
    `empty_cache_after_packing`)."""

    height: int = 1024
    width: int = 1024
    frames: int = 1
    true_cfg_scale: float = 4.0
    steps: int = 4
    cfg_batch: bool = False  # the two CFG passes as one forward of batch 2: streamed once a step, twice the work
    empty_cache: bool = False  # torch.cuda.empty_cache() after encode and after denoise
    empty_cache_after_packing: bool = False  # torch.cuda.empty_cache() once a DiT placed on the device is packed

    @property
    def cfg(self) -> bool:
        return self.true_cfg_scale > 1

    @property
    def dit_calls_per_step(self) -> int:
        """DiT calls a step, each streaming every layer once: two with true CFG run as two passes, one with cfg_batch
        (the same meaning as RunSettings.dit_calls_per_step; `cfg_passes_per_step` on the contract counts the CFG
        passes whether or not they share a call)."""
        return 2 if self.cfg and not self.cfg_batch else 1

    @property
    def batch(self) -> int:
        """Samples in one forward (its activations and compute scale with it)."""
        return 2 if self.cfg and self.cfg_batch else 1

    @classmethod
    def of(cls, settings: RunSettings, run: RunOptions | None = None) -> Workload:
        """The workload of a cell's settings and run options (a record's, or a spec's)."""
        run = run or RunOptions()
        return cls(height=int(settings.height), width=int(settings.width), frames=int(settings.frames or 1),
                   true_cfg_scale=float(settings.true_cfg_scale), steps=int(settings.steps or 1),
                   cfg_batch=settings.cfg_batch, empty_cache=run.empty_cache_between_phases,
                   empty_cache_after_packing=run.empty_cache_after_packing)


@dataclass(frozen=True)
class Machine:
    """The device the plan is for: H2D rates, the CUDA context's bytes and the effective bf16 TFLOPS.

    Args:
        name (str): a GPU SKU (`machine.sku` in records) or a description.
        pinned_h2d_gbps (float): host -> device copy rate from page-locked memory.
        pageable_h2d_gbps (float): the same from pageable memory (`pin_cpu_memory` off).
        context_bytes (int): device bytes the CUDA context holds outside the allocator (NVML minus reserved).
        tflops (float | None): effective TFLOPS of a DiT forward, for models without a timed record.
        source (str): where the numbers come from.
    """

    name: str
    pinned_h2d_gbps: float
    pageable_h2d_gbps: float
    context_bytes: int
    tflops: float | None = None
    source: str = ""


@dataclass(frozen=True)
class PhasePlan:
    phase: str
    weight_bytes: int  # component weights on the device during the phase (whole, or non-layer + resident layers)
    window_bytes: int  # streamed layers on the device at once (the prefetch window), layerwise only
    activation_bytes: int
    allocated_bytes: int  # PyTorch caching allocator, allocated peak
    reserved_bytes: int  # PyTorch caching allocator, reserved peak
    device_bytes: int  # reserved + CUDA context: what NVML counts per process


@dataclass(frozen=True)
class Plan:
    model: str
    card: str
    cap_bytes: int | None
    flags: OffloadFlags  # effective
    resident_layers: int  # DiT layers kept on the device through denoise (all groups)
    workload: Workload
    machine: Machine
    placements: dict[str, str]
    phases: tuple[PhasePlan, ...]
    host_pinned_bytes: int
    host_pageable_bytes: int
    streamed_bytes_per_forward: int
    compute_s_per_forward: float | None
    transfer_s_per_forward: float | None
    step_s: float | None
    bound: str | None  # "compute" or "transfer" (layerwise), "compute" otherwise
    oom_phase: str | None
    notes: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.oom_phase is None

    def phase(self, name: str) -> PhasePlan:
        return next(p for p in self.phases if p.phase == name)

    @property
    def load_peak_bytes(self) -> int:
        """Allocator reserved at load (the counter the suite compares)."""
        return self.phase("load").reserved_bytes

    @property
    def runtime_peak_bytes(self) -> int:
        return max(p.reserved_bytes for p in self.phases if p.phase in RUNTIME_PHASES)

    @property
    def peak_device_bytes(self) -> int:
        return max(p.device_bytes for p in self.phases)

    def oom_line(self) -> str | None:
        """'load needs 52.7 GiB > 31.36 GiB' for a plan that does not fit."""
        if self.oom_phase is None or self.cap_bytes is None:
            return None
        need = self.phase(self.oom_phase).device_bytes
        return f"{self.oom_phase} needs {need / GIB:.1f} GiB > {self.cap_bytes / GIB:.2f} GiB"

    def as_dict(self) -> JsonObject:
        """The plan as a record stores it (`CellRecord.plan`)."""
        return {
            "model": self.model,
            "card": self.card,
            "cap_bytes": self.cap_bytes,
            "flags": self.flags.as_dict(),
            "resident_layers": self.resident_layers,
            "workload": asdict(self.workload),
            "machine": asdict(self.machine),
            "placements": self.placements,
            "phases": {p.phase: {k: v for k, v in asdict(p).items() if k != "phase"} for p in self.phases},
            "load_peak_reserved_bytes": self.load_peak_bytes,
            "runtime_peak_reserved_bytes": self.runtime_peak_bytes,
            "peak_device_bytes": self.peak_device_bytes,
            "host_pinned_bytes": self.host_pinned_bytes,
            "host_pageable_bytes": self.host_pageable_bytes,
            "streamed_bytes_per_forward": self.streamed_bytes_per_forward,
            "compute_s_per_forward": self.compute_s_per_forward,
            "transfer_s_per_forward": self.transfer_s_per_forward,
            "step_s": self.step_s,
            "bound": self.bound,
            "fits": self.fits,
            "oom_phase": self.oom_phase,
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------------- the data


@cache
def load_data(path: str = str(PLAN_DATA_PATH)) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise PlanError(f"{p}: no planner data; write it with `python -m harness.models.sizes --write`")
    return json.loads(p.read_text())


def model_weights(name: str, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    data = data or load_data()
    try:
        return data["weights"][name]
    except KeyError:
        raise PlanError(f"no weights data for model {name!r} in {PLAN_DATA_PATH}: run "
                        "`python -m harness.models.sizes --write`") from None


def model_fits(name: str, data: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], str | None]:
    """The fitted coefficients of `name`, or of a model with the same DiT weights; and where they came from."""
    data = data or load_data()
    fits = data.get("fits", {})
    if name in fits:
        return fits[name], name
    mine = model_weights(name, data)["dit"]
    for other, f in sorted(fits.items()):
        if data["weights"].get(other, {}).get("dit") == mine:
            return f, other
    return {}, None


def machine_profile(sku: str | None = None, data: Mapping[str, Any] | None = None) -> Machine:
    data = data or load_data()
    machines = data.get("machines", {})
    name = sku if sku in machines else DEFAULT_MACHINE
    m = machines.get(name)
    if m is None:
        raise PlanError(f"no machine profile {name!r} in {PLAN_DATA_PATH}")
    source = m.get("source", "")
    if sku is not None and sku != name:
        source = f"no profile for {sku}; {name}'s: {source}"
    return Machine(name=name, pinned_h2d_gbps=m["pinned_h2d_gbps"], pageable_h2d_gbps=m["pageable_h2d_gbps"],
                   context_bytes=int(m["context_bytes"]), tflops=m.get("tflops"), source=source)


# ------------------------------------------------------------------------------------------- the workload


@dataclass(frozen=True)
class Drivers:
    """What activations and compute scale with, for one model and workload."""

    dit_tokens: int  # tokens of one DiT forward: image (+ reference image) + text
    pixels: int  # height x width: one frame, what a frame-wise VAE decodes at a time
    encode_units: int  # text tokens, or reference pixels for an edit model
    video: bool


def drivers(spec: ModelSpec, workload: Workload) -> Drivers:
    lat_h, lat_w = workload.height // spec.vae_scale, workload.width // spec.vae_scale
    tokens = (lat_h // spec.patch) * (lat_w // spec.patch)
    video = spec.family == "wan"
    if video:
        down = spec.components["vae"].config.get("temperal_downsample") or []
        temporal = 2 ** sum(bool(d) for d in down)
        tokens *= (workload.frames - 1) // temporal + 1
    image_tokens = tokens * (2 if spec.edit else 1)  # an edit model attends to its reference image's latents too
    text = spec.prompt_tokens - spec.drop_tokens
    pixels = workload.height * workload.width
    return Drivers(image_tokens + text, pixels, pixels if spec.edit else spec.prompt_tokens, video)


def dit_flops(dit: Mapping[str, Any], tokens: int) -> float:
    """Multiply-adds x 2 of one DiT forward: every weight once per token, plus attention's two T x T products."""
    layers = sum(g["layers"] for g in dit["groups"].values())
    return 2.0 * dit["params"] * tokens + 4.0 * layers * tokens * tokens * dit["hidden"]


# ------------------------------------------------------------------------------------------- placements


def placements(flags: OffloadFlags) -> dict[str, str]:
    """Where the harness's loader puts each component under our backend (`harness.common.contract.Placement.for_role`):
    a text encoder or VAE that `layerwise_offload_components` selects streams from the host."""
    return {role: str(Placement.for_role(role, flags)) for role in ROLES}


@dataclass(frozen=True)
class Streaming:
    resident_layers: int  # layers kept on the device through the denoise phase, over all groups
    resident_bytes: int
    window_bytes: int  # most streamed-layer bytes on the device at once
    streamed_bytes: int  # host -> device bytes per forward
    groups: tuple[tuple[int, int, int], ...] = ()  # per group: kept bytes, streamed bytes, first window's bytes
    # what the layer buffers (window and resident layers) reserve from an empty cache (`harness.plan.segments`):
    # their bytes in 2 MiB segments, more where layers of two sizes split each other's segments (FLUX prefetch 5:
    # 8,450 MiB for a 7,832 MiB window)
    segment_bytes: int = 0


def streaming(component: Mapping[str, Any], prefetch_size: float, resident_value: float = 0.0,
              order: Iterable[str] = ()) -> Streaming:
    """The layerwise runtime's device footprint for one component (`harness.cell.offload.layerwise`; its weights
    data with "groups": the DiT, or a text encoder or VAE that `layerwise_offload_components` streams, each with
    its own prefetch and resident layers): per group, r resident layers
    (`harness.common.flags.resident_layer_count`), and a window of p of the streamed ones computing while the next is in
    flight (2p), while every other group holds its window 0, prefetched at the end of its last window for the next
    forward. p counts streamed layers: with r kept, a window larger than the n - r streamed ones is all of them.
    `order`: the groups' names in forward order (the zoo's `layer_groups`; the data's order otherwise)."""
    groups = []
    kept_layers = kept_bytes = 0
    per_group, replayed, kept = [], [], []
    names = [*order] or list(component["groups"])
    for g in (component["groups"][name] for name in names):
        n, b = g["layers"], g["layer_bytes"]
        keep = resident_layer_count(resident_value, n)
        kept_layers += keep
        kept_bytes += keep * b
        p = max(1, min(prefetch_layers(prefetch_size, n), n - keep))
        per_group.append((keep * b, (n - keep) * b, min(p, n - keep) * b))
        replayed.append((n - keep, p, b))
        kept.append(keep)
        if n - keep:
            groups.append((n - keep, p, b))
    window = max(
        (min(2 * p, n) * b + sum(min(p2, n2) * b2 for j, (n2, p2, b2) in enumerate(groups) if j != i)
         for i, (n, p, b) in enumerate(groups)),
        default=0,
    )
    segments = window_segment_bytes(tuple(replayed), kept=tuple(kept)) if kept_layers or groups else 0
    return Streaming(kept_layers, kept_bytes, window, sum(n * b for n, _, b in groups), tuple(per_group), segments)


@dataclass
class _Allocator:
    """A coarse model of PyTorch's caching allocator over one pipeline call: what it has reserved is kept (nothing
    empties the cache) until a request would pass the card's limit, when the free cached blocks are given back
    first (as the allocator does before it reports an OOM); and a freed block serves a later request only when it
    is large enough.

    Three kinds of request, as the harness makes them: weights materialised tensor by tensor at load (their
    blocks, once freed, are too small for anything later: `dead`), one-block copies of a CPU-offloaded component
    (freed after use into `regions`, which can host a later component or a layer window), and the layer buffers of
    the layerwise window and resident layers (freed into `layer_pool`), which reserve their segments (`Streaming.
    segment_bytes`: with layers of two sizes, more than the window). Activations take any free bytes, but
    not the window's split-off leftovers while it is live. What this reproduces in the committed records:
    uncapped, a CPU-offloaded DiT after a CPU-offloaded text encoder grows the reservation by the whole DiT (Wan:
    11,380 -> 38,634 MiB) and a layer window after a resident encoder by the whole window (Qwen); on the 4090 cap
    the same DiT fits (FLUX: 23,516 MiB) because the encoder's cached block is given back.

    `layer_pool_on_copy_stream`: the runtime variant that takes layer buffers on its copy stream
    (`LayerPool.COPY_STREAM`), where the allocator keeps one pool per stream: a window cannot take a component's
    cached block (Wan prefetch 2: +2,688 MiB, its four 672 MiB layer segments, over the encoder's free 11.1 GiB
    block, `results/h100/wan21-14b-h100.records.jsonl`) and activations cannot take freed layer buffers
    (Qwen-Image decode: +4.3 GiB over a free 5 GiB window, `results/h100/run2.records.jsonl`).
    """

    limit: int | None = None
    reserved: int = 0
    live: int = 0
    dead: int = 0
    regions: list[int] = field(default_factory=list)
    layer_pool: int = 0
    pool_in_use: int = 0
    high: int = 0
    need: int = 0  # the reservation the phase needed after giving back every free block (an OOM's figure)
    oom: bool = False
    layer_pool_on_copy_stream: bool = False
    layer_live: int = 0  # bytes of `layer_pool` the live window holds
    regions_in_use: int = 0  # bytes of free regions the window is filling (kept when the cache is given back)

    def _free_bytes(self) -> int:
        """Cached bytes a request of the compute stream may take (not another stream's idle layer buffers)."""
        idle_layers = self.layer_pool - self.layer_live if self.layer_pool_on_copy_stream else 0
        return self.reserved - self.live - self.dead - idle_layers

    def _grow(self, nbytes: int, from_free: bool = False) -> None:
        """Reserves room for a request of `nbytes`: a new segment, or (`from_free`: activations, load-time
        tensors) whatever free cached bytes there are first."""

        def growth() -> int:
            return max(0, nbytes - (self._free_bytes() if from_free else 0))

        if self.limit is not None and self.reserved + growth() > self.limit:
            # every cached block not in use goes back to the driver (activation blocks too, being freed by now;
            # layer buffers being reused are counted until the window is live)
            self.reserved = self.live + self.pool_in_use + self.regions_in_use
            self.regions, self.layer_pool, self.dead = [], self.pool_in_use, 0
        self.reserved += growth()
        self.high = max(self.high, self.reserved)
        self.need = max(self.need, self.reserved)
        if self.limit is not None and self.reserved > self.limit:
            self.oom = True

    def load(self, nbytes: int) -> int:
        self.high = self.need = self.reserved
        self._grow(nbytes, from_free=True)
        self.live += nbytes
        return self.high

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): every cached block not in use goes back to the driver."""
        self.reserved = self.live
        self.regions, self.layer_pool, self.dead = [], 0, 0

    def discard(self, nbytes: int) -> None:
        self.live -= nbytes
        self.dead += nbytes

    def _take(self, nbytes: int) -> int | None:
        """The smallest free region that holds `nbytes`, removed from the free list; None: a new segment."""
        fitting = [r for r in self.regions if r >= nbytes]
        if not fitting:
            return None
        self.regions.remove(min(fitting))
        return min(fitting)

    def run(self, moved: list[int], window: int, activations: int, large: int = 0) -> int:
        """One runtime phase: components moved in as one block each, the layer window (the bytes its buffers
        reserve), then activations, of which one request of `large` bytes (the VAE decode's) that no layer
        buffer's segment holds: it takes a free block of a component (or of an earlier large request), or what
        a component moved in this phase left free of the block it took, that holds it, else a segment of its
        own, cached after the phase; all freed at the end. Returns the phase's reserved
        peak (at least what it started with, as the records count)."""
        self.high = self.need = self.reserved
        hosts, split_rests = [], []  # split_rests: what a request left free of a larger block it took
        for size in sorted(moved, reverse=True):
            host = self._take(size)
            if host is None:
                self._grow(size)
            hosts.append(host or size)
            split_rests.append((host or size) - size)
            self.live += size
        pooled = min(window, self.layer_pool)
        self.pool_in_use = pooled
        rest = window - pooled
        window_hosts = self._take_for_layers(rest) if rest and not self.layer_pool_on_copy_stream else []
        grown = max(0, rest - sum(window_hosts))
        split_rests += [max(0, sum(window_hosts) - rest)]
        if grown:
            self.regions_in_use = sum(window_hosts)
            self._grow(grown)
        self.live += window
        self.layer_live, self.pool_in_use, self.regions_in_use = pooled, 0, 0  # now part of `live`
        if large and max(split_rests, default=0) < large:
            held = self._take(large)
            if held is None:
                self._grow(large)
            hosts.append(held or large)
        self._grow(activations, from_free=True)
        self.live -= sum(moved) + window
        self.layer_live = 0
        self.regions += hosts + window_hosts
        self.layer_pool = max(self.layer_pool, pooled + grown)
        return self.high

    def _take_for_layers(self, nbytes: int) -> list[int]:
        """The free regions layer buffers of `nbytes` in all fill: the smallest that holds them all, else the
        largest, which the buffers split layer by layer until it is used up, the rest in new segments (Qwen-Image,
        half of 60 layers kept on the 5090 cap: 13 GiB of layers in the encoder's freed 13 GiB block, the rest
        new, so that block is whole again when the decode asks for 1.5 GiB: measured, no growth)."""
        whole = self._take(nbytes)
        if whole is not None:
            return [whole]
        if not self.regions:
            return []
        largest = max(self.regions)
        self.regions.remove(largest)
        return [largest]


# ------------------------------------------------------------------------------------------------ the plan


def plan(
    model: str,
    flags: OffloadFlags,
    cap_bytes: int | None,
    workload: Workload,
    *,
    card: str = "",
    machine: Machine | None = None,
    resident_layers: float | None = None,
    data: Mapping[str, Any] | None = None,
    layer_pool_on_copy_stream: bool = False,
) -> Plan:
    """Predicts what `flags` (effective: resolve them first) cost for `model` on a card of `cap_bytes`.
    `layer_pool_on_copy_stream`: plan the layerwise runtime variant whose layer buffers come from the copy stream's own
    allocator pool (`LayerPool.COPY_STREAM`, `_Allocator`; the plans of its records, `plan_for_record`).

    Example:
        >>> p = plan("qwen-image-edit", OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True,
        ...          dit_offload_prefetch_size=4), round(31.36 * GIB), Workload())
        >>> p.fits, round(p.load_peak_bytes / GIB, 1)
        (True, 13.7)
    """
    data = plan_data_with(model, data or load_data())  # a pipeline folder: its weights read from its files
    spec = get_model(model)
    fits, fits_from = model_fits(model, data)
    machine = machine or machine_profile(data=data)
    notes = _fits_notes(model, fits_from)
    value = flags.layerwise_tuning("dit")[1] if resident_layers is None else resident_layers
    parts = _DeviceParts.of(spec, model_weights(model, data), flags, value)
    fits = {**fits, **fits.get("by_text_encoder", {}).get(text_encoder_class(parts.where), {})}
    drv = drivers(spec, workload)
    allocator = _Allocator(layer_pool_on_copy_stream=layer_pool_on_copy_stream and parts.layerwise)
    if allocator.layer_pool_on_copy_stream:
        notes.append("layer buffers from the copy stream's own pool (the copy-stream layer pool runtime)")
    phases, oom = _phase_plans(parts, _activations(fits, drv, workload, cap_bytes is not None),
                               int(fits.get("base_bytes", 0)),
                               int(fits.get("reserved_slack_bytes", 0)), cap_bytes, machine, workload, allocator,
                               round(fits.get("decode_block_per_pixel", 0.0) * drv.pixels))
    offloaded = parts.host_bytes()
    pinned = bool(flags.pin_cpu_memory)
    timing = _step_time(flags, parts, _compute_s(fits, parts.dit, drv, machine, notes, data), machine, workload, notes)
    return Plan(
        model=model, card=card, cap_bytes=cap_bytes, flags=flags, resident_layers=parts.stream.resident_layers,
        workload=workload, machine=machine, placements=parts.where, phases=phases,
        host_pinned_bytes=offloaded if pinned else 0, host_pageable_bytes=0 if pinned else offloaded,
        streamed_bytes_per_forward=parts.stream.streamed_bytes, compute_s_per_forward=timing.compute,
        transfer_s_per_forward=timing.transfer, step_s=timing.step, bound=timing.bound, oom_phase=oom,
        notes=tuple(notes),
    )


def _fits_notes(model: str, fits_from: str | None) -> list[str]:
    """What a plan says about where its fitted coefficients come from."""
    if fits_from is None:
        return [f"no records of {model} (or a model with its DiT): activations, allocator slack and compute "
                "unknown, counted as 0"]
    if fits_from != model:
        return [f"activations and compute from {fits_from} (same DiT)"]
    return []


def text_encoder_class(where: Mapping[str, str]) -> str:
    """Which of a model's `by_text_encoder` fits a plan with these placements uses."""
    return "resident" if where.get("text_encoder") == "resident" else "offloaded"


# What measure.warm_kernels leaves allocated before a capped card's load: its matmul's cuBLAS workspace, which torch
# keeps for the handle. 32 MiB exactly on the H200: the capped minus the uncapped load of FLUX (334,174,208 -
# 300,619,776 bytes) and of Wan (754,439,680 - 720,885,248), `results/h200/reserved-capped.records.jsonl`. An
# uncapped cell allocates it in encode,
# where the activations fit holds it.
WARM_KERNELS_BYTES = 32 * 2**20


def warm_kernels_bytes(record: CellRecord) -> int:
    """WARM_KERNELS_BYTES where the record's load ran under a card cap (a runtime cap warms after the load)."""
    return WARM_KERNELS_BYTES if (record.cap or {}).get("cap_bytes") and not record.capped_after_load else 0


def _activations(fits: Mapping[str, Any], drv: Drivers, workload: Workload, capped: bool = False) -> dict[str, int]:
    """Each phase's activation bytes: the fitted bytes per unit of what drives them (x2 for a batched CFG); at load,
    under a card cap, what the kernel warm-up keeps."""
    return {
        "load": WARM_KERNELS_BYTES if capped else 0,
        "encode": round(fits.get("encode_per_unit", 0.0) * drv.encode_units),
        "denoise": round(fits.get("denoise_per_token", 0.0) * drv.dit_tokens * workload.batch),
        "decode": round(fits.get("decode_per_pixel", 0.0) * drv.pixels),
    }


# the runtime phase in which a component streams its layers under layerwise offload
STREAMED_IN = {"text_encoder": "encode", "dit": "denoise", "vae": "decode"}


@dataclass(frozen=True)
class _DeviceParts:
    """What a model's components put on the device under the flags' placements."""

    where: dict[str, str]
    sizes: dict[str, int]  # whole-component weight bytes by role
    dit: Mapping[str, Any]  # the DiT's weights data (groups, non-layer bytes)
    stream: Streaming  # the DiT's layerwise window (all zeros without layerwise offload)
    edit: bool  # an edit model: the VAE also encodes the reference image
    # a text encoder or VAE that streams (`layerwise_offload_components`): its window and resident layers in the
    # phase that runs it, and its weights outside the layer groups, on the device from load on
    encoder_streams: dict[str, Streaming] = field(default_factory=dict)
    non_layer: dict[str, int] = field(default_factory=dict)
    host_regions: dict[str, int] = field(default_factory=dict)  # per streamed text encoder / VAE: its layer regions

    @classmethod
    def of(cls, spec: ModelSpec, weights: Mapping[str, Any], flags: OffloadFlags,
           resident_value: float) -> _DeviceParts:
        dit = weights["dit"]
        stream = Streaming(0, 0, 0, 0)
        if flags.dit_layerwise_offload:
            stream = streaming(dit, flags.dit_offload_prefetch_size, resident_value,
                               spec.components["dit"].layer_groups)
        sizes = {role: weights[role]["weight_bytes"] for role in ROLES}
        where = placements(flags)
        streams, non_layer, regions = {}, {}, {}
        for role in ("text_encoder", "vae"):
            if where[role] != Placement.LAYERWISE_FROM_HOST:
                continue
            w = weights[role]
            prefetch, resident, _ = flags.layerwise_tuning(role)
            streams[role] = streaming(w, prefetch, resident, spec.components[role].layer_groups)
            non_layer[role] = w["non_layer_bytes"]
            regions[role] = sum(g["host_bytes"] for g in w["groups"].values())
        return cls(where, sizes, dit, stream, spec.edit, streams, non_layer, regions)

    @property
    def layerwise(self) -> bool:
        return self.where["dit"].startswith("layerwise")

    def layer_segments(self, phase: str) -> int:
        """What the layer buffers of the component streaming in `phase` reserve from an empty cache."""
        if phase == "denoise":
            return self.stream.segment_bytes
        return sum(s.segment_bytes for role, s in self.encoder_streams.items() if STREAMED_IN[role] == phase)

    def used_in(self, phase: str) -> list[str]:
        """The components a runtime phase runs (an edit model's encode also runs the VAE on the reference)."""
        return {"encode": ["text_encoder", *(["vae"] if self.edit else [])], "denoise": ["dit"],
                "decode": ["vae"]}[phase]

    def on_device(self, phase: str) -> tuple[int, int]:
        """(weights, window) on the device during `phase`: a resident component always, a CPU-offloaded one only
        in the phase that uses it (the VAE also in an edit model's encode, which encodes the reference image)."""
        where, dit = self.where, self.dit
        w = window = 0
        for role, streams in self.encoder_streams.items():  # non-layer weights always; layers in its phase
            w += self.non_layer[role] + (streams.resident_bytes if phase == STREAMED_IN[role] else 0)
            window += streams.window_bytes if phase == STREAMED_IN[role] else 0
        if "text_encoder" not in self.encoder_streams and (where["text_encoder"] == "resident" or phase == "encode"):
            w += self.sizes["text_encoder"]
        if "vae" not in self.encoder_streams and (where["vae"] == "resident" or phase == "decode"
                                                  or (phase == "encode" and self.edit)):
            w += self.sizes["vae"]
        if where["dit"] == "resident" or (where["dit"] == "cpu-offload" and phase == "denoise"):
            w += self.sizes["dit"]
        elif where["dit"] == "layerwise-from-device" and phase == "load":
            w += self.sizes["dit"]  # the loader puts the whole DiT on the device before packing it to the host
        elif self.layerwise:
            w += dit["non_layer_bytes"] + (self.stream.resident_bytes if phase == "denoise" else 0)
            window += self.stream.window_bytes if phase == "denoise" else 0
        return w, window

    def host_bytes(self) -> int:
        """Host bytes of the offloaded components (a layerwise component's per-layer regions, resident layers'
        too)."""
        offloaded = sum(self.sizes[role] for role in ("text_encoder", "vae") if self.where[role] == "cpu-offload")
        offloaded += sum(self.host_regions.values())
        if self.where["dit"] == "cpu-offload":
            offloaded += self.sizes["dit"]
        elif self.layerwise:
            offloaded += sum(g["host_bytes"] for g in self.dit["groups"].values())
        return offloaded


def _phase_plans(parts: _DeviceParts, act: Mapping[str, int], base: int, slack: int, cap_bytes: int | None,
                 machine: Machine, workload: Workload, allocator: _Allocator,
                 decode_block: int = 0) -> tuple[tuple[PhasePlan, ...], str | None]:
    """Each phase's allocated and reserved peaks through the allocator model, and the first phase that would
    not fit the card (None: all fit). `decode_block`: the VAE decode's largest request (part of its
    activations)."""
    allocator.limit = None if cap_bytes is None else cap_bytes - machine.context_bytes - slack
    phases = []
    oom = None
    for phase in PHASES:
        w, window = parts.on_device(phase)
        allocated = base + w + window + act[phase]
        peak = _allocator_phase(allocator, parts, phase, base + w, act[phase], workload,
                                decode_block if phase == "decode" else 0)
        if allocator.oom and oom is None:
            oom = phase
            peak = allocator.need  # what the phase needed, not the cap it stopped at
            allocator.limit = None  # the later phases: what they would need on a card large enough
        phases.append(PhasePlan(phase, w, window, act[phase], allocated, peak + slack,
                                peak + slack + machine.context_bytes))
    return tuple(phases), oom


def _allocator_phase(allocator: _Allocator, parts: _DeviceParts, phase: str, loaded: int,
                     activations: int, workload: Workload, large: int = 0) -> int:
    """One phase through the allocator model; its reserved peak (before slack)."""
    if phase == "load":
        peak = allocator.load(loaded + activations)
        if parts.where["dit"] == "layerwise-from-device":
            allocator.discard(parts.sizes["dit"] - parts.dit["non_layer_bytes"])  # packed to the host: blocks freed
            if workload.empty_cache_after_packing:
                allocator.empty_cache()
        return peak
    moved = [parts.sizes[r] for r in parts.used_in(phase) if parts.where[r] == "cpu-offload"]
    peak = allocator.run(moved, parts.layer_segments(phase), activations, large)  # layers: window + resident
    if workload.empty_cache and phase in ("encode", "denoise"):
        allocator.empty_cache()
    return peak


@dataclass(frozen=True)
class _StepTime:
    compute: float | None  # one forward's compute (both passes of a batched CFG)
    transfer: float | None  # one forward's streamed bytes at the H2D rate (layerwise)
    step: float | None
    bound: str | None


def _step_time(flags: OffloadFlags, parts: _DeviceParts, compute: float | None, machine: Machine,
               workload: Workload, notes: list[str]) -> _StepTime:
    """The roofline step: forwards x max(compute, transfer) (leading resident layers: `_leading_forward_s`)."""
    if compute is not None:
        compute *= workload.batch  # a batched CFG forward does both passes' work
    transfer = None
    stream = parts.stream
    if parts.layerwise:
        rate = machine.pinned_h2d_gbps if flags.pin_cpu_memory else machine.pageable_h2d_gbps
        transfer = stream.streamed_bytes / (rate * 1e9)
    known = [v for v in (compute, transfer) if v is not None]
    per_forward = max(known) if known else None
    if compute is not None and transfer is not None and stream.resident_layers \
            and flags.dit_layerwise_residency_policy == "leading":
        per_forward = _leading_forward_s(compute, stream, rate)
    if compute is None and transfer is not None:
        notes.append("step time is the transfer bound alone (no compute time known)")
    step = None if per_forward is None else workload.dit_calls_per_step * per_forward
    bound = None if not known else ("transfer" if transfer is not None and transfer >= (compute or 0) else "compute")
    return _StepTime(compute, transfer, step, bound)


def _leading_forward_s(compute: float, stream: Streaming, rate_gbps: float) -> float:
    """One forward when each group's kept layers lead it (residency "leading"): while they compute, only the first
    window of the group's streamed layers can be in flight (prefetched at the end of the previous forward), so the
    rest of its transfer overlaps its streamed layers' compute alone. Per group, compute shared by layer bytes.
    Measured on the H200 (Qwen-Image, 5090 cap, 0.5 of 60 layers kept): 0.819 s/step leading at prefetch 4 and
    0.890 at prefetch 1, against 0.741 strided at prefetch 1."""
    total = sum(kept + streamed for kept, streamed, _ in stream.groups)
    seconds = 0.0
    for kept, streamed, first in stream.groups:
        c = compute * (kept + streamed) / total
        share = kept / (kept + streamed)
        t_first, t_all = first / (rate_gbps * 1e9), streamed / (rate_gbps * 1e9)
        seconds += max(c * share, t_first) + max(c * (1 - share), t_all - t_first) if streamed else c
    return seconds


def _compute_s(fits: Mapping[str, Any], dit: Mapping[str, Any], drv: Drivers, machine: Machine,
               notes: list[str], data: Mapping[str, Any]) -> float | None:
    """One forward's compute: a timed forward of this model (on this machine's GPU when one was timed there)
    scaled by FLOPs to this workload's tokens, or, with none, the FLOPs at the machine's effective TFLOPS."""
    timed = (fits.get("compute_by_sku") or {}).get(machine.name) or fits.get("compute")
    flops = dit_flops(dit, drv.dit_tokens)
    if timed:
        seconds = timed["s_per_forward"] * flops / dit_flops(dit, timed["tokens"])
        timed_on = (data.get("machines") or {}).get(timed.get("sku"), {}).get("tflops")
        if timed.get("sku") != machine.name and machine.tflops and timed_on:
            seconds *= timed_on / machine.tflops  # timed on another GPU: scale by the two machines' rates
        return seconds
    if machine.tflops:
        notes.append(f"compute from {machine.name}'s effective {machine.tflops:.0f} TFLOPS (no timed forward)")
        return flops / (machine.tflops * 1e12)
    return None


# --------------------------------------------------------------------------------- plans of cells and records


def plan_for_record(record: CellRecord, data: Mapping[str, Any] | None = None) -> Plan | None:
    """The plan of a recorded cell: its effective flags, card and settings, on its machine (the H2D probe its
    child ran). None for a cell the planner does not model (another backend's streamed DiT, a record without
    settings)."""
    data = data or load_data()
    if record.backend != Backend.HARNESS or record.settings is None or record.model not in data.get("weights", {}):
        return None
    card = record.card or Card("", None)
    return plan(record.model, record.effective, card.cap_bytes, Workload.of(record.settings, record.run_options),
                card=card.name, machine=machine_of_record(record, data), data=data,
                layer_pool_on_copy_stream=record.layer_pool is LayerPool.COPY_STREAM)


def machine_of_record(record: CellRecord, data: Mapping[str, Any] | None = None) -> Machine:
    """The machine profile of a record's SKU, with the pinned H2D rate its child measured."""
    profile = machine_profile(record.sku, data)
    if record.h2d_gbps:
        profile = replace(profile, pinned_h2d_gbps=float(record.h2d_gbps),
                          source=f"{profile.source}; pinned H2D from the cell's own probe")
    return profile


# ---------------------------------------------------------------------------------- the plan a record stores


# what planning a recorded cell may raise: PlanError, a FlagError (a ValueError), a KeyError (a zoo change)
PLAN_FAILURES = (PlanError, ValueError, KeyError)


def plan_entry(record: CellRecord) -> JsonObject | None:
    """The plan the runner stores beside a cell's measurements (`record.plan`): the cell's effective flags,
    card and settings on its machine (its own H2D probe). Planning never costs a run its record: a failure is
    stored as {"error": ...}; None for a cell the planner does not model (another backend, no settings)."""
    try:
        p = plan_for_record(record)
    except PLAN_FAILURES as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return None if p is None else p.as_dict()


def plan_on_read(record: CellRecord) -> None:
    """Completes the plan of a record read from a file, in place: the plan its run stored stays; a record without
    one (written before the runner stored plans) or whose planning failed when it ran gets `plan_entry` now, marked
    `"derived": true`. The one place a plan is made after its cell ran: the analysis reads a run through it
    (`harness.analyze.readout`), and the report and the expectations read `record.plan` (`judge.check_record`)."""
    stored = record.plan
    if isinstance(stored, dict) and "error" not in stored:
        return
    entry = plan_entry(record)
    record.plan = None if entry is None else {**entry, "derived": True}
