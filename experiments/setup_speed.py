"""DiT setup speed, one variable at a time in one process: a model's checkpoint into our per-layer host regions
(pinned with CUDA), per reader thread count and with pinning overlapped with reading or after it (issue 18).

    python -m experiments.setup_speed --model qwen-image --threads 8 16 --repeats 2 [--out setup.json]

The checkpoint is read once first so that every measured fill comes from the page cache (the issue's case); each
variant builds fresh regions, fills them (`fill_regions`: reads, and pins when overlapped), pins the rest, and
gives them back before the next. Prints wall time and GB/s per step (alloc, fill, pin after) and the host page
cache before each; `--out` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.cell.checkpoint import CheckpointReader, ensure_checkpoint
from harness.cell.measure import host_memory_state
from harness.cell.offload.layerwise import LayerwiseRuntime
from harness.cell.offload.memory import Device, SetupOptions, fill_regions
from harness.models import get_model


def measure(model_name: str, threads: int, overlap_pin: bool, device: Device) -> dict[str, Any]:
    """One fill of the model's DiT layers into fresh per-layer regions; the regions are released after."""
    spec = get_model(model_name).components["dit"]
    reader = CheckpointReader(ensure_checkpoint(spec, seed=0))
    cache = host_memory_state().get("page_cache_bytes")
    t0 = time.perf_counter()
    rt = LayerwiseRuntime(spec.build_on_meta(), spec.layer_groups, device, prefetch_size=1, pin=True)
    t1 = time.perf_counter()
    jobs = [(lay, reg) for g in rt.groups for lay, reg in zip(g.layouts, g.regions, strict=True)]
    stats = fill_regions(jobs, reader.read_into, SetupOptions(threads, overlap_pin))
    t2 = time.perf_counter()
    rt.pin()  # what overlap left (nothing) or every region (read-then-pin)
    t3 = time.perf_counter()
    nbytes = rt.host_bytes
    pinned = rt.pinned
    for g in rt.groups:
        for region in g.regions:
            region.release()
    return {
        "threads": threads, "overlap_pin": overlap_pin, "bytes": nbytes, "pinned": pinned,
        "page_cache_bytes_before": cache, "alloc_s": round(t1 - t0, 4), "fill_s": round(t2 - t1, 4),
        "pin_after_s": round(t3 - t2, 4), "total_s": round(t3 - t0, 4), "gbps": round(nbytes / (t3 - t0) / 1e9, 2),
        "fill": stats.as_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen-image", help="zoo model whose DiT is read (default qwen-image)")
    parser.add_argument("--threads", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = Device("cuda" if torch.cuda.is_available() else "cpu")
    spec = get_model(args.model).components["dit"]
    warm = CheckpointReader(ensure_checkpoint(spec, seed=0))  # one pass through the file: page cache warm
    scratch = torch.empty(max(warm.nbytes(n) for n in warm.names()), dtype=torch.uint8)
    for name in warm.names():
        warm.read_into(name, scratch[: warm.nbytes(name)])
    del scratch
    rows = []
    for _ in range(args.repeats):
        for threads in args.threads:
            for overlap in (False, True):
                row = measure(args.model, threads, overlap, device)
                rows.append(row)
                print(f"threads {threads:3d} overlap_pin {overlap!s:5}: {row['gbps']:6.2f} GB/s "
                      f"(alloc {row['alloc_s']} s, fill {row['fill_s']} s, pin after {row['pin_after_s']} s, "
                      f"read {row['fill']['read_thread_s']} thread-s, pin {row['fill']['pin_thread_s']} thread-s; "
                      f"pinned {row['pinned']})", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
