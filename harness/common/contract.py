"""The contract between the stages: what the parent hands a cell's child (`CellSpec`) and what comes back
(`CellRecord`), with the closed vocabularies both speak (`Status`, `Phase`, `Placement`, `Backend`).

Every stage passes these types; JSON appears only where a spec or record crosses a process or a file
(`to_json` / `from_json`). The enums are `str` enums, so the JSON holds the same strings as before they existed.

Records are versioned: `from_json` brings an older record up to `SCHEMA_VERSION` through `_migrate_vN` steps
(as asv's `update_to_2` and pytest-benchmark's `normalize_stats`), so every reader sees one shape.

Keys a record carries beyond the declared fields (added by a newer harness, or a branch not yet merged here) are
kept in `CellRecord.extra` and written back unchanged, so reading and rewriting a record never loses data. Phase
entries keep their unknown counters the same way (`PhaseStats.extra`).

This module imports no torch: the parent, the analysis commands and the CPU tests use it freely.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from harness.common.flags import OffloadFlags

SCHEMA_VERSION = 2
ROLES = ("text_encoder", "dit", "vae")

JsonObject = dict[str, Any]  # a nested section kept as JSON (machine, guard, components, outputs, ...)


class RecordError(ValueError):
    """A record cannot be read into a `CellRecord`. The message says where and why."""


# ------------------------------------------------------------------------------------------------- vocabularies


class Status(StrEnum):
    """How a cell ended: exactly one per cell."""

    OK = "ok"
    OOM = "oom"
    ERROR = "error"
    CRASH = "crash"
    TIMEOUT = "timeout"
    SKIPPED = "skipped"

    @property
    def unexpected(self) -> bool:
        """A fate that makes a run fail: the harness, not the flags, went wrong."""
        return self in (Status.ERROR, Status.CRASH, Status.TIMEOUT)


class Phase(StrEnum):
    """Where a cell was when it ended; `setup` is everything before the load phase (guards, checkpoints)."""

    SETUP = "setup"
    LOAD = "load"
    ENCODE = "encode"
    DENOISE = "denoise"
    DECODE = "decode"

    @property
    def is_runtime(self) -> bool:
        """One of the phases of a pipeline call (encode, denoise, decode), as opposed to load."""
        return self in RUNTIME_PHASES

    @property
    def progress(self) -> int:
        """How far a cell failing here got: load 0 ... decode 3, setup -1."""
        return MEASURED_PHASES.index(self) if self in MEASURED_PHASES else -1


MEASURED_PHASES = (Phase.LOAD, Phase.ENCODE, Phase.DENOISE, Phase.DECODE)
RUNTIME_PHASES = (Phase.ENCODE, Phase.DENOISE, Phase.DECODE)
# The same as plain strings, for messages and JSON validation
STATUSES = tuple(s.value for s in Status)
PHASES = tuple(p.value for p in MEASURED_PHASES)

DIFFUSERS_NEEDS_CUDA = "diffusers group offload with streams needs CUDA"
SGLANG_NEEDS_CUDA = "SGLang's layerwise manager enables itself only on CUDA"


class Placement(StrEnum):
    """Where the loader puts a component's weights (harness.cell.offload.loader has one function per placement)."""

    RESIDENT = "resident"
    CPU_OFFLOAD = "cpu-offload"
    LAYERWISE_FROM_HOST = "layerwise-from-host"
    LAYERWISE_FROM_DEVICE = "layerwise-from-device"
    DIFFUSERS_GROUP = "diffusers-group-offload"
    SGLANG_LAYERWISE = "sglang-layerwise"

    @property
    def holds_host_copy(self) -> bool:
        """The weights live in host memory while the cell runs (every placement but resident)."""
        return self is not Placement.RESIDENT

    @property
    def pins_second_copy(self) -> bool:
        """diffusers' group offload pins a copy of every block tensor through torch's caching host allocator while
        the pageable region it was read into is still alive: the host peak is both."""
        return self is Placement.DIFFUSERS_GROUP

    @property
    def streams(self) -> bool:
        """The weights move to the device layer by layer during each forward."""
        return self in (
            Placement.LAYERWISE_FROM_HOST, Placement.LAYERWISE_FROM_DEVICE,
            Placement.DIFFUSERS_GROUP, Placement.SGLANG_LAYERWISE,
        )

    @property
    def whole_on_device(self) -> bool:
        """The whole component is on the device while it runs (resident, or moved there whole)."""
        return self in (Placement.RESIDENT, Placement.CPU_OFFLOAD)

    @property
    def needs_cuda(self) -> str | None:
        """Why this placement cannot run off CUDA, or None when it can."""
        reasons = {Placement.DIFFUSERS_GROUP: DIFFUSERS_NEEDS_CUDA, Placement.SGLANG_LAYERWISE: SGLANG_NEEDS_CUDA}
        return reasons.get(self)

    @classmethod
    def for_role(cls, role: str, flags: OffloadFlags, backend: str = "harness") -> Placement:
        """Where the loader puts component `role` under the effective `flags` and the cell's `backend`.

        A backend other than the harness changes only the layerwise DiT; every other component and cell runs as
        under the harness backend.

        Raises:
            ValueError: an unknown role or backend.
        """
        kind = Backend.of(backend)
        if role == "dit":
            if flags.dit_layerwise_offload:
                return kind.layerwise_placement(bool(flags.dit_cpu_offload))
            return cls.CPU_OFFLOAD if flags.dit_cpu_offload else cls.RESIDENT
        if role in ("text_encoder", "vae"):
            # a component selected for layerwise offload streams from the host whatever its CPU-offload flag says
            # (SGLang's residency_mode: an explicit layerwise selection wins, and the selection clears the flag)
            if role in selected_layerwise(flags):
                return cls.LAYERWISE_FROM_HOST
            on_host = flags.text_encoder_cpu_offload if role == "text_encoder" else flags.vae_cpu_offload
            return cls.CPU_OFFLOAD if on_host else cls.RESIDENT
        raise ValueError(f"unknown component role {role!r}")


class Backend(StrEnum):
    """Who streams the DiT under layerwise offload. "sglang@<version>" names a release; its kind is SGLANG."""

    HARNESS = "harness"
    DIFFUSERS_GROUP = "diffusers-group"
    DIFFUSERS_GROUP_RS = "diffusers-group-rs"  # the same with record_stream
    SGLANG = "sglang"

    @classmethod
    def of(cls, name: str) -> Backend:
        """The kind of backend `name` ("sglang@0.5.23" is SGLANG).

        Raises:
            ValueError: not a known backend.
        """
        base = name.partition("@")[0] if name.startswith("sglang@") else name
        try:
            return cls(base)
        except ValueError:
            raise ValueError(f"unknown backend {name!r}") from None

    @property
    def is_peer(self) -> bool:
        """Not the harness's own runtime: a peer it is compared with."""
        return self is not Backend.HARNESS

    @property
    def is_diffusers(self) -> bool:
        return self in (Backend.DIFFUSERS_GROUP, Backend.DIFFUSERS_GROUP_RS)

    def layerwise_placement(self, dit_cpu_offload: bool) -> Placement:
        if self.is_diffusers:
            return Placement.DIFFUSERS_GROUP
        if self is Backend.SGLANG:
            return Placement.SGLANG_LAYERWISE
        return Placement.LAYERWISE_FROM_HOST if dit_cpu_offload else Placement.LAYERWISE_FROM_DEVICE


class LayerPool(StrEnum):
    """Which allocator pool the harness's layerwise runtime takes its layer buffers from: the variant of the
    runtime a record ran, which the planner's allocator model follows (`harness.plan.planner.model._Allocator`).

    COMPUTE_STREAM: the compute stream's pool, so a window reuses the block an offloaded component freed and
    activations reuse freed layer buffers (the runtime of every record that names its backend).
    COPY_STREAM: the copy stream's own pool, which neither takes a component's cached block nor lends freed
    layer buffers to activations (Wan prefetch 2: +2,688 MiB over the encoder's free block,
    `results/h100/wan21-14b-h100.records.jsonl`; the A/B of the two: `results/h100/ab-layer-pool/`).
    """

    COMPUTE_STREAM = "compute-stream"
    COPY_STREAM = "copy-stream"


def selected_layerwise(flags: OffloadFlags) -> set[str]:
    """The zoo roles `layerwise_offload_components` selects ("all": every role; the DiT by its own flag)."""
    chosen = set(flags.layerwise_offload_components or ())
    roles = set(ROLES) if "all" in chosen else chosen & set(ROLES)
    return roles | ({"dit"} if flags.dit_layerwise_offload else set())


def fate_text(status: str, phase: str | None) -> str:
    """A fate in words, as every table and log line shows it: "ok", "oom in load"."""
    return f"{status} in {phase}" if phase else str(status)


def label_in(cell_id: str) -> str:
    """The label part of a cell id that names another cell (a record's `same_as`); a record's own label is
    `CellRecord.label`, from its flags."""
    return cell_id.rsplit("/", 1)[-1]


def cell_id_of(scenario: str, card: str, flags_label: str, backend: str, cfg_batch: bool = False) -> str:
    """`<scenario>/<card>/<flags label>`, plus `+cfg-batch` when the two CFG passes run as one batched forward and
    `+<backend>` for a backend other than the harness's own (so the ids that results and baselines already key on
    stay as they were)."""
    return f"{scenario}/{card}/{flags_label}{_suffix(backend, cfg_batch)}"


def _suffix(backend: str, cfg_batch: bool) -> str:
    return ("+cfg-batch" if cfg_batch else "") + ("" if backend == Backend.HARNESS else f"+{backend}")


# ------------------------------------------------------------------------------------------------------ the spec


@dataclass(frozen=True)
class Card:
    """A GPU the cell simulates: `cap_bytes` of usable memory (None: the machine's own card, uncapped)."""

    name: str
    cap_bytes: int | None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Card:
        return cls(data["name"], data.get("cap_bytes"))

    def as_dict(self) -> JsonObject:
        return {"name": self.name, "cap_bytes": self.cap_bytes}

    def get(self, key: str, default: Any = None) -> Any:
        """A field by its JSON name, as `dict.get`: for readers that still take a record's card as its JSON object
        (harness.analyze.plots and figures read `r.card.get("cap_bytes")`)."""
        value = self.as_dict().get(key)
        return default if value is None else value


@dataclass(frozen=True)
class RunSettings:
    """What one pipeline call computes.

    Args:
        height (int), width (int): output image size in pixels (multiples of vae_scale * patch).
        steps (int): denoise steps.
        true_cfg_scale (float): > 1 runs true CFG, two passes a step (the prompt and the negative prompt); 1 runs
            one.
        seed (int): seeds every input.
        frames (int, defaults to 1): video frames (video models only).
        cfg_batch (bool, defaults to False): true CFG's two passes as one forward of batch 2 (Qwen-Image, Wan), so
            each streamed layer crosses to the device once a step instead of twice. A run option (the spec carries
            it in `run`), so it is not part of `as_dict`.
    """

    height: int
    width: int
    steps: int
    true_cfg_scale: float
    seed: int
    frames: int = 1
    cfg_batch: bool = False

    @property
    def cfg_passes_per_step(self) -> int:
        """CFG passes a denoise step makes: the prompts it conditions on (two with true CFG), whether or not they
        share one DiT call. What the work scales with."""
        return 2 if self.true_cfg_scale > 1 else 1

    @property
    def dit_calls_per_step(self) -> int:
        """DiT calls (forwards) a denoise step runs, each streaming every streamed layer once: the CFG passes, or
        one batch of both under cfg_batch. What the record's `forwards` counts and what streams."""
        return 1 if self.cfg_batch and self.cfg_passes_per_step == 2 else self.cfg_passes_per_step

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], cfg_batch: bool = False) -> RunSettings:
        """The settings as `as_dict` writes them (values kept as the JSON holds them, so they write back the same),
        with the cell's `cfg_batch` run option."""
        return cls(data["height"], data["width"], data["steps"], data["true_cfg_scale"], data["seed"],
                   frames=data.get("frames", 1), cfg_batch=cfg_batch)

    def as_dict(self) -> JsonObject:
        return {"height": self.height, "width": self.width, "steps": self.steps, "frames": self.frames,
                "true_cfg_scale": self.true_cfg_scale, "seed": self.seed}


@dataclass(frozen=True)
class RunOptions:
    """How the child measures a cell: the scenario's `[run]` table, with the cell's own `cfg_batch` (a scenario
    sweeps it: `harness.plan.scenario.Scenario.cfg_batch`). A cell's spec carries only the options off their
    defaults (`changed`), so the spec hashes of scenarios without `[run]` stay as they were; its record carries
    every one (`as_dict`).

    Args:
        sampler_interval_ms (float): the NVML/RSS polling thread's period; 0 = off (peaks then come from the
            samples taken at phase boundaries only). Default 10, as every record before this option.
        copy_timeline (bool): CUDA events around every layer copy of our layerwise runtime, summarised per step
            (copy busy time, idle gaps, bytes); opt-in, the events cost a little.
        cfg_batch (bool): the two CFG passes as one batched forward (cell id suffix `+cfg-batch`); Qwen-Image and
            Wan families, true_cfg_scale > 1.
        empty_cache_between_phases (bool): `torch.cuda.empty_cache()` at SGLang's release points (after encode
            with the text encoder offloaded, after denoise with the DiT not resident, after decode); the record
            says which mechanism ran.
        setup_threads (int): threads that read checkpoints into host regions at load (harness.cell.offload.memory).
            Default 16; it was 8 before the H200 measurement in results/h200/setup-speed-qwen-image.json.
        setup_overlap_pin (bool): pin each host region as soon as it is read, overlapping other regions' reads;
            false: all reads, then all pins. Default true since that measurement: Qwen-Image's 40.8 GB DiT from
            the page cache into pinned regions at 20.6 GB/s with 16 threads overlapped, 12.7 GB/s read-then-pin.
            The spec keeps only options off their defaults, so a default cell's spec hash did not change with
            these two: its records from before the change loaded with 8 threads, read then pin (the record's
            `run_options` says which); against such a baseline `compare` sees `load_ms` fall, and nothing else.
        empty_cache_after_packing (bool): `torch.cuda.empty_cache()` once, after the load of a DiT placed through
            the device (layerwise-from-device: dit_cpu_offload off) has packed its layers into host regions. Not
            an engine release point (SGLang's layer managers, June era to 0.5.23, free the device copies and keep
            the cache): ours, because on the H200 those freed copies stayed cached through every later phase
            (Qwen-Image-Edit: 45,729 MiB, runtime reserved 3.0x allocated). The record's `cache_release` says
            how many bytes it handed back.
        runtime_cap_mib (int): caps the allocator at a card of this many MiB after the load, for the runtime
            alone (0 = off): the capped re-run of a cell whose load needs more by design (a DiT placed through
            the device). Refused with a capped card. The record's `cap` says `applied_after: load` and checks
            the runtime phases' NVML per-process peak against it.
        unrecorded (frozenset[str]): options a record's JSON lacks, its harness being older than they are. They
            read as today's defaults (what ran, for an option that came at its default, as
            empty_cache_after_packing and runtime_cap_mib did; not necessarily for setup_threads and
            setup_overlap_pin, whose defaults changed: `recorded` tells) and are left out when the record is
            written back, so it keeps its bytes. Options it carries that this harness does not know stay in
            `extra`, written back too.
    """

    sampler_interval_ms: float = 10.0
    copy_timeline: bool = False
    cfg_batch: bool = False
    empty_cache_between_phases: bool = False
    setup_threads: int = 16
    setup_overlap_pin: bool = True
    empty_cache_after_packing: bool = False
    runtime_cap_mib: int = 0
    unrecorded: frozenset[str] = field(default=frozenset(), compare=False)
    extra: JsonObject = field(default_factory=dict, compare=False)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.name not in ("unrecorded", "extra"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunOptions:
        """A record's `run_options` (every option its harness had; see `unrecorded`)."""
        names = cls.names()
        return cls(**{k: v for k, v in data.items() if k in names},
                   unrecorded=frozenset(n for n in names if n not in data),
                   extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def from_changes(cls, data: Mapping[str, Any]) -> RunOptions:
        """A spec's `run` (the options off their defaults, `changed`).

        Raises:
            ValueError: an option this harness does not know.
        """
        unknown = sorted(set(data) - set(cls.names()))
        if unknown:
            raise ValueError(f"run: unknown run option {unknown[0]!r}; known: {', '.join(cls.names())}")
        return cls(**data)

    def recorded(self, name: str) -> bool:
        """The record says what option `name` was (it is not one its harness lacked)."""
        return name not in self.unrecorded

    def changed(self) -> JsonObject:
        """The options that differ from the defaults: what a cell's spec carries (and its hash covers)."""
        default = RunOptions()
        return {n: getattr(self, n) for n in self.names() if getattr(self, n) != getattr(default, n)}

    def as_dict(self) -> JsonObject:
        """Every option a record carries: all of them, less `unrecorded`, plus `extra`."""
        return {**{n: getattr(self, n) for n in self.names() if n not in self.unrecorded}, **self.extra}


@dataclass(frozen=True)
class CellSpec:
    """Everything the parent hands one cell's child (`python -m harness.cell.worker --cell SPEC.json`).

    `resolution` is SGLang's answer for an engine policy (asked once by the parent for the whole card); without it
    the child resolves `requested` under `policy` itself. `latents_out` is where the child saves its final latents;
    it is a path of this run, so it is not part of the spec's hash. `settings.cfg_batch` is `run.cfg_batch`.
    """

    cell_id: str
    scenario: str
    scenario_file: str | None
    model: str
    card: Card
    settings: RunSettings
    policy: str
    requested: OffloadFlags  # written as OffloadFlags.hashed_dict() (the hashes of cells at the defaults kept)
    device: str
    warmup: int = 0
    rounds: int = 1
    backend: str = Backend.HARNESS
    run: RunOptions = field(default_factory=RunOptions)  # written as the options off their defaults (`changed`)
    resolution: JsonObject | None = None
    # Not what the cell runs (so not hashed): where the child saves its final latents, the pinned H2D probe an
    # earlier cell measured on this GPU ({"gbps", "cell_id"}, one probe per run and GPU) and the spawn time the
    # child's process_start_s counts from.
    latents_out: str | None = None
    pinned_h2d_probe: JsonObject | None = None
    spawned_at: float | None = None

    def as_dict(self) -> JsonObject:
        d: JsonObject = {
            "cell_id": self.cell_id, "scenario": self.scenario, "scenario_file": self.scenario_file,
            "model": self.model, "card": self.card.as_dict(), "settings": self.settings.as_dict(),
            "policy": self.policy, "warmup": self.warmup, "rounds": self.rounds,
            "requested": self.requested.hashed_dict(), "backend": str(self.backend), "device": self.device,
        }
        if self.run.changed():
            d["run"] = self.run.changed()
        if self.resolution is not None:
            d["resolution"] = self.resolution
        for key in _UNHASHED_SPEC_KEYS:
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> CellSpec:
        d = json.loads(text)
        run = RunOptions.from_changes(d.get("run") or {})
        return cls(
            cell_id=d["cell_id"], scenario=d["scenario"], scenario_file=d.get("scenario_file"), model=d["model"],
            card=Card.from_dict(d["card"]), settings=RunSettings.from_dict(d["settings"], run.cfg_batch),
            policy=d["policy"], requested=OffloadFlags.from_mapping(d["requested"], "cell spec: requested"),
            device=d["device"], warmup=int(d.get("warmup", 0)), rounds=int(d.get("rounds", 1)),
            backend=d.get("backend", Backend.HARNESS), run=run, resolution=d.get("resolution"),
            **{key: d.get(key) for key in _UNHASHED_SPEC_KEYS},
        )

    def _hashed(self, portable: bool) -> str:
        spec = self.as_dict()
        for key in _UNHASHED_SPEC_KEYS:
            spec.pop(key, None)
        if spec["backend"] == Backend.HARNESS:  # hashes as specs did before backends existed, so old runs resume
            del spec["backend"]
        if portable:
            del spec["scenario_file"]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def spec_hash(self) -> str:
        """A digest of the spec: a resumed run skips a cell whose record carries the same one."""
        return self._hashed(portable=False)

    @property
    def portable_spec_hash(self) -> str:
        """`spec_hash` without the scenario file's path: the path is absolute, so two checkouts (or machines) hash
        one unchanged cell differently; a baseline compared on another machine needs a digest of what runs."""
        return self._hashed(portable=True)


_UNHASHED_SPEC_KEYS = ("latents_out", "pinned_h2d_probe", "spawned_at")
H2D_PROBE_SPEC_KEY = "pinned_h2d_probe"  # the spec key under which the runner passes down an earlier probe


# ---------------------------------------------------------------------------------------------------- the record


@dataclass
class PhaseStats:
    """One phase's counters. Memory counters name their counter and unit; unknown keys stay in `extra`.

    Absent and None are the same here: a counter this device or harness did not measure is left out of the JSON.
    """

    time_ms: float | None = None  # CUDA events on the compute stream (host clock on CPU)
    wall_ms: float | None = None  # host clock after a synchronize
    alloc_peak_allocated_bytes: int | None = None  # PyTorch caching allocator, reset at phase start
    alloc_peak_reserved_bytes: int | None = None
    alloc_end_allocated_bytes: int | None = None
    nvml_proc_peak_bytes: int | None = None  # NVML per-process used memory, sampled
    ledger_peak_bytes: int | None = None  # weight bytes the harness's runtimes placed on the device
    ledger_end_bytes: int | None = None
    rss_peak_bytes: int | None = None  # host resident set, sampled
    pinned_requested_bytes: int | None = None  # host bytes this process page-locked, as asked for
    pinned_requested_peak_bytes: int | None = None
    pinned_registered_bytes: int | None = None  # ... pinned in place with cudaHostRegister (exact)
    pinned_via_allocator_bytes: int | None = None  # ... asked for through torch's caching host allocator
    pinned_torch_allocator_bytes: int | None = None  # what torch's caching host allocator holds (powers of two)
    pinned_regions: int | None = None
    # the SGLang backend's managers (harness.engine.layerwise): their host tensors by is_pinned(), whoever pinned
    # them, and the bytes SGLang registered itself with cudaHostRegister (0.5.23; now, at most, ranges), which none
    # of the counters above sees
    pinned_sglang_manager_bytes: int | None = None
    pageable_sglang_manager_bytes: int | None = None
    mapped_sglang_manager_bytes: int | None = None
    pinned_sglang_registered_bytes: int | None = None
    pinned_sglang_registered_peak_bytes: int | None = None
    pinned_sglang_registered_ranges: int | None = None
    kernel_vmlck_bytes: int | None = None
    kernel_vmpin_bytes: int | None = None
    device_weights_at_start: dict[str, int] | None = None  # per role: parameter bytes on the device
    device_weights_at_end: dict[str, int] | None = None
    forwards: int | None = None
    step_ms: list[float] | None = None  # per denoise step
    allocator: JsonObject | None = None  # the caching allocator's counters at the phase end (CUDA)
    reserved_attribution: JsonObject | None = None  # where reserved-over-allocated comes from (measure.py)
    empty_cache_freed_bytes: int | None = None  # reserved bytes empty_cache handed back after the phase
    extra: JsonObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhaseStats:
        known = _declared(cls)
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    def as_dict(self) -> JsonObject:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**{k: v for k, v in out.items() if v is not None}, **self.extra}

    def get(self, counter: str, default: Any = None) -> Any:
        """A counter by its record name (declared or extra), or `default` where this phase did not measure it."""
        value = getattr(self, counter) if counter in _declared(PhaseStats) else self.extra.get(counter)
        return default if value is None else value


@dataclass(frozen=True)
class Peaks:
    """Device-memory peaks on one counter: the load phase, the runtime phases (max of encode/denoise/decode),
    and their max."""

    counter: str
    load: int | None
    runtime: int | None
    peak: int | None

    def as_dict(self) -> JsonObject:
        return dataclasses.asdict(self)


@dataclass
class CellRecord:
    """One cell's record: the spec it ran, its fate, and what it measured. One JSON line per cell.

    Every declared field is written (null where it does not apply), so a reader sees one shape whatever the
    fate; keys a record carries beyond them are kept in `extra` and written back unchanged (a newer harness or a
    branch adding fields, e.g. resident layers, loses nothing through an older reader). The spec it ran is typed
    as the spec types it (`Card`, `RunSettings`, `OffloadFlags`, `Placement`, `RunOptions`) and written back in
    the JSON it was read from, byte for byte; nested sections the analysis reads as a whole (machine, guard,
    components, outputs, cap, engine) stay JSON objects.
    """

    cell_id: str
    status: Status
    schema_version: int = SCHEMA_VERSION
    created: str | None = None
    # the spec, as the parent's cell and the child's CellSpec say it
    scenario: str | None = None
    scenario_file: str | None = None
    model: str | None = None
    card: Card | None = None
    settings: RunSettings | None = None  # its cfg_batch is run_options.cfg_batch (not written in settings)
    device: str | None = None
    policy: str | None = None
    backend: str = Backend.HARNESS
    spec_hash: str | None = None
    portable_spec_hash: str | None = None
    same_as: str | None = None  # the cell whose record this copies (same effective flags), or None
    # the flags: requested, what the policy made of them, and why
    requested: OffloadFlags = field(default_factory=OffloadFlags)
    effective: OffloadFlags = field(default_factory=OffloadFlags)
    messages: list[str] = field(default_factory=list)
    engine: JsonObject | None = None  # what SGLang's ServerArgs answered (engine policies only)
    placements: dict[str, Placement] = field(default_factory=dict)  # per role, from the effective flags
    run_options: RunOptions | None = None  # every run option of the cell (the spec's `run`)
    # the fate
    failed_phase: str | None = None
    reason: str | None = None
    traceback: str | None = None
    signal: int | None = None
    exit_code: int | None = None
    log_tail: str | None = None
    # what the child measured
    phases: dict[str, PhaseStats] = field(default_factory=dict)
    rounds: JsonObject | None = None  # per measured round: each phase's time and their sum, and their spread
    telemetry: JsonObject | None = None  # per pipeline call: machine state per step, allocator, host memory
    copy_timeline: JsonObject | None = None  # whether our runtime's copy stream was recorded (run option)
    cache_release: JsonObject | None = None  # empty_cache at SGLang's release points and after packing (run options)
    components: JsonObject | None = None
    outputs: JsonObject | None = None
    latents_path: str | None = None
    guard: JsonObject | None = None
    machine: JsonObject | None = None
    cap: JsonObject | None = None
    trace: list[Any] = field(default_factory=list)
    checkpoint_s: float | None = None
    child_elapsed_s: float | None = None
    rss_start_bytes: int | None = None
    rss_end_bytes: int | None = None
    ru_maxrss_bytes: int | None = None
    # what the parent saw
    run_id: str | None = None
    git_sha: str | None = None
    elapsed_s: float | None = None
    returncode: int | None = None
    child_pid: int | None = None
    log: str | None = None
    gpu_index: str | int | None = None
    xdist_worker: str | None = None
    runner_host: str | None = None  # the host whose runner ran it (a merged run shows which machine ran what)
    shard: str | None = None  # the --shard i/N it belonged to
    overhead: JsonObject | None = None  # the cell's fixed cost: process start, imports, guards, probe, teardown
    plan: JsonObject | None = None  # what the planner (harness.plan.planner) predicted for the cell
    # the layerwise runtime's variant: written only off its default (WRITTEN_OFF_DEFAULT), so the records of the
    # default runtime keep their bytes; the records of the other are told by their migration (`_migrate_v1`)
    layer_pool: LayerPool = LayerPool.COMPUTE_STREAM
    extra: JsonObject = field(default_factory=dict)

    @classmethod
    def begin(cls, spec: CellSpec, status: Status = Status.ERROR, created: str | None = None) -> CellRecord:
        """The record header of a cell: its spec (scenario, model, card, settings, device, backend), the
        resolution the parent made (policy, requested, effective, messages, engine) and the placements its
        effective flags give. The one constructor of a header: the child's record starts here (an error until it
        says otherwise) and so does the parent's for a cell whose child left none (crash, timeout, skip).

        Raises:
            ValueError: the spec carries no resolution (the parent resolves: harness.run.runner.spec_for_child).
        """
        if spec.resolution is None:
            raise ValueError(f"{spec.cell_id}: the cell spec carries no resolution; the parent resolves the policy "
                             "(harness.run.runner.spec_for_child)")
        resolved = spec.resolution
        effective = OffloadFlags.from_mapping(resolved["effective"], "resolution.effective")
        return cls(
            cell_id=spec.cell_id, status=status, created=created, scenario=spec.scenario,
            scenario_file=spec.scenario_file, model=spec.model, card=spec.card, settings=spec.settings,
            device=spec.device, backend=spec.backend, run_options=spec.run, policy=resolved["policy"],
            requested=OffloadFlags.from_mapping(resolved["requested"], "resolution.requested"), effective=effective,
            messages=list(resolved["messages"]), engine=resolved.get("engine"),
            placements={role: Placement.for_role(role, effective, spec.backend) for role in ROLES},
        )

    # ------------------------------------------------------------------------------------------------ JSON edge

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "record") -> CellRecord:
        """A record from its JSON object, migrated to SCHEMA_VERSION.

        Raises:
            RecordError: no integer schema_version, a newer one, no cell_id or an unknown status.
        """
        data = migrate(data, where)
        known = _declared(cls)
        values = {k: v for k, v in data.items() if k in known}
        values["status"] = Status(data["status"])
        values["layer_pool"] = LayerPool(data.get("layer_pool", LayerPool.COMPUTE_STREAM))
        values["phases"] = {name: PhaseStats.from_dict(p) for name, p in (data.get("phases") or {}).items()}
        values.update(_typed_spec(data, where))
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_json(cls, line: str, where: str = "record") -> CellRecord:
        return cls.from_dict(json.loads(line), where)

    def to_dict(self) -> JsonObject:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("extra", *WRITTEN_OFF_DEFAULT)}
        out["status"] = str(self.status)
        if self.layer_pool is not LayerPool.COMPUTE_STREAM:
            out["layer_pool"] = str(self.layer_pool)
        out["phases"] = {name: p.as_dict() for name, p in self.phases.items()}
        out.update(card=None if self.card is None else self.card.as_dict(),
                   settings=None if self.settings is None else self.settings.as_dict(),
                   requested=self.requested.as_dict(), effective=self.effective.as_dict(),
                   placements={role: str(p) for role, p in self.placements.items()},
                   run_options=None if self.run_options is None else self.run_options.as_dict())
        return {**out, **self.extra}

    def to_json(self) -> str:
        """One line, keys sorted (the form `results.append_record` writes)."""
        return dumps_line(self.to_dict())

    # ----------------------------------------------------------------------------------- what readers ask of it

    @property
    def fate(self) -> str:
        """"ok", "oom in load", ...: the fate in words."""
        return fate_text(self.status, self.failed_phase)

    @property
    def flags_label(self) -> str:
        """The requested flags' short label (`cpu1-lw1-te0-vae0-pf1-pin1`)."""
        return self.requested.label()

    @property
    def cfg_batch(self) -> bool:
        return self.run_options is not None and self.run_options.cfg_batch

    @property
    def label(self) -> str:
        """The cell within its scenario and card: the flags label, plus `+cfg-batch` and `+<backend>` as in the id."""
        return self.flags_label + _suffix(self.backend, self.cfg_batch)

    @property
    def backend_kind(self) -> Backend:
        return Backend.of(self.backend)

    @property
    def card_name(self) -> str | None:
        return None if self.card is None else self.card.name

    @property
    def sku(self) -> str | None:
        """The GPU SKU the child ran on (`machine.sku`: what baselines and planner profiles are keyed by)."""
        return (self.machine or {}).get("sku")

    @property
    def h2d_gbps(self) -> float | None:
        """The pinned host-to-device rate the cell's probe measured (or was handed down), GB/s."""
        return (self.machine or {}).get("pinned_h2d_gbps")

    @property
    def host(self) -> str | None:
        """The machine that ran the record: the runner's `runner_host`, else the child's `machine.host` (older
        records)."""
        return self.runner_host or (self.machine or {}).get("host")

    @property
    def cfg_passes_per_step(self) -> int:
        """`RunSettings.cfg_passes_per_step` of the cell (1 for a record without settings)."""
        return 1 if self.settings is None else self.settings.cfg_passes_per_step

    @property
    def dit_calls_per_step(self) -> int:
        """`RunSettings.dit_calls_per_step` of the cell (1 for a record without settings)."""
        return 1 if self.settings is None else self.settings.dit_calls_per_step

    @property
    def peak_counter(self) -> str:
        """The device-memory counter peaks are compared on: allocator reserved on CUDA (SGLang CI's choice),
        else the harness ledger (the CPU profile has no device allocator)."""
        return "alloc_peak_reserved_bytes" if self.device == "cuda" else "ledger_peak_bytes"

    @property
    def peaks(self) -> Peaks:
        """Load, runtime (max over encode/denoise/decode) and overall peak on `peak_counter`, computed from
        the phases (never stored: one source of truth)."""
        load = self.phase_max(self.peak_counter, (Phase.LOAD,))
        runtime = self.phase_max(self.peak_counter, RUNTIME_PHASES)
        both = [v for v in (load, runtime) if v is not None]
        return Peaks(self.peak_counter, load, runtime, max(both) if both else None)

    def phase_max(self, counter: str, phases: Iterable[str] = MEASURED_PHASES) -> Any:
        """The largest value of `counter` over `phases` that measured it, or None."""
        values = [p.get(counter) for name in phases if (p := self.phases.get(name)) is not None]
        values = [v for v in values if v is not None]
        return max(values) if values else None

    @property
    def loaded(self) -> bool:
        """Did the cell get past its load phase? (ok, or oom/error in a later phase.)"""
        if self.status is Status.OK:
            return True
        return self.status in (Status.OOM, Status.ERROR) and self.failed_phase in RUNTIME_PHASES

    def median_step_ms(self, skip_first: bool = False) -> float | None:
        """The median denoise step time. With `skip_first`, the first step (which also pays one-off costs:
        cuBLAS handles, kernel loading) is left out when there are more."""
        denoise = self.phases.get(Phase.DENOISE)
        return median_step((denoise.step_ms if denoise else None) or [], skip_first)

    @property
    def capped_after_load(self) -> bool:
        """The allocator was capped after the load (run option runtime_cap_mib), not from the start (a card cap)."""
        return (self.cap or {}).get("applied_after") == Phase.LOAD

    @property
    def skipped_by_guard(self) -> bool:
        """Skipped because a guard found the machine short (disk, host memory, a busy GPU): a state that changes,
        so a resumed run tries the cell again (harness.run.runner.Run.finished)."""
        return self.status is Status.SKIPPED and bool((self.guard or {}).get("failed"))

    def steady_step_ms(self) -> float | None:
        """ms/step by STEP_CONVENTION: the median denoise step from the second on (the only step, if one)."""
        return self.median_step_ms(skip_first=True)

    def first_step_ms(self) -> float | None:
        denoise = self.phases.get(Phase.DENOISE)
        steps = (denoise.step_ms if denoise else None) or []
        return steps[0] if steps else None

    def median_step_s(self) -> float | None:
        """`steady_step_ms` in seconds (roofline, beats_peer)."""
        ms = self.steady_step_ms()
        return None if ms is None else ms / 1e3

    def recorded_with(self, spec_hash: str) -> bool:
        """This record stands for a finished run of the spec with `spec_hash`."""
        return self.spec_hash == spec_hash


WRITTEN_OFF_DEFAULT = ("layer_pool",)
"""Declared fields a record writes only where they differ from their default: fields added after records were
committed, whose default is what every committed record without them ran."""


# A capacity probe's scenario is named `<scenario>@<axis>-<value>` (harness.run.capacity): one cell per probe.
PROBE_MARK = "@"


def is_probe(scenario_name: str | None) -> bool:
    return PROBE_MARK in str(scenario_name or "")


# The one meaning of "ms/step" in the report, the baseline metric (denoise_steady_step_ms), the roofline and the
# README: the first step also pays one-off costs (cuBLAS handles, kernel loading, the first layerwise window), so it
# is left out when there are more, and shown on its own as "first step".
STEP_CONVENTION = "median of steps 2..n"


def median_step(step_ms: list[float], skip_first: bool) -> float | None:
    """The median of per-step times; with `skip_first`, of steps 2..n when there are more than one (the first step
    also pays one-off costs: cuBLAS handles, kernel loading)."""
    steps = step_ms[1:] if skip_first and len(step_ms) > 1 else step_ms
    return statistics.median(steps) if steps else None


Record = CellRecord | Mapping[str, Any]  # a record, or its JSON object as read from a records file


def as_record(data: Record) -> CellRecord:
    """`data` as a CellRecord (a record already is one)."""
    return data if isinstance(data, CellRecord) else CellRecord.from_dict(data)


def dumps_line(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def _declared(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls) if f.name != "extra")


def _typed_spec(data: Mapping[str, Any], where: str) -> JsonObject:
    """The spec sections of a (migrated) record's JSON as the spec types them (None stays None).

    Raises:
        RecordError: a section its type cannot read, naming the record and the section.
    """

    def read(section: str, parse: Callable[[Any], Any], absent: Any = None) -> Any:
        value = data.get(section)
        try:
            return absent if value is None else parse(value)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise RecordError(f"{where}: {section}: {type(e).__name__}: {e}") from None

    run = read("run_options", RunOptions.from_dict)
    return {
        "run_options": run,
        "card": read("card", Card.from_dict),
        "settings": read("settings", lambda s: RunSettings.from_dict(s, bool(run and run.cfg_batch))),
        "placements": read("placements", lambda p: {role: Placement(v) for role, v in p.items()}, {}),
        "requested": read("requested", lambda f: OffloadFlags.from_mapping(f, f"{where}: requested"), OffloadFlags()),
        "effective": read("effective", lambda f: OffloadFlags.from_mapping(f, f"{where}: effective"), OffloadFlags()),
    }


# -------------------------------------------------------------------------------------------------- migrations


def _migrate_v1(rec: JsonObject) -> JsonObject:
    """v1 -> v2: peaks are computed (`CellRecord.peaks`), not stored beside the phases they come from; a record
    from before backends ran the harness's runtime, the variant that took its layer buffers from the copy
    stream's pool (`LayerPool.COPY_STREAM`: a record without a backend was written by it, and every record that
    names its backend by the compute-stream runtime); diffusers' pinned copies take the name of the counter they
    are (`pinned_torch_allocator_bytes`); the flags a v1 record names come with every flag (those added since, at
    the defaults it ran), its settings with frames (1: a v1 record without them is of an image model), as the
    typed record writes them; every declared field is present, null where it does not apply."""
    rec = {k: v for k, v in rec.items() if k != "peaks"}
    for key in ("requested", "effective"):
        if isinstance(rec.get(key), dict):
            rec[key] = OffloadFlags.from_mapping(rec[key], f"v1 record: {key}").as_dict()
    if isinstance(rec.get("settings"), dict):
        rec["settings"].setdefault("frames", 1)
    if "backend" not in rec:
        rec["backend"] = Backend.HARNESS.value
        rec["layer_pool"] = LayerPool.COPY_STREAM.value
    group = ((rec.get("components") or {}).get("dit") or {}).get("diffusers_group")
    if group is not None and "pinned_allocator_bytes" in group:
        group["pinned_torch_allocator_bytes"] = group.pop("pinned_allocator_bytes")
    defaults = CellRecord(cell_id="", status=Status.OK).to_dict()
    for key in _V2_FIELDS:
        rec.setdefault(key, defaults[key])
    rec["schema_version"] = 2
    return rec


_V2_FIELDS = tuple(f.name for f in fields(CellRecord) if f.name not in ("extra", *WRITTEN_OFF_DEFAULT))
_MIGRATIONS = {1: _migrate_v1}


def migrate(data: Mapping[str, Any], where: str = "record") -> JsonObject:
    """A copy of record `data` brought up to SCHEMA_VERSION, one `_migrate_vN` step at a time.

    Raises:
        RecordError: no integer schema_version, a newer one than this harness, no cell_id or an unknown status.
    """
    rec = json.loads(json.dumps(data))  # a deep copy: the steps edit nested sections
    version = rec.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RecordError(f"{where}: record has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise RecordError(f"{where}: schema_version {version} is newer than this harness ({SCHEMA_VERSION})")
    if not isinstance(rec.get("cell_id"), str):
        raise RecordError(f"{where}: record has no cell_id")
    if rec.get("status") not in set(Status):
        raise RecordError(f"{where}: status {rec.get('status')!r} is not one of {STATUSES}")
    while version < SCHEMA_VERSION:
        try:
            rec = _MIGRATIONS[version](rec)
        except ValueError as e:  # a section the step cannot bring up (a FlagError: flags no reader takes)
            raise RecordError(f"{where}: {e}") from None
        version = rec["schema_version"]
    return rec
