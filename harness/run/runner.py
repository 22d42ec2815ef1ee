"""The parent side: one child per cell, its fate recorded, every record appended as the cell ends. The child is
forked by the run's fork server or spawned (`harness.run.cell_start`, OFFLOAD_BENCH_CELL_START); either way it runs
`python -m harness.cell.worker`, in its own process group, and its fate reads the same.

Fates (exactly one per cell): the child's own record says ok / oom (with the phase) / error (with the exception)
/ skipped (a guard's numbers, `harness.cell.guards`). If the child dies without a record it is a crash (signal or exit
code recorded, with the tail of its log); if it outlives the scenario's timeout its whole process group (and any
descendant that left the group) is killed and the cell is a timeout. The parent never imports torch, so it never
holds a CUDA context that would distort the children's numbers.

Nothing lost: each record is appended (locked, fsynced) the moment its cell ends, with SIGINT/SIGTERM held back
for the few microseconds of the write. Ctrl-C or SIGTERM in the parent kills the running child's process group
and leaves every finished cell on disk; if the parent is SIGKILLed its child dies with it (PR_SET_PDEATHSIG; a
forked child's server sees its request pipe close, exits, and the child dies of its own parent-death signal).
Rerunning with the same run id runs only cells without a complete record of the same spec; a torn last line
(a writer that died mid-line) or garbage lines are reported as file:line warnings and never rewritten.
Two parents sharing a run folder take a per-cell lock, so they never run one cell twice or share its files.

`--resume --retry-failed` also reruns the cells whose latest record (from before this invocation) ended crash,
error or timeout; plain `--resume` counts them as finished, as before.

Disk: before each child starts, the results folder must have OFFLOAD_BENCH_RESULTS_MIN_FREE_BYTES free (default
256 MiB; OFFLOAD_BENCH_RESULTS_FREE_BYTES overrides what is measured, for tests), and an append that fails for
lack of space leaves records.jsonl as it was (`results.append_record`); either stops the run with exit 8.

Command line (no pytest):
    python -m harness.run.runner SCENARIO.toml... [--results DIR] [--run-id ID] [--resume [--retry-failed]]
prints "[i/N elapsed] cell_id: status" per cell and exits 0 when no cell ended as error / crash / timeout, 1 when
one did, 5 when every cell was skipped (nothing measured, as compare and baseline say), 2 on bad arguments or
scenario files, 7 when the results folder is not writable (before any cell), 8 when
the results folder's disk is (nearly) full, 130 on SIGINT, 143 on SIGTERM (harness/common/exitcodes.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import fcntl
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import REPO
from harness.common import exitcodes
from harness.common.contract import STATUSES, CellRecord, CellSpec, JsonObject, Status
from harness.common.inputs import InputError, check_environment, check_name, env_number
from harness.common.records import (
    NO_SPACE,
    DiskFullError,
    ResultsError,
    UnwritableError,
    append_record,
    ensure_writable,
    git_sha,
    now_iso,
    read_cell_records,
)
from harness.plan.planner import plan_entry
from harness.plan.scenario import TIERS, Cell, ScenarioError, expand, in_tier, load_scenario
from harness.policy import resolve
from harness.run.cell_start import FORK_SERVER, SPAWN, ForkedChild, ForkServer, ServerError, start_method
from harness.run.gpus import cell_cost, child_gpu
from harness.run.shard import Shard, ShardError, describe, parse_shard, select

UNEXPECTED = tuple(s.value for s in Status if s.unexpected)  # the fates that make a run fail
EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE = exitcodes.OK, exitcodes.FAILED, exitcodes.USAGE
EXIT_UNWRITABLE, EXIT_DISK_FULL = exitcodes.UNWRITABLE, exitcodes.DISK_FULL
EXIT_SIGINT, EXIT_SIGTERM = exitcodes.SIGINT, exitcodes.SIGTERM
# Seconds between the progress lines of a running cell (phase, elapsed, ETA); tests set it to 1.
PROGRESS_EVERY_ENV = "OFFLOAD_BENCH_PROGRESS_S"
PROGRESS_EVERY_DEFAULT_S = 15.0
RESULTS_MIN_FREE_ENV = "OFFLOAD_BENCH_RESULTS_MIN_FREE_BYTES"
RESULTS_FREE_ENV = "OFFLOAD_BENCH_RESULTS_FREE_BYTES"
# A cell leaves its record (tens of KiB with the trace), its log, its spec and its final latents (a few MiB for
# video models) in the results folder; 256 MiB is room for dozens of cells, so a run stops well before a write
# could fail halfway.
RESULTS_MIN_FREE_DEFAULT = 256 * 2**20
# "each": every cell child runs its own pinned H2D probe, as before the probe was passed down (the A/B of the
# saving); anything else: the first cell on a GPU probes and the runner passes its figure to the later ones.
H2D_PROBE_ENV = "OFFLOAD_BENCH_H2D_PROBE"
# The named parts of a cell's fixed cost (harness.cell.worker.run_cell's `overhead`); other_s is the rest of fixed_s.
# process_start_s is a spawned child's interpreter start; a forked one has fork_s instead (request to the worker's
# first line) and the run's first forked cell server_start_s (the fork server's start and preload).
OVERHEAD_PARTS = ("process_start_s", "fork_s", "server_start_s", "imports_s", "guards_s", "cuda_init_s",
                  "h2d_probe_s", "checkpoint_s", "warmup_s", "teardown_s")


class Terminated(KeyboardInterrupt):
    """SIGTERM in the parent. Raised like Ctrl-C so that the same cleanup runs (the child's group is killed)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def detect_device() -> str:
    """'cuda' if an NVIDIA GPU is visible, else 'cpu', without creating a CUDA context in this process."""
    forced = os.environ.get("OFFLOAD_BENCH_PROFILE")
    if forced in ("cpu", "gpu"):
        return "cuda" if forced == "gpu" else "cpu"
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
        return "cuda" if count > 0 else "cpu"
    except Exception:
        return "cpu"


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
            run._found_at_start = len(_read_tolerant(run.records_path)[0])
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
        records = _read_tolerant(self.records_path)[0] if self.records_path.exists() else []
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
        records, problems = _read_tolerant(self.records_path)
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


def _read_tolerant(path: Path) -> tuple[list[CellRecord], list[str]]:
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


# ---------------------------------------------------------------------------------------------- one cell


def _cell_dir(run: Run, cell: Cell) -> Path:
    safe = cell.cell_id.replace("/", "__")
    d = run.run_dir / "cells" / safe
    d.mkdir(parents=True, exist_ok=True)
    return d


class CellBusy(Exception):
    """Another runner holds the cell's lock (it is running the cell) and the caller asked not to wait."""


@contextlib.contextmanager
def _cell_lock(run: Run, cdir: Path, label: str, cell_id: str, wait: bool = True) -> Iterator[None]:
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


def _tail(path: Path, nbytes: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _base_record(run: Run, cell: Cell, status: Status) -> CellRecord:
    """The record of a cell whose child left none (or never ran): the header the child would have begun with
    (`CellRecord.begin`: the spec, settings included, and the resolution), no measurements."""
    spec = dataclasses.replace(cell.spec(run.device), resolution=cell.resolution.as_dict())
    return CellRecord.begin(spec, status, created=now_iso())


def skip_cell(run: Run, cell: Cell, reason: str, label: str = "") -> CellRecord:
    """Records `cell` as skipped (without a child) for `reason`, unless it already has a record of this spec."""
    prior = run.recorded(cell)
    if prior is not None:
        return prior
    record = _base_record(run, cell, Status.SKIPPED)
    record.reason = reason
    _stamp(run, cell, record)
    append(run, record)
    run.say(f"{label} {cell.cell_id}: skipped ({reason})")
    return record


def _stamp(run: Run, cell: Cell, record: CellRecord) -> None:
    """What the parent adds to every record: the run, the checkout and the spec the cell ran with."""
    spec = cell.spec(run.device)
    record.run_id, record.git_sha = run.run_id, run.sha
    record.spec_hash = spec.spec_hash
    record.portable_spec_hash = spec.portable_spec_hash  # what a baseline keeps (harness.analyze.baseline)
    run.stamp_provenance(record)


def run_cell(run: Run, cell: Cell, label: str = "", env: dict[str, str] | None = None,
             wait: bool = True) -> CellRecord:
    """Runs `cell` in a child (or reuses the record of the cell it duplicates) and appends its record.

    A cell that already has a complete record of the same spec in this run is not rerun; its record is returned.
    One that another runner is running is waited for, or without `wait` raises CellBusy.
    """
    prior = run.recorded(cell)
    if prior is not None:
        run.say(f"{label} {cell.cell_id}: already recorded ({prior.status}), skipped on resume")
        return prior
    cdir = _cell_dir(run, cell)
    with _cell_lock(run, cdir, label, cell.cell_id, wait):
        done = run.finished()  # again: another parent may have finished it while we waited for the lock
        prior = run.recorded(cell, done)
        if prior is not None:
            run.say(f"{label} {cell.cell_id}: recorded meanwhile by another runner ({prior.status})")
            return prior
        if cell.same_as is not None:
            return _copy_record(run, cell, done, label)
        check_results_space(run)
        return _run_child(run, cell, cdir, label, env)


def _copy_record(run: Run, cell: Cell, done: dict[str, CellRecord], label: str) -> CellRecord:
    """A cell with the same effective flags as an earlier one takes that one's record instead of a child."""
    source = done.get(cell.same_as or "")
    if source is None:
        raise RuntimeError(f"{cell.cell_id} duplicates {cell.same_as}, which has no record yet")
    record = CellRecord.from_dict({**source.to_dict(), **cell.resolution.as_dict(), "cell_id": cell.cell_id,
                                   "same_as": cell.same_as, "backend": cell.backend})
    _stamp(run, cell, record)
    record.created = now_iso()
    append(run, record)
    run.say(f"{label} {cell.cell_id}: same effective flags as {cell.same_as} -> {record.status} (not rerun)")
    return record


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


def _run_child(run: Run, cell: Cell, cdir: Path, label: str, env: dict[str, str] | None) -> CellRecord:
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    gpu = child_gpu(child_env, run.device)
    out, log = cdir / "record.json", cdir / "child.log"
    out.unlink(missing_ok=True)  # a record left by an interrupted earlier attempt must not pass for this one's
    timeout = cell.scenario.timeout_s
    cost = cell_cost(cell)
    expected = run.pace.estimate_s(cost)
    run.say(f"{label} {cell.cell_id}: starting (timeout {timeout:.0f} s, {eta_text(expected)})")
    started = time.monotonic()
    server, server_start_s = _ready_server(run, cell)  # before the spec: its spawned_at then times the fork alone
    _write_cell_json(run, cell, cdir, gpu)

    def progress() -> None:
        elapsed = time.monotonic() - started
        left = None if expected is None else max(expected - elapsed, 0.0)
        run.say(f"{label} {cell.cell_id}: phase {_last_phase(log) or 'start'}, {elapsed:.0f} s, {eta_text(left)}")

    with open(log, "wb") as logf, _sigterm_raises():
        proc = _start_child(run, server, ["--cell", str(cdir / "cell.json"), "--out", str(out)], child_env, logf)
        fate = _wait(proc, log, timeout, run, progress)
    elapsed, exited_at = time.monotonic() - started, time.time()
    if isinstance(proc, ForkedChild) and proc.server.lost:  # its child died of its parent-death signal
        run.warn(f"{cell.cell_id}: {proc.server.lost}")
    record = _record_from_child(run, cell, out, log, proc.returncode, fate)
    finish_overhead(record, elapsed, exited_at, FORK_SERVER if isinstance(proc, ForkedChild) else SPAWN,
                    server_start_s)
    remember_h2d_probe(run, gpu, record)
    _stamp(run, cell, record)
    record.elapsed_s = round(elapsed, 2)
    record.returncode, record.child_pid = proc.returncode, proc.pid
    record.log = str(log.relative_to(run.run_dir))
    record.gpu_index = gpu  # the GPU id the child ran on (harness.run.gpus), None on CPU
    record.xdist_worker = os.environ.get("PYTEST_XDIST_WORKER")  # the pytest-xdist worker that ran it, if any
    # what the planner predicted for this cell, beside what it measured (planned here: the planner needs no torch)
    record.plan = plan_entry(record)
    append(run, record)
    if record.status is Status.OK:
        run.pace.learn(cost, elapsed)
    run.say(f"{label} {cell.cell_id}: {record.fate} after {elapsed:.1f} s")
    return record


Child = subprocess.Popen | ForkedChild  # what _wait and _kill_tree use of either: pid, returncode, poll, wait


def _ready_server(run: Run, cell: Cell) -> tuple[ForkServer | None, float | None]:
    """The run's fork server if this cell forks (harness.run.cell_start.start_method), started if need be, and the
    seconds its start took (None when it was running, or the cell is spawned)."""
    server = run.server() if start_method(cell.backend) == FORK_SERVER else None
    if server is None:
        return None, None
    try:
        return server, server.ensure()
    except ServerError as e:
        run.server_failed(e)
        return None, None


def _start_child(run: Run, server: ForkServer | None, argv: list[str], env: dict[str, str], logf: Any) -> Child:
    """`python -m harness.cell.worker ARGV`, forked by the server or spawned; either way in its own session and
    process group, dying with the run, output to the cell's log (`logf`), env `env`, in the package's folder."""
    if server is not None:
        try:
            return server.fork(argv, env, REPO, Path(logf.name))
        except ServerError as e:
            run.server_failed(e)
    return subprocess.Popen(
        [sys.executable, "-m", "harness.cell.worker", *argv],
        stdout=logf,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        env=env,
        start_new_session=True,  # its own process group, so a timeout kills grandchildren too
        preexec_fn=_die_with_parent(os.getpid()),
    )


def _write_cell_json(run: Run, cell: Cell, cdir: Path, gpu: str | None) -> None:
    """The child's cell.json; a full disk stops the run in one line (DiskFullError), finished cells kept."""
    try:
        (cdir / "cell.json").write_text(child_spec(run, cell, cdir, gpu).to_json())
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        raise DiskFullError(f"{cdir / 'cell.json'}: no space left to write the cell's spec ({os.strerror(e.errno)}); "
                            f"finished cells are kept: free space and continue with --run-id {run.run_id} "
                            "--resume") from None


def child_spec(run: Run, cell: Cell, cdir: Path, gpu: str | None) -> CellSpec:
    """The cell.json a child reads: the cell's spec (what spec_hash covers) plus what does not change what the cell
    runs: where its latents go, the pinned H2D probe an earlier cell measured on this GPU (one probe per run and
    GPU; OFFLOAD_BENCH_H2D_PROBE=each makes every cell probe) and the spawn time its process_start_s counts from."""
    probe = run.h2d_probes.get(gpu) if os.environ.get(H2D_PROBE_ENV) != "each" else None
    return dataclasses.replace(
        spec_for_child(cell, run.device), latents_out=str(cdir / "latents.pt"),
        pinned_h2d_probe=probe if run.device == "cuda" else None, spawned_at=time.time(),
    )


def spec_for_child(cell: Cell, device: str) -> CellSpec:
    """The cell's spec with the policy's resolution always in it: the child runs what the parent resolved and
    never resolves again. A cell whose spec carries none (every flag set, under one of our models: `Cell.spec`
    hashes the resolution only where the card or a release decided something) gets the resolution of its flags
    alone, the one its records hold; the card's context would change only the notes, not the effective flags."""
    spec = cell.spec(device)
    if spec.resolution is not None:
        return spec
    return dataclasses.replace(spec, resolution=resolve(cell.requested, spec.policy).as_dict())


def finish_overhead(record: CellRecord, elapsed_s: float, exited_at: float, start: str = SPAWN,
                    server_start_s: float | None = None) -> None:
    """Completes the child's `overhead` (harness.cell.worker.run_cell) with what only the parent sees: start (how
    the child started: "spawn" or "fork-server"), teardown_s (record written to child exited), fixed_s (the
    parent's elapsed time minus the measured load and rounds) and other_s (fixed_s minus the named parts). A forked
    child's start part is fork_s (the child's process_start_s, which then times the fork, not an interpreter
    start); server_start_s is the fork server's start, paid inside the run's first forked cell. A child that left
    no record has no overhead of its own."""
    overhead = record.overhead
    if not isinstance(overhead, dict):
        return
    overhead["start"] = start
    if start == FORK_SERVER and "process_start_s" in overhead:
        overhead["fork_s"] = overhead.pop("process_start_s")
    if server_start_s is not None:
        overhead["server_start_s"] = round(server_start_s, 3)
    record_at = overhead.pop("record_at", None)
    if isinstance(record_at, int | float):
        overhead["teardown_s"] = round(max(exited_at - record_at, 0.0), 3)
    measured = overhead.get("measured_s")
    if isinstance(measured, int | float):
        overhead["fixed_s"] = round(elapsed_s - measured, 3)
        named = sum(v for k in OVERHEAD_PARTS if isinstance(v := overhead.get(k), int | float))
        overhead["other_s"] = round(overhead["fixed_s"] - named, 3)


def remember_h2d_probe(run: Run, gpu: str | None, record: CellRecord) -> None:
    """Keeps the pinned H2D probe a cell measured on `gpu` for the later cells on it (one probe per run and GPU)."""
    machine = record.machine or {}
    gbps = machine.get("pinned_h2d_gbps")
    if run.device == "cuda" and gpu not in run.h2d_probes and isinstance(gbps, int | float) \
            and machine.get("pinned_h2d_source", "this cell") == "this cell":
        run.h2d_probes[gpu] = {"gbps": gbps, "cell_id": record.cell_id}


# ------------------------------------------------------------------------------------- the child's process tree


_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: the child gets SIGKILL when this parent dies (even by SIGKILL), so no cell outlives its run."""

    def setup() -> None:
        if _prctl is not None:
            _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before the prctl took effect
            os._exit(1)

    return setup


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a child runs, SIGTERM raises Terminated (like Ctrl-C) unless someone else already handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def _proc_table() -> list[tuple[int, int, int]]:
    """(pid, ppid, pgid) of every process visible in /proc."""
    table = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("utf-8", "replace")
            fields = stat.rsplit(")", 1)[1].split()
            table.append((int(entry), int(fields[1]), int(fields[2])))
        except (OSError, IndexError, ValueError):
            continue
    return table


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`, including those that left its process group or session."""
    children: dict[int, list[int]] = {}
    for p, ppid, _ in _proc_table():
        children.setdefault(ppid, []).append(p)
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def group_members(pgid: int) -> list[int]:
    return [p for p, _, g in _proc_table() if g == pgid]


def _kill_tree(proc: Child) -> None:
    """SIGKILLs the child's process group and every descendant that left it, then reaps the child."""
    alive = proc.poll() is None
    escaped = descendants(proc.pid) if alive else []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    if alive:  # the child itself too, had it not led its group yet (both starts make it lead one before its pid
        with contextlib.suppress(ProcessLookupError, PermissionError):  # is known; this costs nothing)
            os.kill(proc.pid, signal.SIGKILL)
    for pid in escaped:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _kill_leftovers(pgid: int) -> None:
    """After the child exited: anything it left running in its process group is killed too."""
    if group_members(pgid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def _wait(
    proc: Child, log: Path, timeout: float, run: Run, progress: Callable[[], None] | None = None
) -> str | None:
    """Waits for the child, echoing its log and calling `progress` every OFFLOAD_BENCH_PROGRESS_S seconds;
    returns 'timeout' if it had to be killed."""
    deadline = time.monotonic() + timeout
    every = env_number(PROGRESS_EVERY_ENV, PROGRESS_EVERY_DEFAULT_S) or PROGRESS_EVERY_DEFAULT_S
    next_progress = time.monotonic() + every
    shown = 0
    try:
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            shown = _echo(log, shown, run)
            if progress is not None and time.monotonic() >= next_progress:
                progress()
                next_progress += every
            if time.monotonic() > deadline:
                _kill_tree(proc)
                return "timeout"
    except BaseException:
        # Ctrl-C or SIGTERM in the parent: take the child down with us; finished cells are already on disk.
        _kill_tree(proc)
        raise
    finally:
        _kill_leftovers(proc.pid)
    _echo(log, shown, run)
    return None


def _echo(log: Path, shown: int, run: Run) -> int:
    if not run.verbose:
        return shown
    try:
        data = log.read_bytes()
    except OSError:
        return shown
    for line in data[shown:].decode("utf-8", "replace").splitlines():
        if line.startswith("[worker"):
            run.say(f"    {line}")
    return len(data) if data.endswith(b"\n") else shown


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return "?"


def _child_record(cell: Cell, out: Path, log: Path) -> tuple[CellRecord | None, str | None]:
    """The record the child wrote, or None and what is wrong with it."""
    try:
        data = json.loads(out.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        return None, f"its record is unreadable ({e})"
    if not isinstance(data, dict) or data.get("status") not in STATUSES:
        status = data.get("status") if isinstance(data, dict) else data
        return None, f"its record has no valid status ({status!r})"
    if data.get("cell_id") != cell.cell_id:
        return None, f"its record is of another cell ({data.get('cell_id')!r})"
    try:
        record = CellRecord.from_dict(data, str(out))
    except ValueError as e:
        return None, f"its record is unreadable ({e})"
    if record.status is not Status.OK:
        record.log_tail = _tail(log)
    return record, None


def _record_from_child(
    run: Run, cell: Cell, out: Path, log: Path, returncode: int | None, fate: str | None
) -> CellRecord:
    problem = None
    if fate is None and out.exists():
        record, problem = _child_record(cell, out, log)
        if record is not None:
            return record
    if fate == "timeout":
        record = _base_record(run, cell, Status.TIMEOUT)
        record.reason = f"killed (with its process group) after the {cell.scenario.timeout_s:.0f} s cell timeout"
        record.signal = int(signal.SIGKILL)
    elif returncode is not None and returncode < 0:
        record = _base_record(run, cell, Status.CRASH)
        record.reason = (f"child killed by signal {-returncode} ({_signal_name(-returncode)}) without writing "
                         "a record")
        record.signal = -returncode
    else:
        record = _base_record(run, cell, Status.CRASH)
        record.reason = f"child exited with code {returncode} " + (
            f"but {problem}" if problem else "without writing a record") + _disk_full_note(log)
        record.exit_code = returncode
    record.log_tail = _tail(log)
    record.failed_phase = _last_phase(log)
    return record


DISK_FULL_MARKS = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")


def _disk_full_note(log: Path) -> str:
    """What a crash record says when the child's log shows the disk filled under it (another process, or the
    cell's own latents), so the crash is not read as a harness bug; empty otherwise."""
    tail = _tail(log, 20000)
    mark = next((m for m in DISK_FULL_MARKS if m in tail), None)
    if mark is None:
        return ""
    return (f"; the disk was full: its log says {mark!r}. Free space, then rerun the cell with --resume "
            "--retry-failed (plain --resume keeps this crash)")


def _last_phase(log: Path) -> str | None:
    """Best guess of the phase a child died in, from the progress lines in its log."""
    text = _tail(log, 20000)
    phase, at = None, -1
    for key, name in (("loading ", "load"), ("denoise step", "denoise")):
        if key in text:
            phase, at = name, max(at, text.rfind(key))
    # "[worker HH:MM:SS] phase <name>" lines, where the worker prints them as each phase starts, are exact.
    marks = list(re.finditer(r"^\[worker[^\]]*\] phase (load|encode|denoise|decode)\b", text, re.MULTILINE))
    if marks and marks[-1].start() > at:
        phase = marks[-1].group(1)
    return phase


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
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
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
