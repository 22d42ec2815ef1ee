"""The FLUX and Wan families: published sizes (built on meta, nothing allocated) and an end-to-end CPU run of each
tiny twin, both DiT flags on vs resident, in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.models import get_model, model_names
from harness.plan.scenario import expand, load_scenario
from harness.run.cell import spec_for_child

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios" / "cpu"


@pytest.fixture(scope="module")
def checkpoint_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Synthetic checkpoints of the tiny twins go to a temporary cache, never to ~/.cache/offload-bench."""
    folder = tmp_path_factory.mktemp("zoo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OFFLOAD_BENCH_CACHE", str(folder))
        yield folder


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_zoo_registers_flux_and_wan() -> None:
    names = set(model_names())
    assert {"flux-dev", "flux-tiny", "wan2.1-t2v-14b", "wan-tiny"} <= names
    assert get_model("flux-dev").family == "flux"
    assert get_model("wan2.1-t2v-14b").family == "wan"
    assert get_model("flux-dev").components["dit"].layer_groups == ("transformer_blocks", "single_transformer_blocks")
    assert get_model("wan2.1-t2v-14b").components["dit"].layer_groups == ("blocks",)


@pytest.mark.parametrize("model", sorted(model_names()))
def test_declared_layer_group_sizes_match_the_built_dit(model: str) -> None:
    """The scenario loader checks prefetch sizes against `layer_group_sizes` (from the config, no torch)."""
    dit = get_model(model).components["dit"]
    module = dit.build_on_meta()
    assert dit.layer_group_sizes() == {g: len(getattr(module, g)) for g in dit.layer_groups}


@pytest.mark.parametrize(
    ("model", "role", "attr", "published"),
    [
        ("flux-dev", "dit", None, 11.90e9),  # FLUX.1-dev transformer
        ("flux-dev", "text_encoder", "t5", 4.76e9),  # T5-v1.1-XXL encoder
        ("flux-dev", "text_encoder", "clip", 123e6),  # CLIP ViT-L/14 text tower
        ("flux-dev", "vae", None, 83.8e6),
        ("wan2.1-t2v-14b", "dit", None, 14.29e9),  # Wan2.1-T2V-14B transformer
        ("wan2.1-t2v-14b", "text_encoder", None, 5.68e9),  # UMT5-XXL encoder
        ("wan2.1-t2v-14b", "vae", None, 126.9e6),
    ],
)
def test_published_parameter_counts(model: str, role: str, attr: str | None, published: float) -> None:
    module = get_model(model).components[role].build_on_meta()
    if attr is not None:
        module = getattr(module, attr)
    assert all(p.device.type == "meta" for p in module.parameters())
    assert _params(module) == pytest.approx(published, rel=0.01)


@pytest.mark.parametrize("model", ["flux-dev", "wan2.1-t2v-14b"])
def test_text_encoder_embedding_is_stored_once(model: str) -> None:
    """A tied T5/UMT5 embedding listed under two state-dict names would be placed twice by the loader."""
    module = get_model(model).components["text_encoder"].build_on_meta()
    state = module.state_dict()
    assert sum(t.numel() for t in state.values()) == _params(module)


def test_wan_rope_tables_stay_float32() -> None:
    import torch

    dit = get_model("wan-tiny").components["dit"].build_on_meta()
    assert dit.rope.freqs_cos.dtype == torch.float32 and dit.rope.freqs_sin.dtype == torch.float32
    assert next(dit.blocks[0].parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("scenario_file", "both_on"),
    [("flux_tiny.toml", "cpu1-lw1-te1"), ("wan_tiny.toml", "cpu1-lw1-te0")],
)
def test_tiny_end_to_end_both_on_matches_resident(scenario_file: str, both_on: str, checkpoint_cache_dir: Path) -> None:
    from harness.cell.worker import run_cell

    scenario = load_scenario(SCENARIOS / scenario_file)
    cells = {c.requested.label()[:12]: c for c in expand(scenario) if c.card.name == "native"}
    resident_key = "cpu0-lw0-" + both_on.rsplit("-", 1)[-1]
    both = run_cell(spec_for_child(cells[both_on], "cpu"))
    resident = run_cell(spec_for_child(cells[resident_key], "cpu"))
    for rec in (both, resident):
        assert rec.status == "ok", (rec.reason, rec.traceback)
        assert rec.outputs["latents_stats"]["finite"]
        assert rec.outputs["image_stats"]["finite"]
    assert both.placements["dit"] == "layerwise-from-host"
    assert resident.placements["dit"] == "resident"
    assert both.outputs["latents_sha256"] == resident.outputs["latents_sha256"]
    assert both.peaks.peak < resident.peaks.peak


def test_meta_build_skips_random_init_of_meta_parameters_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """parameters_on_meta turns torch.nn.init into a no-op for meta tensors (issue 18: 70 % of Qwen-Image's DiT
    build was random init of values that do not exist), initialises real tensors as before, and restores init."""
    import torch

    from harness.models import parameters_on_meta

    calls: list[str] = []
    real_uniform, real_ones = torch.nn.init.kaiming_uniform_, torch.nn.init.ones_

    def uniform_spy(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(f"kaiming_uniform_ {tensor.device.type}")
        return real_uniform(tensor, *args, **kwargs)

    def ones_spy(tensor: torch.Tensor) -> torch.Tensor:
        calls.append(f"ones_ {tensor.device.type}")
        return real_ones(tensor)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", uniform_spy)
    monkeypatch.setattr(torch.nn.init, "ones_", ones_spy)
    with parameters_on_meta():
        layer = torch.nn.Linear(4, 4)  # reset_parameters: kaiming_uniform_ on its (meta) weight
        real = torch.zeros(4)
        torch.nn.init.ones_(real)
        torch.nn.init.ones_(torch.empty(4, device="meta"))
    assert layer.weight.device.type == "meta" and bool((real == 1).all())
    assert calls == ["ones_ cpu"]  # the meta inits never reached the real functions
    assert torch.nn.init.kaiming_uniform_ is uniform_spy and torch.nn.init.ones_ is ones_spy  # restored
