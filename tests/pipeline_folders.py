"""Tiny real diffusers pipeline folders for the bring-your-own-checkpoint tests: each component built from the
zoo's tiny configs with its real class (random init, seeded), written by its own `save_pretrained` (safetensors, a
sharded index where asked) beside the `model_index.json` a pipeline's `save_pretrained` writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

PIPELINE = {"flux-tiny": "FluxPipeline", "qwen-image-tiny": "QwenImagePipeline", "wan-tiny": "WanPipeline"}


def write_pipeline_folder(root: Path, zoo_name: str, *, shard_dit: bool = False, dtype: str = "float32",
                          dit_class: str | None = None) -> Path:
    """The folder of zoo twin `zoo_name`; with `dit_class`, its transformer is that diffusers class instead, built
    from the twin's DiT config (a class the zoo does not know: SkyReelsV2Transformer3DModel for Wan)."""
    import diffusers
    import torch

    from harness.models import get_model

    torch.manual_seed(0)
    spec = get_model(zoo_name)
    cast = getattr(torch, dtype)
    # deep copies: transformers writes into nested config dicts (Qwen2.5-VL's rope_scaling gains rope_theta), which
    # would change the zoo spec's config, its checkpoint key and its stand-in's digest for every later test
    te, dit, vae = (copy.deepcopy(dict(spec.components[r].config)) for r in ("text_encoder", "dit", "vae"))
    index: dict[str, Any] = {"_class_name": PIPELINE[zoo_name], "_diffusers_version": "0.42.1"}
    mods: dict[str, Any] = {}
    if spec.family == "flux":
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        mods["text_encoder"] = (CLIPTextModel(CLIPTextConfig(**te["clip"])), "transformers")
        mods["text_encoder_2"] = (T5EncoderModel(T5Config(**te["t5"])), "transformers")
        mods["transformer"] = (FluxTransformer2DModel(**dit), "diffusers")
        mods["vae"] = (AutoencoderKL(**vae), "diffusers")
    elif spec.family == "wan":
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        mods["text_encoder"] = (UMT5EncoderModel(UMT5Config(**te)), "transformers")
        mods["transformer"] = (WanTransformer3DModel(**dit), "diffusers")
        mods["vae"] = (AutoencoderKLWan(**vae), "diffusers")
    else:
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size":
                  te["hidden_size"], "fullatt_block_indexes": [0], "window_size": 16, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "in_chans": 3}
        config = Qwen2_5_VLConfig(text_config=dict(te), vision_config=vision)
        mods["text_encoder"] = (Qwen2_5_VLForConditionalGeneration(config), "transformers")
        mods["transformer"] = (QwenImageTransformer2DModel(**dit), "diffusers")
        mods["vae"] = (AutoencoderKLQwenImage(**vae), "diffusers")
    if dit_class is not None:
        mods["transformer"] = (getattr(diffusers, dit_class)(**dit), "diffusers")
    for sub, (module, library) in mods.items():
        module = module.to(cast)
        kwargs = {"max_shard_size": "200KB"} if shard_dit and sub == "transformer" else {}
        module.save_pretrained(root / sub, **kwargs)
        index[sub] = [library, type(module).__name__]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def folder_cells(folder: Path, tmp_path: Path, axes: str, frames: int = 1, latents_dir: Path | None = None,
                 distinct: bool = False) -> list[dict]:
    """Each cell of a 64x64, 2-step, true-CFG scenario on the folder (`axes`: the TOML after the settings: [flags],
    [axes], [[cells]], [run]), run in this process (CPU, one round); with `latents_dir`, cell i saves its final
    latents there as latents{i}.pt; with `distinct`, only the cells that run (a cell whose effective flags an
    earlier cell has is `same_as` it and skipped)."""
    from dataclasses import replace

    from harness.cell.worker import run_cell
    from harness.plan.scenario import expand, load_scenario
    from harness.run.cell import spec_for_child

    path = tmp_path / "folder.toml"
    path.write_text(f'name = "folder"\nmodel = "{folder}"\nprofile = "cpu"\ncards = ["native"]\nheight = 64\n'
                    f'width = 64\nframes = {frames}\nsteps = 2\ntrue_cfg_scale = 4.0\nseed = 0\n{axes}')
    cells = [c for c in expand(load_scenario(path)) if not (distinct and c.same_as)]
    return [run_cell(replace(spec_for_child(c, "cpu"), warmup=0, rounds=1,
                             latents_out=str(latents_dir / f"latents{i}.pt") if latents_dir else None)).to_dict()
            for i, c in enumerate(cells)]
