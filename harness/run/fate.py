"""A cell's fate from what its child left (exactly one per cell): the child's own record says ok / oom (with the
phase) / error (with the exception) / skipped (a guard's numbers, `harness.cell.guards`). If the child died without
a record it is a crash (signal or exit code recorded, with the tail of its log and the phase it died in); if it
outlived the scenario's timeout it is a timeout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
from pathlib import Path

from harness.common.contract import STATUSES, CellRecord, Status
from harness.common.records import now_iso
from harness.plan.scenario import Cell
from harness.run.folder import Run


def log_tail(path: Path, nbytes: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - nbytes))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def base_record(run: Run, cell: Cell, status: Status) -> CellRecord:
    """The record of a cell whose child left none (or never ran): the header the child would have begun with
    (`CellRecord.begin`: the spec, settings included, and the resolution), no measurements."""
    spec = dataclasses.replace(cell.spec(run.device), resolution=cell.resolution.as_dict())
    return CellRecord.begin(spec, status, created=now_iso())


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
        record.log_tail = log_tail(log)
    return record, None


def record_from_child(
    run: Run, cell: Cell, out: Path, log: Path, returncode: int | None, fate: str | None
) -> CellRecord:
    problem = None
    if fate is None and out.exists():
        record, problem = _child_record(cell, out, log)
        if record is not None:
            return record
    if fate == "timeout":
        record = base_record(run, cell, Status.TIMEOUT)
        record.reason = f"killed (with its process group) after the {cell.scenario.timeout_s:.0f} s cell timeout"
        record.signal = int(signal.SIGKILL)
    elif returncode is not None and returncode < 0:
        record = base_record(run, cell, Status.CRASH)
        record.reason = (f"child killed by signal {-returncode} ({_signal_name(-returncode)}) without writing "
                         "a record")
        record.signal = -returncode
    else:
        record = base_record(run, cell, Status.CRASH)
        record.reason = f"child exited with code {returncode} " + (
            f"but {problem}" if problem else "without writing a record") + _disk_full_note(log)
        record.exit_code = returncode
    record.log_tail = log_tail(log)
    record.failed_phase = last_phase(log)
    return record


DISK_FULL_MARKS = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "[Errno 122]")


def _disk_full_note(log: Path) -> str:
    """What a crash record says when the child's log shows the disk filled under it (another process, or the
    cell's own latents), so the crash is not read as a harness bug; empty otherwise."""
    tail = log_tail(log, 20000)
    mark = next((m for m in DISK_FULL_MARKS if m in tail), None)
    if mark is None:
        return ""
    return (f"; the disk was full: its log says {mark!r}. Free space, then rerun the cell with --resume "
            "--retry-failed (plain --resume keeps this crash)")


def last_phase(log: Path) -> str | None:
    """Best guess of the phase a child died in, from the progress lines in its log."""
    text = log_tail(log, 20000)
    phase, at = None, -1
    for key, name in (("loading ", "load"), ("denoise step", "denoise")):
        if key in text:
            phase, at = name, max(at, text.rfind(key))
    # "[worker HH:MM:SS] phase <name>" lines, where the worker prints them as each phase starts, are exact.
    marks = list(re.finditer(r"^\[worker[^\]]*\] phase (load|encode|denoise|decode)\b", text, re.MULTILINE))
    if marks and marks[-1].start() > at:
        phase = marks[-1].group(1)
    return phase
