"""Nothing lost, nothing hangs: every fate of a cell is recorded, interrupted runs keep what finished and resume.

These tests spawn real children (`python -m harness.cell.worker`) on the tiny CPU scenario, with faults injected
through OFFLOAD_BENCH_FAULT, and real parents (`python -m harness.run.runner`) that they interrupt. Eleven worker
children in all; the rest is in-process. They spawn (OFFLOAD_BENCH_CELL_START=spawn): they find the child by its
command line and plant grandchildren from a sitecustomize, which a forked child has neither of; the same fates
under the fork server are tests/test_cell_start.py's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.common.contract import CellRecord
from harness.common.records import append_record, read_cell_records
from harness.plan.scenario import Cell, expand, load_scenario
from harness.run import folder, process
from harness.run.cell import run_cell
from harness.run.folder import Run
from tests.helpers import gone, tiny_scenario_file, wait_for

REPO = Path(__file__).resolve().parent.parent
FAULT = "OFFLOAD_BENCH_FAULT"


# ------------------------------------------------------------------------------------------------ helpers


def scenario_file(folder: Path, name: str, axes: dict[str, list], timeout_s: float | None = None) -> Path:
    return tiny_scenario_file(folder, name, axes, timeout_s)


def one_cell(path: Path) -> Cell:
    cells = expand(load_scenario(path))
    assert len(cells) == 1
    return cells[0]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fates-cache")


@pytest.fixture(autouse=True)
def _env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFLOAD_BENCH_CACHE", str(cache))
    monkeypatch.setenv("OFFLOAD_BENCH_PROFILE", "cpu")
    monkeypatch.setenv("OFFLOAD_BENCH_GIT_SHA", "test")
    monkeypatch.setenv("OFFLOAD_BENCH_CELL_START", "spawn")
    monkeypatch.delenv(FAULT, raising=False)


def records_of(path: Path) -> list[CellRecord]:
    result = read_cell_records(path)
    assert not result.problems, result.problems
    return result.records


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return all(gone(p) for p in process.group_members(pgid))


@pytest.fixture
def grandchildren(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """Env that makes the next Python child start two `sleep` grandchildren (one in its process group, one that
    left it with setsid) and write their pids to a file; kills them afterwards if the test left any."""
    site = tmp_path / "site"
    site.mkdir()
    pids = tmp_path / "grandchildren.txt"
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, subprocess
        out = os.environ.get("FATES_GRANDCHILDREN")
        if out and b"harness.cell.worker" in open("/proc/self/cmdline", "rb").read():
            os.environ.pop("FATES_GRANDCHILDREN")
            a = subprocess.Popen(["sleep", "600"])
            b = subprocess.Popen(["sleep", "601"], start_new_session=True)
            with open(out, "w") as f:
                f.write(f"{a.pid} {b.pid}\\n")
    """))
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "FATES_GRANDCHILDREN": str(pids)}
    yield env, pids
    if pids.exists():
        for pid in map(int, pids.read_text().split()):
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def reap() -> Iterator[list[int]]:
    """Pids a test started (runners, workers); any still running when the test ends (it failed) is killed."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            ours = b"harness." in Path(f"/proc/{pid}/cmdline").read_bytes()  # not a stranger that reused the pid
        except OSError:
            continue
        if ours and not gone(pid):
            os.kill(pid, signal.SIGKILL)


def start_runner(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    out, err = open(tmp_path / "runner.out", "ab"), open(tmp_path / "runner.err", "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "harness.run.runner", *args, "--quiet"],
            cwd=REPO, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
        )
    finally:
        out.close()
        err.close()


def runner_output(tmp_path: Path) -> tuple[str, str]:
    return (tmp_path / "runner.out").read_text(), (tmp_path / "runner.err").read_text()


def the_child(parent: subprocess.Popen, timeout: float = 60.0) -> int:
    """The pid of the worker child the runner `parent` started (waits for it)."""
    found: list[int] = []

    def started() -> bool:
        found[:] = [p for p in process.descendants(parent.pid) if _is_worker(p)]
        return bool(found) or parent.poll() is not None

    wait_for(started, timeout, "the runner to start a child")
    assert found, f"runner exited ({parent.returncode}) before starting a child"
    return found[0]


def _is_worker(pid: int) -> bool:
    try:
        return b"harness.cell.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


# ------------------------------------------------------------------------------------ fates of one child


def test_sigkill_is_a_crash_with_signal_9(tmp_path: Path) -> None:
    cell = one_cell(scenario_file(tmp_path, "fate-kill", {"dit_cpu_offload": [True]}))
    run = Run.create(tmp_path / "results", "cpu", "kill", verbose=False)
    rec = run_cell(run, cell, env={FAULT: "load:sigkill"}).to_dict()
    assert rec["status"] == "crash"
    assert rec["signal"] == 9 and rec["returncode"] == -9
    assert "signal 9 (SIGKILL)" in rec["reason"]
    assert group_gone(rec["child_pid"])
    [stored] = records_of(run.records_path)
    assert stored.cell_id == cell.cell_id and stored.status == "crash" and stored.signal == 9


def test_raise_is_an_error_with_the_exception_and_exit_1(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, "fate-raise", {"dit_cpu_offload": [True]})
    proc = start_runner([str(path), "--results", str(tmp_path / "results"), "--run-id", "r"], tmp_path,
                        {FAULT: "encode:raise"})
    assert proc.wait(120) == 1, runner_output(tmp_path)
    [rec] = records_of(tmp_path / "results" / "runs" / "r" / "records.jsonl")
    assert rec.status == "error" and rec.failed_phase == "encode"
    assert rec.reason == "RuntimeError: injected fault in phase encode"
    assert "injected fault" in (rec.traceback or "")
    out, _ = runner_output(tmp_path)
    assert "[1/1 " in out and f"{rec.cell_id}: error in encode: RuntimeError: injected fault" in out


def test_oom_is_oom_with_its_phase_and_exit_0(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, "fate-oom", {"dit_cpu_offload": [True]})
    proc = start_runner([str(path), "--results", str(tmp_path / "results"), "--run-id", "r"], tmp_path,
                        {FAULT: "denoise:oom"})
    assert proc.wait(120) == 0, runner_output(tmp_path)
    [rec] = records_of(tmp_path / "results" / "runs" / "r" / "records.jsonl")
    assert rec.status == "oom" and rec.failed_phase == "denoise"
    assert "injected out-of-memory in phase denoise" in (rec.reason or "")
    assert "load" in rec.phases  # what ran before the failure is still measured


def test_hang_is_a_timeout_and_the_whole_tree_dies(tmp_path: Path, grandchildren) -> None:
    env, pids = grandchildren
    cell = one_cell(scenario_file(tmp_path, "fate-hang", {"dit_cpu_offload": [True]}, timeout_s=15))
    run = Run.create(tmp_path / "results", "cpu", "hang", verbose=False)
    started = time.monotonic()
    rec = run_cell(run, cell, env={**env, FAULT: "load:hang"}).to_dict()
    assert rec["status"] == "timeout"
    assert 15 <= time.monotonic() - started < 40
    assert "15 s cell timeout" in rec["reason"]
    in_group, escaped = map(int, pids.read_text().split())
    wait_for(lambda: group_gone(rec["child_pid"]) and gone(in_group) and gone(escaped), 10, "the tree to die")
    [stored] = records_of(run.records_path)
    assert stored.status == "timeout" and stored.cell_id == cell.cell_id


# --------------------------------------------------------------------------------- interrupting the parent


def test_sigterm_to_the_runner_kills_the_child_group_and_exits_143(tmp_path: Path, grandchildren, reap) -> None:
    env, pids = grandchildren
    path = scenario_file(tmp_path, "fate-term", {"dit_cpu_offload": [False, True]})
    parent = start_runner([str(path), "--results", str(tmp_path / "results"), "--run-id", "t"], tmp_path,
                          {**env, FAULT: "load:hang"})
    reap.append(parent.pid)
    child = the_child(parent)
    reap.append(child)
    wait_for(pids.exists, 60, "the grandchildren")
    wait_for(lambda: len(pids.read_text().split()) == 2, 10, "the grandchildren's pids")
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(30) == 143, runner_output(tmp_path)
    in_group, escaped = map(int, pids.read_text().split())
    wait_for(lambda: group_gone(child) and gone(in_group) and gone(escaped), 10, "the child's tree to die")
    assert "interrupted by SIGTERM" in runner_output(tmp_path)[1]
    records = tmp_path / "results" / "runs" / "t" / "records.jsonl"
    assert not records.exists() or records_of(records) == []  # the interrupted cell is not recorded: it reruns


def test_sigkilled_runner_takes_its_child_along(tmp_path: Path, reap) -> None:
    path = scenario_file(tmp_path, "fate-pkill", {"dit_cpu_offload": [True]})
    parent = start_runner([str(path), "--results", str(tmp_path / "results"), "--run-id", "k"], tmp_path,
                          {FAULT: "load:hang"})
    reap.append(parent.pid)
    child = the_child(parent)
    reap.append(child)
    parent.kill()
    parent.wait(10)
    wait_for(lambda: gone(child), 10, "the orphaned child to die (PR_SET_PDEATHSIG)")


def test_sigint_keeps_finished_cells_and_resume_runs_only_the_rest(tmp_path: Path, reap) -> None:
    path = scenario_file(tmp_path, "fate-int", {"dit_cpu_offload": [False, True]})
    cells = [c.cell_id for c in expand(load_scenario(path))]
    results = tmp_path / "results"
    records = results / "runs" / "i" / "records.jsonl"
    parent = start_runner([str(path), "--results", str(results), "--run-id", "i"], tmp_path)
    reap.append(parent.pid)
    wait_for(lambda: (records.exists() and records.read_bytes().count(b"\n") >= 1) or parent.poll() is not None,
             120, "the first cell's record")
    second = [p for p in process.descendants(parent.pid) if _is_worker(p)]
    reap.extend(second)
    parent.send_signal(signal.SIGINT)
    assert parent.wait(30) == 130, runner_output(tmp_path)
    assert all(group_gone(p) for p in second)
    first = records_of(records)
    assert [r.cell_id for r in first] == cells[:1] and first[0].status == "ok"
    before = records.read_bytes()
    assert "interrupted by SIGINT: 1 finished cells kept" in runner_output(tmp_path)[1]

    (tmp_path / "runner.out").write_text("")
    again = start_runner([str(path), "--results", str(results), "--resume"], tmp_path)
    assert again.wait(120) == 0, runner_output(tmp_path)
    out, _ = runner_output(tmp_path)
    assert f"[1/2 0s] {cells[0]}: ok (recorded earlier)" in out
    assert f"{cells[1]}: ok" in out and f"{cells[1]}: ok (recorded earlier)" not in out
    final = records_of(records)
    assert sorted(r.cell_id for r in final) == sorted(cells)  # one record per cell: nothing ran twice
    assert records.read_bytes().startswith(before)


def test_torn_and_garbage_lines_are_reported_kept_and_the_resumed_run_completes(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, "fate-torn", {"dit_cpu_offload": [False, True]})
    a, b = expand(load_scenario(path))
    run_dir = tmp_path / "results" / "runs" / "c"
    run_dir.mkdir(parents=True)
    records = run_dir / "records.jsonl"
    done_a = {"schema_version": 1, "cell_id": a.cell_id, "status": "ok", "spec_hash": a.spec_hash("cpu"),
              "scenario": a.scenario.name, "card": {"name": "native", "cap_bytes": None}, "phases": {}}
    half_b = json.dumps({**done_a, "cell_id": b.cell_id, "spec_hash": b.spec_hash("cpu"), "pad": "x" * 200})
    original = (
        b"this is not json\n"
        + b"[1, 2, 3]\n"
        + b"\x00\x00\x00\x00\n"
        + json.dumps(done_a).encode() + b"\n"
        + b'{"schema_version": 1, "cell_id": "' + b.cell_id.encode() + b'", "status": "ok"}\n'  # no spec_hash
        + half_b[: len(half_b) // 2].encode()  # the parent died while writing b's record: a torn last line
    )
    records.write_bytes(original)
    proc = start_runner([str(path), "--results", str(tmp_path / "results"), "--run-id", "c", "--resume"], tmp_path)
    assert proc.wait(120) == 0, runner_output(tmp_path)
    out, err = runner_output(tmp_path)
    for line in (1, 2, 3):
        assert f"{records}:{line}: unreadable record" in err
    assert f"{records}:6: torn last line" in err
    assert f"{a.cell_id}: ok (recorded earlier)" in out
    assert "[2/2" in out and f"{b.cell_id}: ok" in out and f"{b.cell_id}: ok (recorded earlier)" not in out
    data = records.read_bytes()
    assert data.startswith(original)  # nothing rewritten or truncated
    result = read_cell_records(records)
    good = [r for r in result.records if folder.complete_record(r)]
    assert [r.cell_id for r in good] == [a.cell_id, b.cell_id]
    assert (good[-1].child_pid or 0) > 0  # b really ran, and its record sits on a line of its own


# --------------------------------------------------------------------------------------- in-process checks


def test_finished_counts_only_complete_records_and_never_writes(tmp_path: Path, capsys) -> None:
    run = Run.create(tmp_path, "cpu", "f", verbose=False)
    good = {"schema_version": 1, "cell_id": "s/c/x", "status": "ok", "spec_hash": "abc"}
    content = (
        json.dumps(good) + "\n"
        + "[" * 100_000 + "\n"  # pathological nesting: json raises RecursionError, not ValueError
        + json.dumps({"schema_version": 1, "status": "ok"}) + "\n"  # valid JSON without a cell id
        + json.dumps({**good, "cell_id": "s/c/y", "spec_hash": None}) + "\n"
        + json.dumps({**good, "cell_id": "s/c/z"})[:30]
    )
    run.records_path.write_text(content)
    done = run.finished()
    assert set(done) == {"s/c/x"}
    assert run.records_path.read_text() == content
    err = capsys.readouterr().err
    assert f"{run.records_path}:2:" in err and f"{run.records_path}:5: torn last line" in err
    run.finished()
    assert capsys.readouterr().err == ""  # each problem is reported once per run, not once per cell


def test_the_next_record_after_a_torn_line_starts_on_its_own_line(tmp_path: Path) -> None:
    run = Run.create(tmp_path, "cpu", "t", verbose=False)
    run.records_path.write_bytes(b'{"schema_version": 1, "cell_id": "s/c/a", "sta')
    folder.append(run, {"schema_version": 1, "cell_id": "s/c/b", "status": "ok", "spec_hash": "h"})
    assert run.records_path.read_bytes().startswith(b'{"schema_version": 1, "cell_id": "s/c/a", "sta\n{')
    assert set(run.finished()) == {"s/c/b"}


def test_concurrent_parents_appending_to_one_file_do_not_corrupt_it(tmp_path: Path) -> None:
    path = tmp_path / "records.jsonl"
    path.write_bytes(b'{"torn": ')  # a writer died mid-line before these two started
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from harness.run.folder import Run, append
        run = Run(Path({str(tmp_path)!r}), "cpu", "x", verbose=False)
        who = sys.argv[1]
        for i in range(150):
            append(run, {{"schema_version": 1, "cell_id": f"s/{{who}}/{{i}}", "status": "ok", "spec_hash": "h",
                          "pad": who * (1000 + 97 * i)}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, w], cwd=REPO) for w in ("a", "b")]
    assert [p.wait(120) for p in procs] == [0, 0]
    result = read_cell_records(path)
    assert len(result.problems) == 1 and ":1:" in result.problems[0]  # only the torn line from before
    ids = [r.cell_id for r in result.records]
    assert sorted(ids) == sorted(f"s/{w}/{i}" for w in "ab" for i in range(150))
    assert all(r.extra["pad"] == r.cell_id.split("/")[1] * len(r.extra["pad"]) for r in result.records)


def test_a_cell_another_parent_is_running_is_waited_for_not_rerun(tmp_path: Path) -> None:
    import fcntl
    import threading

    cell = one_cell(scenario_file(tmp_path, "fate-lock", {"dit_cpu_offload": [True]}))
    run = Run.create(tmp_path / "results", "cpu", "l", verbose=False)
    lock = os.open(folder.cell_dir(run, cell) / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # "another parent" holds the cell
    got: list[CellRecord] = []
    t = threading.Thread(target=lambda: got.append(run_cell(run, cell)))
    t.start()
    time.sleep(1.0)
    assert t.is_alive() and not got  # waiting, not running a second child
    other = {"schema_version": 1, "cell_id": cell.cell_id, "status": "ok", "spec_hash": cell.spec_hash("cpu"),
             "by": "the other parent"}
    append_record(run.records_path, other)
    os.close(lock)
    t.join(30)
    assert got and got[0].extra["by"] == "the other parent"
    assert len(records_of(run.records_path)) == 1
