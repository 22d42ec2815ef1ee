"""The backend axis: our layerwise runtime and diffusers' group offload as peers in one scenario.

Scenario validation of `backends`, cell ids (unchanged for the harness backend, suffixed otherwise), dedupe per
backend, the CPU profile's skip of diffusers' streamed offload, the `close_output_rtol` expectation, and what the
roofline, guards and other expectations make of other backends' records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.analyze.expect import (
    beats_peer_verdict,
    close_output_verdict,
    evaluate,
    lowest_peak_verdict,
    peer_step_ratio_verdict,
    same_output_verdict,
)
from harness.analyze.roofline import STEP_CONVENTION, roofline_rows
from harness.common.records import migrate
from harness.plan.scenario import BACKENDS, HARNESS_BACKEND, PeerStepRatio, ScenarioError, expand, load_scenario
from harness.run.cell import spec_for_child
from tests.helpers import DELETE, as_records, base_scenario, make_record, mutate, to_toml

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "scenarios" / "cpu" / "qwen_image_edit_tiny.toml"
PEER = REPO / "scenarios" / "gpu" / "qwen_image_peer.toml"
NEEDS_CUDA = "diffusers group offload with streams needs CUDA"


def write(tmp_path: Path, data: dict[str, Any], name: str = "scenario.toml") -> Path:
    path = tmp_path / name
    path.write_text(to_toml(data), encoding="utf-8")
    return path


def peer_scenario(**changes: Any) -> dict[str, Any]:
    """The unit scenario with all three backends and no expectations that single out one cell."""
    data = base_scenario()
    data["backends"] = list(BACKENDS)
    data["expect"] = {"close_output_rtol": 0.02}
    data.update(changes)
    return data


# ------------------------------------------------------------------------------------------------ validation


def test_backends_default_to_the_harness_alone(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, base_scenario()))
    assert s.backends == (HARNESS_BACKEND,)
    assert {c.backend for c in expand(s)} == {HARNESS_BACKEND}


def test_backends_load_in_file_order(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, peer_scenario(backends=["diffusers-group-rs", "harness"])))
    assert s.backends == ("diffusers-group-rs", "harness")


BAD_BACKENDS: list[tuple[str, Any, str]] = [
    ("not-a-list", "harness", "backends"),
    ("empty", [], "backends"),
    ("unknown", ["harness", "diffusers-leaf"], "backends[1]"),
    ("not-a-string", [1], "backends[0]"),
    ("repeats", ["harness", "harness"], "backends"),
    ("table", {"harness": True}, "backends"),
]


@pytest.mark.parametrize(("value", "field"), [b[1:] for b in BAD_BACKENDS], ids=[b[0] for b in BAD_BACKENDS])
def test_backends_raise_naming_file_and_field_if_malformed(tmp_path: Path, value: Any, field: str) -> None:
    file = write(tmp_path, mutate(base_scenario(), ("backends",), value))
    with pytest.raises(ScenarioError) as info:
        load_scenario(file)
    assert str(info.value).startswith(f"{file}: {field}: "), str(info.value)


BAD_RTOL: list[tuple[str, Any]] = [("bool", True), ("zero", 0), ("negative", -0.1), ("string", "0.02"),
                                   ("inf", float("inf")), ("nan", float("nan"))]


@pytest.mark.parametrize("value", [b[1] for b in BAD_RTOL], ids=[b[0] for b in BAD_RTOL])
def test_close_output_rtol_raises_naming_file_and_field_if_not_a_positive_number(tmp_path: Path, value: Any) -> None:
    file = write(tmp_path, mutate(peer_scenario(), ("expect", "close_output_rtol"), value))
    with pytest.raises(ScenarioError) as info:
        load_scenario(file)
    assert str(info.value).startswith(f"{file}: expect.close_output_rtol: "), str(info.value)


@pytest.mark.parametrize("backends", [DELETE, ["harness"], ["diffusers-group", "diffusers-group-rs"]],
                         ids=["default", "harness-only", "no-harness"])
@pytest.mark.parametrize("check", ["close_output_rtol", "beats_peer"])
def test_peer_checks_raise_if_there_is_nothing_to_compare(tmp_path: Path, backends: Any, check: str) -> None:
    data = peer_scenario(expect={check: 0.02 if check == "close_output_rtol" else True})
    file = write(tmp_path, mutate(data, ("backends",), backends))
    with pytest.raises(ScenarioError, match=rf"expect\.{check}: .*backends") as info:
        load_scenario(file)
    assert str(info.value).startswith(f"{file}: ")


@pytest.mark.parametrize("value", ["yes", 1, [True]])
def test_beats_peer_raises_naming_file_and_field_if_not_a_bool(tmp_path: Path, value: Any) -> None:
    file = write(tmp_path, peer_scenario(expect={"beats_peer": value}))
    with pytest.raises(ScenarioError, match=r"expect\.beats_peer: expected true or false"):
        load_scenario(file)


def test_close_output_rtol_loads_as_a_float(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, mutate(peer_scenario(), ("expect", "close_output_rtol"), 1)))
    assert s.expect.close_output_rtol == 1.0 and isinstance(s.expect.close_output_rtol, float)
    assert load_scenario(write(tmp_path, base_scenario(), "plain.toml")).expect.close_output_rtol is None


# ------------------------------------------------------------------------------------------------ cells


def test_harness_cells_keep_their_ids_and_spec_hashes(tmp_path: Path) -> None:
    before = expand(load_scenario(write(tmp_path, base_scenario())))
    after = [c for c in expand(load_scenario(write(tmp_path, peer_scenario())))  # the same file, rewritten
             if c.backend == HARNESS_BACKEND]
    assert [c.cell_id for c in after] == [c.cell_id for c in before]
    assert [c.same_as for c in after] == [c.same_as for c in before]
    for old, new in zip(before, after, strict=True):
        spec = new.spec("cpu").as_dict()
        assert spec["backend"] == HARNESS_BACKEND
        # the hash is what specs hashed to before backends existed: runs begun then resume their cells
        del spec["backend"]
        legacy = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        assert new.spec_hash("cpu") == old.spec_hash("cpu") == legacy


def test_other_backends_get_a_suffix_and_carry_the_backend_in_the_spec(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, peer_scenario()))
    cells = expand(s)
    assert len(cells) == len(s.cards) * len(BACKENDS) * 3  # 2 x 2 axes, one combination excluded
    harness = {(c.card.name, c.requested): c for c in cells if c.backend == HARNESS_BACKEND}
    for c in cells:
        if c.backend == HARNESS_BACKEND:
            assert "+" not in c.cell_id
            continue
        twin = harness[(c.card.name, c.requested)]
        assert c.cell_id == f"{twin.cell_id}+{c.backend}"
        assert c.cell_id == f"unit/{c.card.name}/{c.requested.label()}+{c.backend}"
        assert c.spec("cpu").backend == c.backend
        assert c.spec_hash("cpu") != twin.spec_hash("cpu")
    assert len({c.cell_id for c in cells}) == len(cells)


def test_cells_expand_cards_then_backends_then_axes(tmp_path: Path) -> None:
    cells = expand(load_scenario(write(tmp_path, peer_scenario())))
    order = [(c.card.name, c.backend) for c in cells]
    expected = [(card, b) for card in ("tiny-6m", "native") for b in BACKENDS for _ in range(3)]
    assert order == expected


def test_cells_without_layerwise_run_once_for_every_backend_of_a_card(tmp_path: Path) -> None:
    # without layerwise, the prefetch size resolves to 0: pf0 and pf1 are the same effective cell, and every
    # backend runs it with the same code (backends differ only in who streams a layerwise DiT)
    data = peer_scenario(
        axes={"dit_layerwise_offload": [False], "dit_offload_prefetch_size": [0, 1]},
        flags={"pin_cpu_memory": True}, exclude=[],
    )
    cells = expand(load_scenario(write(tmp_path, data)))
    assert len(cells) == 2 * len(BACKENDS) * 2
    for card in ("tiny-6m", "native"):
        mine = [c for c in cells if c.card.name == card]
        ran = [c for c in mine if c.same_as is None]
        assert [(c.backend, c.requested.dit_offload_prefetch_size) for c in ran] == [(BACKENDS[0], 0)]
        assert all(c.same_as == ran[0].cell_id for c in mine if c is not ran[0])  # never another card's


def test_layerwise_cells_of_different_backends_never_stand_in_for_each_other(tmp_path: Path) -> None:
    # with layerwise on, prefetch 2.5 is truncated to 2: the same effective cell within a backend, never across
    data = peer_scenario(
        axes={"dit_layerwise_offload": [True], "dit_offload_prefetch_size": [2, 2.5]},
        flags={"pin_cpu_memory": True, "dit_cpu_offload": True}, exclude=[],
    )
    cells = expand(load_scenario(write(tmp_path, data)))
    for card in ("tiny-6m", "native"):
        for backend in BACKENDS:
            first, second = [c for c in cells if c.card.name == card and c.backend == backend]
            assert first.same_as is None
            assert second.same_as == first.cell_id


def test_committed_peer_scenario_runs_every_backend_with_and_without_layerwise() -> None:
    s = load_scenario(PEER)
    diffusers_peers = (HARNESS_BACKEND, "diffusers-group", "diffusers-group-rs")  # sglang: qwen_image_peer_sglang
    assert s.model == "qwen-image" and s.backends == diffusers_peers
    assert s.expect.close_output_rtol == 0.02 and not s.expect.same_output
    cells = expand(s)
    assert {(c.backend, c.requested.dit_layerwise_offload) for c in cells} == {
        (b, lw) for b in diffusers_peers for lw in (False, True)
    }
    # the whole-DiT cell runs once (the roofline's compute reference); each backend streams the DiT once
    ran = [(c.backend, c.requested.dit_layerwise_offload) for c in cells if c.same_as is None]
    assert ran == [("harness", False), ("harness", True), ("diffusers-group", True), ("diffusers-group-rs", True)]


# ------------------------------------------------------------------------------------------------ loader, guards


def test_placement_changes_only_the_layerwise_dit_under_a_diffusers_backend() -> None:
    from harness.common.contract import Placement
    from harness.common.flags import OffloadFlags

    placement_for = Placement.for_role
    DIFFUSERS_GROUP = Placement.DIFFUSERS_GROUP

    for cpu in (False, True):
        for lw in (False, True):
            flags = OffloadFlags(dit_cpu_offload=cpu, dit_layerwise_offload=lw, text_encoder_cpu_offload=True)
            for backend in ("diffusers-group", "diffusers-group-rs"):
                want = DIFFUSERS_GROUP if lw else placement_for("dit", flags)
                assert placement_for("dit", flags, backend) == want
                for role in ("text_encoder", "vae"):
                    assert placement_for(role, flags, backend) == placement_for(role, flags)
    with pytest.raises(ValueError, match="unknown backend"):
        placement_for("dit", OffloadFlags(), "accelerate")


def test_load_component_refuses_diffusers_group_without_cuda(tmp_path: Path) -> None:
    from harness.cell.offload.loader import load_component
    from harness.cell.offload.memory import Device
    from harness.common.contract import Placement
    from harness.models import get_model

    spec = get_model("qwen-image-edit-tiny").components["dit"]
    with pytest.raises(RuntimeError, match=NEEDS_CUDA):
        load_component(spec, tmp_path / "unused.safetensors", Placement.DIFFUSERS_GROUP, Device("cpu"), pin=True,
                       backend="diffusers-group")


def test_pinned_allocator_bytes_round_up_to_a_power_of_two() -> None:
    from harness.cell.offload.memory import torch_pinned_block_bytes as pinned_allocator_bytes

    assert [pinned_allocator_bytes(n) for n in (0, 1, 2, 3, 4, 5, 1023, 1024, 1025)] == [0, 1, 2, 4, 4, 8, 1024,
                                                                                          1024, 2048]
    assert pinned_allocator_bytes(round(0.63 * 2**30)) == 2**30


def test_host_guard_counts_diffusers_pinned_copies_on_top_of_the_host_weights() -> None:
    from harness.cell.guards import _host_check, weight_bytes
    from harness.cell.guards import pinned_torch_allocator_bytes as pinned_copy_bytes
    from harness.common.contract import Placement
    from harness.models import get_model

    model = get_model("qwen-image-edit-tiny")
    resident = {"text_encoder": Placement.RESIDENT, "vae": Placement.RESIDENT}
    ours = _host_check("cuda", {**resident, "dit": Placement.LAYERWISE_FROM_HOST}, model, 0)
    peer = _host_check("cuda", {**resident, "dit": Placement.DIFFUSERS_GROUP}, model, 0)
    dit = model.components["dit"]
    assert ours[1]["components"]["dit"]["host_bytes"] == weight_bytes(dit)
    assert peer[1]["components"]["dit"]["host_bytes"] == weight_bytes(dit) + pinned_copy_bytes(dit)
    assert weight_bytes(dit) < pinned_copy_bytes(dit) < 2 * weight_bytes(dit)


# ------------------------------------------------------------------------------------------------ worker, runner


def _tiny_cells(backends: list[str]) -> dict[tuple[str, str, str], Any]:
    s = dataclasses.replace(load_scenario(TINY), backends=tuple(backends))
    return {(c.card.name, c.requested.label()[:8], c.backend): c for c in expand(s)}


def test_worker_skips_a_diffusers_layerwise_cell_on_the_cpu_profile() -> None:
    from harness.cell.worker import run_cell

    cells = _tiny_cells(["harness", "diffusers-group", "diffusers-group-rs"])
    for backend in ("diffusers-group", "diffusers-group-rs"):
        cell = cells[("native", "cpu1-lw1", backend)]
        rec = run_cell(replace(spec_for_child(cell, "cpu"), warmup=0, rounds=1)).to_dict()
        assert rec["status"] == "skipped", (rec["reason"], rec.get("traceback"))
        assert NEEDS_CUDA in rec["reason"] and backend in rec["reason"]
        assert rec["cell_id"].endswith(f"+{backend}")
        assert rec["backend"] == backend
        assert rec["placements"]["dit"] == "diffusers-group-offload"
        assert rec["failed_phase"] is None and rec["phases"] == {}
        assert rec["guard"] is None  # skipped before the guards: nothing on this machine could run it
        assert migrate(rec, rec["cell_id"]) == rec


def test_worker_runs_a_diffusers_cell_without_layerwise_as_the_harness_would(tmp_path: Path) -> None:
    from harness.cell.worker import run_cell

    cells = _tiny_cells(["harness", "diffusers-group"])
    recs = {}
    for backend in ("harness", "diffusers-group"):
        cell = cells[("native", "cpu1-lw0", backend)]
        out = tmp_path / f"{backend}.pt"
        spec = replace(spec_for_child(cell, "cpu"), warmup=0, rounds=1, latents_out=str(out))
        recs[backend] = run_cell(spec).to_dict()
    ours, peer = recs["harness"], recs["diffusers-group"]
    for rec in (ours, peer):
        assert rec["status"] == "ok", (rec["reason"], rec.get("traceback"))
        assert Path(rec["latents_path"]).is_file()
    assert ours["backend"] == "harness" and peer["backend"] == "diffusers-group"
    assert peer["placements"] == ours["placements"]
    assert peer["placements"]["dit"] == "cpu-offload"
    assert peer["outputs"]["latents_sha256"] == ours["outputs"]["latents_sha256"]
    verdict = close_output_verdict("native", as_records([ours, peer]), 1e-6)
    assert verdict.passed and "0" in verdict.message, verdict.message


def test_runner_records_the_backend_and_the_skip(tmp_path: Path) -> None:
    from harness.run.cell import run_cell
    from harness.run.folder import Run

    cell = _tiny_cells(["harness", "diffusers-group-rs"])[("native", "cpu1-lw1", "diffusers-group-rs")]
    run = Run.create(tmp_path, "cpu", "backends", verbose=False)
    rec = run_cell(run, cell).to_dict()
    assert rec["status"] == "skipped" and NEEDS_CUDA in rec["reason"]
    assert rec["backend"] == "diffusers-group-rs"
    assert rec["spec_hash"] == cell.spec_hash("cpu")
    assert run.finished()[cell.cell_id].status == "skipped"
    spec = json.loads((run.run_dir / "cells" / cell.cell_id.replace("/", "__") / "cell.json").read_text())
    assert spec["backend"] == "diffusers-group-rs"



def test_runner_copies_the_whole_dit_cell_to_other_backends_under_their_own_name(tmp_path: Path) -> None:
    from harness.run.cell import run_cell
    from harness.run.folder import Run

    cells = _tiny_cells(["harness", "diffusers-group"])
    ours, peer = cells[("native", "cpu1-lw0", "harness")], cells[("native", "cpu1-lw0", "diffusers-group")]
    assert peer.same_as == ours.cell_id
    run = Run.create(tmp_path, "cpu", "backends", verbose=False)
    source = run_cell(run, ours).to_dict()
    copy = run_cell(run, peer).to_dict()
    assert source["status"] == "ok", source.get("reason")
    assert copy["cell_id"] == peer.cell_id and copy["same_as"] == ours.cell_id
    assert copy["backend"] == "diffusers-group" and source["backend"] == "harness"
    assert copy["outputs"] == source["outputs"] and copy["phases"] == source["phases"]
    assert not (run.run_dir / "cells" / peer.cell_id.replace("/", "__")).joinpath("cell.json").exists()


# ------------------------------------------------------------------------------------------------ expectations


def _rec(tmp_path: Path, backend: str, latents: torch.Tensor | None, *, lw: bool = True, status: str = "ok",
         card: str = "native") -> dict[str, Any]:
    rec = make_record(True, lw, status=status, card=card,
                      failed_phase=None if status == "ok" else "denoise")
    rec["backend"] = backend
    if backend != HARNESS_BACKEND:
        rec["cell_id"] += f"+{backend}"
    if latents is not None:
        path = tmp_path / f"{rec['cell_id'].replace('/', '__')}.pt"
        torch.save(latents, path)
        rec["latents_path"] = str(path)
    return rec


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def test_close_output_passes_within_rtol_and_fails_beyond(tmp_path: Path) -> None:
    ref = _latents()
    near = (ref.float() * 1.001).to(torch.bfloat16)
    far = (ref.float() + 0.5 * _latents(1).float()).to(torch.bfloat16)
    ours = _rec(tmp_path, "harness", ref)
    good = _rec(tmp_path, "diffusers-group", near)
    bad = _rec(tmp_path, "diffusers-group-rs", far)
    v = close_output_verdict("native", as_records([ours, good]), 0.02)
    assert v.passed and v.check == "close_output" and "+diffusers-group vs cpu1-lw1" in v.message, v.message
    v = close_output_verdict("native", as_records([ours, good, bad]), 0.02)
    assert not v.passed
    assert "+diffusers-group-rs" in v.message and "> 0.02" in v.message, v.message
    # the relative distance is what is compared: 0.5 x the noise is about 0.5 of the reference's norm
    assert close_output_verdict("native", as_records([ours, bad]), 0.9).passed


def test_close_output_bound_of_a_named_backend_replaces_the_default_for_it_alone(tmp_path: Path) -> None:
    ref = _latents()
    far = (ref.float() + 0.5 * _latents(1).float()).to(torch.bfloat16)
    ours = _rec(tmp_path, "harness", ref)
    bad = _rec(tmp_path, "diffusers-group-rs", far)
    other = _rec(tmp_path, "diffusers-group", far)
    v = close_output_verdict("native", as_records([ours, bad]), 0.02, {"diffusers-group-rs": 0.9})
    assert v.passed and "(its bound 0.9)" in v.message, v.message
    v = close_output_verdict("native", as_records([ours, bad, other]), 0.02, {"diffusers-group-rs": 0.9})
    assert not v.passed and "+diffusers-group vs" in v.message and "> 0.02" in v.message, v.message


def test_close_output_rtol_table_loads_per_backend_and_refuses_unknown_names(tmp_path: Path) -> None:
    table = {"default": 0.02, "diffusers-group": 0.05}
    s = load_scenario(write(tmp_path, mutate(peer_scenario(), ("expect", "close_output_rtol"), table)))
    assert s.expect.close_output_rtol == 0.02
    assert s.expect.close_output_rtol_by_backend == (("diffusers-group", 0.05),)
    for bad, field in (({"default": 0.02, "sglang@9.9.9": 0.05}, "sglang@9.9.9"),
                       ({"default": 0.02, "harness": 0.05}, "harness"),
                       ({"diffusers-group": 0.05}, None), ({"default": 0.02, "diffusers-group": 0}, "diffusers-group")):
        file = write(tmp_path, mutate(peer_scenario(), ("expect", "close_output_rtol"), bad), "bad.toml")
        with pytest.raises(ScenarioError) as info:
            load_scenario(file)
        where = "expect.close_output_rtol" + (f".{field}" if field else "")
        assert str(info.value).startswith(f"{file}: {where}: "), str(info.value)


def test_close_output_compares_only_cells_with_the_same_flags(tmp_path: Path) -> None:
    ref_lw1, ref_lw0 = _latents(0), _latents(5)
    recs = [
        _rec(tmp_path, "harness", ref_lw1, lw=True),
        _rec(tmp_path, "harness", ref_lw0, lw=False),
        _rec(tmp_path, "diffusers-group", ref_lw1, lw=True),
        _rec(tmp_path, "diffusers-group", ref_lw0, lw=False),
    ]
    v = close_output_verdict("native", as_records(recs), 1e-9)
    assert v.passed and v.message.count(": 0") == 2, v.message


@pytest.mark.parametrize("problem", ["no-peer", "peer-failed", "no-file", "no-path", "shape", "non-finite"])
def test_close_output_fails_if_it_cannot_compare(tmp_path: Path, problem: str) -> None:
    ref = _latents()
    ours = _rec(tmp_path, "harness", ref, status="oom" if problem == "peer-failed" else "ok")
    peer = _rec(tmp_path, "diffusers-group", ref)
    if problem == "no-file":
        Path(peer["latents_path"]).unlink()
    elif problem == "no-path":
        del ours["latents_path"]
    elif problem == "shape":
        torch.save(ref[..., :4], peer["latents_path"])
    elif problem == "non-finite":
        torch.save(torch.full_like(ref, float("nan")), peer["latents_path"])
    records = [peer] if problem == "no-peer" else [ours, peer]
    v = close_output_verdict("native", as_records(records), 0.02)
    assert not v.passed, v.message
    assert "+diffusers-group" in v.message
    want = {"no-peer": "has no record", "peer-failed": "ended oom", "no-file": "cannot compare",
            "no-path": "no latents_path", "shape": "shapes differ", "non-finite": "not finite"}[problem]
    assert want in v.message, v.message


def test_close_output_ignores_other_backends_that_did_not_run(tmp_path: Path) -> None:
    ours = _rec(tmp_path, "harness", _latents())
    skipped = _rec(tmp_path, "diffusers-group", None, status="skipped")
    v = close_output_verdict("native", as_records([ours, skipped]), 0.02)
    assert v.passed and "nothing to compare" in v.message


def test_evaluate_runs_close_output_per_card(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, peer_scenario()))
    ref = _latents()
    records = []
    for card in ("tiny-6m", "native"):
        records.append(_rec(tmp_path, "harness", ref, card=card))
        records.append(_rec(tmp_path, "diffusers-group", ref if card == "native" else -ref, card=card))
    verdicts = {v.card: v for v in evaluate(s, as_records(records)) if v.check == "close_output"}
    assert verdicts["native"].passed
    assert not verdicts["tiny-6m"].passed


def test_lowest_peak_and_same_output_look_within_the_harness_backend(tmp_path: Path) -> None:
    ours = make_record(True, True, load=100, runtime=200)
    ours_lw0 = make_record(True, False, load=500, runtime=900, digest="a" * 64)
    peer = make_record(True, True, load=50, runtime=60, digest="b" * 64)
    peer["backend"] = "diffusers-group"
    peer["cell_id"] += "+diffusers-group"
    where = {"dit_cpu_offload": True, "dit_layerwise_offload": True}
    v = lowest_peak_verdict("tiny-6m", as_records([ours, ours_lw0, peer]), where)
    assert v.passed, v.message
    assert "diffusers-group" not in v.message
    assert same_output_verdict("tiny-6m", as_records([ours, ours_lw0, peer])).passed
    peer_lw0 = {**ours_lw0, "backend": "diffusers-group", "cell_id": ours_lw0["cell_id"] + "+diffusers-group",
                "outputs": {"latents_sha256": "c" * 64}}
    v = same_output_verdict("tiny-6m", as_records([ours, ours_lw0, peer, peer_lw0]))
    assert not v.passed and "+diffusers-group" in v.message
    assert "a" * 12 not in v.message  # the harness cells agree among themselves


# ------------------------------------------------------------------------------------------------ roofline


def _roof_record(backend: str, placement: str, step_ms: list[float], **dit: Any) -> dict[str, Any]:
    cell = f"peer/native/{placement}" + ("" if backend == HARNESS_BACKEND else f"+{backend}")
    return {
        "schema_version": 2, "cell_id": cell, "scenario": "peer", "status": "ok", "backend": backend,
        "settings": {"height": 64, "width": 64, "steps": 3, "true_cfg_scale": 4.0, "seed": 0},
        "machine": {"pinned_h2d_gbps": 50.0},
        "phases": {"denoise": {"step_ms": step_ms}},
        "components": {"dit": {"placement": placement, **dit}},
    }


def test_roofline_rows_name_the_backend_and_stream_diffusers_groups() -> None:
    whole = _roof_record("harness", "cpu-offload", [999.0, 400.0, 400.0])
    peer_whole = _roof_record("diffusers-group", "cpu-offload", [999.0, 300.0, 300.0])
    ours = _roof_record("harness", "layerwise-from-host", [999.0, 2000.0, 2000.0], layerwise={"host_bytes": 40e9})
    peer = _roof_record("diffusers-group-rs", "diffusers-group-offload", [999.0, 2500.0, 2500.0],
                        diffusers_group={"streamed_bytes": 40e9, "unstreamed_bytes": 1e8})
    old = _roof_record("harness", "layerwise-from-host", [2000.0], layerwise={"host_bytes": 40e9})
    del old["backend"]  # a record from before backends existed
    old["cell_id"] = "peer/native/old"
    rows = {r["cell"]: r for r in roofline_rows(as_records([whole, peer_whole, ours, peer, old]))}
    assert set(rows) == {ours["cell_id"], peer["cell_id"], old["cell_id"]}
    assert rows[ours["cell_id"]]["backend"] == rows[old["cell_id"]]["backend"] == "harness"
    assert rows[peer["cell_id"]]["backend"] == "diffusers-group-rs"
    for r in rows.values():
        # the whole-DiT reference is the fastest resident/cpu-offload cell, whatever its backend: 300 ms / 2
        assert r["resident compute s/forward"] == 0.15
        assert r["streamed GB/forward"] == 40.0
        assert r["predicted s/step"] == 1.6  # 2 x max(0.15, 40 GB / 50 GB/s)
    assert rows[peer["cell_id"]][f"measured s/step ({STEP_CONVENTION})"] == 2.5
    assert rows[peer["cell_id"]]["efficiency % (predicted/measured)"] == 64.0


def test_roofline_streams_sglang_managers_host_buffers_unless_layers_stay_resident() -> None:
    whole = _roof_record("harness", "cpu-offload", [999.0, 300.0, 300.0])
    groups = {"transformer_blocks": {"host_bytes": 30e9, "resident_layers": 0},
              "single_blocks": {"host_bytes": 10e9, "resident_layers": 0}}
    sgl = _roof_record("sglang@0.5.23", "sglang-layerwise", [999.0, 4000.0, 4000.0],
                       sglang_layerwise={"groups": groups})
    resident = _roof_record("sglang@0.5.23", "sglang-layerwise", [999.0, 1000.0],
                            sglang_layerwise={"groups": {"blocks": {"host_bytes": 40e9, "resident_layers": 8}}})
    resident["cell_id"] += "-resident"
    rows = {r["cell"]: r for r in roofline_rows(as_records([whole, sgl, resident]))}
    assert set(rows) == {sgl["cell_id"]}  # resident layers stream once per use: no per-forward prediction
    row = rows[sgl["cell_id"]]
    assert row["backend"] == "sglang@0.5.23" and row["streamed GB/forward"] == 40.0
    assert row["H2D % of probe"] == 40.0  # 2 x 40 GB in 4 s = 20 GB/s of a 50 GB/s probe


def test_roofline_counts_only_the_streamed_layers_of_our_runtime() -> None:
    whole = _roof_record("harness", "cpu-offload", [999.0, 300.0, 300.0])
    half = _roof_record("harness", "layerwise-from-host", [999.0, 1000.0, 1000.0],
                        layerwise={"host_bytes": 40e9, "resident_bytes": 20e9, "streamed_bytes": 20e9})
    row = roofline_rows(as_records([whole, half]))[0]
    assert row["streamed GB/forward"] == 20.0  # the resident half moves once per call, not per forward
    assert row["predicted s/step"] == 0.8  # 2 x max(0.15, 20 GB / 50 GB/s)


# ------------------------------------------------------------------------------------------------ beats_peer


def _timed(backend: str, step_ms: list[float], runtime: int, *, lw: bool = True, status: str = "ok") -> dict[str, Any]:
    rec = make_record(True, lw, status=status, device="cuda", runtime=runtime,
                      failed_phase=None if status == "ok" else "load")
    rec["backend"] = backend
    if backend != HARNESS_BACKEND:
        rec["cell_id"] += f"+{backend}"
    if status == "ok":
        rec["phases"]["denoise"]["step_ms"] = step_ms
    return rec


def test_beats_peer_passes_when_ours_is_as_fast_and_as_frugal() -> None:
    # the first step is left out: ours pays 9 s of one-off costs there and still wins on the median of the rest
    records = [
        _timed("harness", [9000, 1500, 1500, 1500], 20_000),
        _timed("diffusers-group", [2000, 1600, 1600, 1600], 20_000),
        _timed("diffusers-group-rs", [2000, 1500, 1500, 1500], 30_000),
        _timed("diffusers-group", [100], 1, lw=False),  # whole-DiT cells are not part of the comparison
    ]
    v = beats_peer_verdict("native", as_records(records))
    assert v.passed, v.message
    assert "1.500 s (ours) vs 1.600 s" in v.message and "diffusers-group-rs" in v.message


@pytest.mark.parametrize(("ours_ms", "ours_peak", "what"), [(1601.0, 20_000, "slower"), (1500.0, 20_001, "peak")])
def test_beats_peer_fails_if_ours_is_slower_or_peaks_higher(ours_ms: float, ours_peak: int, what: str) -> None:
    records = [_timed("harness", [1, ours_ms, ours_ms], ours_peak), _timed("diffusers-group", [1, 1600, 1600], 20_000)]
    v = beats_peer_verdict("native", as_records(records))
    assert not v.passed, (what, v.message)
    assert "+diffusers-group" in v.message


@pytest.mark.parametrize("broken", ["peer", "ours", "missing", "none"])
def test_beats_peer_fails_if_it_cannot_compare(broken: str) -> None:
    ours = _timed("harness", [1, 1000], 10, status="oom" if broken == "ours" else "ok")
    peer = _timed("diffusers-group", [1, 2000], 20, status="error" if broken == "peer" else "ok")
    records = {"peer": [ours, peer], "ours": [ours, peer], "missing": [peer], "none": [ours]}[broken]
    v = beats_peer_verdict("native", as_records(records))
    assert not v.passed
    assert ("nothing to compare" if broken == "none" else "not compared") in v.message, v.message


# ------------------------------------------------------------------------------------------------ peer_step_ratio

GAP = {"diffusers-group": {"at_most": 1.3, "reason": "its hooks copy from pageable memory"}}


def test_peer_step_ratio_passes_within_the_bound_and_says_the_ratio_and_the_reason() -> None:
    records = [_timed("harness", [9000, 1000, 1000], 10), _timed("diffusers-group", [1, 1290, 1290], 10),
               _timed("diffusers-group-rs", [1, 5000, 5000], 10)]  # another backend: not this bound's business
    v = peer_step_ratio_verdict("native", as_records(records), PeerStepRatio("diffusers-group", 1.3, "hooks"))
    assert v.passed, v.message
    assert v.check == "peer_step_ratio[diffusers-group]"
    assert "1.290 s vs 1.000 s (ours) = 1.29x (at most 1.3x)" in v.message and v.message.endswith("kept: hooks")


def test_peer_step_ratio_fails_when_the_gap_grows() -> None:
    records = [_timed("harness", [1, 1000, 1000], 10), _timed("diffusers-group", [1, 1310, 1310], 10)]
    v = peer_step_ratio_verdict("native", as_records(records), PeerStepRatio("diffusers-group", 1.3, "hooks"))
    assert not v.passed and "= 1.31x (at most 1.3x)" in v.message


@pytest.mark.parametrize("broken", ["peer", "ours", "missing", "none"])
def test_peer_step_ratio_fails_when_it_cannot_compare(broken: str) -> None:
    ours = _timed("harness", [1, 1000], 10, status="oom" if broken == "ours" else "ok")
    peer = _timed("diffusers-group", [1, 1100], 20, status="error" if broken == "peer" else "ok")
    records = {"peer": [ours, peer], "ours": [ours, peer], "missing": [peer], "none": [ours]}[broken]
    v = peer_step_ratio_verdict("native", as_records(records), PeerStepRatio("diffusers-group", 1.3, "hooks"))
    assert not v.passed
    assert ("nothing to compare" if broken == "none" else "not compared") in v.message, v.message


BAD_GAPS: list[tuple[str, Any, str]] = [
    ("not-a-table", 1.3, "expect.peer_step_ratio: expected a table of backends"),
    ("harness", {"harness": GAP["diffusers-group"]}, "expect.peer_step_ratio.harness: names no other backend"),
    ("no-reason", {"diffusers-group": {"at_most": 1.3}}, "exactly `at_most`"),
    ("blank-reason", {"diffusers-group": {"at_most": 1.3, "reason": " "}}, r"reason: expected the reason"),
    ("bad-ratio", {"diffusers-group": {"at_most": -1, "reason": "x"}}, r"at_most: expected a positive finite"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_GAPS, ids=[b[0] for b in BAD_GAPS])
def test_peer_step_ratio_refuses_bad_tables_naming_the_field(tmp_path: Path, name: str, value: Any,
                                                              message: str) -> None:
    file = write(tmp_path, peer_scenario(expect={"peer_step_ratio": value}))
    with pytest.raises(ScenarioError, match=message):
        load_scenario(file)


def test_evaluate_runs_one_peer_step_ratio_per_backend_named(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, peer_scenario(expect={"peer_step_ratio": GAP})))
    assert s.expect.peer_step_ratio == (PeerStepRatio("diffusers-group", 1.3, "its hooks copy from pageable memory"),)
    checks = [v.check for v in evaluate(s, [])]
    assert checks.count("peer_step_ratio[diffusers-group]") == len(s.cards)


def test_evaluate_runs_beats_peer_when_declared(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, peer_scenario(expect={"beats_peer": True})))
    checks = {v.check for v in evaluate(s, [])}
    assert "beats_peer" in checks and "close_output" not in checks
