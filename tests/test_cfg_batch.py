"""`[run] cfg_batch`: true CFG's two passes as one batched forward (issue 18). The batch helper against separate
forwards in float32, the scenario side (cell ids, specs, what is refused), and the tiny Qwen-Image and Wan cells
end to end: batched latents close to the two-pass cell's, one DiT call a step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from harness.analyze.expect import cfg_batch_verdict, evaluate
from harness.cell.pipeline import batch_text
from harness.plan.scenario import ScenarioError, expand, load_scenario
from harness.run.runner import spec_for_child
from tests.helpers import as_records

CPU = Path(__file__).resolve().parent.parent / "scenarios" / "cpu"


def _scenario(tmp_path: Path, source: str, run: str, expect: str = "") -> Path:
    text = (CPU / source).read_text()
    text = text.replace('name = "', 'name = "cfgb-', 1).replace("[flags]", f"[run]\n{run}\n\n[flags]")
    if expect:
        text = text.replace("[expect]", f"[expect]\n{expect}")
    path = tmp_path / source
    path.write_text(text)
    return path


def test_batch_text_pads_masks_and_matches_separate_forwards() -> None:
    from harness.models import get_model
    from harness.models.qwen_image import build_dit

    cfg = get_model("qwen-image-edit-tiny").components["dit"].config
    torch.manual_seed(0)
    dit = build_dit(cfg).float().eval()
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(1, 32, 64), torch.tensor([0.5])
    embeds = [torch.randn(1, 7, cfg["joint_attention_dim"]), torch.randn(1, 5, cfg["joint_attention_dim"])]
    shapes = [[(1, 4, 4), (1, 4, 4)]]
    text, mask = batch_text(embeds)
    assert text.shape == (2, 7, cfg["joint_attention_dim"]) and mask.tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    assert batch_text([embeds[0], embeds[0]])[1] is None  # one length: nothing padded, no mask
    with torch.no_grad():
        apart = [dit(hidden_states=x, timestep=t, encoder_hidden_states=e, img_shapes=shapes, return_dict=False)[0]
                 for e in embeds]
        together = dit(hidden_states=x.expand(2, -1, -1), timestep=t.expand(2), encoder_hidden_states=text,
                       encoder_hidden_states_mask=mask, img_shapes=shapes * 2, return_dict=False)[0]
    for i, ref in enumerate(apart):
        assert float((together[i : i + 1] - ref).norm() / ref.norm()) < 1e-5


def test_cfg_batch_cells_are_labelled_and_carry_the_option(tmp_path: Path) -> None:
    path = _scenario(tmp_path, "qwen_image_edit_tiny.toml", "cfg_batch = [false, true]", "cfg_batch_rtol = 0.05")
    cells = expand(load_scenario(path))
    batched = [c for c in cells if c.cfg_batch]
    assert len(batched) == len(cells) // 2
    assert all(c.cell_id.endswith("+cfg-batch") and c.spec("cpu").run.changed() == {"cfg_batch": True} for c in batched)
    assert all("run" not in c.spec("cpu").as_dict() for c in cells if not c.cfg_batch)
    # a batched cell never stands in for a two-pass one (or the reverse)
    by_id = {c.cell_id: c for c in cells}
    assert all(by_id[c.same_as].cfg_batch == c.cfg_batch for c in cells if c.same_as)


@pytest.mark.parametrize(("source", "run", "expect", "field"), [
    ("flux_tiny.toml", "cfg_batch = true", "", "run.cfg_batch"),  # no batched FLUX pipeline
    ("qwen_image_edit_tiny.toml", "cfg_batch = true", "cfg_batch_rtol = 0.05", "expect.cfg_batch_rtol"),
    ("qwen_image_edit_tiny.toml", "cfg_batch = [false, true]", "cfg_batch_rtol = 0", "expect.cfg_batch_rtol"),
])
def test_what_cfg_batch_refuses(tmp_path: Path, source: str, run: str, expect: str, field: str) -> None:
    with pytest.raises(ScenarioError, match=field):
        load_scenario(_scenario(tmp_path, source, run, expect))


def test_cfg_batch_needs_true_cfg(tmp_path: Path) -> None:
    path = _scenario(tmp_path, "wan_tiny.toml", "cfg_batch = true")
    path.write_text(path.read_text().replace("true_cfg_scale = 5.0", "true_cfg_scale = 1.0"))
    with pytest.raises(ScenarioError, match=r"run\.cfg_batch: needs true CFG"):
        load_scenario(path)


def test_cfg_batch_verdict_without_its_two_pass_cell_fails() -> None:
    rec = {"schema_version": 2, "cell_id": "s/c/x+cfg-batch", "status": "ok", "requested": {},
           "run_options": {"cfg_batch": True}}
    verdict = cfg_batch_verdict("c", as_records([rec]), 0.05)
    assert not verdict.passed and "two-pass cell with the same flags has no record" in verdict.message


@pytest.mark.parametrize("source", ["qwen_image_edit_tiny.toml", "wan_tiny.toml"])
def test_tiny_cfg_batch_latents_close_to_two_pass(tmp_path: Path, source: str) -> None:
    from harness.cell.worker import run_cell

    path = _scenario(tmp_path, source, "cfg_batch = [false, true]", "cfg_batch_rtol = 0.05")
    scenario = load_scenario(path)
    cells = [c for c in expand(scenario) if c.card.name == "native" and c.requested.dit_layerwise_offload
             and c.requested.dit_cpu_offload]
    records = []
    for cell in cells:
        spec = dataclasses.replace(spec_for_child(cell, "cpu"), warmup=0, rounds=1,
                                   latents_out=str(tmp_path / f"{cell.cfg_batch}.pt"))
        rec = run_cell(spec).to_dict()
        assert rec["status"] == "ok", (rec["reason"], rec.get("traceback"))
        records.append({**rec, "card": cell.card.as_dict()})
    two_pass, batched = sorted(records, key=lambda r: r["run_options"]["cfg_batch"])
    steps = scenario.steps
    assert two_pass["phases"]["denoise"]["forwards"] == 2 * steps
    assert batched["phases"]["denoise"]["forwards"] == steps and batched["phases"]["denoise"]["forward_batch"] == 2
    verdicts = {v.check: v for v in evaluate(scenario, as_records(records))}
    assert verdicts["cfg_batch"].passed, verdicts["cfg_batch"].message
    assert "+cfg-batch vs" in verdicts["cfg_batch"].message and "two-pass" in verdicts["cfg_batch"].message


def test_the_roofline_streams_a_cfg_batch_cells_layers_once_a_step() -> None:
    """Two CFG passes in one DiT call cross the link once: counted twice, the Qwen-Image cfg-batch cell on the H200
    streamed at 199 % of its probe's rate."""
    from harness.analyze.roofline import roofline_rows
    from tests.helpers import cell_records

    path = Path(__file__).resolve().parent.parent / "results/h200/fidelity-qwen-image.records.jsonl"
    rows = {r["cell"]: r for r in roofline_rows(cell_records(path))}
    batched = rows["cfg-batch-qwen-image/native/cpu1-lw1-te0-vae0-pf1-pin1+cfg-batch"]
    two_pass = rows["cfg-batch-qwen-image/native/cpu1-lw1-te0-vae0-pf1-pin1"]
    assert (batched["forwards/step"], two_pass["forwards/step"]) == (1, 2)
    assert batched["H2D % of probe"] <= 100 and two_pass["H2D % of probe"] <= 101
