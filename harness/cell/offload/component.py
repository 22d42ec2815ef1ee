"""Component CPU offload: a whole module lives on the host and moves to the device only while it is used.

This is SGLang's `VanillaD2HStrategy` and diffusers' `enable_model_cpu_offload` in spirit. The weights sit in one
host region (pinned when asked); `onload()` copies the region to one device buffer with a single copy and points
the parameters at views of it; `offload()` points them back at the host views and frees the buffer. There is no
device-to-host copy: inference never changes the weights, so the host region stays authoritative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from harness.cell.offload.memory import Device, FillStats, HostRegion, Layout, fill_regions, fresh_parameter


class ComponentOffload:
    """Keeps `module`'s parameters in one host region; moves them to `device` between onload() and offload().

    Buffers (small: RoPE tables, inv_freq) are placed on the device by the loader and stay there.
    """

    def __init__(self, module: torch.nn.Module, device: Device, pin: bool, name: str) -> None:
        self.module, self.device, self.name = module, device, name
        named = list(module.named_parameters())
        self.layout = Layout.plan((n, p.dtype, tuple(p.shape)) for n, p in named)
        self.params = [(n, fresh_parameter(module, n, p)) for n, p in named]
        self.region = HostRegion(self.layout.nbytes, pin)
        self.host_views = self.layout.views(self.region.tensor)
        self._buffer: torch.Tensor | None = None
        self.fill_stats: FillStats | None = None  # what fill() took

    @property
    def host_bytes(self) -> int:
        return self.layout.nbytes

    @property
    def on_device(self) -> bool:
        return self._buffer is not None

    def fill(self, read: Callable[[str, torch.Tensor], None]) -> None:
        """Fills the region with `read(name, slot_view)` and points the parameters at it."""
        self.fill_stats = fill_regions([(self.layout, self.region)], read)
        self._bind(self.host_views)

    def pin(self) -> None:
        self.region.pin()
        self.host_views = self.layout.views(self.region.tensor)  # the pin_memory fallback moves the region
        self._bind(self.host_views)

    def onload(self) -> None:
        if self._buffer is not None:
            return
        buf = self.device.empty(self.layout.nbytes, self.name)
        buf.copy_(self.region.tensor, non_blocking=self.region.pinned)
        self._buffer = buf
        self._bind(self.layout.views(buf))

    def offload(self) -> None:
        if self._buffer is None:
            return
        self._bind(self.host_views)
        self._buffer = None  # same stream as the compute that read it, so freeing is ordered after it
        self.device.discharge(self.layout.nbytes)

    # --------------------------------------------------------------- the runtime protocol (harness.cell.offload.loader)
    def before_use(self) -> None:
        self.onload()

    def after_use(self) -> None:
        self.offload()

    def describe(self) -> dict[str, Any]:
        return {"cpu_offload": {"host_bytes": self.host_bytes, "pinned": self.region.pinned,
                                "fill": self.fill_stats.as_dict() if self.fill_stats else None}}

    def device_weight_bytes(self, device: Device) -> int | None:
        """On the CPU profile host and "device" are the same memory: the runtime's state says what is "on" it."""
        if device.is_cuda:
            return None
        return self.layout.nbytes if self.on_device else 0

    def _bind(self, views: dict[str, torch.Tensor]) -> None:
        for name, param in self.params:
            param.data = views[name]
