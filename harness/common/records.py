"""Result records: one self-describing JSON object per cell, appended to a JSON-lines file as each cell ends.

Everything downstream (pytest assertions, report, compare) reads these records, never live objects, so any run
can be re-reported later: `read_cell_records` gives `CellRecord`s (JSON only in the file). Appends take an exclusive
lock and fsync, so concurrent runs writing one file cannot interleave lines, and a crash loses at most the line being
written: the readers skip a torn last line and report it instead of failing the whole file.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.common.contract import (
    PHASES,
    SCHEMA_VERSION,
    STATUSES,
    CellRecord,
    JsonObject,
    RecordError,
    dumps_line,
    migrate,
)

__all__ = ["PHASES", "SCHEMA_VERSION", "STATUSES", "CellRecord", "RecordError", "migrate"]

class ResultsError(ValueError):
    """A results file or record is unreadable. The message names the file and line."""


class NoRecordsError(ResultsError):
    """A run folder or records file holds no readable record: there is nothing to report, baseline or compare."""


class UnwritableError(OSError):
    """A folder the command must write to cannot be written. The message names it."""


class DiskFullError(OSError):
    """Too little free space to write a record safely, or an append that failed for lack of space."""


def ensure_writable(folder: Path | str, create: bool = True) -> Path:
    """Proves `folder` writable by creating and removing a file in it, so a command fails in one line naming the
    folder before doing any work, not with a traceback after it. (os.access is not enough: it says yes to root on
    a read-only mount.) With `create` the folder is made first; without, nothing is left behind: the probe goes
    into the nearest existing ancestor, which must be a folder."""
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            target = folder
        else:
            target = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
            if not target.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        fd, probe = tempfile.mkstemp(prefix=".offload-bench-write-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UnwritableError(f"{folder}: not writable ({e.strerror or type(e).__name__})") from None
    return folder


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def git_sha(cwd: Path | None = None) -> str | None:
    """The checkout's commit, with "-dirty" when tracked files differ from it, or OFFLOAD_BENCH_GIT_SHA where the
    tree has no .git (a copied working tree).

    "-dirty" because a commit alone can name code that did not run: the lent GPU machine gets the working tree over
    a .git of an earlier commit, so its records named that commit for a tree one merge later
    (`results/h200/README.md` lists which records that affects)."""
    if os.environ.get("OFFLOAD_BENCH_GIT_SHA"):
        return os.environ["OFFLOAD_BENCH_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5
        )
        sha = out.stdout.strip()
        if not sha:
            return None
        clean = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return sha if clean.returncode == 0 else f"{sha}-dirty"


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def append_record(path: Path, record: CellRecord | JsonObject) -> None:
    """Appends one record as one line, under an exclusive lock, and fsyncs before returning. A JSON object is
    written as it is (a record of an older schema, or a test's malformed one): the file edge.

    A write or fsync that fails (disk full, quota) cuts the file back to its size before the append, still under
    the lock, so a failed append leaves the file exactly as it was: never half a line that would make the next
    record unreadable. Out of space is a `DiskFullError` naming the file; any other OSError is re-raised.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    line = record.to_json() if isinstance(record, CellRecord) else dumps_line(record)
    cell_id = record.cell_id if isinstance(record, CellRecord) else record.get("cell_id")
    data = (line + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked (a nearly full disk does exactly that)
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
                os.fsync(fd)
            if e.errno in NO_SPACE:
                raise DiskFullError(
                    f"{path}: no space left to append the record of {cell_id!r} "
                    f"({os.strerror(e.errno)}); the file is as it was before the append"
                ) from None
            raise
    finally:
        os.close(fd)  # releases the lock


def write_json_atomic(path: Path, data: Any) -> None:
    """Write-then-rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class ReadResult:
    records: list[CellRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # the problems that are whole records of a newer schema_version than this harness reads (also in `problems`):
    # a reader may skip them with a warning, a writer that carries records on (merge) must refuse
    newer: list[str] = field(default_factory=list)


def read_cell_records(path: Path, strict: bool = False) -> ReadResult:
    """Reads a JSON-lines results file into CellRecords (migrated to SCHEMA_VERSION). Bad lines are reported in
    `problems` (or raised if `strict`)."""
    out = ReadResult()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except IsADirectoryError:
        raise ResultsError(f"{path}: is a folder, not a records file") from None
    except OSError as e:
        raise ResultsError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    lines = text.split("\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = None
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            out.records.append(CellRecord.from_dict(rec, f"{path}:{lineno}"))
        except (ValueError, RecursionError) as e:
            torn = lineno == len(lines) and not text.endswith("\n")
            msg = f"{path}:{lineno}: {'torn last line (interrupted write)' if torn else 'unreadable record'}: {e}"
            if strict:
                raise ResultsError(msg) from None
            out.problems.append(msg)
            version = rec.get("schema_version") if not torn and isinstance(rec, dict) else None
            if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
                out.newer.append(msg)
    return out


def latest_by_cell(records: Iterable[CellRecord]) -> dict[str, CellRecord]:
    """The last record of each cell id (a resumed or repeated run appends newer ones)."""
    out: dict[str, CellRecord] = {}
    for rec in records:
        out[rec.cell_id] = rec
    return out


def _gpu_sort_key(key: Any) -> tuple[int, int, str]:
    if key is None:
        return (2, 0, "")
    return (0, int(key), "") if str(key).isdigit() else (1, 0, str(key))


@dataclass
class GpuShare:
    """What one GPU (or the CPU profile, `gpu_index` None) ran of a run: see `by_gpu`."""

    gpu_index: str | int | None
    gpu: str | None = None  # the name and NVML uuid as the child saw them
    gpu_uuid: str | None = None
    workers: list[str] = field(default_factory=list)  # the pytest-xdist workers that ran its cells
    cells: int = 0  # cells that ran (their latest record each)
    copies: int = 0  # cells that took another cell's record (same effective flags, no child of their own)
    wall_s: float = 0.0  # the sum of its cells' parent-side elapsed_s
    statuses: dict[str, int] = field(default_factory=dict)


def by_gpu(records: Iterable[CellRecord]) -> dict[str | int | None, GpuShare]:
    """One run's records (several pytest-xdist workers append to one records.jsonl) merged per GPU id.

    Keyed by each record's `gpu_index` (None: the CPU profile, or a record from before the field), in GPU order;
    copies (`same_as`) are counted apart, not in cells or wall time.
    """
    out: dict[str | int | None, GpuShare] = {}
    for rec in latest_by_cell(records).values():
        g = out.setdefault(rec.gpu_index, GpuShare(rec.gpu_index))
        if rec.same_as:
            g.copies += 1
            continue
        g.cells += 1
        g.wall_s = round(g.wall_s + float(rec.elapsed_s or 0), 2)
        g.statuses[rec.status] = g.statuses.get(rec.status, 0) + 1
        if rec.xdist_worker and rec.xdist_worker not in g.workers:
            g.workers.append(rec.xdist_worker)
        machine = rec.machine or {}
        g.gpu = g.gpu or machine.get("gpu")
        g.gpu_uuid = g.gpu_uuid or machine.get("gpu_uuid")
    for g in out.values():
        g.workers.sort(key=lambda w: (len(w), w))
    return {k: out[k] for k in sorted(out, key=_gpu_sort_key)}
