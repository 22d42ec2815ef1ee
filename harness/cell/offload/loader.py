"""The loader: checkpoint -> module, placed where the effective flags say.

Placement of each component follows the engine's rules (SGLang, June 2026, see the reference note §3):
- `resident`: every weight is materialised on the device as it is read. With a DiT too large for the card this
  is where the OOM happens, which is the #26925 failure when dit_cpu_offload was forced off.
- `cpu-offload`: weights go into one host region; the component moves to the device only while it runs.
- `layerwise`: with dit_cpu_offload on, checkpoint bytes go straight into the per-layer host regions and only the
  non-layer weights reach the device. With dit_cpu_offload off the engine first materialises the whole DiT on the
  device and then packs it to the host, so the load peak is the whole DiT.
- `diffusers-group-offload` (a scenario's `backends` other than "harness", with layerwise on): the peer of our
  layerwise runtime. The DiT is read into a plain pageable host region (as `from_pretrained` leaves a model on the
  host), then diffusers' own `apply_group_offloading` takes over: block level, one block per group, a side stream,
  `record_stream` for the "-rs" backend. diffusers pins its own copy of every block tensor through torch's caching
  host allocator (rounded up to powers of two; the record's `pinned_torch_allocator_bytes` shows it), after which
  the pageable region is freed. Its hooks move the weights; the harness never does.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from harness.cell.checkpoint import CheckpointError, CheckpointReader, open_checkpoint
from harness.cell.offload.component import ComponentOffload
from harness.cell.offload.layerwise import LayerwiseRuntime
from harness.cell.offload.memory import Device, HostRegion, torch_pinned_block_bytes
from harness.common.contract import Backend, Placement
from harness.common.flags import OffloadFlags
from harness.models import ComponentSpec


def layerwise_tuning(role: str, flags: OffloadFlags | None, prefetch_size: float) -> tuple[float, float, str]:
    """Prefetch size, resident layers and residency policy for a layerwise component (SGLang's
    `layerwise_tuning_for`): its per-component map entry, else the `dit_*` values for the DiT and 0 / 0 / leading
    for the others."""
    if flags is None:
        return (prefetch_size, 0.0, "leading")
    return flags.layerwise_tuning(role, prefetch_size)


class OffloadRuntime(Protocol):
    """What moves a loaded component's weights between uses: one per placement (`_PLACERS`), so a new placement
    (a backend, resident layers) plugs in by giving these four methods."""

    def before_use(self) -> None:
        """Brings what the component needs onto the device before a pipeline stage uses it."""

    def after_use(self) -> None:
        """Gives the device back after the stage."""

    def describe(self) -> dict[str, Any]:
        """Record sections for the component (e.g. {"layerwise": {...}}); empty when there is nothing to say."""

    def device_weight_bytes(self, device: Device) -> int | None:
        """Weight bytes on the device now when the runtime knows better than the parameters, else None."""


class _Resident:
    """Resident weights: nothing moves."""

    def before_use(self) -> None:
        pass

    def after_use(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {}

    def device_weight_bytes(self, device: Device) -> int | None:
        return None


class _DiffusersGroup(_Resident):
    """diffusers' hooks onload each block as its forward starts (the next one prefetched on their stream) and
    offload it as it ends, so between forwards no weight is on the device: before/after use are no-ops."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info

    def describe(self) -> dict[str, Any]:
        return {"diffusers_group": dict(self.info)}


class _SGLang(_Resident):
    """SGLang's managers (harness.engine.layerwise.SGLangLayerwise) with their per-use lifecycle."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def before_use(self) -> None:
        self.engine.before_use()

    def after_use(self) -> None:
        self.engine.after_use()

    def describe(self) -> dict[str, Any]:
        return {"sglang_layerwise": self.engine.describe()}

    def host_counters(self) -> dict[str, int]:
        """What SGLang's managers hold on the host now, by the harness's counters (`SGLangLayerwise.host_counters`)."""
        return self.engine.host_counters()


@dataclass
class LoadedComponent:
    """A component ready to run, with what it cost to set up."""

    role: str
    module: torch.nn.Module
    placement: Placement
    weight_bytes: int
    runtime: OffloadRuntime
    setup_s: dict[str, float] = field(default_factory=dict)

    def before_use(self) -> None:
        self.runtime.before_use()

    def after_use(self) -> None:
        self.runtime.after_use()

    def host_counters(self) -> dict[str, int]:
        """Phase counters of host memory the runtime holds that the harness's pinned ledger does not see (a
        runtime with a `host_counters()`: SGLang's managers); {} for the others."""
        counters = getattr(self.runtime, "host_counters", None)
        return counters() if counters is not None else {}

    def device_weight_bytes(self, device: Device) -> int:
        """Parameter bytes of this component that live on `device` now (placeholders are empty).

        On CUDA this reads where every parameter really is. On the CPU profile host and "device" are the same
        memory, so a CPU-offloaded component reports its runtime's state instead.
        """
        known = self.runtime.device_weight_bytes(device)
        if known is not None:
            return known
        return sum(
            p.numel() * p.element_size() for p in self.module.parameters() if p.device == device.torch and p.numel()
        )

    def describe(self) -> dict[str, Any]:
        total = self.setup_s.get("total_s") or 0.0
        return {
            "placement": str(self.placement),
            "weight_bytes": self.weight_bytes,
            "setup_s": {k: round(v, 4) for k, v in self.setup_s.items()},
            "setup_gbps": round(self.weight_bytes / total / 1e9, 3) if total else None,
            **self.runtime.describe(),
        }


def _set_tensor(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _check_names(module: torch.nn.Module, reader: CheckpointReader) -> None:
    want = set(module.state_dict())
    have = set(reader.names())
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        raise CheckpointError(
            f"{reader.path}: does not match {type(module).__name__}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
        )


class _Staging:
    """Two pinned host buffers that alternate: the file read into one overlaps the H2D copy out of the other."""

    def __init__(self, nbytes: int) -> None:
        self.regions = [HostRegion(nbytes, pin=True) for _ in range(2)]
        for r in self.regions:
            r.pin()
        self.events: list[Any] = [None, None]
        self.turn = 0

    def next(self) -> torch.Tensor:
        self.turn ^= 1
        if self.events[self.turn] is not None:
            self.events[self.turn].synchronize()  # the copy that last read this buffer has finished
        return self.regions[self.turn].tensor

    def copied(self) -> None:
        ev = torch.cuda.Event()
        ev.record()
        self.events[self.turn] = ev

    def close(self) -> None:
        torch.cuda.synchronize()
        for r in self.regions:
            r.release()


def _materialise(module: torch.nn.Module, reader: CheckpointReader, device: Device, names: list[str]) -> None:
    """Reads each named tensor from the checkpoint onto the device, one at a time, as the engine's loader does.

    On CUDA the bytes go file -> pinned staging -> device (the staging pair lets the read of one tensor overlap
    the copy of the previous one); on the CPU profile straight into the "device" tensor.
    """
    staging = _Staging(max((reader.nbytes(n) for n in names), default=0)) if device.is_cuda and names else None
    try:
        for name in names:
            e = reader.entries[name]
            dst = device.empty(e.nbytes, name).view(e.dtype).view(e.shape)
            if staging is None:
                reader.read_into(name, dst)
            else:
                host = staging.next()[: e.nbytes].view(e.dtype).view(e.shape)
                reader.read_into(name, host)
                dst.copy_(host, non_blocking=True)
                staging.copied()
            _set_tensor(module, name, dst)
    finally:
        if staging is not None:
            staging.close()


def _place_buffers(module: torch.nn.Module, device: Device, buffers: bool = True) -> None:
    """Non-persistent buffers (RoPE tables) are computed at build time on the host; move them once.

    With `buffers=False` only the plain tensor attributes move: diffusers' group offload moves a module's buffers
    with its weights, but never looks at plain attributes.
    """
    for owner in module.modules() if buffers else ():
        for attr, buf in list(owner._buffers.items()):
            if buf is not None and buf.device != device.torch:
                owner._buffers[attr] = buf.to(device.torch)
    # diffusers' QwenEmbedRope keeps its tables as plain attributes, not buffers.
    for owner in module.modules():
        for attr, value in list(vars(owner).items()):
            if isinstance(value, torch.Tensor) and not attr.startswith("_") and value.device != device.torch:
                setattr(owner, attr, value.to(device.torch))


@dataclass
class _Load:
    """What every placer gets: the module on meta, its checkpoint, the device and the flags that matter."""

    spec: ComponentSpec
    module: torch.nn.Module
    reader: CheckpointReader
    device: Device
    pin: bool
    prefetch_size: float
    backend: str
    flags: OffloadFlags | None
    clock: _Clock

    @property
    def persistent_buffers(self) -> list[str]:
        in_file = set(self.reader.names())
        return [n for n, _ in self.module.named_buffers() if n in in_file]


def load_component(
    spec: ComponentSpec,
    checkpoint: Path,
    placement: Placement,
    device: Device,
    *,
    pin: bool,
    prefetch_size: float = 0.0,
    backend: str = "harness",
    flags: OffloadFlags | None = None,
) -> LoadedComponent:
    """Builds `spec`'s module on meta, fills it from `checkpoint` and places it (one `_place_*` per placement).

    Setup times are recorded per step: build (module on meta), alloc (host regions), read (file -> host
    regions), pin (page-locking them; under DIFFUSERS_GROUP, diffusers' setup, which pins its copies), place
    (file -> device). `backend` matters only for DIFFUSERS_GROUP ("diffusers-group-rs": record_stream on).

    Raises:
        CheckpointError: the file does not match the module.
        torch.OutOfMemoryError: the device ran out while placing (the caller records the phase).
        RuntimeError: a placement that needs CUDA on another device, or DIFFUSERS_GROUP without a diffusers
            backend.
    """
    placement = Placement(placement)
    if placement.needs_cuda and not device.is_cuda:
        raise RuntimeError(f"{placement}: {placement.needs_cuda}")
    if placement is Placement.DIFFUSERS_GROUP and not Backend.of(backend).is_diffusers:
        raise RuntimeError(f"{placement}: backend {backend!r} is not a diffusers backend")
    clock = _Clock()
    module = spec.build_on_meta()
    reader = open_checkpoint(checkpoint)  # a synthetic file, or a pipeline folder's component
    _check_names(module, reader)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    clock.lap("build_s")
    load = _Load(spec, module, reader, device, pin, prefetch_size, backend, flags, clock)
    runtime = _PLACERS[placement](load, placement)
    _place_buffers(module, device, buffers=placement is not Placement.DIFFUSERS_GROUP)
    if device.is_cuda:
        torch.cuda.synchronize(device.torch)
    clock.lap("place_s")
    clock.laps["total_s"] = clock.total()
    return LoadedComponent(spec.role, module, placement, weight_bytes, runtime, setup_s=clock.laps)


def _place_resident(load: _Load, placement: Placement) -> OffloadRuntime:
    _materialise(load.module, load.reader, load.device, list(load.reader.names()))
    load.clock.lap("place_s")
    return _Resident()


def _place_cpu_offload(load: _Load, placement: Placement) -> OffloadRuntime:
    offload = ComponentOffload(load.module, load.device, load.pin, load.spec.role)
    load.clock.lap("alloc_s")
    offload.fill(load.reader.read_into)
    load.clock.lap("read_s")
    offload.pin()
    load.clock.lap("pin_s")
    _materialise(load.module, load.reader, load.device, load.persistent_buffers)
    load.clock.lap("place_s")
    return offload


def _place_layerwise(load: _Load, placement: Placement) -> OffloadRuntime:
    """Our layerwise runtime. From the host: checkpoint bytes go straight into the per-layer host regions. From
    the device: what the engine does when dit_cpu_offload is off, the whole DiT lands on the device first and is
    then packed to the host."""
    module, reader, device, clock = load.module, load.reader, load.device, load.clock
    from_host = placement is Placement.LAYERWISE_FROM_HOST
    if not from_host:
        _materialise(module, reader, device, list(reader.names()))
        clock.lap("place_s")
    live = dict(module.named_parameters())  # the device copies, if any, read once by fill() below
    prefetch, resident, policy = layerwise_tuning(load.spec.role, load.flags, load.prefetch_size)
    rt = LayerwiseRuntime(module, load.spec.layer_groups, device, prefetch, pin=load.pin, resident_layers=resident,
                          residency_policy=policy)
    clock.lap("alloc_s")
    if from_host:
        rt.fill(reader.read_into)
    else:
        rt.fill(lambda name, dst: dst.copy_(live[name].data))
        device.discharge(rt.param_bytes())  # layer weights now live in the host regions: free the device copies
    live.clear()
    clock.lap("read_s")
    rt.pin()
    clock.lap("pin_s")
    if from_host:
        _materialise(module, reader, device, [n for n in reader.names() if n not in rt.layer_param_names])
        clock.lap("place_s")
    rt.attach()
    return rt


def _place_diffusers_group(load: _Load, placement: Placement) -> OffloadRuntime:
    return _DiffusersGroup(_diffusers_group(load))


def _place_sglang(load: _Load, placement: Placement) -> OffloadRuntime:
    return _SGLang(_sglang_layerwise(load))


_PLACERS: dict[Placement, Callable[[_Load, Placement], OffloadRuntime]] = {
    Placement.RESIDENT: _place_resident,
    Placement.CPU_OFFLOAD: _place_cpu_offload,
    Placement.LAYERWISE_FROM_HOST: _place_layerwise,
    Placement.LAYERWISE_FROM_DEVICE: _place_layerwise,
    Placement.DIFFUSERS_GROUP: _place_diffusers_group,
    Placement.SGLANG_LAYERWISE: _place_sglang,
}


def _read_to_host(load: _Load) -> ComponentOffload:
    """The whole state dict into pageable host memory, as `from_pretrained` (and SGLang's CPU load) leaves a model:
    parameters into one region (ComponentOffload's fill), the persistent buffers beside them."""
    host = ComponentOffload(load.module, load.device, False, load.spec.role)
    load.clock.lap("alloc_s")
    host.fill(load.reader.read_into)
    for name in load.persistent_buffers:
        e = load.reader.entries[name]
        buf = torch.empty(e.shape, dtype=e.dtype)
        load.reader.read_into(name, buf)
        _set_tensor(load.module, name, buf)
    load.clock.lap("read_s")
    return host


def maps_checkpoint(version: str) -> bool:
    """Whether `version`'s manager plans host memory per layer against the host's available memory (0.5.23's
    `_plan_layer_hosting` with its HostPinBudget): its loader then hands the manager views of the checkpoint's
    mapping, and so must the harness (`_map_to_host`). Releases without the plan get `_read_to_host`'s copy, as
    their CPU load leaves a model. A release that is not installed: False (load_engine then says how to install)."""
    from harness.engine.layerwise import EngineUnavailable, load_engine

    try:
        layerwise = load_engine(version)[0]
    except EngineUnavailable:
        return False
    return hasattr(getattr(layerwise, "LayerwiseOffloadManager", None), "_plan_layer_hosting")


def _map_to_host(load: _Load) -> None:
    """Every checkpoint tensor of the module as a view of the checkpoint's mapping, as SGLang 0.5.23's loader
    leaves a host-bound model (`runtime/loader/weight_utils.py`: `safe_open(...).get_tensor` keeps the mapping).
    Its pages are page cache, which the manager's HostPinBudget reading (MemAvailable) counts as available; the
    anonymous copy of `_read_to_host` is not, and with the 40.8 GB Qwen-Image DiT alive at that reading the budget
    pinned 49 of 60 blocks (results/h200/qwen-image-peer-sglang.records.jsonl;
    docs/findings/sglang-pin-budget-handover.md)."""
    for name in load.reader.names():
        _set_tensor(load.module, name, load.reader.tensor(name))
    load.clock.lap("read_s")


def _diffusers_group(load: _Load) -> dict[str, Any]:
    """DIFFUSERS_GROUP: the weights into a plain pageable host region (diffusers pins its own copies), then
    diffusers' `apply_group_offloading`; returns what it set up, for the record."""
    import diffusers
    from diffusers.hooks import apply_group_offloading

    host = _read_to_host(load)
    options = {"offload_type": "block_level", "num_blocks_per_group": 1, "use_stream": True,
               "record_stream": Backend.of(load.backend) is Backend.DIFFUSERS_GROUP_RS, "non_blocking": True}
    apply_group_offloading(load.module, onload_device=load.device.torch, offload_device=torch.device("cpu"),
                           **options)
    load.clock.lap("pin_s")
    info = _describe_groups(load.module, host.region.nbytes)
    # The group of non-block weights has no stream and no pinned copy: its tensors still view the pageable region,
    # which would keep all of it alive. Give them their own (small) storage; the region goes with `host`.
    begin = host.region.tensor.data_ptr()
    end = begin + host.region.nbytes
    for t in itertools.chain(load.module.parameters(), load.module.buffers()):
        if t.device.type == "cpu" and begin <= t.data_ptr() < end:
            t.data = t.data.clone()
    del host
    load.clock.lap("place_s")
    return {"backend": load.backend, "diffusers": diffusers.__version__, **options, **info}


def _sglang_layerwise(load: _Load) -> Any:
    """SGLANG_LAYERWISE: the weights where SGLang's loader leaves them (host with dit_cpu_offload, else the whole
    DiT on the device), then SGLang's own mixin and managers take the DiT over (harness.engine.layerwise)."""
    from harness.engine.layerwise import SGLangLayerwise
    from harness.engine.policy import available_versions

    if load.flags is None:
        raise ValueError(f"{Placement.SGLANG_LAYERWISE} needs the effective flags")
    if load.backend == "sglang":
        versions = available_versions()
        version = versions[-1] if versions else "(none installed)"  # load_engine then says how to install one
    else:
        version = load.backend.partition("@")[2]
    # Without dit_cpu_offload SGLang's loader puts the whole DiT on the device first.
    host, handover = None, "device"
    if load.flags.dit_cpu_offload and maps_checkpoint(version):
        _map_to_host(load)
        handover = "checkpoint mapping"
    elif load.flags.dit_cpu_offload:
        host, handover = _read_to_host(load), "anonymous copy"
    else:
        _materialise(load.module, load.reader, load.device, list(load.reader.names()))
        load.clock.lap("place_s")
    engine = SGLangLayerwise(load.module, load.spec.layer_groups, load.flags, version)
    engine.info["host_handover"] = handover
    load.clock.lap("pin_s")
    if host is not None:
        # The non-layer weights went to the device with the mixin's module.to(); nothing views the region now
        # but the module's plain tensor attributes (RoPE tables), which _place_buffers moves below.
        del host
    elif handover == "device":
        load.device.discharge(sum(g["host_bytes"] for g in engine.describe()["groups"].values()))
    return engine


def _describe_groups(module: torch.nn.Module, host_bytes: int) -> dict[str, Any]:
    """diffusers' module groups on `module`: how many, the bytes they move, and the host bytes they pinned."""
    groups: dict[int, Any] = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            groups.setdefault(id(hook.group), hook.group)

    def tensors(group: Any) -> list[torch.Tensor]:
        out = [t for m in group.modules for t in itertools.chain(m.parameters(), m.buffers())]
        out += list(group.parameters) + list(group.buffers)
        return list({id(t): t for t in out}.values())

    def nbytes(ts: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    streamed = [g for g in groups.values() if g.stream is not None]
    unstreamed = [g for g in groups.values() if g.stream is None]
    pinned = [t for g in streamed for t in g.cpu_param_dict.values()]
    return {
        "groups": len(streamed),
        # moved host -> device on diffusers' side stream, one block per group, every forward
        "streamed_bytes": sum(nbytes(tensors(g)) for g in streamed),
        # the non-block weights: moved to the device synchronously before each forward, and back after it
        "unstreamed_bytes": sum(nbytes(tensors(g)) for g in unstreamed),
        "host_bytes": host_bytes,  # the pageable region the checkpoint was read into (freed once diffusers pinned)
        "pinned_requested_bytes": nbytes(pinned),  # diffusers' pinned copies, as asked for
        # what torch's caching host allocator holds for them: each tensor rounded up to a power of two
        "pinned_torch_allocator_bytes": sum(torch_pinned_block_bytes(t.numel() * t.element_size()) for t in pinned),
        "pinned": bool(pinned) and all(t.is_pinned() for t in pinned),
    }


class _Clock:
    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.t0
