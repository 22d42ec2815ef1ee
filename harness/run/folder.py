"""The run folder: <results>/runs/<run id>/ with records.jsonl, a folder per cell (its cell.json, child.log,
record.json, latents and lock) and the run's fork server's log; what is already recorded there (resume); and the
one way a record gets into it.

Nothing lost: each record is appended (locked, fsynced) the moment its cell ends, with SIGINT/SIGTERM held back
for the few microseconds of the write. Rerunning with the same run id runs only cells without a complete record of
the same spec; a torn last line (a writer that died mid-line) or garbage lines are reported as file:line warnings
and never rewritten. Two parents sharing a run folder take a per-cell lock, so they never run one cell twice or
share its files. `--resume --retry-failed` also reruns the cells whose latest record (from before this invocation)
ended crash, error or timeout; plain `--resume` counts them as finished.

Disk: before each child starts, the results folder must have OFFLOAD_BENCH_RESULTS_MIN_FREE_BYTES free (default
256 MiB; OFFLOAD_BENCH_RESULTS_FREE_BYTES overrides what is measured, for tests), and an append that fails for
lack of space leaves records.jsonl as it was (`results.append_record`); either stops the run with exit 8.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from harness import REPO
from harness.common.contract import CellRecord, JsonObject
from harness.common.inputs import check_name, env_number
from harness.common.records import DiskFullError, ResultsError, append_record, git_sha, read_cell_records
from harness.plan.scenario import Cell
from harness.run.cell_start import ForkServer, ServerError
from harness.run.shard import Shard

RESULTS_MIN_FREE_ENV = "OFFLOAD_BENCH_RESULTS_MIN_FREE_BYTES"
RESULTS_FREE_ENV = "OFFLOAD_BENCH_RESULTS_FREE_BYTES"
# A cell leaves its record (tens of KiB with the trace), its log, its spec and its final latents (a few MiB for
# video models) in the results folder; 256 MiB is room for dozens of cells, so a run stops well before a write
# could fail halfway.
RESULTS_MIN_FREE_DEFAULT = 256 * 2**20


def new_run_id() -> str:
    """A fresh run id: the start time plus a random suffix (a folder name under <results>/runs)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def complete_record(rec: CellRecord) -> bool:
    """A record that may stand for a finished cell: the spec hash it ran with (a CellRecord always has a cell id
    and a known status)."""
    return isinstance(rec.spec_hash, str)


@dataclass
class Pace:
    """Seconds per unit of a cell's cost hint (`harness.run.gpus.cell_cost`: steps x frames x pixels x forwards x
    calls), learnt from the cells this process ran to the end: the ETAs of progress lines. Before the first cell
    ends there is no ETA. A hint, not a model: load and checkpoint generation do not scale with it."""

    seconds: float = 0.0
    cost: float = 0.0

    def learn(self, cost: float, seconds: float) -> None:
        self.seconds += seconds
        self.cost += cost

    def estimate_s(self, cost: float) -> float | None:
        return cost * self.seconds / self.cost if self.cost > 0 else None


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA after the first cell"
    return f"ETA {seconds / 60:.1f} min" if seconds >= 120 else f"ETA {seconds:.0f} s"


@dataclass
class Run:
    """One run of the harness: a folder with records.jsonl, per-cell specs and logs."""

    run_dir: Path
    device: str
    run_id: str
    sha: str | None = None
    verbose: bool = True
    retry_failed: bool = False  # see retry_failures()
    shard: Shard | None = None  # the --shard this process runs, stamped into its records
    # the pinned H2D probe measured by the first cell on each GPU id: {"gbps", "cell_id"}, passed to later cells
    h2d_probes: dict[str | None, JsonObject] = field(default_factory=dict)  # JSON: each goes into a cell.json
    _warned: set[str] = field(default_factory=set)
    _stale_before: int = 0  # records[:_stale_before] predate retry_failures(); their failures are rerun
    _found_at_start: int = 0  # records[:_found_at_start] predate this process; their guard skips are rerun
    pace: Pace = field(default_factory=Pace)
    # Where progress and warning lines go: stderr, or under pytest its terminal writer (scenarios/conftest.py), so
    # that a cell running for minutes shows them live instead of in the captured output after the test.
    sink: Callable[[str], None] | None = None
    # The fork server of OFFLOAD_BENCH_CELL_START=fork-server (harness.run.cell_start), started at the first cell
    # that forks; None once it failed (the rest of the run spawns).
    fork_server: ForkServer | None = None
    _fork_server_failed: bool = False

    @classmethod
    def create(cls, results_root: Path, device: str, run_id: str | None = None, verbose: bool = True) -> Run:
        run_id = new_run_id() if run_id is None else check_name(run_id, "run id")  # InputError: a ValueError
        # absolute: the child runs in the package's folder (cwd=REPO), so a relative results path (an installed
        # offload-bench's default ./results) would name another place there
        run_dir = Path(results_root).resolve() / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        run = cls(run_dir, device, run_id, git_sha(REPO), verbose)
        if run.records_path.exists():
            run._found_at_start = len(read_tolerant(run.records_path)[0])
        return run

    @property
    def records_path(self) -> Path:
        return self.run_dir / "records.jsonl"

    def server(self) -> ForkServer | None:
        """The run's fork server (made on first use), None after it failed once in this run."""
        if self._fork_server_failed:
            return None
        if self.fork_server is None:
            self.fork_server = ForkServer(self.run_dir)
        return self.fork_server

    def server_failed(self, error: ServerError) -> None:
        """The fork server could not serve: warn once, and spawn every later cell of this run."""
        self._fork_server_failed = True
        self.close()
        self.warn(f"{error}\nthis cell and the rest of the run are spawned (OFFLOAD_BENCH_CELL_START=spawn)")

    def close(self) -> None:
        """Stops the run's fork server, if one runs (a later cell would start it again)."""
        if self.fork_server is not None:
            self.fork_server.close()

    def stamp_provenance(self, record: CellRecord) -> None:
        """What every record of this process carries besides the child's machine info (which a crash or a skip
        lacks): the host that ran it and the --shard it belonged to, so a merged run shows which machine ran what."""
        record.runner_host, record.shard = platform.node(), None if self.shard is None else str(self.shard)

    def retry_failures(self) -> list[str]:
        """From now on, a cell whose latest record so far ended crash/error/timeout does not count as finished,
        so it runs again. Only records already in the file are affected: a cell that fails again in this run
        keeps its new record (it is not retried in a loop), and another parent sharing the run sees the new one.
        Returns the cells that will be rerun."""
        records = read_tolerant(self.records_path)[0] if self.records_path.exists() else []
        self._stale_before = len(records)
        self.retry_failed = True
        latest = {r.cell_id: r for r in records if complete_record(r)}
        return sorted(cid for cid, r in latest.items() if r.status.unexpected)

    def finished(self) -> dict[str, CellRecord]:
        """The latest complete record of each cell in this run's file (a resumed run skips these cells). A guard's
        skip from before this process is not finished: the disk may be freed or the GPU idle since, so a resume
        runs the cell again (otherwise a Wan cell skipped for disk stays skipped on resume after the checkpoints
        are cleared). One from this process stands, so a session does not run it twice.

        Unreadable lines (garbage, a torn last line) are warned about once, naming file:line, and skipped; a line
        that parses but lacks the cell id, status or spec hash does not count as finished either.
        """
        if not self.records_path.exists():
            return {}
        records, problems = read_tolerant(self.records_path)
        for problem in problems:
            self.warn(problem)
        out: dict[str, CellRecord] = {}
        for i, rec in enumerate(records):
            if complete_record(rec):
                if self.retry_failed and i < self._stale_before and rec.status.unexpected:
                    out.pop(rec.cell_id, None)  # a failure from before --retry-failed: not finished
                elif rec.skipped_by_guard and i < self._found_at_start:
                    out.pop(rec.cell_id, None)
                else:
                    out[rec.cell_id] = rec
            else:
                self.warn(
                    f"{self.records_path}: a record of {rec.cell_id!r} lacks cell_id/status/spec_hash; "
                    "not counted as finished"
                )
        return out

    def recorded(self, cell: Cell, records: dict[str, CellRecord] | None = None) -> CellRecord | None:
        """The cell's finished record in this run (or in `records`) if it ran with today's spec, else None: the
        one test of "already recorded" (resume, the per-cell lock, pytest's session)."""
        prior = (self.finished() if records is None else records).get(cell.cell_id)
        return prior if prior is not None and prior.recorded_with(cell.spec_hash(self.device)) else None

    def warn(self, msg: str) -> None:
        if msg not in self._warned:
            self._warned.add(msg)
            self._emit(f"warning: {msg}")

    def say(self, msg: str) -> None:
        if self.verbose:
            self._emit(msg)

    def _emit(self, line: str) -> None:
        if self.sink is not None:
            self.sink(line)
        else:
            print(line, file=sys.stderr, flush=True)


def read_tolerant(path: Path) -> tuple[list[CellRecord], list[str]]:
    """`results.read_cell_records`, and if that raises on some pathological line, the same line by line here."""
    try:
        result = read_cell_records(path)
        return result.records, result.problems
    except ResultsError:
        raise
    except Exception:
        pass
    records: list[CellRecord] = []
    problems: list[str] = []
    data = path.read_bytes()
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8", "replace"))
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            records.append(CellRecord.from_dict(rec, f"{path}:{lineno}"))
        except Exception as e:
            torn = lineno == len(lines) and not data.endswith(b"\n")
            what = "torn last line (interrupted write)" if torn else "unreadable record"
            problems.append(f"{path}:{lineno}: {what}: {type(e).__name__}: {str(e)[:200]}")
    return records, problems


# ------------------------------------------------------------------------------------------------ appending


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Holds SIGINT/SIGTERM back while a record is written; a pending one is delivered right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _end_torn_line(path: Path) -> bool:
    """If the file ends inside a line (a writer died mid-write), appends one newline, under the lock that
    `append_record` takes, so that the next record starts on a line of its own instead of being glued to the torn
    one (which would make both unreadable). Existing bytes are never rewritten. Returns whether it did."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return False
        os.write(fd, b"\n")
        os.fsync(fd)
        return True
    finally:
        os.close(fd)  # releases the lock


def append(run: Run, record: CellRecord) -> None:
    """Appends `record` to the run's records.jsonl (locked, fsynced; signals held back during the write)."""
    with _signals_held():
        if _end_torn_line(run.records_path):
            run.warn(f"{run.records_path}: the last line was torn (an interrupted write); it is kept as it is and "
                     "the next record starts on a new line")
        try:
            append_record(run.records_path, record)
        except DiskFullError as e:
            raise DiskFullError(f"{e}; finished cells are kept: free space and continue with --run-id "
                                f"{run.run_id} --resume") from None


def cell_dir(run: Run, cell: Cell) -> Path:
    safe = cell.cell_id.replace("/", "__")
    d = run.run_dir / "cells" / safe
    d.mkdir(parents=True, exist_ok=True)
    return d


class CellBusy(Exception):
    """Another runner holds the cell's lock (it is running the cell) and the caller asked not to wait."""


@contextlib.contextmanager
def cell_lock(run: Run, cdir: Path, label: str, cell_id: str, wait: bool = True) -> Iterator[None]:
    """An exclusive lock on the cell's folder, so two parents sharing a run never run one cell at once. Without
    `wait`, a cell another runner holds raises CellBusy (the caller takes the next cell and comes back)."""
    fd = os.open(cdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise CellBusy(cell_id) from None
            run.say(f"{label} {cell_id}: another runner is running this cell; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def results_free_bytes(folder: Path) -> int:
    """Free bytes on the filesystem of the results folder (or the OFFLOAD_BENCH_RESULTS_FREE_BYTES override)."""
    override = env_number(RESULTS_FREE_ENV)
    if override is not None:
        return int(override)
    return shutil.disk_usage(folder).free


def check_results_space(run: Run) -> None:
    """Refuses to start a cell when the results folder is nearly full: the child's log and latents and the
    record append need room, and a run that stops here loses nothing (every finished record is on disk)."""
    need = int(env_number(RESULTS_MIN_FREE_ENV, RESULTS_MIN_FREE_DEFAULT) or 0)
    free = results_free_bytes(run.run_dir)
    if free < need:
        raise DiskFullError(
            f"{run.run_dir}: only {free / 2**20:,.1f} MiB free, a cell needs {need / 2**20:,.0f} MiB "
            f"({RESULTS_MIN_FREE_ENV}); free space and continue with --run-id {run.run_id} --resume"
        )
