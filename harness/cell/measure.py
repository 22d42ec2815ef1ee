"""Measurement inside the child: per-phase timings and peaks, an NVML/RSS polling thread, the card cap, machine info.

Counters, each under a name that says which it is:
- `alloc_peak_allocated_bytes` / `alloc_peak_reserved_bytes`: PyTorch caching allocator peaks, reset at each
  phase start (`reset_peak_memory_stats` resets to the current value, so a phase's peak includes what earlier
  phases left on the device).
- `nvml_proc_peak_bytes`: NVML's per-process used memory, polled every 10 ms by a thread: allocator memory plus
  the CUDA context and anything allocated outside PyTorch.
- `ledger_peak_bytes`: weight bytes the harness's runtimes placed on the device; on the CPU profile it is the only
  device counter (no allocator there), and a simulated card's cap is enforced against it.
- `rss_peak_bytes`: host resident set, polled; `pinned_*`: host bytes page-locked by this process: the harness's
  ledger (`pinned_requested_bytes`, ...), torch's caching host allocator (`pinned_torch_allocator_bytes`), and under
  the SGLang backend what its managers hold (`pinned_sglang_manager_bytes`, `pageable_sglang_manager_bytes`,
  `mapped_sglang_manager_bytes`: an `is_pinned()` walk of their host tensors; `pinned_sglang_registered_bytes` /
  `_peak_bytes`: its own cudaHostRegister calls, counted; `harness.engine.layerwise`), through `host_probe`.
- machine state per denoise step (`machine_state`: SM and memory clocks, temperature, power, throttle reasons, from
  NVML), allocator statistics (`allocator_stats`: torch.cuda.memory_stats) and the host page cache
  (`host_memory_state`: /proc/meminfo) per round: what the drift experiments read (`harness.analyze.drift`;
  `results/h200/drift.records.jsonl`).
Times come from CUDA events on the compute stream (`time_ms`) and from the host clock after a synchronize
(`wall_ms`); on the CPU profile both are host-clock times.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.cell.offload.memory import PINNED, Device, HostRegion

_PAGE = os.sysconf("SC_PAGE_SIZE")


def host_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def kernel_locked_bytes() -> dict[str, int]:
    """Locked/pinned host memory as the kernel accounts it (VmLck, VmPin in /proc/self/status): a view of pinned
    bytes independent of the harness's own ledger (drivers differ in what they report here)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmLck", "VmPin"):
                    out[f"kernel_{key.lower()}_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class Nvml:
    """Per-process and whole-device memory of the GPU this process uses, through NVML (None when unavailable)."""

    def __init__(self, device_index: int) -> None:
        self.handle: Any = None
        self.pid = os.getpid()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nv = pynvml
            self.handle = self._handle_for(device_index)
        except Exception:
            self.handle = None

    def _handle_for(self, index: int) -> Any:
        # Match by PCI bus id so that CUDA_VISIBLE_DEVICES remapping cannot point us at another GPU.
        props = torch.cuda.get_device_properties(index)
        bus = getattr(props, "pci_bus_id", None)
        if bus is not None:
            pci = f"{getattr(props, 'pci_domain_id', 0):08X}:{bus:02X}:{getattr(props, 'pci_device_id', 0):02X}.0"
            with contextlib.suppress(Exception):
                return self._nv.nvmlDeviceGetHandleByPciBusId(pci)
        return self._nv.nvmlDeviceGetHandleByIndex(index)

    def process_used(self) -> int | None:
        if self.handle is None:
            return None
        try:
            for proc in self._nv.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == self.pid and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
        except Exception:
            return None
        return None

    def device_used(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self._nv.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:
            return None

    def info(self) -> dict[str, Any]:
        if self.handle is None:
            return {}
        nv, h, out = self._nv, self.handle, {}
        for key, fn in (
            ("driver", lambda: nv.nvmlSystemGetDriverVersion()),
            ("pcie_gen", lambda: nv.nvmlDeviceGetCurrPcieLinkGeneration(h)),
            ("pcie_width", lambda: nv.nvmlDeviceGetCurrPcieLinkWidth(h)),
            ("pcie_gen_max", lambda: nv.nvmlDeviceGetMaxPcieLinkGeneration(h)),
            ("gpu_uuid", lambda: nv.nvmlDeviceGetUUID(h)),  # which physical GPU this child measured
        ):
            with contextlib.suppress(Exception):
                value = fn()
                out[key] = value.decode() if isinstance(value, bytes) else value
        return out


# NVML's clock event ("throttle") reason bits (nvml.h: nvmlClocksEventReason*), named here so that a record says
# which limit held the clocks without the reader looking the mask up.
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
MACHINE_FIELDS = ("sm_clock_mhz", "mem_clock_mhz", "temperature_c", "power_w", "throttle_reasons")


def throttle_names(mask: int) -> list[str]:
    """The names of the reason bits set in `mask` (unknown bits as hex)."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    rest = mask & ~sum(THROTTLE_REASONS)
    return names + ([hex(rest)] if rest else [])


def machine_state(nvml: Nvml | None) -> tuple[dict[str, Any], dict[str, str]]:
    """One reading of the GPU's clocks, temperature, power and throttle reasons: (values, why each missing value
    is missing). Every field of MACHINE_FIELDS is present in values; an unavailable one is None, with its reason
    (no NVML, or the call's error: NVML_ERROR_NOT_SUPPORTED on some boards and in some containers)."""
    values: dict[str, Any] = dict.fromkeys(MACHINE_FIELDS)
    if nvml is None or nvml.handle is None:
        why = "no NVML handle (CPU profile, or pynvml/driver unavailable)"
        return values, dict.fromkeys(MACHINE_FIELDS, why)
    nv, h = nvml._nv, nvml.handle
    # pynvml renamed "throttle" to "clocks event" reasons; older releases have only the first name.
    event_reasons = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None
    )
    reads: dict[str, Any] = {
        "sm_clock_mhz": lambda: int(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
        "mem_clock_mhz": lambda: int(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
        "temperature_c": lambda: int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
        "power_w": lambda: round(nv.nvmlDeviceGetPowerUsage(h) / 1e3, 1),  # NVML reports milliwatts
        "throttle_reasons": lambda: int(event_reasons(h)),
    }
    missing: dict[str, str] = {}
    for key, read in reads.items():
        try:
            values[key] = read()
        except Exception as e:  # pynvml.NVMLError and friends: the field stays None, with the reason
            missing[key] = f"{type(e).__name__}: {e}"
    if values["throttle_reasons"] is not None:
        values["throttle_reason_names"] = throttle_names(values["throttle_reasons"])
    return values, missing


# torch.cuda.memory_stats keys kept per phase and per round, under names that say what they count.
_ALLOCATOR_KEYS = {
    "allocated_bytes.all.current": "allocated_bytes",
    "allocated_bytes.all.peak": "allocated_peak_bytes",
    "reserved_bytes.all.current": "reserved_bytes",
    "reserved_bytes.all.peak": "reserved_peak_bytes",
    "inactive_split_bytes.all.current": "inactive_split_bytes",
    "inactive_split_bytes.all.peak": "inactive_split_peak_bytes",
    "segment.all.current": "segments",
    "segment.all.peak": "segments_peak",
    "num_alloc_retries": "num_alloc_retries",
    "num_ooms": "num_ooms",
    "num_device_alloc": "num_device_alloc",
    "num_device_free": "num_device_free",
}


def allocator_stats(stats: dict[str, Any]) -> dict[str, int]:
    """The caching allocator's counters of `torch.cuda.memory_stats()` that explain reserved memory: current and
    peak allocated/reserved bytes, inactive split bytes (free parts of split blocks: fragmentation), segments
    (cudaMalloc'd blocks), and the cumulative retries (a cudaMalloc that failed, emptied the cache and retried: the
    allocator at its limit), OOMs and device allocs/frees. Peaks are since the last reset (each phase start)."""
    return {name: int(stats[key]) for key, name in _ALLOCATOR_KEYS.items() if key in stats}


def reserved_attribution(
    start: dict[str, int], end: dict[str, int], segments: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Where a phase's reserved-over-allocated gap can come from, from allocator counters (`allocator_stats` at the
    phase's start and end) and optionally the segments of `torch.cuda.memory_snapshot()` at its end:

    - `cached_from_earlier_bytes`: reserved but unallocated at the phase start: blocks an earlier phase freed and
      the allocator kept (an offloaded text encoder's, a previous round's);
    - `inactive_split_peak_bytes`: the peak of free parts of split blocks during the phase (fragmentation);
    - `reserved_by_stream_bytes`: reserved bytes per stream at the end (0 = the default stream), since each stream
      has its own pool: blocks one stream freed cannot serve another's allocations.

    The parts are measured at different moments, so they bound the gap rather than sum to it; `unexplained_bytes`
    is what neither of the first two covers."""
    gap = end.get("reserved_peak_bytes", 0) - end.get("allocated_peak_bytes", 0)
    cached = max(0, start.get("reserved_bytes", 0) - start.get("allocated_bytes", 0))
    split = end.get("inactive_split_peak_bytes", 0)
    out: dict[str, Any] = {
        "reserved_peak_bytes": end.get("reserved_peak_bytes"),
        "allocated_peak_bytes": end.get("allocated_peak_bytes"),
        "gap_bytes": gap,
        "cached_from_earlier_bytes": cached,
        "inactive_split_peak_bytes": split,
        "unexplained_bytes": max(0, gap - cached - split),
    }
    if segments is not None:
        by_stream: dict[str, int] = {}
        for seg in segments:
            key = str(seg.get("stream", 0))
            by_stream[key] = by_stream.get(key, 0) + int(seg.get("total_size", 0))
        out["reserved_by_stream_bytes"] = by_stream
    return out


# /proc/meminfo fields of the host page cache and write-back, in bytes (the kernel writes kB).
_MEMINFO_KEYS = {"MemAvailable": "mem_available_bytes", "Cached": "page_cache_bytes", "Dirty": "dirty_bytes",
                 "Writeback": "writeback_bytes", "Mlocked": "mlocked_bytes"}


def host_memory_state(meminfo: str | None = None) -> dict[str, int]:
    """The host page cache (Cached), dirty and write-back bytes, available memory and mlocked bytes, from
    /proc/meminfo (`meminfo`: its text, for tests); {} where it cannot be read."""
    if meminfo is None:
        try:
            with open("/proc/meminfo") as f:
                meminfo = f.read()
        except OSError:
            return {}
    out: dict[str, int] = {}
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        if key in _MEMINFO_KEYS and rest.split():
            out[_MEMINFO_KEYS[key]] = int(rest.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Polls NVML per-process memory and host RSS; keeps the peak of the current phase and a coarse trace."""

    def __init__(self, nvml: Nvml | None, interval_s: float = 0.01, trace_every_s: float = 0.25) -> None:
        """`interval_s` 0 means off: `start()` then starts no thread, and the peaks come from the samples taken
        at each phase's start and end only (RunOptions.sampler_interval_ms)."""
        super().__init__(daemon=True, name="offload-bench-sampler")
        self.nvml, self.interval_s, self.trace_every_s = nvml, interval_s, trace_every_s
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self.t0 = time.monotonic()
        self.phase = "setup"
        self.peaks: dict[str, dict[str, int]] = {}
        self.trace: list[tuple[float, str, int | None, int]] = []
        self._last_trace = -1e9

    def start(self) -> None:
        if self.interval_s > 0:
            super().start()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def sample(self) -> None:
        proc = self.nvml.process_used() if self.nvml else None
        rss = host_rss_bytes()
        now = time.monotonic() - self.t0
        with self._lock:
            peak = self.peaks.setdefault(self.phase, {})
            if proc is not None:
                peak["nvml_proc_peak_bytes"] = max(peak.get("nvml_proc_peak_bytes", 0), proc)
            peak["rss_peak_bytes"] = max(peak.get("rss_peak_bytes", 0), rss)
            if now - self._last_trace >= self.trace_every_s:
                self.trace.append((round(now, 3), self.phase, proc, rss))
                self._last_trace = now

    def enter(self, phase: str) -> None:
        with self._lock:
            self.phase = phase
        self.sample()

    def phase_peaks(self, phase: str) -> dict[str, int]:
        self.sample()
        with self._lock:
            return dict(self.peaks.get(phase, {}))

    def stop(self) -> None:
        self._stop_event.set()


@dataclass
class Meter:
    """Per-phase measurement. Use `with meter.phase("load"): ...`; results land in `meter.phases`."""

    device: Device
    sampler: Sampler
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    current: str | None = None
    failed_phase: str | None = None
    on_enter: Any = None  # called with the phase name as it starts (fault injection in tests)
    probe: Any = None  # returns {component role: weight bytes on the device}, read at each phase start and end
    step_probe: Any = None  # returns (values, why missing) of the machine (`machine_state`), read at each step mark
    on_exit: Any = None  # called with (phase name, its record) after the phase is measured (cache release)
    link_gbps: float | None = None  # the pinned-copy probe's rate: the copy timeline's limit
    host_probe: Any = None  # returns host counters a runtime keeps itself (SGLang's pins), read at each phase end

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        events = self._start_cuda() if self.device.is_cuda else None
        at_start: dict[str, int] = {}
        if events is not None:
            with contextlib.suppress(Exception):
                at_start = allocator_stats(torch.cuda.memory_stats(self.device.torch))
        self.device.reset_ledger_peak()
        self.sampler.enter(name)
        self.current = name
        rec: dict[str, Any] = {}
        self.phases[name] = rec
        if self.probe is not None:
            rec["device_weights_at_start"] = self.probe()
        t0 = time.perf_counter()
        completed = False
        try:
            if self.on_enter is not None:
                self.on_enter(name)
            yield rec
            completed = True
        except BaseException:
            self.failed_phase = name
            raise
        finally:
            if events is not None:
                events[1].record()
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize(self.device.torch)
            rec["wall_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
            if events is not None:
                self._cuda_counters(rec, at_start, *events)
            else:
                rec["time_ms"] = rec["wall_ms"]
            self._end_counters(rec, name)
            self.current = None
            if completed and self.on_exit is not None:
                self.on_exit(name, rec)

    def _start_cuda(self) -> tuple[Any, Any]:
        torch.cuda.synchronize(self.device.torch)
        torch.cuda.reset_peak_memory_stats(self.device.torch)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        return start, end

    def _cuda_counters(self, rec: dict[str, Any], at_start: dict[str, int], start: Any, end: Any) -> None:
        """The phase's CUDA-event time, the allocator's peaks and where its reserved-over-allocated gap comes from
        (`reserved_attribution`, against the allocator's counters at the phase start), after the end event was
        synchronized."""
        dev = self.device.torch
        with contextlib.suppress(Exception):
            rec["time_ms"] = round(start.elapsed_time(end), 3)
        rec["alloc_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
        rec["alloc_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
        rec["alloc_end_allocated_bytes"] = torch.cuda.memory_allocated(dev)
        with contextlib.suppress(Exception):
            rec["allocator"] = allocator_stats(torch.cuda.memory_stats(dev))
            rec["reserved_attribution"] = reserved_attribution(at_start, rec["allocator"], torch.cuda.memory_snapshot())

    def _end_counters(self, rec: dict[str, Any], name: str) -> None:
        """Weights on the device, the ledger, the sampler's peaks and the pinned host bytes at the phase end."""
        if self.probe is not None:
            with contextlib.suppress(Exception):
                rec["device_weights_at_end"] = self.probe()
        rec["ledger_peak_bytes"] = self.device.ledger_peak_bytes
        rec["ledger_end_bytes"] = self.device.ledger_bytes
        rec.update(self.sampler.phase_peaks(name))
        rec.update(PINNED.snapshot())
        rec.update(kernel_locked_bytes())
        if self.host_probe is not None:
            with contextlib.suppress(Exception):  # a counter that fails must not fail the phase
                rec.update(self.host_probe())
        if self.device.is_cuda:
            with contextlib.suppress(Exception):
                stats = torch.cuda.host_memory_stats()
                # Bytes of pinned blocks torch's caching host allocator owns now (rounded up to powers of two:
                # pin_memory(), diffusers' group offload). torch names it allocated_bytes; there never was a
                # reserved_bytes key for the host allocator, which this read until the backend axis needed it.
                held = stats.get("allocated_bytes.current", stats.get("reserved_bytes.current", 0))
                rec["pinned_torch_allocator_bytes"] = int(held)


class Timer:
    """Per-step timing: CUDA events on the device (read after one synchronize at the end), host clock on CPU.

    With `probe` (e.g. `lambda: machine_state(nvml)`), each mark also takes one reading, in `readings`. It is
    taken on the host as it enqueues the mark, not when the GPU reaches it: under layerwise offload the host is
    at most a prefetch window ahead of the GPU, under a resident DiT it may be further ahead.
    """

    def __init__(self, device: Device, probe: Any = None) -> None:
        self.cuda = device.is_cuda
        self.marks: list[Any] = []
        self.probe = probe
        self.readings: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())
        if self.probe is not None:
            self.readings.append(self.probe())

    def offsets_ms(self) -> list[float]:
        """Each mark's time since the first, in ms (on one clock with `harness.cell.offload.timeline` readings)."""
        if not self.marks:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[0].elapsed_time(m) for m in self.marks]
        return [(m - self.marks[0]) * 1e3 for m in self.marks]

    def intervals_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [round(a.elapsed_time(b), 3) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [round((b - a) * 1e3, 3) for a, b in zip(self.marks, self.marks[1:], strict=False)]


def apply_card_cap(cap_bytes: int, device: Device, nvml: Nvml | None) -> dict[str, Any]:
    """Makes the caching allocator behave like a card of `cap_bytes`.

    `set_per_process_memory_fraction` caps only the allocator; the CUDA context and kernel modules live outside
    it. We warm the kernels the pipeline uses, read the overhead as NVML per-process minus allocator reserved,
    and give the allocator the rest. The record later checks the NVML per-process peak against the cap.
    """
    if not device.is_cuda:
        device.cap_bytes = cap_bytes
        return {"cap_bytes": cap_bytes, "enforced_by": "harness ledger (CPU profile: weights only)"}
    warm_kernels(device)
    total = torch.cuda.get_device_properties(device.torch).total_memory
    proc = nvml.process_used() if nvml else None
    reserved = torch.cuda.memory_reserved(device.torch)
    overhead = (proc - reserved) if proc is not None else 700 * 2**20  # 0.7 GiB measured on the H100 otherwise
    limit = cap_bytes - overhead
    if limit <= 0 or cap_bytes > total:
        raise ValueError(f"card cap {cap_bytes} bytes does not fit this GPU ({total} bytes, overhead {overhead})")
    torch.cuda.set_per_process_memory_fraction(limit / total, device.torch)
    return {
        "cap_bytes": cap_bytes,
        "enforced_by": "torch.cuda.set_per_process_memory_fraction",
        "context_overhead_bytes": overhead,
        "overhead_source": "nvml_proc - alloc_reserved" if proc is not None else "assumed 0.7 GiB (no NVML)",
        "allocator_limit_bytes": limit,
        "fraction": limit / total,
    }


def warm_kernels(device: Device) -> None:
    """Loads the kernels every pipeline uses, so lazy module loading does not grow the context mid-run."""
    if not device.is_cuda:
        return
    x = torch.randn(256, 256, device=device.torch, dtype=torch.bfloat16)
    (x @ x).sum().item()
    q = x.view(1, 2, 128, 256)
    torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().item()
    del x, q
    torch.cuda.synchronize(device.torch)


def pinned_h2d_gbps(device: Device, nbytes: int = 256 * 2**20, repeats: int = 5) -> float | None:
    """A short pinned host-to-device copy probe (median of `repeats`), recorded in machine info.

    The source is page-locked in place with cudaHostRegister, as the runtimes' regions are, and unregistered after:
    neither the harness's pinned ledger nor torch's caching host allocator (the record's
    pinned_torch_allocator_bytes, where diffusers' group offload pins) keeps anything of the probe.
    """
    if not device.is_cuda:
        return None
    region = HostRegion(nbytes, pin=False)  # pageable; registered below without going through the ledger
    cudart = torch.cuda.cudart()
    rc = cudart.cudaHostRegister(region.tensor.data_ptr(), nbytes, 0)
    registered = int(getattr(rc, "value", rc)) == 0
    src = region.tensor if registered else torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    try:
        src.fill_(1)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device.torch)
        dst.copy_(src, non_blocking=True)
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        torch.cuda.synchronize(device.torch)
    finally:
        if registered:
            cudart.cudaHostUnregister(region.tensor.data_ptr())
    del src, dst
    torch.cuda.empty_cache()
    if not registered:  # the fallback's block went to torch's host allocator: hand it back
        empty_host_cache = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None) or getattr(
            torch._C, "_host_emptyCache", None
        )
        with contextlib.suppress(Exception):
            if empty_host_cache is not None:
                empty_host_cache()
    return round(nbytes / sorted(times)[len(times) // 2] / 1e9, 2)


def h2d_probe(device: Device, known: dict[str, Any] | None) -> dict[str, Any]:
    """The machine fields of the pinned H2D probe: measured here, or `known` (what an earlier cell of this run
    measured on the same GPU, passed down by the runner: `harness.cell.worker.H2D_PROBE_SPEC_KEY`), so that the probe
    runs once per run and GPU instead of once per cell. `pinned_h2d_source` says which; `pinned_h2d_probe_s` is
    what the probe cost this cell (0 when it was passed down)."""
    if not device.is_cuda:
        return {}
    if known and isinstance(known.get("gbps"), int | float):
        return {"pinned_h2d_gbps": known["gbps"], "pinned_h2d_probe_s": 0.0,
                "pinned_h2d_source": f"passed down by the runner (measured by {known.get('cell_id')})"}
    t0 = time.perf_counter()
    out: dict[str, Any] = {"pinned_h2d_source": "this cell"}
    try:  # a probe that fails must not take the cell down with it
        out["pinned_h2d_gbps"] = pinned_h2d_gbps(device)
    except Exception as e:
        out["pinned_h2d_gbps"] = None
        out["pinned_h2d_probe_error"] = f"{type(e).__name__}: {e}"
    out["pinned_h2d_probe_s"] = round(time.perf_counter() - t0, 3)
    return out


def machine_info(device: Device, nvml: Nvml | None, known_h2d: dict[str, Any] | None = None) -> dict[str, Any]:
    import diffusers
    import transformers

    info: dict[str, Any] = {
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "allocator_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF") or "",
        "host_mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "cgroup_memory_max": _read_first("/sys/fs/cgroup/memory.max"),
    }
    if device.is_cuda:
        props = torch.cuda.get_device_properties(device.torch)
        info.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            sku=sku_of(props.name),
        )
        if nvml:
            info.update(nvml.info())
        info.update(h2d_probe(device, known_h2d))
    else:
        info.update(gpu=None, sku="cpu")
    return info


def sku_of(name: str) -> str:
    """A stable, filename-safe GPU SKU key such as 'nvidia-h100-80gb-hbm3'."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug


def _read_first(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def run_end_stats() -> dict[str, Any]:
    # ru_maxrss is in KiB on Linux; it never goes down, so it is the whole child's peak.
    return {"ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
