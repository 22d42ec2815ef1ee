"""How a cell's child starts (harness.run.cell_start, harness.cell.forkserver): a cell forked from the fork server
gives the record a spawned one gives, its fates (killed, segfault, error, oom, timeout) read the same, its whole
tree dies on a timeout, and nothing of the server outlives the run, even a SIGKILLed runner.

The forked cells share one run (one server start, about 8 s on the shared 2-core CPU box); the tests that start
runners or spawn the same cells for comparison are marked slow.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.common.contract import CellRecord
from harness.common.inputs import InputError, check_environment
from harness.plan.scenario import Cell, expand, load_scenario
from harness.run import runner
from harness.run.cell import finish_overhead, run_cell, spec_for_child
from harness.run.cell_start import CELL_START_ENV, FORK_SERVER, SPAWN, ForkServer, start_method
from harness.run.folder import Run, cell_dir
from tests.helpers import gone, tiny_scenario_file, wait_for

REPO = Path(__file__).resolve().parent.parent
FAULT = "OFFLOAD_BENCH_FAULT"
BASE_ENV = {"OFFLOAD_BENCH_PROFILE": "cpu", "OFFLOAD_BENCH_GIT_SHA": "test"}


def one_cell(folder: Path, name: str, timeout_s: float | None = None) -> Cell:
    [cell] = expand(load_scenario(tiny_scenario_file(folder, name, {"dit_cpu_offload": [True]}, timeout_s)))
    return cell


def servers_for(run_dir: Path) -> list[int]:
    """Live fork servers (and children forked from them) serving `run_dir`, by command line."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"harness.cell.forkserver" in cmd and str(run_dir).encode() in cmd and not gone(int(entry)):
            found.append(int(entry))
    return found


@pytest.fixture(scope="module")
def forked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Run, Path]]:
    """One run whose cells fork from one server (the environment stays as it is for the module: a change would
    restart the server)."""
    folder = tmp_path_factory.mktemp("forked")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**BASE_ENV, CELL_START_ENV: FORK_SERVER}.items():
            mp.setenv(key, value)
        mp.delenv(FAULT, raising=False)
        run = Run.create(folder / "results", "cpu", "forked", verbose=False)
        yield run, folder
        # one server served every forked cell of the module (pytest changes PYTEST_CURRENT_TEST around each test,
        # which must not restart it)
        assert len(set(SERVED)) == 1, SERVED
        run.close()
    assert not servers_for(run.run_dir)


SERVED: list[int | None] = []  # the server pid after each forked cell


@pytest.fixture
def spawned(forked: tuple[Run, Path], tmp_path: Path) -> Run:
    """A run of its own for the spawned twins (run them inside `spawning()`)."""
    return Run.create(tmp_path / "results", "cpu", "spawned", verbose=False)


@contextlib.contextmanager
def spawning() -> Iterator[None]:
    """OFFLOAD_BENCH_CELL_START=spawn for a while; the module's environment (and the server) comes back after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CELL_START_ENV, SPAWN)
        yield


# ------------------------------------------------------------------------------------------- choosing a start


def test_the_variable_is_checked_once_and_names_its_forms() -> None:
    check_environment({CELL_START_ENV: "Fork-Server"})
    check_environment({CELL_START_ENV: " spawn "})
    with pytest.raises(InputError, match=r"OFFLOAD_BENCH_CELL_START='fork'.*fork-server, spawn"):
        check_environment({CELL_START_ENV: "fork"})


def test_the_runner_refuses_a_bad_start_before_any_cell(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(CELL_START_ENV, "forkserver")
    path = tiny_scenario_file(tmp_path, "bad-start", {"dit_cpu_offload": [True]})
    assert runner.main([str(path), "--results", str(tmp_path / "r"), "--quiet"]) == runner.EXIT_USAGE
    assert "OFFLOAD_BENCH_CELL_START='forkserver'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fork_server_is_the_linux_default_and_sglang_cells_always_spawn() -> None:
    linux = sys.platform.startswith("linux")
    assert start_method("harness", {}) == (FORK_SERVER if linux else SPAWN)
    assert start_method("harness", {CELL_START_ENV: "spawn"}) == SPAWN
    assert start_method("diffusers-group", {CELL_START_ENV: "fork-server"}) == (FORK_SERVER if linux else SPAWN)
    for backend in ("sglang", "sglang@0.5.23"):
        assert start_method(backend, {CELL_START_ENV: "fork-server"}) == SPAWN


def test_the_preload_finds_the_classes_the_zoo_factories_import() -> None:
    from harness.cell.forkserver import lazy_heavy_imports

    files = [REPO / "harness" / "models" / f"{m}.py" for m in ("flux", "qwen_image", "wan")]
    files.append(REPO / "harness" / "cell" / "pipeline.py")
    found = set(lazy_heavy_imports(files))
    assert {("diffusers", "FluxTransformer2DModel"), ("transformers", "T5EncoderModel"),
            ("diffusers", "QwenImageTransformer2DModel"), ("transformers", "Qwen2_5_VLTextModel"),
            ("diffusers", "AutoencoderKLWan"), ("diffusers", "UniPCMultistepScheduler")} <= found
    assert all(module.split(".")[0] in ("diffusers", "transformers") for module, _ in found)


def test_the_server_refuses_to_fork_holding_a_cuda_context(monkeypatch) -> None:
    import torch

    from harness.cell.forkserver import refuse_cuda

    refuse_cuda()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(AssertionError, match="must never touch CUDA"):
        refuse_cuda()


def test_a_forked_record_names_the_fork_and_the_server_start() -> None:
    def record(**overhead: float) -> CellRecord:
        return CellRecord.from_dict({"schema_version": 2, "cell_id": "s/c/x", "status": "ok",
                                     "overhead": {"measured_s": 1.0, "record_at": 10.0, **overhead}})

    forked = record(process_start_s=0.02, guards_s=0.1)
    finish_overhead(forked, elapsed_s=9.0, exited_at=10.1, start=FORK_SERVER, server_start_s=7.5)
    o = forked.overhead
    assert o["start"] == "fork-server" and o["fork_s"] == 0.02 and "process_start_s" not in o
    assert o["server_start_s"] == 7.5 and o["other_s"] == pytest.approx(9.0 - 1.0 - 0.02 - 0.1 - 7.5 - 0.1)
    spawned = record(process_start_s=0.1)
    finish_overhead(spawned, elapsed_s=5.0, exited_at=10.1)
    assert spawned.overhead["start"] == "spawn" and spawned.overhead["process_start_s"] == 0.1


# ------------------------------------------------------------------------------------------------ forked cells


def essence(rec: CellRecord) -> dict:
    """What must not depend on how the child started."""
    d = rec.to_dict()
    return {"status": d["status"], "failed_phase": d["failed_phase"], "reason": d["reason"],
            "placements": d["placements"], "effective": d["effective"], "peaks": rec.peaks,
            "latents_sha256": (d.get("outputs") or {}).get("latents_sha256"),
            "phases": sorted(d["phases"]), "signal": d["signal"], "exit_code": d["exit_code"],
            "returncode": d["returncode"]}


def test_a_forked_cell_gives_the_record_of_the_same_cell_run_in_process(forked) -> None:
    from harness.cell.worker import run_cell as run_in_process

    run, folder = forked
    cell = one_cell(folder, "same-record")
    a = run_cell(run, cell)
    SERVED.append(run.fork_server.pid)
    assert a.status == "ok", (a.reason, a.log_tail)
    b = run_in_process(spec_for_child(cell, "cpu"))
    assert (a.outputs["latents_sha256"], a.peaks, a.placements) == (b.outputs["latents_sha256"], b.peaks,
                                                                  b.placements)
    o = a.overhead
    assert o["start"] == "fork-server" and "fork_s" in o and "process_start_s" not in o
    assert o["imports_s"] < 0.5  # imported once, in the server
    assert o["fixed_s"] == pytest.approx(a.elapsed_s - o["measured_s"], abs=0.01)
    assert a.child_pid != run.fork_server.pid and gone(a.child_pid)


@pytest.mark.slow
def test_a_cell_gives_the_same_record_forked_or_spawned(forked, spawned) -> None:
    run, folder = forked
    cell = one_cell(folder, "same-record-twin")
    a = run_cell(run, cell)
    SERVED.append(run.fork_server.pid)
    with spawning():
        b = run_cell(spawned, cell)
    assert a.status == "ok", (a.reason, a.log_tail)
    assert essence(a) == essence(b)
    for rec in (a, b):  # the memory counters are there either way
        assert rec.rss_start_bytes and rec.ru_maxrss_bytes and rec.rss_end_bytes
        for phase in rec.phases.values():
            assert phase.ledger_peak_bytes is not None and phase.rss_peak_bytes
    oa, ob = a.overhead, b.overhead
    assert (oa["start"], ob["start"]) == ("fork-server", "spawn")
    assert "fork_s" in oa and "process_start_s" not in oa and "process_start_s" in ob


FATES = {  # fault -> (status, failed_phase, signal, reason) as a spawned child gives them (tests/test_runner_fates.py)
    "load:sigkill": ("crash", "load", 9, "child killed by signal 9 (SIGKILL) without writing a record"),
    "load:segv": ("crash", "load", 11, "child killed by signal 11 (SIGSEGV) without writing a record"),
    "encode:raise": ("error", "encode", None, "RuntimeError: injected fault in phase encode"),
    "denoise:oom": ("oom", "denoise", None, "injected out-of-memory in phase denoise"),
}


@pytest.mark.parametrize("fault", list(FATES))
def test_fates_of_a_forked_child(forked, fault: str) -> None:
    run, folder = forked
    rec = run_cell(run, one_cell(folder, f"fate-{fault.replace(':', '-')}"), env={FAULT: fault})
    SERVED.append(run.fork_server.pid)
    status, phase, sig, reason = FATES[fault]
    assert (rec.status, rec.failed_phase, rec.signal) == (status, phase, sig)
    assert reason in (rec.reason or "")
    if sig is not None:
        assert rec.returncode == -sig and rec.overhead is None  # the crash record of a spawned child
    assert gone(rec.child_pid)


def test_a_forked_child_that_hangs_is_killed_with_its_whole_tree(forked) -> None:
    run, folder = forked
    started = time.monotonic()
    rec = run_cell(run, one_cell(folder, "fate-tree", timeout_s=3), env={FAULT: "load:tree"})
    SERVED.append(run.fork_server.pid)
    assert rec.status == "timeout" and rec.signal == 9 and rec.failed_phase == "load"
    assert rec.reason == "killed (with its process group) after the 3 s cell timeout"
    assert 3 <= time.monotonic() - started < 30
    line = next(x for x in (rec.log_tail or "").splitlines() if "fault tree: grandchildren" in x)
    in_group, escaped = map(int, line.split()[-2:])
    wait_for(lambda: gone(rec.child_pid) and gone(in_group) and gone(escaped), 10, "the tree to die")
    assert run.fork_server.proc.poll() is None  # the server itself serves on


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["load:sigkill", "load:segv", "load:tree"])
def test_fates_read_the_same_spawned(forked, spawned, tmp_path, fault: str) -> None:
    run, folder = forked
    timeout = 20 if fault == "load:tree" else None  # a spawned child reaches the load in 5-10 s here
    a = run_cell(run, one_cell(folder, f"twin-{fault.replace(':', '-')}", timeout), env={FAULT: fault})
    with spawning():
        b = run_cell(spawned, one_cell(tmp_path, f"twin-{fault.replace(':', '-')}", timeout), env={FAULT: fault})
    assert essence(a) == essence(b)
    if fault == "load:tree":
        for rec in (a, b):
            line = next(x for x in (rec.log_tail or "").splitlines() if "fault tree: grandchildren" in x)
            pids = [int(p) for p in line.split()[-2:]]
            wait_for(lambda pids=pids: all(gone(p) for p in pids), 10, "the grandchildren to die")


# --------------------------------------------------------------------------------------- the server's lifetime


def start_runner(args: list[str], tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(tmp_path / "runner.out", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "harness.run.runner", *args, "--quiet"], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **BASE_ENV, CELL_START_ENV: FORK_SERVER, **env})


@pytest.mark.slow
def test_no_server_is_left_after_the_run(tmp_path) -> None:
    path = tiny_scenario_file(tmp_path, "left", {"dit_cpu_offload": [True, False]})
    proc = start_runner([str(path), "--results", str(tmp_path / "r"), "--run-id", "l"], tmp_path, {})
    run_dir = tmp_path / "r" / "runs" / "l"
    seen: list[int] = []
    while proc.poll() is None:
        seen.extend(p for p in servers_for(run_dir) if p not in seen)
        time.sleep(0.2)
    assert proc.returncode == 0, (tmp_path / "runner.out").read_text()
    assert seen, "no fork server was seen during the run"
    assert not servers_for(run_dir) and all(gone(p) for p in seen)
    records = [CellRecord.from_dict(json.loads(line)) for line in (run_dir / "records.jsonl").open()]
    assert [r.overhead["start"] for r in records] == ["fork-server"] * 2
    assert "server_start_s" in records[0].overhead and "server_start_s" not in records[1].overhead


@pytest.mark.slow
def test_a_sigkilled_runner_takes_the_server_and_the_cell_along(tmp_path) -> None:
    path = tiny_scenario_file(tmp_path, "pkill", {"dit_cpu_offload": [True]})
    proc = start_runner([str(path), "--results", str(tmp_path / "r"), "--run-id", "k"], tmp_path,
                        {FAULT: "load:hang"})
    run_dir = tmp_path / "r" / "runs" / "k"
    try:
        wait_for(lambda: len(servers_for(run_dir)) >= 2 or proc.poll() is not None, 120, "the server and its child")
        assert proc.poll() is None, (tmp_path / "runner.out").read_text()
        tree = servers_for(run_dir)
        proc.kill()
        proc.wait(10)
        wait_for(lambda: all(gone(p) for p in tree), 15, "the server and the cell to die with the runner")
    finally:
        for pid in servers_for(run_dir):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_the_server_restarts_when_the_environment_changes(tmp_path, monkeypatch) -> None:
    server = ForkServer(tmp_path)
    try:
        assert server.ensure() > 0
        first = server.pid
        assert server.ensure() is None and server.pid == first
        monkeypatch.setenv("OFFLOAD_BENCH_TEST_MARK", "1")  # read at import by someone: the server starts again
        assert server.ensure() > 0 and server.pid != first and gone(first)
    finally:
        server.close()
    assert server.pid is None and not servers_for(tmp_path)


@pytest.mark.slow
def test_a_server_that_dies_under_a_cell_makes_it_a_crash_and_the_next_cell_forks_again(tmp_path, monkeypatch,
                                                                                          capsys) -> None:
    import threading

    for key, value in {**BASE_ENV, CELL_START_ENV: FORK_SERVER}.items():
        monkeypatch.setenv(key, value)
    run = Run.create(tmp_path / "results", "cpu", "lost", verbose=False)
    cell = one_cell(tmp_path, "lost", timeout_s=120)

    def kill_the_server() -> None:
        log = cell_dir(run, cell) / "child.log"
        wait_for(lambda: log.exists() and b"phase load" in log.read_bytes(), 60, "the child to hang in load")
        os.kill(run.fork_server.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_the_server)
    killer.start()
    try:
        rec = run_cell(run, cell, env={FAULT: "load:hang"})
        killer.join(60)
        assert (rec.status, rec.signal, rec.failed_phase) == ("crash", 9, "load")
        assert rec.reason == "child killed by signal 9 (SIGKILL) without writing a record"
        wait_for(lambda: gone(rec.child_pid), 10, "the child to die with its server")
        assert f"{cell.cell_id}: the fork server exited" in capsys.readouterr().err
        again = run_cell(run, one_cell(tmp_path, "again"))
        assert again.status == "ok" and again.overhead["start"] == "fork-server"
        assert "server_start_s" in again.overhead  # a new server
    finally:
        run.close()
    assert not servers_for(run.run_dir)


@pytest.mark.slow
def test_a_server_that_cannot_start_leaves_the_run_to_spawn(tmp_path, monkeypatch, capsys) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\nif 'harness.cell.forkserver' in ' '.join(sys.orig_argv):\n"
        "    print('a broken fork server', file=sys.stderr, flush=True)\n    os._exit(3)\n")
    for key, value in {**BASE_ENV, CELL_START_ENV: FORK_SERVER}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    run = Run.create(tmp_path / "results", "cpu", "broken", verbose=False)
    try:
        first = run_cell(run, one_cell(tmp_path, "broken-a"))
        second = run_cell(run, one_cell(tmp_path, "broken-b"))
    finally:
        run.close()
    err = capsys.readouterr().err
    assert "the fork server exited (exit code 3)" in err and "a broken fork server" in err
    assert err.count("the rest of the run are spawned") == 1  # warned once, not retried per cell
    assert [r.status for r in (first, second)] == ["ok", "ok"]
    assert [r.overhead["start"] for r in (first, second)] == ["spawn", "spawn"]
