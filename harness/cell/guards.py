"""Guards the child runs before a cell starts: skip, with the numbers, a cell this machine cannot hold right now.

A cell that would run out of host RAM takes the whole box down (the kernel's OOM killer picks a victim, maybe
the parent); one that would fill the disk while writing a checkpoint corrupts the cache; one that starts on a GPU
other processes already fill measures their memory, not ours. Each such cell ends as `skipped`, with a reason
that gives the numbers and a `guard` dict in its record, instead of a misleading crash or oom.

Checks (each with a margin, default 10 %, `OFFLOAD_BENCH_GUARD_MARGIN`):
- host: the weight bytes the cell places in host memory (text encoder / VAE with *_cpu_offload, the DiT with
  dit_cpu_offload or layerwise; under diffusers' group offload also its pinned copies, rounded up to powers of
  two; on the CPU profile the simulated device is host memory too, so every component counts there as well)
  against min(/proc/meminfo MemAvailable, cgroup v2 memory.max - memory.current + its clean page cache).
- disk: the bytes of the synthetic checkpoints not yet cached against the free space at the checkpoint cache.
- gpu (CUDA cells only): memory other processes already use, read through NVML before this child has a CUDA
  context: a capped card needs free >= its cap; an uncapped one needs others to hold at most 5 % of the GPU.

Every number can be overridden through the environment to fake a small machine in tests:
OFFLOAD_BENCH_HOST_AVAILABLE_BYTES, OFFLOAD_BENCH_DISK_FREE_BYTES, OFFLOAD_BENCH_GPU_FREE_BYTES with
OFFLOAD_BENCH_GPU_TOTAL_BYTES, OFFLOAD_BENCH_GPU_MAX_FOREIGN_FRACTION; OFFLOAD_BENCH_GUARDS=0 turns guards off.

Weight bytes come from `ComponentSpec.build_on_meta` (parameters on the meta device: nothing is allocated).
Importing this module imports no torch; `check_cell` does (the child has imported it already).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.common.contract import CellSpec, Placement

HOST_ENV = "OFFLOAD_BENCH_HOST_AVAILABLE_BYTES"
DISK_ENV = "OFFLOAD_BENCH_DISK_FREE_BYTES"
GPU_FREE_ENV = "OFFLOAD_BENCH_GPU_FREE_BYTES"
GPU_TOTAL_ENV = "OFFLOAD_BENCH_GPU_TOTAL_BYTES"
GPU_FOREIGN_ENV = "OFFLOAD_BENCH_GPU_MAX_FOREIGN_FRACTION"
MARGIN_ENV = "OFFLOAD_BENCH_GUARD_MARGIN"
SWITCH_ENV = "OFFLOAD_BENCH_GUARDS"

DEFAULT_MARGIN = 0.10
DEFAULT_GPU_FOREIGN_FRACTION = 0.05
CHECKPOINT_SEED = 0  # the worker generates every checkpoint with seed 0
class GuardConfigError(ValueError):
    """An OFFLOAD_BENCH_* guard override is not a number. The message names the variable."""


def _env_number(name: str, kind: type = int) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = kind(raw.strip()) if kind is float else int(float(raw.strip()))
    except ValueError:
        raise GuardConfigError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise GuardConfigError(f"{name}={raw!r} is negative")
    return value


def fmt_bytes(n: int | float | None) -> str:
    """'12,345,678 bytes (11.8 MiB)': exact bytes for the record, a readable size for people."""
    if n is None:
        return "unknown"
    n = int(n)
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n:,} bytes ({n / size:.1f} {unit})"
    return f"{n:,} bytes"


def margin() -> float:
    value = _env_number(MARGIN_ENV, float)
    return DEFAULT_MARGIN if value is None else value


def with_margin(nbytes: int, m: float | None = None) -> int:
    return int(nbytes * (1 + (margin() if m is None else m)) + 0.5)


# ---------------------------------------------------------------------------------------------------- host RAM


def meminfo_available_bytes(path: str = "/proc/meminfo") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_dirs(root: Path = Path("/sys/fs/cgroup")) -> list[Path]:
    """This process's cgroup v2 folder and its ancestors up to the root (empty without cgroup v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return []
    here = root / rel.strip().lstrip("/")
    dirs = []
    while True:
        dirs.append(here)
        if here == root or root not in here.parents:
            break
        here = here.parent
    return dirs


def _reclaimable_file_bytes(d: Path) -> int:
    """Clean page cache charged to cgroup `d` (memory.stat: file - shmem - file_dirty - file_writeback): the kernel
    drops it before it kills anyone. memory.current counts it, and right after a 53 GB checkpoint was written or
    read most of it is that file's pages, so without this the headroom looks 40+ GiB smaller than it is."""
    try:
        stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines() if line.strip())
        file, shmem, dirty, writeback = (int(stat.get(k, 0)) for k in ("file", "shmem", "file_dirty", "file_writeback"))
    except (OSError, ValueError):
        return 0
    return max(0, file - shmem - dirty - writeback)


def cgroup_available_bytes(dirs: list[Path] | None = None) -> tuple[int | None, str | None]:
    """The tightest memory.max - (memory.current - clean page cache) over this cgroup and its ancestors, and which
    folder set it."""
    best: tuple[int | None, str | None] = (None, None)
    for d in _cgroup_dirs() if dirs is None else dirs:
        try:
            limit = (d / "memory.max").read_text().strip()
            current = int((d / "memory.current").read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max":
            continue
        try:
            avail = max(0, int(limit) - current + _reclaimable_file_bytes(d))
        except ValueError:
            continue
        if best[0] is None or avail < best[0]:
            best = (avail, str(d))
    return best


def host_available() -> dict[str, Any]:
    """Host bytes this child may still use: min(MemAvailable, cgroup headroom), or the override."""
    meminfo = meminfo_available_bytes()
    cgroup, cgroup_dir = cgroup_available_bytes()
    override = _env_number(HOST_ENV)
    candidates = [v for v in (meminfo, cgroup) if v is not None]
    info: dict[str, Any] = {"meminfo_available_bytes": meminfo, "cgroup_available_bytes": cgroup}
    if cgroup_dir:
        info["cgroup_dir"] = cgroup_dir
    if override is not None:
        info.update(available_bytes=override, source=HOST_ENV)
    elif candidates:
        value = min(candidates)
        info.update(available_bytes=value, source="cgroup" if value == cgroup and value != meminfo else "MemAvailable")
    else:
        info.update(available_bytes=None, source="unknown")
    return info


# -------------------------------------------------------------------------------------------- component sizes


_WEIGHT_BYTES: dict[tuple[str, str], int] = {}


def weight_bytes(spec: Any) -> int:
    """Bytes of a component's state dict (= its checkpoint's data), from a meta-device build: no allocation."""
    key = (spec.role, spec.key(CHECKPOINT_SEED))
    if key not in _WEIGHT_BYTES:
        module = spec.build_on_meta()
        _WEIGHT_BYTES[key] = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        del module
    return _WEIGHT_BYTES[key]


_PINNED_COPY_BYTES: dict[tuple[str, str], int] = {}


def pinned_torch_allocator_bytes(spec: Any) -> int:
    """What torch's caching host allocator holds for a pinned copy of every tensor of a component (each rounded up
    to a power of two): an upper bound on what diffusers' streamed group offload pins."""
    from harness.cell.offload.memory import torch_pinned_block_bytes

    key = (spec.role, spec.key(CHECKPOINT_SEED))
    if key not in _PINNED_COPY_BYTES:
        module = spec.build_on_meta()
        _PINNED_COPY_BYTES[key] = sum(
            torch_pinned_block_bytes(t.numel() * t.element_size()) for t in module.state_dict().values()
        )
        del module
    return _PINNED_COPY_BYTES[key]


def checkpoint_device() -> str:
    """The generator device in the checkpoint cache key, chosen as `ensure_checkpoint` chooses it."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def checkpoint_folder(spec: Any, device: str) -> Path:
    """The folder `harness.cell.checkpoint.ensure_checkpoint` uses for `spec` (same formula, kept in step by
    tests/test_guards.py)."""
    from harness.cell.checkpoint import cache_root

    return cache_root() / "checkpoints" / f"{spec.role}-{spec.key(CHECKPOINT_SEED)}-{device}"


def checkpoint_cached(folder: Path) -> bool:
    return (folder / "complete.json").exists() and (folder / "model.safetensors").exists()


def disk_free_bytes(path: Path) -> tuple[int | None, str]:
    """Free bytes on the filesystem that holds `path` (its nearest existing ancestor), or the override."""
    override = _env_number(DISK_ENV)
    if override is not None:
        return override, DISK_ENV
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free, f"statvfs({probe})"
    except OSError:
        return None, "unknown"


# ---------------------------------------------------------------------------------------------------- the GPU


def _nvml_handle(nv: Any) -> Any:
    """The NVML handle of the GPU this child's CUDA device 0 will be, from CUDA_VISIBLE_DEVICES (an index, read
    in PCI order as NVML numbers GPUs, or a GPU-/MIG- UUID)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first = visible.split(",")[0].strip() if visible else ""
    if first.startswith(("GPU-", "MIG-")):
        return nv.nvmlDeviceGetHandleByUUID(first)
    return nv.nvmlDeviceGetHandleByIndex(int(first) if first.isdigit() else 0)


def gpu_memory() -> dict[str, Any]:
    """Total and free bytes of the GPU, and the processes already on it, without creating a CUDA context."""
    fake_free, fake_total = _env_number(GPU_FREE_ENV), _env_number(GPU_TOTAL_ENV)
    if fake_free is not None and fake_total is not None:
        return {"total_bytes": fake_total, "free_bytes": fake_free, "source": f"{GPU_FREE_ENV}/{GPU_TOTAL_ENV}"}
    import pynvml as nv

    nv.nvmlInit()
    try:
        h = _nvml_handle(nv)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        others = []
        try:
            for p in nv.nvmlDeviceGetComputeRunningProcesses(h)[:16]:
                others.append({"pid": int(p.pid), "used_bytes": p.usedGpuMemory})
        except nv.NVMLError:
            pass
        info = {"total_bytes": int(mem.total), "free_bytes": int(mem.free), "used_bytes": int(mem.used),
                "processes": others, "source": "nvmlDeviceGetMemoryInfo"}
    finally:
        nv.nvmlShutdown()
    if fake_free is not None:
        info.update(free_bytes=fake_free, source=GPU_FREE_ENV)
    return info


def gpu_verdict(info: dict[str, Any], cap_bytes: int | None) -> tuple[bool, str]:
    """Whether the GPU has room for the card: free >= cap (capped), others <= the allowed fraction (uncapped)."""
    total, free = info["total_bytes"], info["free_bytes"]
    foreign = total - free
    if cap_bytes:
        ok = free >= cap_bytes
        return ok, (
            f"GPU: card cap {fmt_bytes(cap_bytes)} but only {fmt_bytes(free)} free of {fmt_bytes(total)} "
            f"({fmt_bytes(foreign)} already used by other processes)"
        )
    fraction = _env_number(GPU_FOREIGN_ENV, float)
    fraction = DEFAULT_GPU_FOREIGN_FRACTION if fraction is None else fraction
    allowed = int(total * fraction)
    ok = foreign <= allowed
    return ok, (
        f"GPU: uncapped card, but other processes already use {fmt_bytes(foreign)} of {fmt_bytes(total)} "
        f"({fmt_bytes(free)} free), more than the {fraction:.0%} allowed ({GPU_FOREIGN_ENV})"
    )


# -------------------------------------------------------------------------------------------------- the checks


@dataclass
class GuardResult:
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def skip(self) -> bool:
        return bool(self.failed)

    @property
    def reason(self) -> str | None:
        return ("guard: " + "; ".join(self.reasons)) if self.reasons else None

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.checks,
            "failed": list(self.failed),
            "problems": list(self.problems),
            "margin": margin(),
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _host_check(device: str, placements: dict[str, Placement], model: Any, m: float) -> tuple[bool, dict, str]:
    device_is_host = device != "cuda"
    components, weights_on_host = {}, 0
    for role, comp in model.components.items():
        nbytes = weight_bytes(comp)
        placement = placements[role]
        on_host = placement.holds_host_copy
        # On the CPU profile the simulated device is host memory as well: what sits "on the device" counts too.
        host_bytes = nbytes * (int(on_host) + int(device_is_host))
        if placement.pins_second_copy:
            host_bytes += pinned_torch_allocator_bytes(comp)
        components[role] = {"placement": placements.get(role), "weight_bytes": nbytes, "host_bytes": host_bytes}
        weights_on_host += host_bytes
    needed = with_margin(weights_on_host, m)
    info = host_available()
    available = info["available_bytes"]
    ok = available is None or available >= needed
    check = {"ok": ok, "needed_bytes": needed, "weight_bytes_on_host": weights_on_host,
             "device_is_host": device_is_host, "components": components, **info}
    reason = (
        f"host RAM: needs {fmt_bytes(needed)} ({fmt_bytes(weights_on_host)} of weights in host memory "
        f"+ {m:.0%}) but {fmt_bytes(available)} available (source {info['source']}; MemAvailable "
        f"{fmt_bytes(info['meminfo_available_bytes'])}, cgroup headroom {fmt_bytes(info['cgroup_available_bytes'])})"
    )
    return ok, check, reason


def _disk_check(model: Any, m: float) -> tuple[bool, dict, str]:
    device = checkpoint_device()
    missing, cached = {}, []
    folder = None
    for role, comp in model.components.items():
        folder = checkpoint_folder(comp, device)
        if checkpoint_cached(folder):
            cached.append(role)
        else:
            missing[role] = weight_bytes(comp)
    root = folder.parent if folder is not None else Path(".")
    to_write = sum(missing.values())
    needed = with_margin(to_write, m) if to_write else 0
    free, source = disk_free_bytes(root)
    ok = not to_write or free is None or free >= needed
    check = {"ok": ok, "path": str(root), "needed_bytes": needed, "checkpoint_bytes_missing": missing,
             "cached": cached, "free_bytes": free, "source": source, "generator_device": device}
    reason = (
        f"disk: {fmt_bytes(needed)} needed for checkpoints not yet cached ({', '.join(missing) or 'none'}: "
        f"{fmt_bytes(to_write)} + {m:.0%}) but {fmt_bytes(free)} free at {root} (source {source})"
    )
    return ok, check, reason


def check_cell(spec: CellSpec, placements: dict[str, Placement]) -> GuardResult:
    """Runs every guard for the cell `spec` with the loader's `placements`.

    A guard that cannot read its numbers (or raises) is recorded under `problems` and does not skip the cell.
    """
    started = time.monotonic()
    result = GuardResult()
    if os.environ.get(SWITCH_ENV, "1").strip().lower() in ("0", "off", "false", "no"):
        result.problems.append(f"guards turned off by {SWITCH_ENV}")
        return result
    from harness.models import get_model

    try:
        m = margin()
        model = get_model(spec.model)
    except Exception as e:
        result.problems.append(f"guards not run: {type(e).__name__}: {e}")
        return result
    checks = [("host", lambda: _host_check(spec.device, placements, model, m)), ("disk", lambda: _disk_check(model, m))]
    if spec.device == "cuda":

        def gpu() -> tuple[bool, dict, str]:
            info = gpu_memory()
            ok, reason = gpu_verdict(info, spec.card.cap_bytes)
            return ok, {"ok": ok, "cap_bytes": spec.card.cap_bytes, **info}, reason

        checks.append(("gpu", gpu))
    for name, fn in checks:
        try:
            ok, check, reason = fn()
        except GuardConfigError:
            raise
        except Exception as e:
            result.problems.append(f"{name} guard could not run: {type(e).__name__}: {e}")
            continue
        result.checks[name] = check
        if not ok:
            result.failed.append(name)
            result.reasons.append(reason)
    result.elapsed_s = time.monotonic() - started
    return result
