"""`python -m harness.analyze.overhead RUN...`: the fixed cost of each cell of a run (what a cell costs besides
its measured load and rounds), part by part, with the median over the run's cells, to quote a before/after.

A record from this harness carries `overhead` (harness.cell.worker.run_cell, completed by
harness.run.runner.finish_overhead). An older record has none: its fixed cost is estimated as elapsed_s minus the
load phase's and the runtime phases' wall times (times the rounds), and the row says "estimated".
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from tabulate import tabulate

from harness.common.contract import RUNTIME_PHASES, CellRecord, JsonObject, Phase, Status
from harness.common.records import latest_by_cell, read_cell_records

# process_start_s: a spawned child's interpreter start; fork_s and server_start_s: a forked one's fork, and the fork
# server's start in the run's first forked cell (harness.run.runner.OVERHEAD_PARTS).
PARTS = ("process_start_s", "fork_s", "server_start_s", "imports_s", "guards_s", "cuda_init_s", "h2d_probe_s",
         "checkpoint_s", "warmup_s", "teardown_s", "other_s")


def fixed_cost(record: CellRecord) -> JsonObject | None:
    """{"elapsed_s", "measured_s", "fixed_s", parts..., "estimated"} of a cell that ran a child to the end (ok),
    None for the others (a copy, a skip, a failure: no measured part to subtract). The parts are the record's
    `overhead` section as the child wrote it."""
    elapsed = record.elapsed_s
    if record.status is not Status.OK or record.same_as or not isinstance(elapsed, int | float):
        return None
    overhead = record.overhead
    if isinstance(overhead, dict) and isinstance(overhead.get("fixed_s"), int | float):
        return {"elapsed_s": elapsed, **overhead, "estimated": False}

    def wall_ms(phase: str) -> float:
        stats = record.phases.get(phase)
        return (stats.wall_ms or 0) if stats else 0

    rounds = record.rounds or {}
    calls = int(rounds.get("warmup") or 0) + int(rounds.get("rounds") or 1)
    measured = (wall_ms(Phase.LOAD) + sum(wall_ms(p) for p in RUNTIME_PHASES) * calls) / 1e3
    return {"elapsed_s": elapsed, "measured_s": round(measured, 3), "fixed_s": round(elapsed - measured, 3),
            "estimated": True}


def rows(records: list[CellRecord]) -> list[dict[str, str | float | None]]:
    """The table: one row per cell that ran to the end, by column header."""
    out = []
    for r in latest_by_cell(records).values():
        cost = fixed_cost(r)
        if cost is None:
            continue
        row = {"cell": r.cell_id, "start": cost.get("start") or "", "elapsed s": cost["elapsed_s"],
               "measured s": cost.get("measured_s"), "fixed s": cost["fixed_s"]}
        row |= {p.removesuffix("_s").replace("_", " "): cost.get(p) for p in PARTS}
        row["estimated"] = "yes" if cost["estimated"] else ""
        out.append(row)
    return out


def server_start_line(records: list[CellRecord]) -> str:
    """The fork server's start, paid once per run inside its first forked cell (whatever that cell's fate), which
    the per-cell median leaves out; empty for a run without one."""
    starts = [(r.cell_id, o["server_start_s"]) for r in records
              if isinstance(o := r.overhead, dict) and isinstance(o.get("server_start_s"), int | float)]
    return "".join(f"fork server start: {s:.2f} s, in {cid} (once per run and server)\n" for cid, s in starts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.analyze.overhead", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run folders or records files")
    args = parser.parse_args(argv)
    for run in args.runs:
        path = Path(run) / "records.jsonl" if Path(run).is_dir() else Path(run)
        records = read_cell_records(path).records
        table = rows(records)
        print(f"## {run}\n")
        if not table:
            print("no cell ran to the end: no fixed cost to show\n")
            continue
        print(tabulate(table, headers="keys", tablefmt="github"))
        fixed = [r["fixed s"] for r in table]
        print(f"\nfixed cost per cell: median {statistics.median(fixed):.2f} s, min {min(fixed):.2f} s, max "
              f"{max(fixed):.2f} s over {len(fixed)} cells; measured part median "
              f"{statistics.median(r['measured s'] for r in table):.2f} s")
        print(server_start_line(records) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
