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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.flags import OffloadFlags
from harness.models import ComponentSpec
from harness.models.checkpoint import CheckpointError, CheckpointReader
from harness.offload.component import ComponentOffload
from harness.offload.layerwise import LayerwiseRuntime
from harness.offload.memory import Device, HostRegion, pinned_allocator_bytes

DIFFUSERS_GROUP = "diffusers-group-offload"
PLACEMENTS = ("resident", "cpu-offload", "layerwise-from-host", "layerwise-from-device", DIFFUSERS_GROUP)
DIFFUSERS_BACKENDS = ("diffusers-group", "diffusers-group-rs")  # harness.scenario.BACKENDS other than "harness"
DIFFUSERS_NEEDS_CUDA = "diffusers group offload with streams needs CUDA"
SGLANG_LAYERWISE = "sglang-layerwise"  # SGLang's LayerwiseOffloadManager on the DiT (harness.engine.layerwise)
PLACEMENTS = (*PLACEMENTS, SGLANG_LAYERWISE)
SGLANG_NEEDS_CUDA = "SGLang's layerwise manager enables itself only on CUDA"


def is_sglang_backend(backend: str) -> bool:
    """"sglang" (the newest installed release) or "sglang@<version>"."""
    return backend == "sglang" or backend.startswith("sglang@")


def placement_for(role: str, flags: OffloadFlags, backend: str = "harness") -> str:
    """Where the loader puts component `role` under the effective `flags` and the cell's `backend`.

    A diffusers backend changes only the layerwise DiT (whatever dit_cpu_offload says, diffusers' hooks stream it
    from the host); every other component and cell runs as under the harness backend.
    """
    if backend != "harness" and backend not in DIFFUSERS_BACKENDS and not is_sglang_backend(backend):
        raise ValueError(f"unknown backend {backend!r}")
    if role == "dit":
        if flags.dit_layerwise_offload:
            if backend in DIFFUSERS_BACKENDS:
                return DIFFUSERS_GROUP
            if is_sglang_backend(backend):
                return SGLANG_LAYERWISE
            return "layerwise-from-host" if flags.dit_cpu_offload else "layerwise-from-device"
        return "cpu-offload" if flags.dit_cpu_offload else "resident"
    if role in ("text_encoder", "vae"):
        # a component selected for layerwise offload streams from the host whatever its CPU-offload flag says
        # (SGLang's residency_mode: an explicit layerwise selection wins, and the selection clears the flag)
        if role in selected_layerwise(flags):
            return "layerwise-from-host"
        on_host = flags.text_encoder_cpu_offload if role == "text_encoder" else flags.vae_cpu_offload
        return "cpu-offload" if on_host else "resident"
    raise ValueError(f"unknown component role {role!r}")


def selected_layerwise(flags: OffloadFlags) -> set[str]:
    """The zoo roles `layerwise_offload_components` selects ("all": every role; the DiT by its own flag)."""
    chosen = set(flags.layerwise_offload_components or ())
    roles = {"text_encoder", "vae", "dit"} if "all" in chosen else chosen & {"text_encoder", "vae", "dit"}
    return roles | ({"dit"} if flags.dit_layerwise_offload else set())


def layerwise_tuning(role: str, flags: OffloadFlags | None, prefetch_size: float) -> tuple[float, float, str]:
    """Prefetch size, resident layers and residency policy for a layerwise component (SGLang's
    `layerwise_tuning_for`): its per-component map entry, else the `dit_*` values for the DiT and 0 / 0 / leading
    for the others."""
    if flags is None:
        return (prefetch_size, 0.0, "leading")
    name = "transformer" if role == "dit" else role
    defaults = ((prefetch_size, flags.dit_layerwise_resident_layers, flags.dit_layerwise_residency_policy)
                if role == "dit" else (0.0, 0.0, "leading"))
    picked = [flags.component_value(m, name) for m in ("layerwise_prefetch_size", "layerwise_resident_layers",
                                                       "layerwise_residency_policy")]
    return tuple(d if v is None else v for v, d in zip(picked, defaults, strict=True))  # type: ignore[return-value]


@dataclass
class LoadedComponent:
    """A component ready to run, with what it cost to set up."""

    role: str
    module: torch.nn.Module
    placement: str
    weight_bytes: int
    offload: ComponentOffload | None = None
    layerwise: LayerwiseRuntime | None = None
    setup_s: dict[str, float] = field(default_factory=dict)
    diffusers_group: dict[str, Any] | None = None  # what diffusers' group offload set up (DIFFUSERS_GROUP only)
    sglang: Any = None  # harness.engine.layerwise.SGLangLayerwise (SGLANG_LAYERWISE only)

    # Under DIFFUSERS_GROUP both are no-ops: diffusers' hooks onload each block as its forward starts (the next one
    # prefetched on their stream) and offload it as it ends, so between forwards no weight is on the device.
    def before_use(self) -> None:
        if self.offload is not None:
            self.offload.onload()
        if self.sglang is not None:
            self.sglang.before_use()

    def after_use(self) -> None:
        if self.offload is not None:
            self.offload.offload()
        if self.layerwise is not None:
            self.layerwise.release_all()
        if self.sglang is not None:
            self.sglang.after_use()

    def device_weight_bytes(self, device: Device) -> int:
        """Parameter bytes of this component that live on `device` now (placeholders are empty).

        On CUDA this reads where every parameter really is. On the CPU profile host and "device" are the same
        memory, so a CPU-offloaded component reports its runtime's state instead.
        """
        if self.offload is not None and not device.is_cuda:
            return self.offload.layout.nbytes if self.offload.on_device else 0
        return sum(
            p.numel() * p.element_size() for p in self.module.parameters() if p.device == device.torch and p.numel()
        )

    def describe(self) -> dict[str, Any]:
        total = self.setup_s.get("total_s") or 0.0
        d: dict[str, Any] = {
            "placement": self.placement,
            "weight_bytes": self.weight_bytes,
            "setup_s": {k: round(v, 4) for k, v in self.setup_s.items()},
            "setup_gbps": round(self.weight_bytes / total / 1e9, 3) if total else None,
        }
        if self.layerwise is not None:
            d["layerwise"] = {
                "groups": {
                    g.name: {
                        "layers": len(g.layers),
                        "prefetch": g.prefetch,
                        "resident_layers": len(g.kept),
                        "residency_policy": g.policy,
                        "resident_bytes": g.kept_bytes(),
                        "streamed_layers": len(g.streamed),
                    }
                    for g in self.layerwise.groups
                },
                "host_bytes": self.layerwise.host_bytes,
                "resident_bytes": self.layerwise.kept_bytes(),
                "streamed_bytes": self.layerwise.streamed_bytes(),
                "param_bytes": self.layerwise.param_bytes(),
                "largest_layer_by_group": {
                    g.name: max(layout.nbytes for layout in g.layouts) for g in self.layerwise.groups
                },
                "pinned": self.layerwise.pinned,
                "largest_layer_bytes": max(self.layerwise.layer_bytes(), default=0),
                "fill": self.layerwise.fill_stats.as_dict() if self.layerwise.fill_stats else None,
            }
        if self.offload is not None:
            d["cpu_offload"] = {"host_bytes": self.offload.host_bytes, "pinned": self.offload.region.pinned,
                                "fill": self.offload.fill_stats.as_dict() if self.offload.fill_stats else None}
        if self.diffusers_group is not None:
            d["diffusers_group"] = dict(self.diffusers_group)
        if self.sglang is not None:
            d["sglang_layerwise"] = self.sglang.describe()
        return d


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


def load_component(
    spec: ComponentSpec,
    checkpoint: Path,
    placement: str,
    device: Device,
    *,
    pin: bool,
    prefetch_size: float = 0.0,
    backend: str = "harness",
    flags: OffloadFlags | None = None,
) -> LoadedComponent:
    """Builds `spec`'s module on meta, fills it from `checkpoint` and places it.

    Setup times are recorded per step: build (module on meta), alloc (host regions), read (file -> host
    regions), pin (page-locking them; under DIFFUSERS_GROUP, diffusers' setup, which pins its copies), place
    (file -> device). `backend` matters only for DIFFUSERS_GROUP ("diffusers-group-rs": record_stream on).

    Raises:
        CheckpointError: the file does not match the module.
        torch.OutOfMemoryError: the device ran out while placing (the caller records the phase).
        RuntimeError: DIFFUSERS_GROUP on a device that is not CUDA (DIFFUSERS_NEEDS_CUDA), or without a
            diffusers backend.
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if placement == DIFFUSERS_GROUP and (backend not in DIFFUSERS_BACKENDS or not device.is_cuda):
        why = f"backend {backend!r} is not one of {DIFFUSERS_BACKENDS}" if device.is_cuda else DIFFUSERS_NEEDS_CUDA
        raise RuntimeError(f"{placement}: {why}")
    if placement == SGLANG_LAYERWISE and not device.is_cuda:
        raise RuntimeError(f"{placement}: {SGLANG_NEEDS_CUDA}")
    clock = _Clock()
    module = spec.build_on_meta()
    reader = CheckpointReader(checkpoint)
    _check_names(module, reader)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    clock.lap("build_s")
    loaded = LoadedComponent(spec.role, module, placement, weight_bytes, setup_s=clock.laps)
    in_file = set(reader.names())
    persistent_buffers = [n for n, _ in module.named_buffers() if n in in_file]

    if placement == "resident":
        _materialise(module, reader, device, list(reader.names()))
        clock.lap("place_s")
    elif placement == "cpu-offload":
        loaded.offload = ComponentOffload(module, device, pin, spec.role)
        clock.lap("alloc_s")
        loaded.offload.fill(reader.read_into)
        clock.lap("read_s")
        loaded.offload.pin()
        clock.lap("pin_s")
        _materialise(module, reader, device, persistent_buffers)
        clock.lap("place_s")
    elif placement == DIFFUSERS_GROUP:
        loaded.diffusers_group = _diffusers_group(module, reader, persistent_buffers, device, backend, clock)
    elif placement == SGLANG_LAYERWISE:
        loaded.sglang = _sglang_layerwise(spec, module, reader, device, backend, flags, clock)
    else:
        if placement == "layerwise-from-device":
            # What the engine does when dit_cpu_offload is off: the whole DiT lands on the device first.
            _materialise(module, reader, device, list(reader.names()))
            clock.lap("place_s")
        live = dict(module.named_parameters())  # the device copies, if any, read once by fill() below
        prefetch, resident, policy = layerwise_tuning(spec.role, flags, prefetch_size)
        rt = LayerwiseRuntime(module, spec.layer_groups, device, prefetch, pin, resident_layers=resident,
                              residency_policy=policy)
        clock.lap("alloc_s")
        if placement == "layerwise-from-host":
            rt.fill(reader.read_into)
        else:
            rt.fill(lambda name, dst: dst.copy_(live[name].data))
            # Layer weights now live in the host regions; give their device copies back.
            device.discharge(rt.param_bytes())
        del live
        clock.lap("read_s")
        rt.pin()
        clock.lap("pin_s")
        if placement == "layerwise-from-host":
            _materialise(module, reader, device, [n for n in reader.names() if n not in rt.layer_param_names])
            clock.lap("place_s")
        rt.attach()
        loaded.layerwise = rt
    _place_buffers(module, device, buffers=placement != DIFFUSERS_GROUP)
    if device.is_cuda:
        torch.cuda.synchronize(device.torch)
    clock.lap("place_s")
    clock.laps["total_s"] = clock.total()
    return loaded


def _diffusers_group(
    module: torch.nn.Module,
    reader: CheckpointReader,
    persistent_buffers: list[str],
    device: Device,
    backend: str,
    clock: _Clock,
) -> dict[str, Any]:
    """DIFFUSERS_GROUP: the weights into one plain pageable host region (ComponentOffload's fill), then diffusers'
    `apply_group_offloading`; returns what it set up, for the record."""
    import diffusers
    from diffusers.hooks import apply_group_offloading

    host = ComponentOffload(module, device, False, "dit")  # pageable: diffusers pins its own copies
    clock.lap("alloc_s")
    host.fill(reader.read_into)
    for name in persistent_buffers:  # the rest of the state dict, on the host too: diffusers moves buffers
        e = reader.entries[name]
        buf = torch.empty(e.shape, dtype=e.dtype)
        reader.read_into(name, buf)
        _set_tensor(module, name, buf)
    clock.lap("read_s")
    record_stream = backend == "diffusers-group-rs"
    apply_group_offloading(
        module,
        onload_device=device.torch,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=True,
        record_stream=record_stream,
        non_blocking=True,
    )
    clock.lap("pin_s")
    info = _describe_groups(module, host.region.nbytes)
    # The group of non-block weights has no stream and no pinned copy: its tensors still view the pageable region,
    # which would keep all of it alive. Give them their own (small) storage; the region goes with `host`.
    begin = host.region.tensor.data_ptr()
    end = begin + host.region.nbytes
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type == "cpu" and begin <= t.data_ptr() < end:
            t.data = t.data.clone()
    del host
    clock.lap("place_s")
    return {
        "backend": backend,
        "diffusers": diffusers.__version__,
        "offload_type": "block_level",
        "num_blocks_per_group": 1,
        "use_stream": True,
        "record_stream": record_stream,
        "non_blocking": True,
        **info,
    }


def _sglang_layerwise(
    spec: ComponentSpec,
    module: torch.nn.Module,
    reader: CheckpointReader,
    device: Device,
    backend: str,
    flags: OffloadFlags | None,
    clock: _Clock,
) -> Any:
    """SGLANG_LAYERWISE: the weights where SGLang's loader leaves them (host with dit_cpu_offload, else the whole
    DiT on the device), then SGLang's own mixin and managers take the DiT over (harness.engine.layerwise)."""
    from harness.engine.layerwise import SGLangLayerwise
    from harness.engine.policy import available_versions

    if flags is None:
        raise ValueError(f"{SGLANG_LAYERWISE} needs the effective flags")
    if backend == "sglang":
        versions = available_versions()
        version = versions[-1] if versions else "(none installed)"  # load_engine then says how to install one
    else:
        version = backend.partition("@")[2]
    host = None
    if flags.dit_cpu_offload:
        host = ComponentOffload(module, device, False, "dit")  # pageable host tensors, as SGLang's CPU load
        clock.lap("alloc_s")
        host.fill(reader.read_into)
        in_file = set(reader.names())
        for name, _ in list(module.named_buffers()):
            if name in in_file:
                e = reader.entries[name]
                buf = torch.empty(e.shape, dtype=e.dtype)
                reader.read_into(name, buf)
                _set_tensor(module, name, buf)
        clock.lap("read_s")
    else:
        # What SGLang's loader does without dit_cpu_offload: the whole DiT lands on the device first.
        _materialise(module, reader, device, list(reader.names()))
        clock.lap("place_s")
    engine = SGLangLayerwise(module, spec.layer_groups, flags, version)
    clock.lap("pin_s")
    if host is not None:
        # The non-layer weights went to the device with the mixin's module.to(); nothing views the region now
        # but the module's plain tensor attributes (RoPE tables), which _place_buffers moves below.
        del host
    else:
        device.discharge(sum(g["host_bytes"] for g in engine.describe()["groups"].values()))
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
        "pinned_allocator_bytes": sum(pinned_allocator_bytes(t.numel() * t.element_size()) for t in pinned),
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
