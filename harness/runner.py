"""The parent side: one spawned child per cell, its fate recorded, every record appended as the cell ends.

Fates: the child's own record says ok / oom (with the phase) / error (with the exception). If the child dies
without a record it is a crash (signal or exit code recorded, with the tail of its log); if it outlives the
scenario's timeout its whole process group is killed and the cell is a timeout. The parent never imports torch,
so it never holds a CUDA context that would distort the children's numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.results import (
    SCHEMA_VERSION,
    append_record,
    git_sha,
    latest_by_cell,
    now_iso,
    read_records,
    summarize_peaks,
)
from harness.scenario import Cell

REPO = Path(__file__).resolve().parent.parent


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


@dataclass
class Run:
    """One run of the harness: a folder with records.jsonl, per-cell specs and logs."""

    run_dir: Path
    device: str
    run_id: str
    sha: str | None = None
    verbose: bool = True
    _executed: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def create(cls, results_root: Path, device: str, run_id: str | None = None, verbose: bool = True) -> Run:
        run_id = run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        run_dir = Path(results_root) / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        return cls(run_dir, device, run_id, git_sha(REPO), verbose)

    @property
    def records_path(self) -> Path:
        return self.run_dir / "records.jsonl"

    def finished(self) -> dict[str, dict[str, Any]]:
        """Records already in this run's file (a resumed run skips these cells)."""
        if not self.records_path.exists():
            return {}
        result = read_records(self.records_path)
        for problem in result.problems:
            self.say(f"warning: {problem}")
        return latest_by_cell(result.records)

    def say(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr, flush=True)


def _cell_dir(run: Run, cell: Cell) -> Path:
    safe = cell.cell_id.replace("/", "__")
    d = run.run_dir / "cells" / safe
    d.mkdir(parents=True, exist_ok=True)
    return d


def _tail(path: Path, nbytes: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_cell(run: Run, cell: Cell, label: str = "", env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs `cell` in a child (or reuses the record of the cell it duplicates) and appends its record."""
    done = run.finished()
    spec_hash = cell.spec_hash(run.device)
    prior = done.get(cell.cell_id)
    if prior is not None and prior.get("spec_hash") == spec_hash:
        run.say(f"{label} {cell.cell_id}: already recorded ({prior['status']}), skipped on resume")
        return prior
    if cell.same_as is not None:
        source = done.get(cell.same_as)
        if source is None:
            raise RuntimeError(f"{cell.cell_id} duplicates {cell.same_as}, which has no record yet")
        record = {**source, **cell.resolution.as_dict(), "cell_id": cell.cell_id, "same_as": cell.same_as}
        record.update(spec_hash=spec_hash, created=now_iso())
        append_record(run.records_path, record)
        run.say(f"{label} {cell.cell_id}: same effective flags as {cell.same_as} -> {record['status']} (not rerun)")
        return record

    cdir = _cell_dir(run, cell)
    spec = cell.spec(run.device)
    spec["latents_out"] = str(cdir / "latents.pt")
    (cdir / "cell.json").write_text(json.dumps(spec, indent=1))
    out, log = cdir / "record.json", cdir / "child.log"
    out.unlink(missing_ok=True)
    timeout = cell.scenario.timeout_s
    run.say(f"{label} {cell.cell_id}: starting (timeout {timeout:.0f} s)")
    started = time.monotonic()
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "harness.worker", "--cell", str(cdir / "cell.json"), "--out", str(out)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # its own process group, so a timeout kills grandchildren too
        )
        fate = _wait(proc, log, timeout, run)
    elapsed = time.monotonic() - started
    record = _record_from_child(cell, out, log, proc.returncode, fate)
    record.update(
        run_id=run.run_id,
        git_sha=run.sha,
        spec_hash=spec_hash,
        elapsed_s=round(elapsed, 2),
        returncode=proc.returncode,
        log=str(log.relative_to(run.run_dir)),
    )
    append_record(run.records_path, record)
    where = f" in {record['failed_phase']}" if record.get("failed_phase") else ""
    run.say(f"{label} {cell.cell_id}: {record['status']}{where} after {elapsed:.1f} s")
    return record


def _wait(proc: subprocess.Popen, log: Path, timeout: float, run: Run) -> str | None:
    """Waits for the child, echoing its log; returns 'timeout' if it had to be killed."""
    deadline = time.monotonic() + timeout
    shown = 0
    try:
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            shown = _echo(log, shown, run)
            if time.monotonic() > deadline:
                _kill_group(proc)
                return "timeout"
    except BaseException:
        # Ctrl-C or SIGTERM in the parent: take the child down with us; finished cells are already on disk.
        _kill_group(proc)
        raise
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
            print(f"    {line}", file=sys.stderr, flush=True)
    return len(data) if data.endswith(b"\n") else shown


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _record_from_child(cell: Cell, out: Path, log: Path, returncode: int, fate: str | None) -> dict[str, Any]:
    if fate is None and out.exists():
        try:
            record = json.loads(out.read_text())
            if isinstance(record, dict) and record.get("status"):
                if record["status"] not in ("ok",):
                    record["log_tail"] = _tail(log)
                return record
        except (json.JSONDecodeError, OSError):
            pass
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "created": now_iso(),
        "cell_id": cell.cell_id,
        "scenario": cell.scenario.name,
        "model": cell.scenario.model,
        "card": cell.card.as_dict(),
        **cell.resolution.as_dict(),
        "phases": {},
        "log_tail": _tail(log),
    }
    if fate == "timeout":
        record.update(status="timeout", reason=f"killed after the {cell.scenario.timeout_s:.0f} s cell timeout")
    elif returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else "?"
        record.update(status="crash", reason=f"child killed by signal {-returncode} ({name})", signal=-returncode)
    else:
        record.update(status="crash", reason=f"child exited with code {returncode} without writing a record")
    record["failed_phase"] = _last_phase(log)
    record["peaks"] = summarize_peaks(record)
    return record


def _last_phase(log: Path) -> str | None:
    text = _tail(log, 20000)
    phase = None
    for key, name in (("loading ", "load"), ("denoise step", "denoise")):
        if key in text:
            phase = name
    return phase


def run_cells(
    run: Run, cells: list[Cell], on_record: Callable[[Cell, dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
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
