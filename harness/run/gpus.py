"""Which GPU each pytest-xdist worker's cells run on, and in which order cells are handed out.

`pytest scenarios -n N` (or `-n auto`) runs one xdist worker per visible GPU; worker `gw<k>` owns the k-th visible
GPU and starts every cell child with `CUDA_VISIBLE_DEVICES=<that GPU>`, so each child sees exactly one device, as
its CUDA device 0, before CUDA initialises. GPU ids are strings as CUDA_VISIBLE_DEVICES spells them: indices
("0", "3") or UUIDs ("GPU-...", "MIG-..."). Everything here is pure (no torch, no CUDA) except `nvml_count`.

Cost hint (`cell_cost`): the harness never imports torch in the pytest processes, so instead of weight bytes
(`ComponentSpec.build_on_meta` is exact but imports torch and diffusers and takes ~10 s for the zoo's published
models) a cell's cost is estimated from its scenario as steps x frames x height x width x CFG passes per step
(2 with true CFG, else 1, batched or not: the work is the same) x pipeline calls (warmup + rounds). It ranks the
real-size GPU scenarios (1024x1024 and 480x832x81 video) far above the tiny 64x64 twins, which is all
longest-first scheduling needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

_WORKER = re.compile(r"gw(\d+)")


def visible_gpus(env: Mapping[str, str], nvml_count: int | None) -> list[str]:
    """The GPUs a process started with `env` may use, as CUDA_VISIBLE_DEVICES ids.

    CUDA_VISIBLE_DEVICES unset: every GPU NVML counts ("0" .. str(nvml_count - 1); none if the count is unknown).
    Set: its comma-separated entries, spaces stripped, read as CUDA reads them: an empty string means no GPU, and
    the list ends at the first entry that is not a device (empty, "-1", not a number or GPU-/MIG- UUID, an index
    NVML does not count, or a repeat), as CUDA ignores everything from an invalid entry on.
    """
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [str(i) for i in range(nvml_count or 0)]
    out: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.isdigit():
            entry = str(int(entry))  # "01" is device 1
            if nvml_count is not None and int(entry) >= nvml_count:
                break
        elif not entry.startswith(("GPU-", "MIG-")):
            break
        if entry in out:
            break
        out.append(entry)
    return out


def gpu_for_worker(worker_id: str | None, gpus: list[str]) -> str | None:
    """The GPU of xdist worker `worker_id`: "gw<k>" gets gpus[k]. Without xdist (None, "" or "master", the
    controller) the first GPU, or None when there is none. A worker beyond the GPUs is an error, never a share."""
    if worker_id in (None, "", "master"):
        return gpus[0] if gpus else None
    m = _WORKER.fullmatch(worker_id)
    if m is None:
        raise ValueError(f"unknown pytest-xdist worker id {worker_id!r} (expected gw<k>)")
    k = int(m.group(1))
    if k >= len(gpus):
        raise ValueError(
            f"pytest-xdist worker {worker_id} has no GPU of its own: {len(gpus)} visible "
            f"({', '.join(gpus) or 'none'}); run with -n at most the number of visible GPUs (-n auto picks it)"
        )
    return gpus[k]


def child_env(gpu: str | None, env: Mapping[str, str]) -> dict[str, str]:
    """What a cell child started by a worker that owns `gpu` gets on top of the parent's environment:
    CUDA_VISIBLE_DEVICES=<gpu>, and CUDA_DEVICE_ORDER=PCI_BUS_ID unless the parent chose an order, so that an index
    means the same GPU to CUDA as to NVML (which numbers GPUs in PCI order; `harness.cell.guards` reads it that way).
    Nothing for `gpu` None (the CPU profile, or no xdist)."""
    if gpu is None:
        return {}
    out = {"CUDA_VISIBLE_DEVICES": gpu}
    if "CUDA_DEVICE_ORDER" not in env:
        out["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return out


def child_gpu(env: Mapping[str, str], device: str) -> str | None:
    """The GPU id a child started with `env` runs on (its CUDA device 0): the first entry of CUDA_VISIBLE_DEVICES,
    "0" when that is unset, None on the CPU profile or when no GPU is visible."""
    if device != "cuda":
        return None
    if env.get("CUDA_VISIBLE_DEVICES") is None:
        return "0"
    gpus = visible_gpus(env, None)
    return gpus[0] if gpus else None


def cell_cost(cell: Any) -> int:
    """Estimated work of a cell (see the module docstring): steps x frames x height x width x passes x calls."""
    s = cell.scenario
    passes = 2 if s.true_cfg_scale > 1 else 1
    return s.steps * max(s.frames, 1) * s.height * s.width * passes * (s.warmup + s.rounds)


def longest_first(items: Iterable[T], cost: Callable[[T], float]) -> list[T]:
    """`items` by decreasing cost; items of equal cost keep their order (a stable sort), so every xdist worker
    collects the same order."""
    return sorted(items, key=lambda item: -cost(item))


def nvml_count() -> int | None:
    """How many GPUs NVML sees (no CUDA context); None when NVML is unavailable."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None
