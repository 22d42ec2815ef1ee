"""Per-round telemetry of a run's cells as tables: `python -m harness.analyze.drift RUN [--cell SUBSTRING]`.

What issue 18's drift and copy-limit experiments read: for each round of each cell that recorded telemetry
(`record["telemetry"]`), the steady step time (median of steps 2..n), the GPU's SM clock range, temperature,
power and throttle reasons over its steps (NVML), the allocator's peaks, retries and segments, the host's page
cache, dirty bytes and pinned bytes at its end, and, with the copy timeline on, the copy engine's busy fraction
and the steps' share of the copy limit; then the spread of the measured rounds. Reads records only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.contract import CellRecord

MIB = 2**20


def _range(values: list[Any]) -> str:
    known = [v for v in values if isinstance(v, int | float)]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def _mib(v: Any) -> str:
    return f"{v / MIB:,.0f}" if isinstance(v, int | float) else ""


def round_rows(record: CellRecord) -> list[list[Any]]:
    """One row per round of the record's telemetry."""
    rows = []
    for r in (record.telemetry or {}).get("rounds") or []:
        steps = (r.get("step_machine") or {}).get("steps") or []
        reasons = sorted({n for s in steps for n in s.get("throttle_reason_names") or []})
        alloc = r.get("allocator") or {}
        retries = max((a.get("num_alloc_retries", 0) for a in alloc.values()), default=None)
        segments = max((a.get("segments_peak", a.get("segments", 0)) for a in alloc.values()), default=None)
        host = r.get("host") or {}
        timeline = r.get("copy_timeline") or {}
        rows.append([
            f"{r['round'] + 1}{' (warm-up)' if r.get('warmup') else ''}",
            r.get("steady_step_ms"),
            _range([s.get("sm_clock_mhz") for s in steps]),
            _range([s.get("mem_clock_mhz") for s in steps]),
            _range([s.get("temperature_c") for s in steps]),
            _range([s.get("power_w") for s in steps]),
            ", ".join(reasons),
            _mib(r.get("alloc_peak_allocated_bytes")),
            _mib(r.get("alloc_peak_reserved_bytes")),
            retries,
            segments,
            _mib(host.get("page_cache_bytes")),
            _mib(host.get("dirty_bytes")),
            _mib(host.get("pinned_requested_bytes")),
            timeline.get("steady_median_busy_fraction"),
            timeline.get("steady_median_pct_of_copy_limit"),
        ])
    return rows


def reserved_rows(record: CellRecord) -> list[list[Any]]:
    """One row per phase with a reserved-memory attribution (the merged phases: peaks are the max over rounds)."""
    rows = []
    for name, ph in record.phases.items():
        att = ph.reserved_attribution
        if not att:
            continue
        streams = att.get("reserved_by_stream_bytes") or {}
        rows.append([name, _mib(att.get("reserved_peak_bytes")), _mib(att.get("allocated_peak_bytes")),
                     _mib(att.get("gap_bytes")), _mib(att.get("cached_from_earlier_bytes")),
                     _mib(att.get("inactive_split_peak_bytes")), _mib(att.get("unexplained_bytes")),
                     ", ".join(f"{k}: {_mib(v)}" for k, v in sorted(streams.items())),
                     _mib(ph.empty_cache_freed_bytes)])
    return rows


RESERVED_HEADERS = ["phase", "alloc peak reserved MiB", "alloc peak allocated MiB", "gap MiB",
                    "cached from earlier MiB", "inactive split peak MiB", "unexplained MiB",
                    "reserved by stream MiB (end)", "empty_cache freed MiB"]

HEADERS = ["round", "steady step ms", "SM MHz", "mem MHz", "temp C", "power W", "throttle reasons",
           "alloc peak allocated MiB", "alloc peak reserved MiB", "alloc retries (cumulative)", "segments",
           "host page cache MiB", "host dirty MiB", "pinned requested MiB", "copy busy fraction",
           "% of copy limit"]


def render(records: list[CellRecord]) -> str:
    out = []
    for rec in records:
        rows = round_rows(rec)
        if not rows:
            continue
        tele = rec.telemetry or {}
        out += [f"## {rec.cell_id}", "",
                f"sampler every {tele.get('sampler_interval_ms')} ms (0 = off); status {rec.status}", ""]
        out += [tabulate(rows, headers=HEADERS, tablefmt="github", disable_numparse=True), ""]
        spread = ((rec.rounds or {}).get("spread") or {}).get("steady_step_ms")
        if spread:
            out += [f"measured rounds' steady step: min {spread['min']} / median {spread['median']} / max "
                    f"{spread['max']} ms, max/min {spread['max_over_min']}", ""]
        reserved = reserved_rows(rec)
        if reserved:
            mechanism = (rec.cache_release or {}).get("mechanism", "none")
            out += [f"reserved memory by phase (allocator; cache release: {mechanism})", "",
                    tabulate(reserved, headers=RESERVED_HEADERS, tablefmt="github", disable_numparse=True), ""]
        unavailable = {k: v for r in (tele.get("rounds") or [])
                       for k, v in ((r.get("step_machine") or {}).get("unavailable") or {}).items()}
        if unavailable:
            out += ["null fields: " + "; ".join(f"{k}: {v}" for k, v in sorted(unavailable.items())), ""]
    return "\n".join(out) + "\n" if out else "no record with telemetry\n"


def main(argv: list[str] | None = None) -> int:
    from harness.run.results import latest_by_cell, read_cell_records

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder or a records.jsonl file")
    parser.add_argument("--cell", default="", help="only cells whose id contains this")
    args = parser.parse_args(argv)
    path = args.run / "records.jsonl" if args.run.is_dir() else args.run
    if not path.exists():
        print(f"error: {path}: no such records file", file=sys.stderr)
        return 2
    records = [r for r in latest_by_cell(read_cell_records(path).records).values() if args.cell in r.cell_id]
    print(render(records), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
