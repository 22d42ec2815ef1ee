"""Per-round telemetry of a run's cells as tables: `python -m harness.analyze.drift RUN [--cell SUBSTRING]`.

What the drift and copy-limit experiments read (`docs/findings/drift.md`, `docs/findings/copy-limit.md`): for each
round of each cell that recorded telemetry (`record["telemetry"]`), the steady step time (median of steps 2..n), the
GPU's SM clock range, temperature, power and throttle reasons over its steps (NVML), the allocator's peaks, retries
and segments, the host's page cache, dirty bytes and pinned bytes at its end, and, with the copy timeline on, the
copy engine's busy fraction and the steps' share of the copy limit; then the spread of the measured rounds and what
the telemetry says caused it (`spread_cause`). Reads records only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.common.contract import CellRecord
from harness.common.units import MIB


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
            timeline.get("steady_median_busy_gbps"),
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
           "copy busy GB/s", "% of copy limit"]


NOISE_FLOOR = 0.01  # a spread of the measured rounds' steady steps below this is not attributed
BUSY = 0.99  # a copy engine busy this much of a round is the round's limit


def spread_cause(record: CellRecord) -> str | None:
    """What the telemetry says moved the measured rounds' steady steps (None: fewer than two measured rounds).

    Clocks first (the slowest round's lowest SM clock more than 2 % under the fastest round's highest, or a
    thermal / hardware slowdown reason in a measured round); then the PCIe link: with the copy timeline on and the
    copy engine busy >= 99 % of every measured round, a step is its bytes over the link's delivered bandwidth, so
    when step x delivered GB/s varies less than half as much as the step, the link's bandwidth is the cause (the
    Qwen-Image-Edit 5090 both-on rounds on the H200, `results/h200/drift.records.jsonl`: steps 1,491-1,540 ms,
    3.3 %, at 52.9-54.7 GB/s).
    """
    rounds = [r for r in (record.telemetry or {}).get("rounds") or [] if not r.get("warmup")]
    steps = [r.get("steady_step_ms") for r in rounds]
    if len(rounds) < 2 or not all(isinstance(v, int | float) and v > 0 for v in steps):
        return None
    spread = max(steps) / min(steps) - 1
    if spread < NOISE_FLOOR:
        return f"{spread:.1%} between rounds: under the {NOISE_FLOOR:.0%} noise floor, nothing to attribute"
    clocks = [[s.get("sm_clock_mhz") for s in (r.get("step_machine") or {}).get("steps") or []] for r in rounds]
    slow, fast = steps.index(max(steps)), steps.index(min(steps))
    slow_low = min((c for c in clocks[slow] if c), default=None)
    fast_high = max((c for c in clocks[fast] if c), default=None)
    reasons = {n for r in rounds for s in (r.get("step_machine") or {}).get("steps") or []
               for n in s.get("throttle_reason_names") or [] if "thermal" in n or "hw_" in n}
    if reasons or (slow_low and fast_high and slow_low < 0.98 * fast_high):
        return (f"{spread:.1%} between rounds with the GPU's clocks moving (SM {slow_low} MHz in the slowest round "
                f"against {fast_high} in the fastest{'; ' + ', '.join(sorted(reasons)) if reasons else ''})")
    timelines = [r.get("copy_timeline") or {} for r in rounds]
    busy = [t.get("steady_median_busy_fraction") for t in timelines]
    gbps = [t.get("steady_median_busy_gbps") for t in timelines]
    flat = f"SM clock {_range([c for cs in clocks for c in cs])} MHz"
    if not all(isinstance(b, int | float) and b >= BUSY for b in busy) or not all(gbps):
        why = "no copy timeline" if not any(gbps) else "the copy engine idle more than 1 % of some round"
        return f"{spread:.1%} between rounds, not attributed: {flat}, {why}"
    work = [s * g for s, g in zip(steps, gbps, strict=True)]
    if max(work) / min(work) - 1 <= spread / 2:
        return (f"{spread:.1%} between rounds from the PCIe link: the copy engine was busy >= {min(busy):.2%} of "
                f"every round and delivered {min(gbps):g}-{max(gbps):g} GB/s; {flat}, no throttle")
    return f"{spread:.1%} between rounds, not attributed: {flat}, copy engine busy, bytes x GB/s not constant"


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
        cause = spread_cause(rec)
        if cause:
            out += [f"cause: {cause}", ""]
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
    from harness.common.records import latest_by_cell, read_cell_records

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
