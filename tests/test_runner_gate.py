"""Nothing lost, nothing cryptic in the plain runner: unwritable results folder, disk full (free-space check before
each cell, and an append that fails with ENOSPC leaves the file as it was), and --resume --retry-failed.

No worker child is spawned: with OFFLOAD_BENCH_PROFILE=gpu the tiny CPU scenario's cells are recorded as skipped
by the parent itself, which is all these paths need.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.common import exitcodes
from harness.common.contract import label_in
from harness.common.records import DiskFullError, append_record, read_cell_records
from harness.plan.scenario import expand, load_scenario
from harness.run import runner
from harness.run.cell import run_cell
from harness.run.folder import (
    RESULTS_FREE_ENV,
    RESULTS_MIN_FREE_ENV,
    Run,
    check_results_space,
)
from tests.helpers import tiny_scenario_file

AXES = {"dit_cpu_offload": [False, True], "dit_layerwise_offload": [True]}


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_BENCH_PROFILE", "gpu")  # the CPU scenario is then skipped without a child
    monkeypatch.setenv("OFFLOAD_BENCH_GIT_SHA", "test")
    monkeypatch.delenv("OFFLOAD_BENCH_RESULTS_FREE_BYTES", raising=False)
    monkeypatch.delenv("OFFLOAD_BENCH_RESULTS_MIN_FREE_BYTES", raising=False)


def statuses(path: Path) -> list[tuple[str, str]]:
    return [(label_in(r.cell_id), str(r.status)) for r in read_cell_records(path, strict=True).records]


def _fail(monkeypatch: pytest.MonkeyPatch, after: int, err: int = errno.ENOSPC) -> None:
    """os.write writes `after` bytes of what it is asked, then the next call fails with `err` (a disk filling
    up mid-line, as a real ENOSPC does)."""
    real = os.write
    state = {"left": after}

    def write(fd: int, data: Any) -> int:
        if state["left"] <= 0:
            raise OSError(err, os.strerror(err))
        n = real(fd, bytes(data[: state["left"]]))
        state["left"] -= n
        return n

    monkeypatch.setattr(os, "write", write)


# ------------------------------------------------------------------------------------------------ append


@pytest.mark.parametrize("after", [0, 7])
def test_enospc_during_append_leaves_the_file_as_it_was(tmp_path, monkeypatch, after):
    path = tmp_path / "records.jsonl"
    append_record(path, {"cell_id": "a", "n": 1})
    before = path.read_bytes()
    _fail(monkeypatch, after)
    with pytest.raises(DiskFullError) as e:
        append_record(path, {"cell_id": "b", "n": 2, "pad": "x" * 100})
    monkeypatch.undo()
    assert path.read_bytes() == before  # no torn half line for the next reader
    assert str(path) in str(e.value) and "'b'" in str(e.value) and "as it was" in str(e.value)
    append_record(path, {"cell_id": "c", "n": 3})
    assert [json.loads(line)["cell_id"] for line in path.read_text().splitlines()] == ["a", "c"]


def test_enospc_at_fsync_takes_the_line_back(tmp_path, monkeypatch):
    """The line reached the page cache but cannot be made durable (ENOSPC on fsync, as on NFS or a thin pool):
    the append is undone rather than left behind as a record the caller was told had failed."""
    path = tmp_path / "records.jsonl"
    append_record(path, {"cell_id": "a"})
    before = path.read_bytes()

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError):
        append_record(path, {"cell_id": "b"})
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_other_write_errors_are_not_called_disk_full(tmp_path, monkeypatch):
    path = tmp_path / "records.jsonl"
    _fail(monkeypatch, 3, errno.EIO)
    with pytest.raises(OSError) as e:
        append_record(path, {"cell_id": "a"})
    monkeypatch.undo()
    assert not isinstance(e.value, DiskFullError) and e.value.errno == errno.EIO
    assert path.read_bytes() == b""


# ------------------------------------------------------------------------------------------------ runner CLI


def test_runner_disk_full_append_exits_8_and_keeps_the_file(tmp_path, monkeypatch, capsys):
    toml = tiny_scenario_file(tmp_path, "gate", AXES)
    results = tmp_path / "results"
    rc = runner.main([str(toml), "--results", str(results), "--run-id", "r", "--quiet"])
    assert rc == exitcodes.ALL_SKIPPED  # cpu cells on the forced gpu profile: every cell skipped
    path = results / "runs" / "r" / "records.jsonl"
    before = path.read_bytes()
    capsys.readouterr()
    _fail(monkeypatch, 5)
    rc = runner.main([str(toml), "--results", str(results), "--run-id", "r2", "--quiet"])
    monkeypatch.undo()
    assert rc == exitcodes.DISK_FULL
    err = capsys.readouterr().err
    assert "no space left" in err and "--run-id r2 --resume" in err and "Traceback" not in err
    assert (results / "runs" / "r2" / "records.jsonl").read_bytes() == b""
    assert path.read_bytes() == before


def test_runner_checks_free_space_before_each_cell(tmp_path, monkeypatch, capsys):
    toml = tiny_scenario_file(tmp_path, "gate", AXES)
    run = Run.create(tmp_path / "results", "cpu", "r", verbose=False)
    cell = expand(load_scenario(toml))[0]
    monkeypatch.setenv(RESULTS_FREE_ENV, str(10 * 2**20))
    with pytest.raises(DiskFullError, match=r"only 10\.0 MiB free, a cell needs 256 MiB"):
        run_cell(run, cell)
    assert not run.records_path.exists() and not list(run.run_dir.glob("cells/*/child.log"))  # no child started
    monkeypatch.setenv(RESULTS_MIN_FREE_ENV, str(2**20))
    check_results_space(run)  # 10 MiB free is enough when 1 MiB is asked for


def test_runner_unwritable_results_is_one_line_before_any_cell(tmp_path, capsys):
    toml = tiny_scenario_file(tmp_path, "gate", AXES)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc = runner.main([str(toml), "--results", str(blocker / "results"), "--quiet"])
    captured = capsys.readouterr()
    assert rc == exitcodes.UNWRITABLE
    assert captured.err.strip() == f"error: {blocker / 'results' / 'runs'}: not writable (Not a directory)"
    assert "cells" not in captured.out


# ------------------------------------------------------------------------------------------------ retry


def _crashed_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run whose two cells were recorded as crash (one after an earlier ok record) under this spec."""
    toml = tiny_scenario_file(tmp_path, "gate", AXES)
    results = tmp_path / "results"
    path = results / "runs" / "r" / "records.jsonl"
    for i, cell in enumerate(expand(load_scenario(toml))):
        base = {"schema_version": 1, "cell_id": cell.cell_id, "spec_hash": cell.spec_hash("cuda"), "phases": {}}
        if i == 0:
            append_record(path, {**base, "status": "ok"})
        append_record(path, {**base, "status": "crash", "reason": "child killed by signal 9 (SIGKILL)"})
    return toml, results


def test_plain_resume_keeps_failed_cells(tmp_path, capsys):
    toml, results = _crashed_run(tmp_path)
    before = statuses(results / "runs" / "r" / "records.jsonl")
    rc = runner.main([str(toml), "--results", str(results), "--run-id", "r", "--resume", "--quiet"])
    assert rc == exitcodes.FAILED  # the crash records stand, as before
    assert statuses(results / "runs" / "r" / "records.jsonl") == before
    assert capsys.readouterr().out.count("(recorded earlier)") == 2


def test_resume_retry_failed_reruns_crashed_cells_once(tmp_path, capsys):
    toml, results = _crashed_run(tmp_path)
    rc = runner.main([str(toml), "--results", str(results), "--run-id", "r", "--resume", "--retry-failed",
                      "--quiet"])
    out = capsys.readouterr().out
    assert "--retry-failed: 2 cells ended crash/error/timeout and run again" in out
    assert rc == exitcodes.ALL_SKIPPED  # both reruns skipped: nothing measured
    after = statuses(results / "runs" / "r" / "records.jsonl")
    assert after[-2:] == [("cpu0-lw1-te0-vae0-pf1-pin1", "skipped"), ("cpu1-lw1-te0-vae0-pf1-pin1", "skipped")]
    assert len(after) == 5  # nothing rewritten, one new record per retried cell
    # once rerun, the cells are finished: a second retry has nothing to do
    rc = runner.main([str(toml), "--results", str(results), "--run-id", "r", "--resume", "--retry-failed",
                      "--quiet"])
    assert rc == exitcodes.ALL_SKIPPED and "2 cells ended" not in capsys.readouterr().out
    assert len(statuses(results / "runs" / "r" / "records.jsonl")) == 5


def test_a_cell_that_fails_again_is_not_retried_in_a_loop(tmp_path):
    _, results = _crashed_run(tmp_path)
    run = Run(results / "runs" / "r", "cuda", "r", verbose=False)
    assert len(run.retry_failures()) == 2 and run.finished() == {}
    fresh = {"schema_version": 1, "cell_id": "gate/native/cpu1-lw1-te0-vae0-pf1-pin1", "spec_hash": "x",
             "status": "crash", "phases": {}}
    append_record(run.records_path, fresh)  # this invocation's own failure
    assert set(run.finished()) == {fresh["cell_id"]}


def test_retry_failed_needs_resume(tmp_path, capsys):
    toml = tiny_scenario_file(tmp_path, "gate", AXES)
    with pytest.raises(SystemExit) as e:
        runner.main([str(toml), "--results", str(tmp_path), "--retry-failed"])
    assert e.value.code == exitcodes.USAGE and "--retry-failed needs --resume" in capsys.readouterr().err


def test_pytest_refuses_an_unwritable_bench_results_in_one_line(tmp_path):
    """Under pytest (make bench) the same check runs at configure time, before collection: pytest's usage code 4."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "scenarios", "-p", "no:cacheprovider", "--collect-only", "-q",
         "--bench-results", str(blocker / "results")],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 4
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines == [f"ERROR: offload-bench: --bench-results: {blocker / 'results' / 'runs'}: not writable "
                     "(Not a directory)"]


def test_resume_reruns_a_cell_a_guard_skipped_but_not_within_the_same_process(tmp_path):
    """A guard's skip (disk short, GPU busy) is the machine's state, not the cell's fate: a resumed run tries the
    cell again; the process that recorded the skip does not (a pytest session asks for a record more than once)."""
    toml = tiny_scenario_file(tmp_path, "gate", AXES)
    path = tmp_path / "results" / "runs" / "r" / "records.jsonl"
    cells = expand(load_scenario(toml))
    guard = {"failed": True, "problems": ["disk: 41.2 GiB needed, 32.5 GiB free"]}
    for cell in cells:
        append_record(path, {"schema_version": 1, "cell_id": cell.cell_id, "spec_hash": cell.spec_hash("cuda"),
                             "phases": {}, "status": "skipped", "reason": "guard: disk", "guard": guard})
    assert len(Run(path.parent, "cuda", "r", verbose=False).finished()) == len(cells)  # recorded by this process
    resumed = Run.create(tmp_path / "results", "cuda", "r", verbose=False)
    assert resumed.finished() == {} and all(resumed.recorded(c) is None for c in cells)
    append_record(path, {"schema_version": 1, "cell_id": cells[0].cell_id, "spec_hash": cells[0].spec_hash("cuda"),
                         "phases": {}, "status": "skipped", "reason": "guard: disk", "guard": guard})
    assert set(resumed.finished()) == {cells[0].cell_id}  # skipped again in this process: it stands
