"""Several GPUs: one pytest-xdist worker per GPU (harness.run.gpus + scenarios/conftest.py), longest cells first, one
shared records.jsonl merged per GPU (results.by_gpu). Everything here runs on CPU; the one end-to-end test runs the
legacy tiny scenario with `-n 2` on the CPU profile (no GPU assignment there)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.analyze.report import render
from harness.common.contract import CellRecord
from harness.common.records import GpuShare, by_gpu, read_cell_records
from harness.plan.scenario import expand, load_scenario
from harness.run import cell as run_cell_module
from harness.run import folder
from harness.run.folder import Run
from harness.run.gpus import cell_cost, child_env, child_gpu, gpu_for_worker, longest_first, visible_gpus
from tests.helpers import as_records

REPO = Path(__file__).resolve().parent.parent
LEGACY = REPO / "scenarios" / "cpu" / "qwen_image_edit_tiny_legacy.toml"


# ------------------------------------------------------------------------------------------------ visible GPUs


@pytest.mark.parametrize(
    ("value", "count", "expected"),
    [
        (None, 3, ["0", "1", "2"]),  # unset: NVML's count
        (None, None, []),  # unset and no NVML
        (None, 0, []),
        ("", 4, []),  # empty string: no GPU at all
        ("0,2", 4, ["0", "2"]),
        ("0,2", None, ["0", "2"]),  # count unknown: taken as written
        ("0,2", 2, ["0"]),  # CUDA stops at the first index it does not have
        (" 1 , 3 ", 4, ["1", "3"]),  # spaces
        ("GPU-8b2c-aa,GPU-77ee-bb", 2, ["GPU-8b2c-aa", "GPU-77ee-bb"]),  # UUIDs
        ("MIG-1234", 1, ["MIG-1234"]),
        ("-1", 4, []),  # the usual way to hide every GPU
        ("1,x,2", 4, ["1"]),  # everything from an invalid entry on is ignored
        ("0,,1", 4, ["0"]),
        ("2,2", 4, ["2"]),  # a repeat ends the list
    ],
)
def test_visible_gpus(value: str | None, count: int | None, expected: list[str]) -> None:
    env = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
    assert visible_gpus(env, count) == expected


def test_gpu_for_worker_maps_gw_k_to_the_kth_gpu() -> None:
    gpus = ["0", "2", "5", "GPU-abc"]
    assert [gpu_for_worker(f"gw{k}", gpus) for k in range(4)] == gpus
    assert gpu_for_worker(None, gpus) == "0"  # no xdist / the controller: the first GPU
    assert gpu_for_worker("master", gpus) == "0"
    assert gpu_for_worker(None, []) is None


@pytest.mark.parametrize("worker", ["gw4", "gw10"])
def test_gpu_for_worker_beyond_the_gpus_is_an_error(worker: str) -> None:
    with pytest.raises(ValueError, match=rf"{worker} has no GPU of its own: 4 visible"):
        gpu_for_worker(worker, ["0", "1", "2", "3"])
    with pytest.raises(ValueError, match="no GPU of its own: 0 visible"):
        gpu_for_worker("gw0", [])
    with pytest.raises(ValueError, match="unknown pytest-xdist worker id"):
        gpu_for_worker("worker-1", ["0"])


def test_child_env_and_child_gpu() -> None:
    assert child_env("3", {}) == {"CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert child_env("3", {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}) == {"CUDA_VISIBLE_DEVICES": "3"}  # theirs stays
    assert child_env(None, {}) == {}
    assert child_gpu({"CUDA_VISIBLE_DEVICES": "3"}, "cuda") == "3"
    assert child_gpu({"CUDA_VISIBLE_DEVICES": " GPU-abc , 1"}, "cuda") == "GPU-abc"
    assert child_gpu({}, "cuda") == "0"  # all GPUs visible: the child uses CUDA device 0
    assert child_gpu({"CUDA_VISIBLE_DEVICES": ""}, "cuda") is None
    assert child_gpu({"CUDA_VISIBLE_DEVICES": "3"}, "cpu") is None


# ------------------------------------------------------------------------------------------------ ordering


def test_longest_first_is_stable_for_ties() -> None:
    items = [("a", 1), ("b", 5), ("c", 1), ("d", 5), ("e", 3), ("f", 1)]
    assert [n for n, _ in longest_first(items, lambda x: x[1])] == ["b", "d", "e", "a", "c", "f"]
    assert longest_first([], lambda x: 0) == []


def test_cell_cost_ranks_real_sizes_above_tiny_twins() -> None:
    def cost(path: str) -> int:
        return cell_cost(expand(load_scenario(REPO / "scenarios" / path))[0])

    wan, qwen = cost("gpu/wan21_14b_h100.toml"), cost("gpu/qwen_image_edit_5090.toml")
    flux = cost("gpu/flux_dev_4090.toml")
    tiny = max(cost(f"cpu/{p.name}") for p in (REPO / "scenarios" / "cpu").glob("*.toml"))
    assert min(wan, qwen, flux) > 10 * tiny
    s = load_scenario(REPO / "scenarios" / "gpu" / "qwen_image_edit_5090.toml")
    forwards = 2 if s.true_cfg_scale > 1 else 1
    assert qwen == s.steps * s.frames * s.height * s.width * forwards * (s.warmup + s.rounds)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("PYTEST_ADDOPTS", None)
    return {**env, **extra}


def _pytest(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "scenarios", "-p", "no:cacheprovider", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


def test_collection_order_and_auto_workers_on_the_gpu_profile(tmp_path: Path) -> None:
    """-n auto on the GPU profile: one worker per visible GPU; cells longest first, set-level tests after every
    cell, the other profile's skipped items last. (--collect-only starts no worker.)"""
    proc = _pytest(["-n", "auto", "--bench-profile", "gpu", "--collect-only", "--bench-results", str(tmp_path)],
                   _clean_env(CUDA_VISIBLE_DEVICES="0,1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 pytest-xdist workers (gw0 -> GPU 0, gw1 -> GPU 1)" in proc.stdout
    ids = re.findall(r"<Function (test_\w+)\[([^\]]+)\]>", proc.stdout)
    scenarios = {s.name: s for s in (load_scenario(p) for p in (REPO / "scenarios").rglob("*.toml"))}
    # skipped here: the CPU profile's items, and capacity searches (run by `python -m harness capacity`, not pytest)
    kinds = ["skip" if (s := scenarios[cid.split("/")[0]]).profile == "cpu" or s.capacity is not None else name
             for name, cid in ids]
    first_skip = kinds.index("skip")
    assert set(kinds[first_skip:]) == {"skip"}  # CPU-profile items, skipped here, come last
    runnable = kinds[:first_skip]
    assert runnable.index("test_expectations") == runnable.count("test_cell")  # every cell before any set test
    costs = [cell_cost(expand(scenarios[cid.split("/")[0]])[0]) for _, cid in ids[: runnable.count("test_cell")]]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]


@pytest.mark.parametrize(("workers", "visible", "shown"), [("3", "0,1", "2: 0, 1"), ("1", "", "0: none")])
def test_more_workers_than_gpus_is_refused(tmp_path: Path, workers: str, visible: str, shown: str) -> None:
    proc = _pytest(["-n", workers, "--bench-profile", "gpu", "--bench-results", str(tmp_path)],
                   _clean_env(CUDA_VISIBLE_DEVICES=visible))
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert f"-n {workers} asks for more pytest-xdist workers than visible GPUs ({shown}" in proc.stderr
    assert not (tmp_path / "runs").exists()  # refused before any worker or cell started


# ------------------------------------------------------------------------------------------ per-worker GPU


def _scenarios_conftest() -> Any:
    spec = importlib.util.spec_from_file_location("offload_bench_scenarios_conftest", REPO / "scenarios/conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_worker_gets_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    conftest = _scenarios_conftest()
    monkeypatch.setattr(conftest, "nvml_count", lambda: 8)
    env = {"CUDA_VISIBLE_DEVICES": "1,3,5"}
    got = [conftest.worker_child_env(f"gw{k}", "cuda", env)["CUDA_VISIBLE_DEVICES"] for k in range(3)]
    assert got == ["1", "3", "5"]
    assert conftest.worker_child_env("gw2", "cuda", {}) == {"CUDA_VISIBLE_DEVICES": "2",
                                                            "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert conftest.worker_child_env(None, "cuda", env) == {}  # no xdist: the children inherit the environment
    assert conftest.worker_child_env("gw5", "cpu", env) == {}  # CPU profile: no GPU assignment
    with pytest.raises(ValueError, match="gw3 has no GPU of its own"):
        conftest.worker_child_env("gw3", "cuda", env)


def test_records_pass_the_worker_env_to_every_cell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records.get and Records.group (which may run a missing cell on this worker) hand the env to run_cell."""
    conftest = _scenarios_conftest()
    seen: list[tuple[str, dict[str, str] | None]] = []

    def fake_run_cell(run: Run, cell: Any, label: str = "", env: dict[str, str] | None = None) -> CellRecord:
        seen.append((cell.cell_id, env))
        record = CellRecord.from_dict({"cell_id": cell.cell_id, "status": "ok", "spec_hash": cell.spec_hash(run.device),
                                       "scenario": cell.scenario.name, "card": cell.card.as_dict(),
                                       "schema_version": 1})
        folder.append(run, record)
        return record

    monkeypatch.setattr(conftest, "run_cell", fake_run_cell)
    scenario = load_scenario(LEGACY)
    cells = expand(scenario)
    env = {"CUDA_VISIBLE_DEVICES": "3", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    records = conftest.Records(Run.create(tmp_path, "cuda", "r", verbose=False), len(cells), env)
    records.get(cells[0])
    records.group(scenario, cells[0].card.name)
    assert {cid for cid, _ in seen} == {c.cell_id for c in cells}  # each cell once, none run twice
    assert all(e == env for _, e in seen)


def test_the_child_runs_with_the_workers_gpu_and_the_record_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runner.run_cell's env reaches the child process, and its record carries gpu_index and xdist_worker. The
    child is swapped for a stub that writes down the CUDA_VISIBLE_DEVICES it saw (no torch, no record: a crash)."""
    seen = tmp_path / "seen"
    real_popen = subprocess.Popen

    def stub_popen(args: list[str], **kwargs: Any) -> subprocess.Popen:
        code = "import os, sys; open(sys.argv[1], 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>'))"
        return real_popen([sys.executable, "-c", code, str(seen)], **kwargs)

    monkeypatch.setattr(run_cell_module.subprocess, "Popen", stub_popen)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    run = Run.create(tmp_path, "cuda", "r", verbose=False)
    cell = expand(load_scenario(LEGACY))[0]
    record = run_cell_module.run_cell(run, cell, env={"CUDA_VISIBLE_DEVICES": "2"}).to_dict()
    assert seen.read_text() == "2"
    assert (record["status"], record["gpu_index"], record["xdist_worker"]) == ("crash", "2", "gw1")
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    cpu = run_cell_module.run_cell(Run.create(tmp_path, "cpu", "c", verbose=False), cell).to_dict()
    assert (cpu["gpu_index"], cpu["xdist_worker"]) == (None, None)


# ------------------------------------------------------------------------------------------- merged records


def _rec(cell: str, gpu: str | None, worker: str | None, elapsed: float, status: str = "ok", **extra: Any) -> dict:
    return {"cell_id": cell, "status": status, "gpu_index": gpu, "xdist_worker": worker, "elapsed_s": elapsed,
            "scenario": cell.split("/")[0], "card": {"name": "native", "cap_bytes": None}, "device": "cuda",
            "schema_version": 1, "machine": {"gpu": "NVIDIA H200", "gpu_uuid": f"GPU-{gpu}"}, **extra}


def test_by_gpu_merges_the_workers_records() -> None:
    records = [
        _rec("s/native/a", "0", "gw0", 10.0),
        _rec("s/native/b", "1", "gw1", 5.0),
        _rec("s/native/c", "0", "gw0", 20.5, "oom"),
        _rec("s/native/d", "10", "gw10", 1.0),
        _rec("s/native/e", "1", "gw1", 5.0, same_as="s/native/b"),  # a copy: no child of its own
        _rec("s/native/b", "1", "gw1", 6.0),  # b again (a resumed run): the latest record counts
        _rec("s/native/f", "GPU-x", "gw2", 2.0),
        _rec("s/native/g", "1", "gw0", 3.0),  # the set-level test of another worker ran a missing cell
    ]
    merged = by_gpu(as_records(records))
    assert list(merged) == ["0", "1", "10", "GPU-x"]
    assert merged["0"] == GpuShare("0", gpu="NVIDIA H200", gpu_uuid="GPU-0", workers=["gw0"], cells=2, copies=0,
                                   wall_s=30.5, statuses={"ok": 1, "oom": 1})
    assert (merged["1"].cells, merged["1"].copies, merged["1"].wall_s) == (2, 1, 9.0)
    assert merged["1"].workers == ["gw0", "gw1"] and merged["10"].workers == ["gw10"]
    assert by_gpu(as_records([_rec("s/native/a", None, None, 1.0)]))[None].cells == 1  # CPU: one None group
    text = render(as_records(records), title="t")
    assert "## GPUs" in text and "NVIDIA H200" in text and "GPU-x" in text
    assert "## GPUs" not in render(as_records([_rec("s/native/a", "0", None, 1.0)]), title="t")  # one GPU


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_two_workers_end_to_end_on_the_cpu_profile(tmp_path: Path, checkpoint_cache: Path) -> None:
    results = tmp_path / "results"
    proc = _pytest(
        ["-n", "2", "--bench-profile", "cpu", "--bench-scenario", "qwen-image-edit-tiny-legacy",
         "--bench-results", str(results), "-rA"],
        _clean_env(OFFLOAD_BENCH_CACHE=str(checkpoint_cache)),
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "2 workers [3 items]" in out and "2 passed, 1 xfailed" in out  # the legacy check: a strict xfail
    runs = list((results / "runs").iterdir())
    assert len(runs) == 1, runs  # both workers appended to one run
    records = read_cell_records(runs[0] / "records.jsonl", strict=True).records
    cells = [c.cell_id for c in expand(load_scenario(LEGACY))]
    assert sorted(r.cell_id for r in records) == sorted(cells)  # one record per cell: none ran twice
    for r in records:
        assert folder.complete_record(r) and r.run_id == runs[0].name
        assert re.fullmatch(r"gw[01]", r.xdist_worker or "") and r.gpu_index is None
    assert by_gpu(records)[None].cells == 1 and by_gpu(records)[None].copies == 1


def test_cells_running_at_once_write_one_checkpoint_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers' children that need the same synthetic checkpoint at once: one writes it, the others wait and read
    it (found on the CPU profile with -n 4: two writers renaming one model.partial)."""
    import threading

    from harness.cell import checkpoint
    from harness.models import get_model

    monkeypatch.setenv("OFFLOAD_BENCH_CACHE", str(tmp_path))
    spec = get_model("qwen-image-tiny").components["dit"]
    writes: list[Path] = []
    real_write = checkpoint.write_synthetic

    def slow_write(*args: Any, **kwargs: Any) -> str:
        writes.append(args[1])
        threading.Event().wait(0.3)  # long enough for every other thread to reach the lock
        return real_write(*args, **kwargs)  # the content digest the marker keeps

    monkeypatch.setattr(checkpoint, "write_synthetic", slow_write)
    paths: list[Path] = []
    messages: list[str] = []
    threads = [threading.Thread(target=lambda: paths.append(checkpoint.ensure_checkpoint(
        spec, seed=7, device="cpu", progress=messages.append))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(writes) == 1 and len(paths) == 4 and len(set(paths)) == 1
    assert any("being written by another process; waiting" in m for m in messages)
    assert checkpoint.CheckpointReader(paths[0]).names()
