"""Host regions, packed layouts and the device the runtimes place weights on.

Every offload path here keeps weights in a few large host regions carved into aligned slices, one region per
layer (layerwise) or per component (component offload). A region is allocated with exactly the bytes it needs
and, when pinning is asked for, page-locked in place with cudaHostRegister: PyTorch's `pin_memory()` goes
through the caching host allocator, which rounds every block up to a power of two (a 0.63 GiB Qwen-Image layer
would hold 1 GiB; SGLang#36562 saw 20.4 GiB become 32 GiB).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

import torch

# SGLang aligns each slice to 32 bytes for fused kernels. We use 256 so that a parameter viewed inside a flat
# buffer has the same alignment class as one from the caching allocator (512-byte blocks), and cuBLAS picks the same
# kernels for both: the output-equivalence check compares layerwise with resident bit for bit.
SLICE_ALIGN = 256


class SimulatedOutOfMemoryError(torch.OutOfMemoryError):
    """Raised by the CPU profile's device ledger when placing weights would pass the simulated card's cap."""


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """This slot's typed view of a flat uint8 region (host or device)."""
        return flat[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class Layout:
    slots: tuple[Slot, ...]
    nbytes: int

    @classmethod
    def plan(cls, tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> Layout:
        """Packs tensors back to back, each slice starting on a SLICE_ALIGN boundary; no other padding."""
        slots, offset = [], 0
        for name, dtype, shape in tensors:
            nbytes = dtype.itemsize
            for s in shape:
                nbytes *= s
            offset += -offset % SLICE_ALIGN
            slots.append(Slot(name, dtype, tuple(shape), offset, nbytes))
            offset += nbytes
        return cls(tuple(slots), offset)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s.name: s.view(flat) for s in self.slots}


def fresh_parameter(root: torch.nn.Module, name: str, old: torch.nn.Parameter) -> torch.nn.Parameter:
    """Replaces parameter `name` of `root` with a fresh one the runtime can re-point with `.data = ...`.

    A meta parameter cannot take real storage through `.data`, and a parameter still holding a device copy
    would keep it alive; the fresh parameter starts empty and the caller keeps `old` only as a fill source.
    """
    owner_name, _, attr = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    new = torch.nn.Parameter(torch.empty(0, dtype=old.dtype), requires_grad=False)
    owner._parameters[attr] = new
    return new


class PinnedLedger:
    """Host bytes this process page-locked, as requested and by which method."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requested_bytes = 0
        self.registered_bytes = 0  # cudaHostRegister: exactly the bytes asked for
        self.allocator_bytes = 0  # fallback through torch's caching host allocator (rounded up)
        self.regions = 0

    def add(self, nbytes: int, method: str) -> None:
        with self._lock:
            self.requested_bytes += nbytes
            self.regions += 1
            if method == "cudaHostRegister":
                self.registered_bytes += nbytes
            else:
                self.allocator_bytes += nbytes

    def snapshot(self) -> dict[str, int]:
        return {
            "pinned_requested_bytes": self.requested_bytes,
            "pinned_registered_bytes": self.registered_bytes,
            "pinned_via_allocator_bytes": self.allocator_bytes,
            "pinned_regions": self.regions,
        }


PINNED = PinnedLedger()


class HostRegion:
    """One host allocation of exactly `nbytes`, page-locked in place when `pin` and CUDA allow it.

    Args:
        nbytes (int): size of the region.
        pin (bool): page-lock it, so that copies to the GPU are asynchronous DMA at full PCIe rate.
    """

    def __init__(self, nbytes: int, pin: bool) -> None:
        self.nbytes = nbytes
        self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8)[:nbytes]
        self.pin_method = "pageable"
        if pin and torch.cuda.is_available() and nbytes > 0:
            rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
            if int(getattr(rc, "value", rc)) == 0:
                self.pin_method = "cudaHostRegister"
            else:
                # Fall back to the caching host allocator; it rounds up, which the pinned counters then show.
                self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                self.pin_method = "pin_memory"
            PINNED.add(nbytes, self.pin_method)

    @property
    def pinned(self) -> bool:
        return self.pin_method != "pageable"


class Device:
    """The device components run on, with a ledger of the weight bytes the offload runtimes placed on it.

    On CUDA the ledger is informational: the caching allocator enforces the card's cap. On the CPU profile the
    host stands in for the GPU, no allocator counts anything, and the ledger is the only device-memory counter:
    with `cap_bytes` set it raises SimulatedOutOfMemoryError, so CPU tests reproduce a load-time OOM.
    """

    def __init__(self, kind: str, cap_bytes: int | None = None) -> None:
        if kind not in ("cuda", "cpu"):
            raise ValueError(f"device kind must be 'cuda' or 'cpu', got {kind!r}")
        self.kind = kind
        self.torch = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
        self.cap_bytes = cap_bytes if kind == "cpu" else None
        self.ledger_bytes = 0
        self.ledger_peak_bytes = 0
        self._lock = threading.Lock()

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def charge(self, nbytes: int, what: str) -> None:
        with self._lock:
            if self.cap_bytes is not None and self.ledger_bytes + nbytes > self.cap_bytes:
                raise SimulatedOutOfMemoryError(
                    f"simulated card: placing {what} ({nbytes} bytes) would hold {self.ledger_bytes + nbytes} "
                    f"bytes of weights, over the cap of {self.cap_bytes} bytes"
                )
            self.ledger_bytes += nbytes
            self.ledger_peak_bytes = max(self.ledger_peak_bytes, self.ledger_bytes)

    def discharge(self, nbytes: int) -> None:
        with self._lock:
            self.ledger_bytes -= nbytes

    def reset_ledger_peak(self) -> None:
        with self._lock:
            self.ledger_peak_bytes = self.ledger_bytes

    def empty(self, nbytes: int, what: str) -> torch.Tensor:
        """A flat uint8 buffer on the device, charged to the ledger (the caller discharges it)."""
        self.charge(nbytes, what)
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.torch)
        except BaseException:
            self.discharge(nbytes)
            raise
