"""Does the PCIe link itself deliver a steady rate from a large pinned working set? (issue 18, drift)

The Qwen-Image-Edit 5090 both-on cell copies a 38.9 GB pinned DiT per step with the copy engine busy 99.99 % of
every round, yet its rounds delivered 52.97-54.71 GB/s (3.3 % apart, H200, session 6), while FLUX (22.6 GB) held
54.85-55.26. This takes the model and our runtime out: pinned host regions of one DiT layer each (allocated and
page-locked as the runtime's are, `HostRegion`), copied in order into a ring of device slots on a side stream, with
every pass moving the same bytes (a small working set is cycled), timed with CUDA events per region.

    python -m experiments.pcie_working_set --sizes-gib 0.6 8 38 --passes 10 [--no-huge-pages] [--out ws.json]

Per working-set size: pass GB/s (min / median / max, max/min), and per region the rate over passes, so a slow
region that is slow in every pass (placement: NUMA node, page size) is told apart from a pass that is slow
everywhere (time-varying: the link, the host). The host's NUMA nodes, the GPU's node, transparent huge page
settings and how many of the regions' bytes are in huge pages and on each node are printed with the rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.cell.offload.memory import HostRegion

LAYER_BYTES = 648 * 2**20  # about one Qwen-Image transformer block (40.8 GB / 60 layers)


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max and max/min of a list of rates."""
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3), "max_over_min": round(max(values) / min(values), 4)}


def region_consistency(rates: list[list[float]]) -> dict[str, Any]:
    """rates[pass][region]: is a region's slowness fixed (the same regions slow every pass) or does it move?
    The answer is the mean rank correlation (Spearman) of region rates between consecutive passes: near 1 when
    placement decides the rate, near 0 when the pass-to-pass variation is time, not place."""
    def ranks(row: list[float]) -> list[int]:
        order = sorted(range(len(row)), key=row.__getitem__)
        out = [0] * len(row)
        for rank, i in enumerate(order):
            out[i] = rank
        return out

    n = len(rates[0]) if rates else 0
    if n < 3 or len(rates) < 2:
        return {"rank_correlation": None, "why": "fewer than 3 regions or 2 passes"}
    corr = []
    for a, b in itertools.pairwise(rates):
        ra, rb = ranks(a), ranks(b)
        d2 = sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True))
        corr.append(1 - 6 * d2 / (n * (n * n - 1)))
    per_region = [statistics.median(p[i] for p in rates) for i in range(n)]
    return {"rank_correlation": round(statistics.mean(corr), 3), "region_median_gbps": spread(per_region)}


def numa_pages(text: str, min_bytes: int = 2**30) -> dict[str, int]:
    """Bytes per NUMA node of the large anonymous mappings in /proc/self/numa_maps text ("N0=pages", with
    "kernelpagesize_kB=" giving the page size)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if "anon=" not in line:
            continue
        kb = re.search(r"kernelpagesize_kB=(\d+)", line)
        page = int(kb.group(1)) * 1024 if kb else 4096
        nodes = {f"N{m[0]}": int(m[1]) * page for m in re.findall(r"\bN(\d+)=(\d+)", line)}
        if sum(nodes.values()) >= min_bytes:
            for k, v in nodes.items():
                out[k] = out.get(k, 0) + v
    return out


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        return f"unreadable: {e.strerror}"


def host_facts(device: torch.device) -> dict[str, Any]:
    """NUMA nodes, the GPU's node (from its PCI bus id), transparent huge page settings."""
    facts: dict[str, Any] = {
        "numa_nodes_online": _read("/sys/devices/system/node/online"),
        "thp_enabled": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_defrag": _read("/sys/kernel/mm/transparent_hugepage/defrag"),
    }
    bus = None
    try:
        import pynvml

        pynvml.nvmlInit()
        bus = pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)).busId
        bus = bus.decode() if isinstance(bus, bytes) else bus
    except Exception as e:  # the facts are context, not the measurement
        facts["gpu_numa_node"] = f"unknown: {type(e).__name__}"
    if bus:
        facts["gpu_pci_bus"] = bus
        facts["gpu_numa_node"] = _read(f"/sys/bus/pci/devices/{bus.lower()[-12:]}/numa_node")
    return facts


def anon_huge_bytes() -> int | None:
    """AnonHugePages of this process (smaps_rollup), bytes."""
    m = re.search(r"AnonHugePages:\s+(\d+) kB", _read("/proc/self/smaps_rollup"))
    return int(m.group(1)) * 1024 if m else None


def make_regions(total: int, region_bytes: int, huge_pages: bool) -> tuple[list[HostRegion], float]:
    """Regions as the runtime makes them: anonymous mapping, filled, then page-locked in place. Seconds taken."""
    t0 = time.perf_counter()
    regions = []
    for _ in range(max(1, round(total / region_bytes))):
        r = HostRegion(region_bytes, pin=True, huge_pages=huge_pages)
        r.tensor.fill_(1)
        r.pin()
        regions.append(r)
    return regions, time.perf_counter() - t0


def copy_passes(regions: list[HostRegion], copies_per_pass: int, passes: int, slots: int,
                device: torch.device) -> tuple[list[float], list[list[float]]]:
    """GB/s of each pass (every pass copies `copies_per_pass` regions, cycling the set), and per pass the rate of
    each region (its copies' bytes over their summed event times)."""
    nbytes = regions[0].nbytes
    ring = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(slots)]
    stream = torch.cuda.Stream(device)
    pass_rates, region_rates = [], []
    for _ in range(passes + 1):  # the first pass warms the path and is dropped
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(copies_per_pass + 1)]
        with torch.cuda.stream(stream):
            marks[0].record(stream)
            for i in range(copies_per_pass):
                ring[i % slots].copy_(regions[i % len(regions)].tensor, non_blocking=True)
                marks[i + 1].record(stream)
        stream.synchronize()
        times = [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(copies_per_pass)]
        pass_rates.append(nbytes * copies_per_pass / sum(times) / 1e9)
        seconds, copies = [0.0] * len(regions), [0] * len(regions)
        for i, t in enumerate(times):
            seconds[i % len(regions)] += t
            copies[i % len(regions)] += 1
        region_rates.append([nbytes * n / t / 1e9 for n, t in zip(copies, seconds, strict=True) if n])
    return pass_rates[1:], region_rates[1:]


def measure(size_gib: float, args: argparse.Namespace, device: torch.device, copies: int) -> dict[str, Any]:
    """One working-set size: build, copy `args.passes` passes, give the regions back."""
    huge_before = anon_huge_bytes() or 0
    regions, build_s = make_regions(int(size_gib * 2**30), args.region_mib * 2**20, not args.no_huge_pages)
    row: dict[str, Any] = {
        "working_set_gib": round(len(regions) * regions[0].nbytes / 2**30, 2), "regions": len(regions),
        "huge_pages_requested": not args.no_huge_pages, "build_s": round(build_s, 2),
        "anon_huge_gib": round(((anon_huge_bytes() or 0) - huge_before) / 2**30, 2),
        "numa_gib": {k: round(v / 2**30, 2) for k, v in numa_pages(_read("/proc/self/numa_maps")).items()},
        "pinned": all(r.pinned for r in regions),
    }
    rates, per_region = copy_passes(regions, copies, args.passes, args.slots, device)
    row["pass_gbps"] = [round(r, 2) for r in rates]
    row["pass"] = spread(rates)
    row["regions_over_passes"] = region_consistency(per_region)
    for r in regions:
        r.release()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-gib", type=float, nargs="+", default=[0.6, 8.0, 38.0])
    parser.add_argument("--region-mib", type=int, default=LAYER_BYTES // 2**20)
    parser.add_argument("--passes", type=int, default=10)
    parser.add_argument("--slots", type=int, default=4, help="device slots in the ring (prefetch window)")
    parser.add_argument("--no-huge-pages", action="store_true", help="regions advised MADV_NOHUGEPAGE")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("pcie_working_set: no CUDA device, nothing measured", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0)
    copies = max(1, round(max(args.sizes_gib) * 2**30 / (args.region_mib * 2**20)))
    out: dict[str, Any] = {"host": host_facts(device), "bytes_per_pass": copies * args.region_mib * 2**20,
                           "rows": []}
    print(json.dumps(out["host"]), flush=True)
    for size in args.sizes_gib:
        row = measure(size, args, device, copies)
        out["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "pass_gbps"}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
