"""A Qwen-Image and a Wan pipeline folder run by the harness against diffusers' own QwenImagePipeline and
WanPipeline (`from_pretrained` + `__call__`) on the same folder (issue 29), through every offload flag combination
the harness runs: the DiT resident, CPU-offloaded whole and streamed layerwise with prefetch 1 and 2, the text
encoder and the VAE CPU-offloaded or not, host memory pinned or not (the product of the six, 48 distinct cells
once the policy has merged equal effective flags), plus resident layers (leading and strided), the text encoder
and VAE streamed layerwise (`layerwise_offload_components`) and the two CFG passes batched (`cfg_batch`).

As tests/test_folder_model.py's FLUX test: 64x64, 2 steps, true CFG 4.0, seed 0; the harness's seeded inputs drawn
again in its order (the positive, then the negative prompt's token ids, then the noise), the prompts encoded by the
folder's own text encoder and passed as `prompt_embeds` / `negative_prompt_embeds` (the tiny folders have no
tokenizer), the noise passed as `latents`, the scheduler the harness's published config (a folder written per
component has none). Final latents compared bitwise where the same kernels run on the same inputs; where they
cannot, the bound and its reason are stated beside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.models import get_model
from tests.pipeline_folders import folder_cells, write_pipeline_folder

torch = pytest.importorskip("torch")

MATRIX = """[axes]
dit_cpu_offload = [false, true]
dit_layerwise_offload = [false, true]
dit_offload_prefetch_size = [1, 2]
text_encoder_cpu_offload = [false, true]
vae_cpu_offload = [false, true]
pin_cpu_memory = [false, true]
"""
# what the product above leaves out: resident layers, layerwise text encoder / VAE (a selected component's CPU
# offload is cleared), "all" (the DiT streamed by the selection alone)
EXTRAS = """[flags]
dit_cpu_offload = true
dit_offload_prefetch_size = 1
[[cells]]
dit_layerwise_offload = true
dit_layerwise_resident_layers = 2
[[cells]]
dit_layerwise_offload = true
dit_layerwise_resident_layers = 2
dit_layerwise_residency_policy = "strided"
[[cells]]
text_encoder_cpu_offload = true
layerwise_offload_components = ["vae"]
[[cells]]
layerwise_offload_components = "all"
"""
FAST = """[flags]
dit_cpu_offload = true
text_encoder_cpu_offload = true
[[cells]]
dit_layerwise_offload = false
[[cells]]
dit_layerwise_offload = true
dit_offload_prefetch_size = 2
pin_cpu_memory = false
"""
CFG_BATCH = "[run]\ncfg_batch = true\n" + FAST


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, str], Path]]:
    """The tiny twin's folder in a dtype, written once per module."""
    root, made = tmp_path_factory.mktemp("parity"), {}

    def folder(twin: str, dtype: str) -> Path:
        if (twin, dtype) not in made:
            made[twin, dtype] = write_pipeline_folder(root / f"{twin}-{dtype}", twin, dtype=dtype)
        return made[twin, dtype]

    yield folder


def _ours(folder: Path, tmp_path: Path, axes: str, frames: int = 1) -> list[tuple[dict, Any]]:
    """The harness's distinct cells of the scenario, each record with its final latents."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = []
    for i, rec in enumerate(folder_cells(folder, tmp_path, axes, frames=frames, latents_dir=tmp_path, distinct=True)):
        assert rec["status"] == "ok", (rec["cell_id"], rec["reason"], rec.get("traceback"))
        out.append((rec, torch.load(tmp_path / f"latents{i}.pt")))
    return out


def _last_latents() -> tuple[dict[str, Any], Callable[..., dict]]:
    final: dict[str, Any] = {}

    def keep(_pipe: object, _i: int, _t: object, kw: dict) -> dict:
        final["latents"] = kw["latents"].clone()
        return kw

    return final, keep


def qwen_image_reference(folder: Path, dtype: str) -> tuple[Any, Any]:
    """Diffusers' QwenImagePipeline on the folder with the harness's inputs: (final packed latents in float32,
    the image mapped back to [-1, 1])."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from harness.cell.pipeline import QWEN_SCHEDULER, _pack

    cast, spec = getattr(torch, dtype), get_model(str(folder))
    pipe = QwenImagePipeline.from_pretrained(folder, scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
                                             tokenizer=None, dtype=cast)
    gen = torch.Generator("cpu").manual_seed(0)
    vocab = pipe.text_encoder.config.text_config.vocab_size
    ids = [torch.randint(0, vocab, (1, spec.prompt_tokens), generator=gen) for _ in range(2)]
    with torch.inference_mode():  # as QwenImagePipeline._get_qwen_prompt_embeds: the last hidden states, template
        embeds = [pipe.text_encoder(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True)
                  .hidden_states[-1][:, spec.drop_tokens:] for x in ids]  # tokens dropped
    noise = torch.randn(1, pipe.vae.config.z_dim, 1, 8, 8, generator=gen)
    final, keep = _last_latents()
    image = pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], true_cfg_scale=4.0, height=64, width=64,
                 num_inference_steps=2, latents=_pack(noise, 2).to(cast), output_type="pt",
                 callback_on_step_end=keep, return_dict=False)[0]
    return final["latents"].float(), image.float() * 2 - 1  # diffusers' image: (decoded / 2 + 0.5).clamp(0, 1)


def wan_reference(folder: Path, dtype: str, fp32_modules: bool = True, frames: int = 5) -> tuple[Any, Any]:
    """Diffusers' WanPipeline on the folder with the harness's inputs: (final latents in float32, the video as
    (B, C, F, H, W) mapped back to [-1, 1]).

    `from_pretrained` keeps WanTransformer3DModel's `_keep_in_fp32_modules` (time embedder, scale-shift tables,
    norms) in float32 whatever the dtype, and refuses to load the class at all without accelerate (which this
    environment lacks): loaded with the list cleared, those modules are then upcast by hand, exactly what a load
    with accelerate gives (the stored values are the folder's dtype, so the upcast is exact). `fp32_modules=False`
    leaves them in the folder's dtype, as the harness keeps every weight of a component in one dtype."""
    import diffusers
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from harness.cell.pipeline import WAN_SCHEDULER

    cast, spec = getattr(torch, dtype), get_model(str(folder))
    dit_class = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["transformer"][1])
    kept = dit_class._keep_in_fp32_modules
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dit_class, "_keep_in_fp32_modules", None)
        pipe = WanPipeline.from_pretrained(folder, scheduler=UniPCMultistepScheduler(**WAN_SCHEDULER),
                                           tokenizer=None, dtype=cast)
    for name, module in pipe.transformer.named_modules():
        if fp32_modules and any(k in name.split(".") for k in kept):
            module.float()
    gen = torch.Generator("cpu").manual_seed(0)
    ids = [torch.randint(0, pipe.text_encoder.config.vocab_size, (1, spec.prompt_tokens), generator=gen)
           for _ in range(2)]
    with torch.inference_mode():  # as WanPipeline._get_t5_prompt_embeds (every token real: nothing to pad)
        embeds = [pipe.text_encoder(x, torch.ones_like(x)).last_hidden_state for x in ids]
    noise = torch.randn(1, pipe.vae.config.z_dim, (frames - 1) // 4 + 1, 8, 8, generator=gen)
    final, keep = _last_latents()
    video = pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], guidance_scale=4.0, height=64,
                 width=64, num_frames=frames, num_inference_steps=2, latents=noise, output_type="pt",
                 callback_on_step_end=keep, return_dict=False)[0]
    return final["latents"].float(), video.float().permute(0, 2, 1, 3, 4) * 2 - 1  # (B, F, C, H, W) in [0, 1]


def _rel(a: Any, b: Any) -> float:
    return float((a - b).norm() / b.norm())


def _same_image(rec: dict, image: Any, rel: float) -> None:
    """The decoded image's stats to rounding: diffusers decodes `latents / (1 / std) + mean`, the harness
    `latents * std + mean`, and maps to [0, 1] after (undone above, exact in float32 only)."""
    stats = rec["outputs"]["image_stats"]
    assert stats["shape"] == list(image.shape)
    for key, value in (("mean", image.mean()), ("std", image.std()), ("absmax", image.abs().max())):
        assert stats[key] == pytest.approx(float(value), rel=rel, abs=1e-6), key


def _assert_bitwise(ours: list[tuple[dict, Any]], theirs: Any, image: Any, rel: float) -> None:
    for rec, latents in ours:
        assert torch.equal(latents, theirs), (rec["cell_id"], _rel(latents, theirs))
        _same_image(rec, image, rel)


def _placements(ours: list[tuple[dict, Any]]) -> set[str]:
    return {rec["placements"]["dit"] for rec, _ in ours}


def reference(twin: str, folder: Path, dtype: str, frames: int = 1) -> tuple[Any, Any]:
    return (qwen_image_reference(folder, dtype) if twin == "qwen-image-tiny"
            else wan_reference(folder, dtype, frames=frames))


# Wan: a 5-frame video (2 latent frames) in the fast subset, one frame elsewhere (the DiT and the 3D VAE at 5
# frames made the 58 cells of the slow Wan tests 10 minutes here)
FRAMES = {"qwen-image-tiny": 1, "wan-tiny": 5}


@pytest.mark.parametrize("twin", ["qwen-image-tiny", "wan-tiny"])
def test_a_folder_computes_what_diffusers_pipeline_does(folders: Callable[[str, str], Path], tmp_path: Path,
                                                        twin: str) -> None:
    """The fast subset, float32: the DiT CPU-offloaded whole and streamed layerwise (prefetch 2, unpinned), the
    text encoder offloaded: bitwise (on CPU both run the same modules on the same inputs in the same order)."""
    folder = folders(twin, "float32")
    ours = _ours(folder, tmp_path, FAST, FRAMES[twin])
    assert _placements(ours) == {"cpu-offload", "layerwise-from-host"}
    theirs, image = reference(twin, folder, "float32", FRAMES[twin])
    _assert_bitwise(ours, theirs, image, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("twin", ["qwen-image-tiny", "wan-tiny"])
def test_every_flag_combination_computes_what_diffusers_does(folders: Callable[[str, str], Path], tmp_path: Path,
                                                             twin: str) -> None:
    """Every combination in float32: bitwise. The batched CFG passes (`cfg_batch`, the harness's option; diffusers'
    pipelines run cond and uncond as two forwards) within 1e-5 relative L2: one forward of batch 2 runs GEMMs of
    twice the rows, which the CPU kernels block and reduce otherwise (measured 3.6e-7 Qwen-Image, 6.0e-7 Wan)."""
    folder = folders(twin, "float32")
    ours = _ours(folder, tmp_path, MATRIX) + _ours(folder, tmp_path / "extras", EXTRAS)
    assert len(ours) == 48 + 4
    assert _placements(ours) == {"resident", "cpu-offload", "layerwise-from-device", "layerwise-from-host"}
    assert {rec["placements"][role] for rec, _ in ours for role in ("text_encoder", "vae")} == {
        "resident", "cpu-offload", "layerwise-from-host"}
    batched = _ours(folder, tmp_path / "batched", CFG_BATCH)
    assert [rec["cell_id"].endswith("+cfg-batch") for rec, _ in batched] == [True, True]
    theirs, image = reference(twin, folder, "float32")
    _assert_bitwise(ours, theirs, image, 1e-5)
    for rec, latents in batched:
        assert _rel(latents, theirs) < 1e-5, rec["cell_id"]
        _same_image(rec, image, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("twin", ["qwen-image-tiny", "wan-tiny"])
def test_a_bfloat16_folder_computes_what_diffusers_does(folders: Callable[[str, str], Path], tmp_path: Path,
                                                        twin: str) -> None:
    """A bfloat16 folder, the fast subset and the extras (resident layers, layerwise text encoder / VAE, "all").

    Qwen-Image: bitwise (the text encoder's RoPE frequencies stay float32, as a transformers load keeps them; cast
    to bfloat16 with the module, as the harness did, the final latents were 0.57 % relative L2 apart).

    Wan: within 3 % relative L2 of WanPipeline as `from_pretrained` loads it (measured 1.2 %), since diffusers keeps
    the transformer's `_keep_in_fp32_modules` (time embedder, scale-shift tables, norms: 0.2 % of the 14B DiT's
    bytes) in float32, and the harness keeps every weight of a component in its stored dtype (harness/models/wan.py);
    bitwise against the same pipeline with those modules left in bfloat16, which shows that is the whole
    difference."""
    folder = folders(twin, "bfloat16")
    ours = _ours(folder, tmp_path, FAST) + _ours(folder, tmp_path / "extras", EXTRAS)
    assert len(ours) == 2 + 4
    if twin == "qwen-image-tiny":
        theirs, image = reference(twin, folder, "bfloat16")
        _assert_bitwise(ours, theirs, image, 1e-2)
        return
    theirs, image = wan_reference(folder, "bfloat16", frames=1)
    for rec, latents in ours:
        assert _rel(latents, theirs) < 3e-2, rec["cell_id"]
        _same_image(rec, image, 2e-2)
    same, image = wan_reference(folder, "bfloat16", fp32_modules=False, frames=1)
    _assert_bitwise(ours, same, image, 1e-2)


def test_a_transformer_class_the_zoo_does_not_know_runs_layerwise(tmp_path: Path) -> None:
    """A WanPipeline folder whose transformer is SkyReelsV2Transformer3DModel (a diffusers class the zoo has no
    entry for): built from its config, its blocks found by the generic ModuleList rule and streamed by the layerwise
    runtime, driven by the Wan pipeline code; bitwise what WanPipeline computes with that transformer."""
    folder = write_pipeline_folder(tmp_path / "skyreels", "wan-tiny", dit_class="SkyReelsV2Transformer3DModel")
    spec = get_model(str(folder))
    assert spec.components["dit"].factory == "harness.models.folder:build_diffusers_dit"
    assert spec.components["dit"].layer_group_sizes() == {"blocks": 12}
    ours = _ours(folder, tmp_path / "cells", "[flags]\ndit_cpu_offload = true\ndit_layerwise_offload = true\n", 5)
    assert _placements(ours) == {"layerwise-from-host"}
    groups = ours[0][0]["components"]["dit"]["layerwise"]["groups"]
    assert list(groups) == ["blocks"] and groups["blocks"]["streamed_layers"] == 12
    theirs, image = wan_reference(folder, "float32")
    _assert_bitwise(ours, theirs, image, 1e-5)
