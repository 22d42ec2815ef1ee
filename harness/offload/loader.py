"""The loader: checkpoint -> module, placed where the effective flags say.

Placement of each component follows the engine's rules (SGLang, June 2026, see the reference note §3):
- `resident`: every weight is materialised on the device as it is read. With a DiT too large for the card this
  is where the OOM happens, which is the #26925 failure when dit_cpu_offload was forced off.
- `cpu-offload`: weights go into one host region; the component moves to the device only while it runs.
- `layerwise`: with dit_cpu_offload on, checkpoint bytes go straight into the per-layer host regions and only the
  non-layer weights reach the device. With dit_cpu_offload off the engine first materialises the whole DiT on the
  device and then packs it to the host, so the load peak is the whole DiT.
"""

from __future__ import annotations

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
from harness.offload.memory import Device, HostRegion

PLACEMENTS = ("resident", "cpu-offload", "layerwise-from-host", "layerwise-from-device")


def placement_for(role: str, flags: OffloadFlags) -> str:
    """Where the loader puts component `role` under the effective `flags`."""
    if role == "dit":
        if flags.dit_layerwise_offload:
            return "layerwise-from-host" if flags.dit_cpu_offload else "layerwise-from-device"
        return "cpu-offload" if flags.dit_cpu_offload else "resident"
    if role == "text_encoder":
        return "cpu-offload" if flags.text_encoder_cpu_offload else "resident"
    if role == "vae":
        return "cpu-offload" if flags.vae_cpu_offload else "resident"
    raise ValueError(f"unknown component role {role!r}")


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

    def before_use(self) -> None:
        if self.offload is not None:
            self.offload.onload()

    def after_use(self) -> None:
        if self.offload is not None:
            self.offload.offload()
        if self.layerwise is not None:
            self.layerwise.release_all()

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
                "groups": {g.name: {"layers": len(g.layers), "prefetch": g.prefetch} for g in self.layerwise.groups},
                "host_bytes": self.layerwise.host_bytes,
                "param_bytes": self.layerwise.param_bytes(),
                "largest_layer_by_group": {
                    g.name: max(layout.nbytes for layout in g.layouts) for g in self.layerwise.groups
                },
                "pinned": self.layerwise.pinned,
                "largest_layer_bytes": max(self.layerwise.layer_bytes(), default=0),
            }
        if self.offload is not None:
            d["cpu_offload"] = {"host_bytes": self.offload.host_bytes, "pinned": self.offload.region.pinned}
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


def _place_buffers(module: torch.nn.Module, device: Device) -> None:
    """Non-persistent buffers (RoPE tables) are computed at build time on the host; move them once."""
    for owner in module.modules():
        for attr, buf in list(owner._buffers.items()):
            if buf is not None and buf.device != device.torch:
                owner._buffers[attr] = buf.to(device.torch)
    # diffusers' QwenEmbedRope keeps its tables as plain attributes, not buffers.
    for owner in module.modules():
        for attr, value in list(vars(owner).items()):
            if isinstance(value, torch.Tensor) and not attr.startswith("_") and value.device != device.torch:
                setattr(owner, attr, value.to(device.torch))


def load_component(
    spec: ComponentSpec, checkpoint: Path, placement: str, device: Device, *, pin: bool, prefetch_size: float = 0.0
) -> LoadedComponent:
    """Builds `spec`'s module on meta, fills it from `checkpoint` and places it.

    Setup times are recorded per step: build (module on meta), alloc (host regions), read (file -> host
    regions), pin (page-locking them), place (file -> device).

    Raises:
        CheckpointError: the file does not match the module.
        torch.OutOfMemoryError: the device ran out while placing (the caller records the phase).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
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
    else:
        if placement == "layerwise-from-device":
            # What the engine does when dit_cpu_offload is off: the whole DiT lands on the device first.
            _materialise(module, reader, device, list(reader.names()))
            clock.lap("place_s")
        live = dict(module.named_parameters())  # the device copies, if any, read once by fill() below
        rt = LayerwiseRuntime(module, spec.layer_groups, device, prefetch_size, pin)
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
    _place_buffers(module, device)
    if device.is_cuda:
        torch.cuda.synchronize(device.torch)
    clock.lap("place_s")
    clock.laps["total_s"] = clock.total()
    return loaded


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
