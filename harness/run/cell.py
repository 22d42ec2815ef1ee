"""Runs one cell: its child's spec (cell.json, with the policy's resolution and the run's H2D probe), the child
started (forked by the run's fork server or spawned, `harness.run.cell_start`) and waited for
(`harness.run.process`), its record (`harness.run.fate`) completed with what only the parent sees (the run, the
spec hashes, the overhead's start and teardown, the plan) and appended to the run's records (`harness.run.folder`).
A cell with the same effective flags as an earlier one copies that one's record instead of running a child.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness import REPO
from harness.common.contract import CellRecord, CellSpec, Status
from harness.common.records import NO_SPACE, DiskFullError, now_iso
from harness.plan.planner import plan_entry
from harness.plan.scenario import Cell
from harness.policy import resolve
from harness.run.cell_start import FORK_SERVER, SPAWN, ForkedChild, ForkServer, ServerError, start_method
from harness.run.fate import base_record, last_phase, record_from_child
from harness.run.folder import Run, append, cell_dir, cell_lock, check_results_space, eta_text
from harness.run.gpus import cell_cost, child_gpu
from harness.run.process import Child, die_with_parent, sigterm_raises, wait_child

# "each": every cell child runs its own pinned H2D probe, as before the probe was passed down (the A/B of the
# saving); anything else: the first cell on a GPU probes and the runner passes its figure to the later ones.
H2D_PROBE_ENV = "OFFLOAD_BENCH_H2D_PROBE"
# The named parts of a cell's fixed cost (harness.cell.worker.run_cell's `overhead`); other_s is the rest of fixed_s.
# process_start_s is a spawned child's interpreter start; a forked one has fork_s instead (request to the worker's
# first line) and the run's first forked cell server_start_s (the fork server's start and preload).
OVERHEAD_PARTS = ("process_start_s", "fork_s", "server_start_s", "imports_s", "guards_s", "cuda_init_s",
                  "h2d_probe_s", "checkpoint_s", "warmup_s", "teardown_s")


def skip_cell(run: Run, cell: Cell, reason: str, label: str = "") -> CellRecord:
    """Records `cell` as skipped (without a child) for `reason`, unless it already has a record of this spec."""
    prior = run.recorded(cell)
    if prior is not None:
        return prior
    record = base_record(run, cell, Status.SKIPPED)
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
    cdir = cell_dir(run, cell)
    with cell_lock(run, cdir, label, cell.cell_id, wait):
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
        run.say(f"{label} {cell.cell_id}: phase {last_phase(log) or 'start'}, {elapsed:.0f} s, {eta_text(left)}")

    with open(log, "wb") as logf, sigterm_raises():
        proc = _start_child(run, server, ["--cell", str(cdir / "cell.json"), "--out", str(out)], child_env, logf)
        fate = wait_child(proc, log, timeout, run, progress)
    elapsed, exited_at = time.monotonic() - started, time.time()
    if isinstance(proc, ForkedChild) and proc.server.lost:  # its child died of its parent-death signal
        run.warn(f"{cell.cell_id}: {proc.server.lost}")
    record = record_from_child(run, cell, out, log, proc.returncode, fate)
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
        preexec_fn=die_with_parent(os.getpid()),
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
