"""Prints the zoo cell beside the folder cell of one run (`python -m experiments.folder_run.compare RECORDS`):
per phase the allocator's reserved and allocated peaks (torch.cuda.max_memory_reserved / max_memory_allocated
over the phase, bytes: the record's `alloc_peak_reserved_bytes` / `alloc_peak_allocated_bytes`) and NVML's
per-process peak (`nvml_proc_peak_bytes`), and the steady denoise step (median of steps 2..n, per measured round,
ms), with the folder cell's difference in percent. Exit 1 when any of them differs by more than --within percent
(#29: 2 %), 2 when a cell lacks one of them (a gate that compared nothing must not pass)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

PEAKS = ("alloc_peak_reserved_bytes", "alloc_peak_allocated_bytes", "nvml_proc_peak_bytes")
STEP = "steady_step_ms (median of rounds)"


def _metrics(rec: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for phase, p in sorted((rec.get("phases") or {}).items()):
        for key in PEAKS:
            if isinstance(p.get(key), int | float):
                out[f"{phase}.{key}"] = float(p[key])
    steps = [s for s in (rec.get("rounds") or {}).get("steady_step_ms") or [] if isinstance(s, int | float)]
    if steps:
        out[STEP] = statistics.median(steps)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("records", type=Path)
    p.add_argument("--within", type=float, default=2.0, help="allowed difference, percent (default 2)")
    args = p.parse_args(argv)
    recs = [json.loads(line) for line in args.records.read_text().splitlines() if line.strip()]
    zoo = [r for r in recs if "/" not in str(r.get("model"))]
    folder = [r for r in recs if "/" in str(r.get("model"))]
    if len(zoo) != 1 or len(folder) != 1 or any(r.get("status") != "ok" for r in zoo + folder):
        print("need one ok zoo cell and one ok folder cell:", [(r.get("cell_id"), r.get("status")) for r in recs])
        return 2
    a, b = _metrics(zoo[0]), _metrics(folder[0])
    for name, m in (("zoo", a), ("folder", b)):
        missing = [k for k in PEAKS if not any(key.endswith("." + k) for key in m)] + ([STEP] if STEP not in m else [])
        if missing:
            print(f"the {name} cell's record lacks {', '.join(missing)}: nothing to compare them by")
            return 2
    print(f"zoo    {zoo[0]['cell_id']}\nfolder {folder[0]['cell_id']} ({folder[0]['model']})")
    print(f"{'metric':44} {'zoo':>16} {'folder':>16} {'diff %':>8}")
    worst = 0.0
    for key in a:
        if key not in b:
            continue
        diff = 100.0 * (b[key] - a[key]) / a[key] if a[key] else 0.0
        worst = max(worst, abs(diff))
        print(f"{key:44} {a[key]:16,.1f} {b[key]:16,.1f} {diff:8.3f}")
    same = zoo[0].get("outputs", {}).get("latents_sha256") == folder[0].get("outputs", {}).get("latents_sha256")
    print(f"latents bitwise equal: {same}; largest difference {worst:.3f} % (bound {args.within} %)")
    return 0 if worst <= args.within else 1


if __name__ == "__main__":
    raise SystemExit(main())
