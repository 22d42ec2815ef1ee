"""Host regions, packed layouts and the device the runtimes place weights on.

Every offload path here keeps weights in a few large host regions carved into aligned slices, one region per
layer (layerwise) or per component (component offload). A region is allocated with exactly the bytes it needs
and, when pinning is asked for, page-locked in place with cudaHostRegister: PyTorch's `pin_memory()` goes
through the caching host allocator, which rounds every block up to a power of two (a 0.63 GiB Qwen-Image layer
would hold 1 GiB; SGLang#36562 saw 20.4 GiB become 32 GiB).
"""

from __future__ import annotations

import contextlib
import mmap
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

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
    """Host bytes this process has page-locked now (and at most), as requested and by which method."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requested_bytes = 0
        self.registered_bytes = 0  # cudaHostRegister: exactly the bytes asked for
        self.allocator_bytes = 0  # fallback through torch's caching host allocator (rounded up)
        self.peak_requested_bytes = 0
        self.regions = 0

    def add(self, nbytes: int, method: str, sign: int = 1) -> None:
        with self._lock:
            self.requested_bytes += sign * nbytes
            self.regions += sign
            if method == "cudaHostRegister":
                self.registered_bytes += sign * nbytes
            else:
                self.allocator_bytes += sign * nbytes
            self.peak_requested_bytes = max(self.peak_requested_bytes, self.requested_bytes)

    def snapshot(self) -> dict[str, int]:
        return {
            "pinned_requested_bytes": self.requested_bytes,
            "pinned_requested_peak_bytes": self.peak_requested_bytes,
            "pinned_registered_bytes": self.registered_bytes,
            "pinned_via_allocator_bytes": self.allocator_bytes,
            "pinned_regions": self.regions,
        }


PINNED = PinnedLedger()


def torch_pinned_block_bytes(nbytes: int) -> int:
    """Host bytes torch's caching host allocator holds for a pinned request of `nbytes` (`pin_memory()`, as
    diffusers' group offload pins): the next power of two."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


class HostRegion:
    """One host allocation of exactly `nbytes` (page granularity), page-locked in place once filled.

    The memory is an anonymous mapping advised to use transparent huge pages: filling 38 GiB of fresh 4 KiB pages
    is page-fault bound (about 3 GB/s measured on the lent H100's VM), 2 MiB pages fault 512 times less often.
    Pinning comes after the fill (`pin()`), because cudaHostRegister of untouched memory faults every page in
    on one thread, while the fill touches them from several reader threads.

    Args:
        nbytes (int): size of the region.
        pin (bool): whether `pin()` page-locks it (so copies to the GPU are asynchronous DMA at full PCIe rate).
        huge_pages (bool): advise transparent huge pages (MADV_HUGEPAGE, the default) or refuse them
            (MADV_NOHUGEPAGE: `experiments.pcie_working_set` compares the two).
    """

    def __init__(self, nbytes: int, pin: bool, huge_pages: bool = True) -> None:
        self.nbytes = nbytes
        self.want_pin = pin
        self._map = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):
            self._map.madvise(mmap.MADV_HUGEPAGE if huge_pages else mmap.MADV_NOHUGEPAGE)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8, count=max(nbytes, 1))[:nbytes]
        self.pin_method = "pageable"

    def pin(self) -> None:
        """Page-locks the region in place (exact bytes, no power-of-two rounding); no-op without CUDA."""
        if not self.want_pin or self.pinned or self.nbytes == 0 or not torch.cuda.is_available():
            return
        rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, 0)
        if int(getattr(rc, "value", rc)) == 0:
            self.pin_method = "cudaHostRegister"
        else:
            # Fall back to the caching host allocator; it rounds up, which the pinned counters then show.
            pinned = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
            pinned.copy_(self.tensor)
            self.tensor = pinned
            self.pin_method = "pin_memory"
        PINNED.add(self.nbytes, self.pin_method)

    def release(self) -> None:
        """Unpins (a registered range must be unregistered before its memory is unmapped) and frees."""
        if self.pin_method == "cudaHostRegister":
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
        if self.pinned:
            PINNED.add(self.nbytes, self.pin_method, sign=-1)
        self.pin_method = "pageable"
        self.tensor = torch.empty(0, dtype=torch.uint8)

    @property
    def pinned(self) -> bool:
        return self.pin_method != "pageable"


@dataclass(frozen=True)
class SetupOptions:
    """How host regions are filled at load (the worker sets `SETUP` from the cell's `[run]` options).

    Args:
        threads (int): reader threads (16: the H200 measurement below).
        overlap_pin (bool): page-lock each region as soon as its last slot is read, on the thread that read it, so
            pinning runs while other regions are still being read (instead of all reads, then all pins). On by
            default: on the H200, Qwen-Image's 40.8 GB DiT from the page cache went into pinned regions at 20.6
            GB/s with 16 threads overlapped against 12.7 GB/s read-then-pin (`experiments.setup_speed`,
            results/h200/setup-speed-qwen-image.json): pinning costs 1.1-1.2 s of wall time unless it overlaps.
    """

    threads: int = 16
    overlap_pin: bool = True


SETUP = SetupOptions()


@dataclass(frozen=True)
class FillStats:
    """What one fill took: wall time, and the thread-seconds spent reading and pinning (their sum over threads,
    so read_thread_s / wall_s is how many threads were busy reading on average)."""

    threads: int
    overlap_pin: bool
    regions: int
    nbytes: int
    wall_s: float
    read_thread_s: float
    pin_thread_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "overlap_pin": self.overlap_pin,
            "regions": self.regions,
            "bytes": self.nbytes,
            "wall_s": round(self.wall_s, 4),
            "read_thread_s": round(self.read_thread_s, 4),
            "pin_thread_s": round(self.pin_thread_s, 4),
            "gbps": round(self.nbytes / self.wall_s / 1e9, 3) if self.wall_s > 0 else None,
        }


def fill_regions(
    jobs: list[tuple[Layout, HostRegion]], read: Callable[[str, torch.Tensor], None],
    options: SetupOptions | None = None,
) -> FillStats:
    """Fills regions slot by slot with `read(name, destination_view)` from a few threads; with `overlap_pin`, the
    thread that reads a region's last slot then pins that region (a no-op for a region not asked to pin).

    Reads from a file (os.preadv) release the GIL, so threads overlap the page-cache copies and the first touch
    of each region's pages; cudaHostRegister releases it too, so one region's pinning overlaps others' reads.
    """
    opts = options or SETUP
    work = [(slot.name, slot.view(region.tensor), region) for layout, region in jobs for slot in layout.slots]
    left = {id(region): len(layout.slots) for layout, region in jobs}
    lock = threading.Lock()
    read_s: list[float] = []
    pin_s: list[float] = []

    def one(name: str, view: torch.Tensor, region: HostRegion) -> None:
        t0 = time.perf_counter()
        read(name, view)
        read_s.append(time.perf_counter() - t0)
        if not opts.overlap_pin:
            return
        with lock:
            left[id(region)] -= 1
            last = left[id(region)] == 0
        if last:
            t1 = time.perf_counter()
            region.pin()
            pin_s.append(time.perf_counter() - t1)

    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=opts.threads) as pool:
        list(pool.map(lambda item: one(*item), work))
    return FillStats(opts.threads, opts.overlap_pin, len(jobs), sum(region.nbytes for _, region in jobs),
                     time.perf_counter() - t_start, sum(read_s), sum(pin_s))


def pin_all(regions: list[HostRegion], threads: int = 8) -> None:
    """Pins many regions from a few threads (registration of resident pages is per-page kernel work)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(HostRegion.pin, regions))


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
