"""Capacity search (harness.run.capacity): the bisection, the probe cells, the scenario table, and a CPU run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.common.contract import CellRecord, Status
from harness.plan.advise import DEFAULT_MARGIN
from harness.plan.scenario import ScenarioError, expand, load_scenario
from harness.run.capacity import (
    Probe,
    planned_capacity,
    probe_cell,
    probe_scenario,
    render,
    run_capacity,
    search,
)

REPO = Path(__file__).resolve().parent.parent
WAN_CAPACITY = REPO / "scenarios" / "gpu" / "wan21_14b_capacity_5090.toml"


def _oracle(boundary: float, calls: list[int], fate: str = "oom") -> Any:
    def probe(value: int) -> Probe:
        calls.append(value)
        return Probe(value, "ok" if value <= boundary else fate, f"cell@{value}")

    return probe


@pytest.mark.parametrize("boundary", [-1, 0, 1, 37, 64, 98, 99, 1000])
@pytest.mark.parametrize("start", [None, 0, 40, 99])
def test_search_finds_the_boundary_from_any_start(boundary: int, start: int | None) -> None:
    values = list(range(100))
    calls: list[int] = []
    found = search(values, _oracle(boundary, calls), start)
    want_ok = None if boundary < 0 else min(boundary, 99)
    assert found.largest_ok == want_ok
    assert found.smallest_oom == (None if boundary >= 99 else boundary + 1)
    assert len(calls) == len(set(calls)) <= 2 * math.ceil(math.log2(len(values))) + 2
    assert found.undecided is None


def test_a_right_plan_costs_two_probes() -> None:
    calls: list[int] = []
    found = search(list(range(1, 322, 4)), _oracle(85, calls), start=85)
    assert found.largest_ok == 85 and found.smallest_oom == 89 and calls == [85, 89]


def test_a_probe_that_neither_runs_nor_ooms_stops_the_search() -> None:
    calls: list[int] = []
    found = search(list(range(10)), _oracle(4, calls, fate="crash"), start=3)
    assert calls == [3, 4, 6]  # up by 1, then by 2: the probe at 6 crashed
    assert found.undecided == "cell@6 ended crash" and found.largest_ok == 4 and found.smallest_oom is None


def test_capacity_table_parses_and_checks(tmp_path: Path) -> None:
    scenario = load_scenario(WAN_CAPACITY)
    assert scenario.capacity is not None and scenario.capacity.axis == "frames"
    assert scenario.capacity.values()[:3] == [5, 9, 13] and scenario.capacity.values()[-1] == 321
    src = WAN_CAPACITY.read_text()
    for bad, field in (('axis = "steps"', "capacity.axis"), ("step = 3", "capacity.step"),
                       ("min = 4", "capacity.min"), ("max = 1", "capacity.max")):
        key = bad.split(" =")[0]
        lines = [ln for ln in src.splitlines() if not ln.startswith(f"{key} ")]
        text = "\n".join(lines).replace("[capacity]", f"[capacity]\n{bad}")
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
            load_scenario(tmp_path / "bad.toml")
    image = (REPO / "scenarios" / "gpu" / "flux_dev_4090.toml").read_text()
    (tmp_path / "img.toml").write_text(image + '\n[capacity]\naxis = "frames"\nmax = 81\n')
    with pytest.raises(ScenarioError, match="needs a video model"):
        load_scenario(tmp_path / "img.toml")


def test_probes_are_cells_of_their_own() -> None:
    scenario = load_scenario(WAN_CAPACITY)
    cell = expand(scenario)[0]
    a, b = probe_cell(cell, 49), probe_cell(cell, 85)
    assert a.scenario.frames == 49 and b.scenario.frames == 85
    assert a.cell_id == "wan21-14b-capacity-5090@frames-49/rtx5090-32g/cpu1-lw0-te1-vae0-pf1-pin1"
    assert a.cell_id != b.cell_id and a.spec_hash("cuda") != b.spec_hash("cuda")
    assert a.spec("cuda").settings.frames == 49


def test_resolution_probes_keep_the_aspect_on_the_pixel_grid(tmp_path: Path) -> None:
    src = (REPO / "scenarios" / "gpu" / "flux_dev_4090.toml").read_text()
    path = tmp_path / "flux_capacity.toml"
    path.write_text(src.replace("width = 1024", "width = 1536") + '\n[capacity]\naxis = "resolution"\nmin = 512\n'
                    "max = 2048\nstep = 64\n")
    scenario = load_scenario(path)
    s = probe_scenario(scenario, 768)
    assert (s.height, s.width) == (768, 1152) and s.name.endswith("@resolution-768")


def test_the_plan_gives_layerwise_more_frames_than_whole_dit_offload() -> None:
    scenario = load_scenario(WAN_CAPACITY)
    planned = {c.resolution.effective.dit_layerwise_offload: planned_capacity(c, scenario.capacity.values())
               for c in expand(scenario)}
    assert planned[False] is not None and planned[True] is not None and planned[True] > planned[False] >= 49


def test_run_capacity_searches_each_combination_from_its_plan() -> None:
    scenario = load_scenario(WAN_CAPACITY)
    seen: list[str] = []

    def device(cell: Any) -> CellRecord:  # fits 85 frames with the DiT whole, 201 layerwise
        seen.append(cell.cell_id)
        limit = 85 if not cell.resolution.effective.dit_layerwise_offload else 201
        return CellRecord(cell.cell_id, Status.OK if cell.scenario.frames <= limit else Status.OOM)

    rows = run_capacity(scenario, device)
    by_lw = {r.flags: r for r in rows}
    whole, layerwise = by_lw["cpu1-lw0-te1-vae0-pf0-pin1"], by_lw["cpu1-lw1-te1-vae0-pf1-pin1"]
    assert (whole.largest_ok, whole.smallest_oom, whole.planned) == (85, 89, 85)
    assert len(whole.probes) == 2
    assert (layerwise.largest_ok, layerwise.smallest_oom) == (201, 205)
    assert all("@frames-" in cid for cid in seen)
    text = render(rows, "capacity")
    assert "planned max frames" in text and "85:ok, 89:oom" in text


def test_capacity_command_refuses_a_scenario_without_the_table() -> None:
    out = subprocess.run([sys.executable, "-m", "harness", "capacity", "scenarios/gpu/wan21_14b_h100.toml"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "no [capacity] table" in out.stderr


@pytest.mark.slow
def test_capacity_runs_probe_cells_end_to_end_on_cpu(tmp_path: Path) -> None:
    """The tiny FLUX twin, both DiT flags on, on the CPU profile: the plan says every size fits, so the search
    probes the largest first, as an isolated child with its record (and plan); the CPU ledger counts weights
    only, so it completes."""
    path = tmp_path / "flux_tiny_capacity.toml"
    path.write_text(
        'name = "flux-tiny-capacity"\nmodel = "flux-tiny"\nprofile = "cpu"\ncards = ["native"]\nheight = 64\n'
        "width = 64\nsteps = 1\ntrue_cfg_scale = 1.0\ntimeout_s = 300\n"
        "[flags]\ndit_cpu_offload = true\ndit_layerwise_offload = true\ndit_offload_prefetch_size = 1\n"
        '[capacity]\naxis = "resolution"\nmin = 64\nmax = 96\nstep = 16\n'
    )
    out = subprocess.run([sys.executable, "-m", "harness", "capacity", str(path), "--results", str(tmp_path),
                          "--run-id", "cap"], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OFFLOAD_BENCH_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "runs" / "cap" / "capacity.json").read_text())
    assert [(r["planned"], r["largest_ok"], r["smallest_oom"]) for r in rows] == [(96, 96, None)]
    records = [json.loads(line) for line in (tmp_path / "runs" / "cap" / "records.jsonl").read_text().splitlines()]
    assert [r["cell_id"] for r in records] == ["flux-tiny-capacity@resolution-96/native/cpu1-lw1-te0-vae0-pf1-pin1"]
    assert records[0]["status"] == "ok" and records[0]["settings"]["height"] == 96 and records[0]["plan"]["fits"]


def test_the_margin_column_names_a_hairline_fit() -> None:
    """FLUX.1-dev with the DiT CPU-offloaded whole fills 22.2 of the 4090 cap's 22.97 allocator GiB: the plan's
    largest square fits only without advise's margin (the H200 search completed 1024 and OOMed at 1088, session 6),
    while with layerwise the margin costs one grid step. The margin never raises the planned value."""
    scenario = load_scenario(REPO / "scenarios" / "gpu" / "flux_dev_capacity_4090.toml")
    values = scenario.capacity.values()
    by_lw = {c.resolution.effective.dit_layerwise_offload: c for c in expand(scenario)}
    assert planned_capacity(by_lw[False], values) is not None
    assert planned_capacity(by_lw[False], values, DEFAULT_MARGIN) is None
    plain, safe = planned_capacity(by_lw[True], values), planned_capacity(by_lw[True], values, DEFAULT_MARGIN)
    assert plain is not None and safe is not None and safe < plain
    for c in expand(load_scenario(WAN_CAPACITY)):
        wan_values = load_scenario(WAN_CAPACITY).capacity.values()
        assert (planned_capacity(c, wan_values, DEFAULT_MARGIN) or 0) <= (planned_capacity(c, wan_values) or 0)


def test_a_search_that_ran_is_tabled_again_from_its_records() -> None:
    """`--from-records` runs no probe: the committed H200 search (session 6) read back, with today's plans."""
    records = REPO / "results" / "h200" / "flux-dev-capacity-4090.records.jsonl"
    out = subprocess.run([sys.executable, "-m", "harness", "capacity", "scenarios/gpu/flux_dev_capacity_4090.toml",
                          "--from-records", str(records)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")] for line in out.stdout.splitlines()
            if line.startswith("| rtx4090-24g")}
    whole, layerwise = rows["cpu1-lw0-te1-vae0-pf0-pin1"], rows["cpu1-lw1-te1-vae0-pf1-pin1"]
    assert whole[5:7] == ["1024", "1088"] and whole[4] == "none"
    assert layerwise[5:7] == ["3520", "3584"]
    missing = subprocess.run([sys.executable, "-m", "harness", "capacity", "scenarios/gpu/flux_dev_capacity_4090.toml",
                              "--from-records", "nope.jsonl"], cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and "no such records file" in missing.stderr


FLUX_CAPACITY = ('name = "flux-tiny-capacity"\nmodel = "flux-tiny"\nprofile = "cpu"\ncards = ["native"]\nheight = 64\n'
                 "width = 64\nsteps = 1\ntrue_cfg_scale = 1.0\ntimeout_s = 300\n"
                 "[flags]\ndit_cpu_offload = true\ndit_layerwise_offload = true\ndit_offload_prefetch_size = 1\n"
                 '[capacity]\naxis = "resolution"\nmin = 64\nmax = 96\nstep = 16\n')


def test_capacity_model_that_is_none_is_one_line_before_any_run_folder(tmp_path: Path) -> None:
    path = tmp_path / "flux_tiny_capacity.toml"
    path.write_text(FLUX_CAPACITY)
    out = subprocess.run([sys.executable, "-m", "harness", "capacity", str(path), "--model", str(tmp_path / "none"),
                          "--results", str(tmp_path / "results")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.startswith("error: --model: unknown model") and "\n" not in \
        out.stderr.strip()
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_capacity_searches_a_pipeline_folder_with_model(tmp_path: Path) -> None:
    """`capacity SCENARIO --model FOLDER` (issue 29): the same search on a diffusers folder written by
    save_pretrained; the run folder keeps the scenario with the folder as its model, and the probe ran on it."""
    from tests.pipeline_folders import write_pipeline_folder

    folder = write_pipeline_folder(tmp_path / "my-flux", "flux-tiny")
    path = tmp_path / "flux_tiny_capacity.toml"
    path.write_text(FLUX_CAPACITY)
    out = subprocess.run([sys.executable, "-m", "harness", "capacity", str(path), "--model", str(folder),
                          "--results", str(tmp_path), "--run-id", "cap"], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "OFFLOAD_BENCH_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "cap"
    kept = load_scenario(run / "scenario-flux_tiny_capacity.toml")
    assert kept.model == str(folder.resolve()) and kept.capacity is not None
    rows = json.loads((run / "capacity.json").read_text())
    assert [(r["planned"], r["largest_ok"]) for r in rows] == [(96, 96)]
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] and records[0]["model"] == str(folder.resolve())
    # the folder's own weights, not the zoo twin's generated checkpoint
    assert records[0]["components"]["dit"]["checkpoint"] == {"verified": None, "why": "pipeline folder: no digest"}
