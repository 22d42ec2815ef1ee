"""Our layerwise offload runtime: stream a DiT's layers from per-layer host regions with a prefetch window.

Shape (after SGLang's LayerwiseOffloadManager, written from its description, not its code):
- each layer of each streamed ModuleList owns one host region holding all its parameters, packed and aligned
  (`memory.Layout`), pinned in place when `pin_cpu_memory` is on;
- on the GPU a layer lives in one flat buffer, taken from the compute stream's allocator pool and filled by a
  single copy on a side stream, and its parameters are views of that buffer; outside its window a parameter
  points at an empty placeholder, so a forward that touched a released layer would fail loudly instead of
  reading stale memory;
- `dit_layerwise_resident_layers` r of a group's n layers stay on the device (which ones: the residency policy,
  `harness.common.flags.streamed_layer_indices`): copied in at the first forward of a request (the first layer's
  pre-hook) and dropped when the component's use ends (`release_all`), SGLang's default "forward" lifetime, so
  they are transferred once per pipeline call instead of once per forward;
- the other n - r layers stream: in their order they are grouped into windows of p layers. Entering window k
  prefetches window k+1 (the last window prefetches window 0 of the next forward, so the transfer wraps across
  denoise steps and CFG passes); leaving a layer releases it. So at most r + 2p layers are on the device: the
  resident set, the window being computed and the one in flight. (SGLang prefetches `i+p .. i+2p-1 mod n`, which
  differs only when p does not divide n, and under `strided` tops the stream up at every layer; here both
  policies use the window rule, so a residency policy changes only which layers stream.)

Why a prefetch copy waits for the compute stream: the CPU enqueues kernels far ahead of the GPU, and a buffer
released on the compute stream goes back to its pool at once, in stream order, so the next allocation may get a
block whose last readers have not run yet. The copy into it therefore starts only after the compute enqueued
before it. The host also waits, before prefetching window k+1, on the event that marks the end of window k-2's
compute, which keeps the CPU at most two windows ahead of the GPU. (Waiting on window k-1 instead, in the first
layer's pre-hook of window k, before window k's kernels are enqueued, leaves the GPU idle while the host returns
from the wait, prefetches and launches them; on compute-bound Wan2.1-14B with prefetch 1 that was 80 such gaps a
step and +0.96 % over the whole-DiT cell against +0.12 % waiting two back, H200,
`results/h200/wan21-14b-overhead.records.jsonl`. Memory is the same either way: which blocks exist follows the
host's allocate/free order, and the copy's wait on the compute stream keeps a reused block safe.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.cell.offload.memory import (
    Device,
    FillStats,
    HostRegion,
    Layout,
    fill_regions,
    fresh_parameter,
    pin_all,
)
from harness.cell.offload.timeline import CopyRecorder, recorded
from harness.common.flags import prefetch_layers, resident_layer_count, streamed_layer_indices

# How many windows the host may run ahead of the GPU's compute (see the module docstring: 1 left a gap a window).
HOST_LEAD_WINDOWS = 2


@dataclass
class _Resident:
    buffer: torch.Tensor
    ready: Any  # torch.cuda.Event, or None on the CPU profile
    views: dict[str, torch.Tensor]


@dataclass
class _Group:
    """One streamed ModuleList. `streamed`: its streamed layer indices in order (windows are taken over these
    positions); `kept`: the layers kept on the device for a whole request; `prefetch`: p, at most the number of
    streamed layers. `resident` holds every layer now on the device, kept or streamed."""

    name: str
    layers: list[torch.nn.Module]
    prefetch: int
    streamed: tuple[int, ...]
    kept: frozenset[int]
    policy: str
    layouts: list[Layout] = field(default_factory=list)
    regions: list[HostRegion] = field(default_factory=list)
    params: list[list[tuple[torch.nn.Parameter, str]]] = field(default_factory=list)
    resident: dict[int, _Resident] = field(default_factory=dict)
    window_done: dict[int, Any] = field(default_factory=dict)
    position: dict[int, int] = field(default_factory=dict)  # streamed layer -> its place in `streamed`
    kept_armed: bool = False

    def __post_init__(self) -> None:
        self.position = {layer: s for s, layer in enumerate(self.streamed)}

    @property
    def num_windows(self) -> int:
        return -(-len(self.streamed) // self.prefetch)

    def window(self, k: int) -> tuple[int, ...]:
        return self.streamed[k * self.prefetch : (k + 1) * self.prefetch]

    def kept_bytes(self) -> int:
        return sum(self.layouts[i].nbytes for i in self.kept)

    def streamed_bytes(self) -> int:
        return sum(self.layouts[i].nbytes for i in self.streamed)


class LayerwiseRuntime:
    """Streams the layers of `module`'s ModuleLists named in `groups` from host regions.

    Args:
        module (nn.Module): the DiT; its layer parameters may be on meta, host or device when built.
        groups (tuple[str, ...]): dotted paths of the streamed ModuleLists (e.g. ("transformer_blocks",),
            ("t5.encoder.block",)).
        device (Device): where layers are computed.
        prefetch_size (float): SGLang's `dit_offload_prefetch_size`; see `harness.common.flags.prefetch_layers`.
        pin (bool): page-lock the host regions.
        resident_layers (float): SGLang's `dit_layerwise_resident_layers` per group; see
            `harness.common.flags.resident_layer_count`.
        residency_policy (str): "leading" or "strided"; see `harness.common.flags.streamed_layer_indices`.

    Example:
        >>> rt = LayerwiseRuntime(dit, ("transformer_blocks",), device, prefetch_size=4, pin=True)
        >>> rt.fill(reader.read_into)  # checkpoint bytes go straight into the per-layer regions
        >>> rt.pin()                   # page-locked after the fill (see memory.HostRegion)
        >>> rt.attach()                # layers now stream; non-layer weights are placed by the loader
    """

    def __init__(
        self, module: torch.nn.Module, groups: tuple[str, ...], device: Device, prefetch_size: float, pin: bool,
        resident_layers: float = 0.0, residency_policy: str = "leading",
    ) -> None:
        if not groups:
            raise ValueError(f"{type(module).__name__} declares no layer groups to stream")
        self.device = device
        self.groups: list[_Group] = []
        self.layer_param_names: set[str] = set()
        self._hooks: list[Any] = []
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self.copy_stream = torch.cuda.Stream(device.torch) if device.is_cuda else None
        self.copied_bytes = 0
        # Set by the worker under `[run] copy_timeline`: brackets each layer copy (harness.cell.offload.timeline).
        self.copy_recorder: CopyRecorder | None = None
        self.fill_stats: FillStats | None = None  # what fill() took (threads, reads, pins overlapped or not)
        for gname in groups:
            layers = list(module.get_submodule(gname))
            n = len(layers)
            streamed = streamed_layer_indices(n, resident_layer_count(resident_layers, n), residency_policy)
            # p counts streamed layers: with r kept, a window larger than the n - r streamed ones is all of them
            prefetch = max(1, min(prefetch_layers(prefetch_size, n), len(streamed)))
            kept = frozenset(range(n)) - set(streamed)
            group = _Group(gname, layers, prefetch, streamed, kept, residency_policy)
            for i, layer in enumerate(layers):
                named = list(layer.named_parameters(recurse=True))
                layout = Layout.plan((f"{gname}.{i}.{n}", p.dtype, tuple(p.shape)) for n, p in named)
                group.layouts.append(layout)
                group.regions.append(HostRegion(layout.nbytes, pin))
                group.params.append([(fresh_parameter(layer, n, p), f"{gname}.{i}.{n}") for n, p in named])
                self.layer_param_names.update(f"{gname}.{i}.{n}" for n, _ in named)
            self.groups.append(group)

    # ----------------------------------------------------------------------------------------------- setup
    @property
    def host_bytes(self) -> int:
        return sum(r.nbytes for g in self.groups for r in g.regions)

    @property
    def pinned(self) -> bool:
        return all(r.pinned for g in self.groups for r in g.regions)

    def param_bytes(self) -> int:
        """Bytes of the streamed parameters themselves (the regions add alignment padding)."""
        return sum(s.nbytes for g in self.groups for layout in g.layouts for s in layout.slots)

    def layer_bytes(self) -> list[int]:
        return [layout.nbytes for g in self.groups for layout in g.layouts]

    def kept_bytes(self) -> int:
        """Device bytes of the layers kept for a whole request (region sizes: what a kept layer's buffer takes)."""
        return sum(g.kept_bytes() for g in self.groups)

    def streamed_bytes(self) -> int:
        """Bytes one forward moves host -> device: the streamed layers' regions (kept layers move once a call)."""
        return sum(g.streamed_bytes() for g in self.groups)

    def fill(self, read: Callable[[str, torch.Tensor], None]) -> None:
        """Fills every layer's region with `read(name, slot_view)`: a checkpoint reader's read_into, or a copy
        from a live tensor."""
        self.fill_stats = fill_regions(
            [(lay, reg) for g in self.groups for lay, reg in zip(g.layouts, g.regions, strict=True)], read
        )

    def pin(self) -> None:
        """Page-locks every layer region (after the fill: see HostRegion)."""
        pin_all([r for g in self.groups for r in g.regions])

    def attach(self) -> None:
        """Points every layer parameter at a placeholder (freeing any device copy) and installs the hooks."""
        for g in self.groups:
            for i, layer in enumerate(g.layers):
                self._bind_placeholders(g, i)
                self._hooks.append(layer.register_forward_pre_hook(self._make_pre_hook(g, i)))
                self._hooks.append(layer.register_forward_hook(self._make_post_hook(g, i)))

    def detach(self) -> None:
        self.release_all()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def release_all(self) -> None:
        """Drops every resident layer (e.g. the window prefetched for a forward that will not come)."""
        for g in self.groups:
            for i in list(g.resident):
                self._release(g, i)
            g.window_done.clear()
            g.kept_armed = False

    # --------------------------------------------------------------- the runtime protocol (harness.cell.offload.loader)
    def before_use(self) -> None:
        pass  # the hooks fetch each layer as its forward starts

    def after_use(self) -> None:
        self.release_all()

    def describe(self) -> dict[str, Any]:
        return {"layerwise": {
            "groups": {
                g.name: {
                    "layers": len(g.layers),
                    "prefetch": g.prefetch,
                    "resident_layers": len(g.kept),
                    "residency_policy": g.policy,
                    "resident_bytes": g.kept_bytes(),
                    "streamed_layers": len(g.streamed),
                }
                for g in self.groups
            },
            "host_bytes": self.host_bytes,
            "resident_bytes": self.kept_bytes(),
            "streamed_bytes": self.streamed_bytes(),
            "param_bytes": self.param_bytes(),
            "largest_layer_by_group": {g.name: max(layout.nbytes for layout in g.layouts) for g in self.groups},
            "pinned": self.pinned,
            "largest_layer_bytes": max(self.layer_bytes(), default=0),
            "fill": self.fill_stats.as_dict() if self.fill_stats else None,
        }}

    def device_weight_bytes(self, device: Device) -> int | None:
        return None

    # ----------------------------------------------------------------------------------------------- hooks
    def _make_pre_hook(self, g: _Group, i: int) -> Callable[..., None]:
        def pre_hook(module: torch.nn.Module, args: Any) -> None:
            if i == 0:
                if not g.kept_armed:
                    # The kept set first (the forward needs all of it), then the head of the stream.
                    for j in sorted(g.kept):
                        if j not in g.resident:
                            self._prefetch(g, j)
                    g.kept_armed = True
                if g.streamed:
                    self._prefetch_window(g, 0)
            s = g.position.get(i)
            if s is not None and s % g.prefetch == 0:
                k = s // g.prefetch
                nxt = (k + 1) % g.num_windows
                if nxt != k:
                    self._wait_window_done(g, (k - HOST_LEAD_WINDOWS) % g.num_windows)
                    self._prefetch_window(g, nxt)
            res = g.resident.get(i) or self._prefetch(g, i)
            if res.ready is not None:
                torch.cuda.current_stream(self.device.torch).wait_event(res.ready)
            for param, name in g.params[i]:
                param.data = res.views[name]

        return pre_hook

    def _make_post_hook(self, g: _Group, i: int) -> Callable[..., None]:
        def post_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            s = g.position.get(i)
            if s is None:
                return  # a kept layer stays until the component's use ends (release_all)
            self._release(g, i)
            p = g.prefetch
            if self.device.is_cuda and (s % p == p - 1 or s == len(g.streamed) - 1):
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device.torch))
                g.window_done[s // p] = done

        return post_hook

    # ----------------------------------------------------------------------------------------------- moves
    def _prefetch_window(self, g: _Group, k: int) -> None:
        for j in g.window(k):
            if j not in g.resident:
                self._prefetch(g, j)

    def _prefetch(self, g: _Group, i: int) -> _Resident:
        layout, region = g.layouts[i], g.regions[i]
        # Allocated on the compute stream, not the copy stream: the caching allocator keeps one pool per stream,
        # and only the compute stream's pool holds what a component freed after its phase (a 9 GiB text encoder
        # block on FLUX), so buffers taken from the copy stream's pool would grow reserved memory past it.
        buf = self.device.empty(layout.nbytes, f"{g.name}[{i}]")
        if self.copy_stream is not None:
            # That block may be one the compute stream freed but has not finished reading: copy after the compute
            # enqueued so far (through the window before this one), which overlaps the copy with this window.
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device.torch))
            with torch.cuda.stream(self.copy_stream):
                with recorded(self.copy_recorder, layout.nbytes):
                    buf.copy_(region.tensor, non_blocking=region.pinned)
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
        else:
            with recorded(self.copy_recorder, layout.nbytes):
                buf.copy_(region.tensor)
            ready = None
        self.copied_bytes += layout.nbytes
        res = _Resident(buf, ready, layout.views(buf))
        g.resident[i] = res
        return res

    def _wait_window_done(self, g: _Group, k: int) -> None:
        done = g.window_done.pop(k, None)
        if done is not None:
            done.synchronize()

    def _release(self, g: _Group, i: int) -> None:
        res = g.resident.pop(i, None)
        if res is None:
            return
        self._bind_placeholders(g, i)
        if res.ready is not None:
            # Freed on the compute stream, the stream that allocated it, so the allocator may hand the block out
            # again at once, in stream order. A prefetched layer that was never used may still be copying: order
            # the free after its copy. (For a layer that ran, the compute stream waited on this event already.)
            torch.cuda.current_stream(self.device.torch).wait_event(res.ready)
        self.device.discharge(g.layouts[i].nbytes)

    def _bind_placeholders(self, g: _Group, i: int) -> None:
        for param, _ in g.params[i]:
            ph = self._placeholders.get(param.dtype)
            if ph is None:
                ph = self._placeholders[param.dtype] = torch.empty(0, dtype=param.dtype, device=self.device.torch)
            param.data = ph

    def resident_layers(self) -> int:
        return sum(len(g.resident) for g in self.groups)
