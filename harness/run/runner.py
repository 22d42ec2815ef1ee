"""The parent side: one child per cell, its fate recorded, every record appended as the cell ends. The child is
forked by the run's fork server or spawned (`harness.run.cell_start`, OFFLOAD_BENCH_CELL_START); either way it runs
`python -m harness.cell.worker`, in its own process group, and its fate reads the same. The parent never imports
torch, so it never holds a CUDA context that would distort the children's numbers.

One job per module, in the order a cell goes through them:
    folder.py      the run folder: records.jsonl (locked, fsynced appends, tolerant reads, resume), the per-cell
                   folders and locks, the free-space check
    cell.py        one cell: the child's spec (cell.json), its start, its record completed and appended
    cell_start.py  how the child starts: forked by the run's fork server, or spawned
    process.py     the child's process tree: dies with the parent, waited for with a timeout and progress lines,
                   killed with every descendant on a timeout, Ctrl-C or SIGTERM
    fate.py        the record from what the child left: its own, or crash / timeout with the tail of its log
    runner.py      this module: the loop over the cells (shards, progress, ETA) and the command line

Ctrl-C or SIGTERM in the parent kills the running child's process group and leaves every finished cell on disk;
`--resume` reruns only cells without a complete record of the same spec, and `--resume --retry-failed` also the
cells whose latest record (from before this invocation) ended crash, error or timeout.

Command line (no pytest):
    python -m harness.run.runner SCENARIO.toml... [--results DIR] [--run-id ID] [--resume [--retry-failed]]
prints "[i/N elapsed] cell_id: status" per cell and exits 0 when no cell ended as error / crash / timeout, 1 when
one did, 5 when every cell was skipped (nothing measured, as compare and baseline say), 2 on bad arguments or
scenario files, 7 when the results folder is not writable (before any cell), 8 when
the results folder's disk is (nearly) full, 130 on SIGINT, 143 on SIGTERM (harness/common/exitcodes.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.common import exitcodes
from harness.common.contract import CellRecord, Status
from harness.common.inputs import InputError, check_environment, check_name
from harness.common.records import DiskFullError, UnwritableError, ensure_writable
from harness.plan.scenario import TIERS, Cell, ScenarioError, expand, in_tier, load_scenario
from harness.run.cell import run_cell, skip_cell
from harness.run.folder import CellBusy, Run, eta_text
from harness.run.gpus import cell_cost, detect_device
from harness.run.process import Terminated, raise_terminated
from harness.run.shard import Shard, ShardError, describe, parse_shard, select

UNEXPECTED = tuple(s.value for s in Status if s.unexpected)  # the fates that make a run fail
EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE = exitcodes.OK, exitcodes.FAILED, exitcodes.USAGE
EXIT_UNWRITABLE, EXIT_DISK_FULL = exitcodes.UNWRITABLE, exitcodes.DISK_FULL
EXIT_SIGINT, EXIT_SIGTERM = exitcodes.SIGINT, exitcodes.SIGTERM


def run_cells(
    run: Run, cells: list[Cell], on_record: Callable[[Cell, CellRecord], None] | None = None
) -> list[CellRecord]:
    """Runs cells in order (duplicates after the cell they duplicate), showing progress."""
    records = []
    t0 = time.monotonic()
    for i, cell in enumerate(cells, 1):
        label = f"[{i}/{len(cells)} {time.monotonic() - t0:6.0f}s]"
        rec = run_cell(run, cell, label)
        records.append(rec)
        if on_record:
            on_record(cell, rec)
    return records


# ------------------------------------------------------------------------------------------------- command line


def _newest_run(results: Path) -> str | None:
    runs = [p for p in (results / "runs").glob("*/records.jsonl") if p.is_file()]
    if not runs:
        return None
    return max(runs, key=lambda p: p.stat().st_mtime).parent.name


def _describe(rec: CellRecord) -> str:
    text = rec.fate
    if rec.status is not Status.OK and rec.reason:
        reason = str(rec.reason).replace("\n", " ")
        text += f": {reason[:300]}"
    return text


class _Refused(Exception):
    """The command cannot start: a one-line message and its exit code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Shard | None]:
    parser = argparse.ArgumentParser(
        prog="python -m harness.run.runner",
        description="Runs every cell of the given scenario files, one child per cell, without pytest. Exit 0: no "
        "cell ended as error/crash/timeout; 1: some did; 5: every cell was skipped; 2: bad arguments; 7: the results "
        "folder is not writable; "
        "8: disk full in the results folder; 130: SIGINT; 143: SIGTERM.",
    )
    parser.add_argument("scenarios", nargs="+", type=Path, help="scenario TOML files")
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: results)")
    parser.add_argument("--run-id", help="run id (a folder under RESULTS/runs); an existing run keeps its cells")
    parser.add_argument("--resume", action="store_true", help="continue a run: --run-id's, else the newest one")
    parser.add_argument("--retry-failed", action="store_true",
                        help="with --resume: also rerun cells whose record ended crash, error or timeout "
                        "(plain --resume keeps them as recorded)")
    parser.add_argument("--quiet", action="store_true", help="only one line per cell (no child progress)")
    parser.add_argument("--shard", metavar="I/N",
                        help="run only the I-th of N cost-balanced shares of the cells (harness/run/shard.py); "
                        "N machines running 1/N..N/N under one --run-id cover every cell once; join them with "
                        "harness merge")
    parser.add_argument("--tier", choices=TIERS,
                        help="pr: only the scenarios with tier = \"pr\"; nightly (the default): every scenario")
    args = parser.parse_args(argv)
    if args.retry_failed and not args.resume:
        parser.error("--retry-failed needs --resume (it reruns the failed cells of an existing run)")
    try:
        return args, parse_shard(args.shard) if args.shard is not None else None
    except ShardError as e:
        parser.error(str(e))
        raise  # parser.error exits; for the type checker


def _load_scenarios(paths: list[Path], tier: str | None) -> list[Any]:
    paths = list(dict.fromkeys(p.resolve() for p in paths))  # one file given twice (or by two paths) is one scenario
    try:
        scenarios = [load_scenario(p) for p in paths]
    except ScenarioError as e:
        raise _Refused(EXIT_USAGE, str(e)) from None
    names = [s.name for s in scenarios]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        files = ", ".join(str(p) for p, s in zip(paths, scenarios, strict=True) if s.name == dupes[0])
        raise _Refused(EXIT_USAGE, f"scenario name {dupes[0]!r} is used by more than one file: {files}")
    if tier:
        left_out = [s.name for s in scenarios if not in_tier(s, tier)]
        scenarios = [s for s in scenarios if in_tier(s, tier)]
        if left_out:
            print(f"--tier {tier}: {len(left_out)} scenarios left out ({', '.join(left_out)})", flush=True)
    return scenarios


def _open_run(args: argparse.Namespace) -> Run:
    """The run to record into: a new one, or with --resume the named or newest one. The results folder must be
    writable before any cell runs."""
    run_id = args.run_id
    if run_id is not None:
        try:
            check_name(run_id, "run id", "--run-id")
        except InputError as e:
            raise _Refused(EXIT_USAGE, str(e)) from None
    if args.resume:
        if run_id is None:
            run_id = _newest_run(args.results)
            if run_id is None:
                raise _Refused(EXIT_USAGE, f"--resume: no run with records under {args.results / 'runs'}")
        elif not (args.results / "runs" / run_id).is_dir():
            raise _Refused(EXIT_USAGE, f"--resume: no run {run_id!r} under {args.results / 'runs'}")
    try:
        ensure_writable(args.results / "runs")  # before any cell: a run that cannot record must not start
        run = Run.create(args.results, detect_device(), run_id, verbose=not args.quiet)
        ensure_writable(run.run_dir)
    except UnwritableError as e:
        raise _Refused(EXIT_UNWRITABLE, str(e)) from None
    except ValueError as e:
        raise _Refused(EXIT_USAGE, str(e)) from None
    if args.retry_failed:
        retried = run.retry_failures()
        print(f"--retry-failed: {len(retried)} cells ended crash/error/timeout and run again"
              + (f": {', '.join(retried)}" if retried else ""), flush=True)
    return run


def _run_all(run: Run, cells: list[Cell], shard: Shard | None) -> dict[str, CellRecord]:
    """Every cell in order (a cell of the other profile is recorded as skipped); the final record of each."""
    if shard is not None:
        print(describe(cells, shard, run.device), flush=True)
        cells = select(cells, shard, run.device)
        run.shard = shard
    n = len(cells)
    print(f"offload-bench runner: run {run.run_id}, {n} cells, device {run.device}, records -> {run.records_path}",
          flush=True)
    t0 = time.monotonic()
    final: dict[str, CellRecord] = {}
    costs = [0 if c.same_as else cell_cost(c) for c in cells]
    # Two runners on one run id: a cell the other is running is passed over (not waited for in lock-step) and
    # taken up again after the cells nobody holds; by then it is usually recorded, or it is waited for.
    deferred: list[tuple[int, Cell]] = []
    for i, cell in enumerate(cells, 1):
        left = run.pace.estimate_s(sum(costs[i - 1:]))
        label = f"[{i}/{n} {time.monotonic() - t0:.0f}s, run {eta_text(left)}]"
        if cell.same_as is not None and any(c.cell_id == cell.same_as for _, c in deferred):
            deferred.append((i, cell))  # its source is another runner's: copy it once that one is recorded
            continue
        try:
            _one(run, cell, i, n, t0, label, final, wait=False)
        except CellBusy:
            run.say(f"{label} {cell.cell_id}: another runner is running this cell; taking the next one")
            deferred.append((i, cell))
    for i, cell in deferred:  # the cells another runner held, now waited for one by one
        _one(run, cell, i, n, t0, f"[{i}/{n} {time.monotonic() - t0:.0f}s]", final, wait=True)
    return final


def _one(run: Run, cell: Cell, i: int, n: int, t0: float, label: str, final: dict[str, CellRecord],
         wait: bool) -> None:
    """One cell of `_run_all`: run (or skipped for the other profile), recorded in `final`, its line printed."""
    resumed = run.recorded(cell) is not None
    wanted = "cuda" if cell.scenario.profile == "gpu" else "cpu"
    if wanted != run.device:
        why = "no CUDA GPU on this machine" if wanted == "cuda" else "a CUDA GPU is present (GPU profile)"
        rec = skip_cell(run, cell, f"{cell.scenario.name} is a {cell.scenario.profile}-profile scenario and "
                        f"{why}", label)
    else:
        rec = run_cell(run, cell, label, wait=wait)
    final[cell.cell_id] = rec
    note = " (recorded earlier)" if resumed else ""
    print(f"[{i}/{n} {time.monotonic() - t0:.0f}s] {cell.cell_id}: {_describe(rec)}{note}", flush=True)


def _summary(run: Run, final: dict[str, CellRecord]) -> int:
    counts: dict[str, int] = {}
    for rec in final.values():
        counts[rec.status] = counts.get(rec.status, 0) + 1
    bad = [cid for cid, rec in final.items() if rec.status.unexpected]
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"done: {summary}; records in {run.records_path}", flush=True)
    if bad:
        print(f"unexpected fates ({len(bad)}): {', '.join(bad)}", flush=True)
        return EXIT_UNEXPECTED
    if final and all(rec.status is Status.SKIPPED for rec in final.values()):
        # nothing measured: the same code compare and baseline give such a run, so a job can tell it from a pass
        reason = next((str(r.reason).replace("\n", " ")[:200] for r in final.values() if r.reason), "no reason")
        print(f"every cell was skipped, nothing measured (first reason: {reason}); exit {exitcodes.ALL_SKIPPED}",
              file=sys.stderr, flush=True)
        return exitcodes.ALL_SKIPPED
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args, shard = _parse_args(argv)
    old_term = signal.signal(signal.SIGTERM, raise_terminated)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    run: Run | None = None
    try:
        try:
            check_environment()  # before any child: a bad OFFLOAD_BENCH_* would fail every cell, one by one
        except InputError as e:
            raise _Refused(EXIT_USAGE, str(e)) from None
        scenarios = _load_scenarios(args.scenarios, args.tier)
        run = _open_run(args)
        final = _run_all(run, [c for s in scenarios for c in expand(s)], shard)
    except _Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except DiskFullError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DISK_FULL
    except Terminated:
        _interrupted(run, "SIGTERM")
        return EXIT_SIGTERM
    except KeyboardInterrupt:
        _interrupted(run, "SIGINT")
        return EXIT_SIGINT
    finally:
        if run is not None:
            run.close()  # the fork server goes with the run
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    from harness.analyze.readout import finish_run

    finish_run(run.records_path)  # the run's verdicts, judged here where its latents files are
    return _summary(run, final)


def _interrupted(run: Run | None, what: str) -> None:
    if run is None:
        print(f"interrupted by {what}", file=sys.stderr, flush=True)
        return
    kept = len(run.finished())
    print(
        f"interrupted by {what}: {kept} finished cells kept in {run.records_path}; "
        f"continue with --run-id {run.run_id} --resume",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
