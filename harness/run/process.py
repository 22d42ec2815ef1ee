"""The child's process tree: it dies with its parent (PR_SET_PDEATHSIG, even when the parent is SIGKILLed), the
parent waits for it with a timeout while echoing its log and a progress line, and a timeout, Ctrl-C or SIGTERM
kills its whole process group and every descendant that left the group. A forked child's server sees its request
pipe close when the parent dies, exits, and the child dies of its own parent-death signal (harness.run.cell_start).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness.common.inputs import env_number
from harness.common.lineage import die_with
from harness.run.cell_start import ForkedChild
from harness.run.folder import Run

# Seconds between the progress lines of a running cell (phase, elapsed, ETA); tests set it to 1.
PROGRESS_EVERY_ENV = "OFFLOAD_BENCH_PROGRESS_S"
PROGRESS_EVERY_DEFAULT_S = 15.0


class Terminated(KeyboardInterrupt):
    """SIGTERM in the parent. Raised like Ctrl-C so that the same cleanup runs (the child's group is killed)."""


def raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


Child = subprocess.Popen | ForkedChild  # what wait_child and _kill_tree use of either: pid, returncode, poll, wait


def die_with_parent(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: the child gets SIGKILL when this parent dies (even by SIGKILL), so no cell outlives its run."""

    def setup() -> None:
        die_with(parent_pid)

    return setup


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While a child runs, SIGTERM raises Terminated (like Ctrl-C) unless someone else already handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return
    old = signal.signal(signal.SIGTERM, raise_terminated)
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


def wait_child(
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
