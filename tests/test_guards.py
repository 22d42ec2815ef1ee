"""Guards before a cell starts (harness.cell.guards): host RAM, disk for checkpoints, GPU memory used by others.

Small machines are faked through the OFFLOAD_BENCH_* overrides. Most checks run the worker's `run_cell`
in-process (the guard runs before anything heavy, so a skipped cell costs no child); one goes through a real
child and the command-line runner, to show the record lands in records.jsonl and the run still exits 0.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.cell import guards
from harness.common import exitcodes
from harness.common.contract import Card, CellSpec, Placement
from harness.common.records import read_cell_records
from harness.plan.scenario import expand, load_scenario
from harness.policy import resolve
from harness.run.runner import spec_for_child
from tests.helpers import tiny_scenario_file

REPO = Path(__file__).resolve().parent.parent
ENVS = (guards.HOST_ENV, guards.DISK_ENV, guards.GPU_FREE_ENV, guards.GPU_TOTAL_ENV, guards.GPU_FOREIGN_ENV,
        guards.MARGIN_ENV, guards.SWITCH_ENV, "OFFLOAD_BENCH_FAULT")


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"  # fresh per test: nothing cached unless the test caches it
    monkeypatch.setenv("OFFLOAD_BENCH_CACHE", str(cache))
    monkeypatch.setenv("OFFLOAD_BENCH_PROFILE", "cpu")
    monkeypatch.setenv("OFFLOAD_BENCH_GIT_SHA", "test")
    for name in ENVS:
        monkeypatch.delenv(name, raising=False)
    return cache


def scenario_file(folder: Path, name: str, axes: dict[str, list]) -> Path:
    return tiny_scenario_file(folder, name, axes)


def cell_spec(tmp_path: Path, device: str = "cpu", **axes: bool) -> CellSpec:
    axes = axes or {"dit_cpu_offload": True}
    [cell] = expand(load_scenario(scenario_file(tmp_path, "guarded", {k: [v] for k, v in axes.items()})))
    return dataclasses.replace(spec_for_child(cell, device), latents_out=str(tmp_path / "latents.pt"))


def placements(spec: CellSpec) -> dict[str, Placement]:
    flags = resolve(spec.requested, spec.policy).effective
    return {role: Placement.for_role(role, flags) for role in ("text_encoder", "dit", "vae")}


def tiny_weight_bytes() -> dict[str, int]:
    from harness.models import get_model

    return {role: guards.weight_bytes(c) for role, c in get_model("qwen-image-edit-tiny").components.items()}


def run_worker_in_process(spec: CellSpec) -> dict[str, Any]:
    from harness.cell.worker import run_cell

    return run_cell(spec).to_dict()


# ------------------------------------------------------------------------------------------------- host RAM


def test_tiny_host_ram_skips_the_cell_with_the_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(guards.HOST_ENV, "1000")
    rec = run_worker_in_process(cell_spec(tmp_path))
    assert rec["status"] == "skipped" and rec["failed_phase"] is None
    host = rec["guard"]["host"]
    total = sum(tiny_weight_bytes().values())
    # CPU profile: the simulated device is host memory, so every component counts, and the offloaded DiT twice.
    assert host["weight_bytes_on_host"] == total + tiny_weight_bytes()["dit"]
    assert host["needed_bytes"] == round(host["weight_bytes_on_host"] * 1.1)
    assert host["available_bytes"] == 1000 and host["source"] == guards.HOST_ENV and not host["ok"]
    assert rec["guard"]["failed"] == ["host"]
    assert rec["reason"].startswith("guard: host RAM: needs ")
    assert f"{host['needed_bytes']:,} bytes" in rec["reason"] and "but 1,000 bytes available" in rec["reason"]
    assert "phases" in rec and rec["phases"] == {}  # nothing ran
    assert not (tmp_path / "cache" / "checkpoints").exists()  # nor was any checkpoint written


def test_enough_host_ram_passes_and_margin_is_ten_percent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = cell_spec(tmp_path)
    need = guards.check_cell(spec, placements(spec)).checks["host"]["needed_bytes"]
    monkeypatch.setenv(guards.HOST_ENV, str(need))
    assert not guards.check_cell(spec, placements(spec)).skip
    monkeypatch.setenv(guards.HOST_ENV, str(need - 1))
    result = guards.check_cell(spec, placements(spec))
    assert result.skip and result.failed == ["host"]


def test_host_bytes_follow_the_placements_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(guards.GPU_FREE_ENV, str(80 * 2**30))
    monkeypatch.setenv(guards.GPU_TOTAL_ENV, str(80 * 2**30))
    w = tiny_weight_bytes()
    cases = [
        ({"dit_cpu_offload": False, "dit_layerwise_offload": False}, 0),
        ({"dit_cpu_offload": True, "dit_layerwise_offload": False}, w["dit"]),
        ({"dit_cpu_offload": True, "dit_layerwise_offload": True}, w["dit"]),
        ({"dit_cpu_offload": False, "dit_layerwise_offload": True}, w["dit"]),  # layerwise-from-device: packed to host
        ({"text_encoder_cpu_offload": True, "vae_cpu_offload": True}, w["text_encoder"] + w["vae"]),
    ]
    for axes, expected in cases:
        spec = cell_spec(tmp_path, "cuda", **axes)
        host = guards.check_cell(spec, placements(spec)).checks["host"]
        assert host["weight_bytes_on_host"] == expected, (axes, host["components"])
        assert not host["device_is_host"]


def test_cgroup_headroom_is_the_tightest_limit(tmp_path: Path) -> None:
    dirs = []
    for name, limit, current in (("leaf", "max", "5"), ("mid", "1000", "400"), ("top", "5000", "100")):
        d = tmp_path / name
        d.mkdir()
        (d / "memory.max").write_text(limit + "\n")
        (d / "memory.current").write_text(current + "\n")
        dirs.append(d)
    assert guards.cgroup_available_bytes(dirs) == (600, str(tmp_path / "mid"))
    assert guards.cgroup_available_bytes([tmp_path / "missing"]) == (None, None)
    # clean page cache counts in memory.current but the kernel reclaims it first (dirty and shmem pages it cannot)
    (tmp_path / "mid" / "memory.stat").write_text("anon 100\nfile 350\nshmem 20\nfile_dirty 20\nfile_writeback 10\n")
    assert guards.cgroup_available_bytes(dirs) == (900, str(tmp_path / "mid"))
    (tmp_path / "mid" / "memory.stat").write_text("garbage\n")
    assert guards.cgroup_available_bytes(dirs) == (600, str(tmp_path / "mid"))
    info = guards.host_available()
    assert info["available_bytes"] == min(v for v in (info["meminfo_available_bytes"],
                                                      info["cgroup_available_bytes"]) if v is not None)


# ------------------------------------------------------------------------------------------------------ disk


def test_tiny_disk_skips_a_cell_whose_checkpoints_are_not_cached(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(guards.DISK_ENV, "4096")
    rec = run_worker_in_process(cell_spec(tmp_path))
    assert rec["status"] == "skipped"
    disk = rec["guard"]["disk"]
    w = tiny_weight_bytes()
    assert disk["checkpoint_bytes_missing"] == w and disk["cached"] == []
    assert disk["needed_bytes"] == round(sum(w.values()) * 1.1) and disk["free_bytes"] == 4096
    assert rec["guard"]["failed"] == ["disk"] and rec["guard"]["host"]["ok"]
    assert rec["reason"].startswith("guard: disk: ")
    assert f"{disk['needed_bytes']:,} bytes" in rec["reason"] and "but 4,096 bytes (4.0 KiB) free" in rec["reason"]
    assert "text_encoder, dit, vae" in rec["reason"]


def test_cached_checkpoints_need_no_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Also keeps guards.checkpoint_folder in step with ensure_checkpoint's cache layout."""
    from harness.cell.checkpoint import ensure_checkpoint
    from harness.models import get_model

    model = get_model("qwen-image-edit-tiny")
    paths = {role: ensure_checkpoint(c, seed=0) for role, c in model.components.items()}
    for role, c in model.components.items():
        assert paths[role].parent == guards.checkpoint_folder(c, guards.checkpoint_device())
        assert guards.weight_bytes(c) <= paths[role].stat().st_size < guards.weight_bytes(c) + 2**20
    monkeypatch.setenv(guards.DISK_ENV, "0")
    spec = cell_spec(tmp_path)
    result = guards.check_cell(spec, placements(spec))
    assert not result.skip, result.reason
    assert result.checks["disk"]["cached"] == ["text_encoder", "dit", "vae"]
    assert result.checks["disk"]["needed_bytes"] == 0
    (paths["dit"].parent / "complete.json").unlink()  # an interrupted generation: not cached
    result = guards.check_cell(spec, placements(spec))
    assert result.skip and result.checks["disk"]["checkpoint_bytes_missing"] == {"dit": guards.weight_bytes(
        model.components["dit"])}


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.parametrize(
    ("cap", "free", "total", "skip"),
    [
        (32 * 2**30, 31 * 2**30, 80 * 2**30, True),  # a capped card needs its whole cap free
        (32 * 2**30, 32 * 2**30, 80 * 2**30, False),
        (None, 75 * 2**30, 80 * 2**30, True),  # uncapped: others hold 6.25 % > 5 %
        (None, 77 * 2**30, 80 * 2**30, False),
    ],
)
def test_gpu_used_by_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cap, free, total, skip) -> None:
    monkeypatch.setenv(guards.GPU_FREE_ENV, str(free))
    monkeypatch.setenv(guards.GPU_TOTAL_ENV, str(total))
    spec = cell_spec(tmp_path, "cuda")
    spec = dataclasses.replace(spec, card=Card("fake", cap))
    result = guards.check_cell(spec, placements(spec))
    assert result.skip is skip
    gpu = result.checks["gpu"]
    assert (gpu["free_bytes"], gpu["total_bytes"], gpu["cap_bytes"]) == (free, total, cap)
    if skip:
        assert result.failed == ["gpu"] and f"{free:,} bytes" in result.reason and f"{total:,} bytes" in result.reason


def test_cpu_cells_have_no_gpu_guard(tmp_path: Path) -> None:
    spec = cell_spec(tmp_path)
    assert "gpu" not in guards.check_cell(spec, placements(spec)).checks


# ------------------------------------------------------------------------------------------------- misc


def test_a_malformed_override_is_an_error_not_a_silent_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(guards.HOST_ENV, "lots")
    rec = run_worker_in_process(cell_spec(tmp_path))
    assert rec["status"] == "error" and "OFFLOAD_BENCH_HOST_AVAILABLE_BYTES='lots' is not a number" in rec["reason"]


def test_guards_can_be_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(guards.HOST_ENV, "1")
    monkeypatch.setenv(guards.SWITCH_ENV, "0")
    spec = cell_spec(tmp_path)
    result = guards.check_cell(spec, placements(spec))
    assert not result.skip and result.problems


def test_a_skipped_cell_is_recorded_and_the_run_exits_5(tmp_path: Path, _env: Path) -> None:
    """End to end: a real child skips itself, the runner appends the record, skipped is not a failure; a run whose
    every cell was skipped measured nothing and exits ALL_SKIPPED (5), as compare and baseline do."""
    path = scenario_file(tmp_path, "guard-e2e", {"dit_cpu_offload": [True]})
    env = {**os.environ, guards.HOST_ENV: "2048", guards.DISK_ENV: "1024"}
    proc = subprocess.run(
        [sys.executable, "-m", "harness.run.runner", str(path), "--results", str(tmp_path / "results"),
         "--run-id", "g", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == exitcodes.ALL_SKIPPED, proc.stdout + proc.stderr
    assert "every cell was skipped, nothing measured" in proc.stderr
    [rec] = read_cell_records(tmp_path / "results" / "runs" / "g" / "records.jsonl", strict=True).records
    reason = rec.reason or ""
    assert rec.status == "skipped" and rec.returncode == 0 and rec.spec_hash
    assert (rec.guard or {})["failed"] == ["host", "disk"]
    assert "host RAM: needs" in reason and "but 2,048 bytes (2.0 KiB) available" in reason
    assert "disk: " in reason and "but 1,024 bytes (1.0 KiB) free" in reason
    assert f"{rec.cell_id}: skipped: guard: host RAM" in proc.stdout
    assert "done: skipped 1" in proc.stdout
