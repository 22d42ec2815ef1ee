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
from harness.offload.memory import Device

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

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "placement": self.placement,
            "weight_bytes": self.weight_bytes,
            "setup_s": {k: round(v, 4) for k, v in self.setup_s.items()},
        }
        if self.layerwise is not None:
            d["layerwise"] = {
                "groups": {g.name: {"layers": len(g.layers), "prefetch": g.prefetch} for g in self.layerwise.groups},
                "host_bytes": self.layerwise.host_bytes,
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


def _materialise(module: torch.nn.Module, reader: CheckpointReader, device: Device, names: list[str]) -> None:
    """Reads each named tensor from the checkpoint straight onto the device, one at a time."""
    for name in names:
        src = reader.tensor(name)
        nbytes = src.numel() * src.element_size()
        dst = device.empty(nbytes, name).view(src.dtype).view(src.shape)
        dst.copy_(src)
        _set_tensor(module, name, dst)


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

    Raises:
        CheckpointError: the file does not match the module.
        torch.OutOfMemoryError: the device ran out while placing (the caller records the phase).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    t0 = time.perf_counter()
    module = spec.build_on_meta()
    reader = CheckpointReader(checkpoint)
    _check_names(module, reader)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    timings = {"build_s": time.perf_counter() - t0}
    loaded = LoadedComponent(spec.role, module, placement, weight_bytes, setup_s=timings)
    persistent_buffers = [n for n, _ in module.named_buffers() if n in set(reader.names())]

    t1 = time.perf_counter()
    if placement == "resident":
        _materialise(module, reader, device, list(reader.names()))
        timings["place_s"] = time.perf_counter() - t1
    elif placement == "cpu-offload":
        loaded.offload = ComponentOffload(module, device, pin, spec.role)
        timings["pin_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        loaded.offload.fill(reader.tensor)
        timings["read_s"] = time.perf_counter() - t2
        _materialise(module, reader, device, persistent_buffers)
    else:
        if placement == "layerwise-from-device":
            # What the engine does when dit_cpu_offload is off: the whole DiT lands on the device first.
            _materialise(module, reader, device, list(reader.names()))
            timings["place_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        live = dict(module.named_parameters())  # the device copies, if any, read once by fill() below
        rt = LayerwiseRuntime(module, spec.layer_groups, device, prefetch_size, pin)
        timings["pin_s"] = time.perf_counter() - t2
        t3 = time.perf_counter()
        if placement == "layerwise-from-host":
            rt.fill(reader.tensor)
            rest = [n for n in reader.names() if n not in rt.layer_param_names]
            _materialise(module, reader, device, rest)
        else:
            rt.fill(lambda name: live[name].data)
            # Layer weights now live in the host regions; give their device copies back.
            device.discharge(rt.param_bytes())
        timings["read_s"] = time.perf_counter() - t3
        del live
        rt.attach()
        loaded.layerwise = rt
    _place_buffers(module, device)
    if device.is_cuda:
        torch.cuda.synchronize(device.torch)
    timings["total_s"] = time.perf_counter() - t0
    return loaded
