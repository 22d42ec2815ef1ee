"""Qwen-Image and Qwen-Image-Edit: the 20.4 B DiT, a Qwen2.5-VL-7B-shaped text encoder and the Qwen-Image VAE.

Config numbers are the published ones (Qwen/Qwen-Image `transformer/config.json`, `vae/config.json`, and the
language model of Qwen2.5-VL-7B-Instruct). The tiny twins keep every structural choice (mrope, patching, the VAE's
8x downsampling, z_dim 16 so that 2x2 patches give the DiT's 64 input channels) and shrink widths and depths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.models import VAE_DECODER_LAYERS, ComponentSpec, ModelSpec, register


def build_dit(config: Mapping[str, Any]) -> Any:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel(**config)


def build_text_encoder(config: Mapping[str, Any]) -> Any:
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    cfg = Qwen2_5_VLTextConfig(**config)
    cfg._attn_implementation = "sdpa"
    model = Qwen2_5_VLTextModel(cfg)
    # The RoPE frequencies stay float32, as a transformers load keeps them: as buffers, `build_on_meta`'s cast made
    # them bfloat16, and a bfloat16 folder's final latents were 0.57 % relative L2 from QwenImagePipeline's
    # (tests/test_folder_parity.py). Plain attributes now, which the loader still moves to the device; each a
    # clone, since the registered tensor is marked as an nn.Buffer and setattr would register it again.
    rope = model.rotary_emb
    for name in ("inv_freq", "original_inv_freq"):
        setattr(rope, name, rope._buffers.pop(name).clone())
    return model


def build_vae(config: Mapping[str, Any]) -> Any:
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(**config)


TEXT_ENCODER_LAYERS = ("layers",)
_HERE = "harness.models.qwen_image"

# Qwen/Qwen-Image transformer/config.json: 60 layers, 24 heads x 128, joint_attention_dim 3584 -> 20.43 B params.
QWEN_IMAGE_DIT = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56],
}
# Qwen2.5-VL-7B-Instruct, language model only: 28 layers, hidden 3584, GQA 28/4, vocab 152064.
QWEN25_VL_7B_TEXT = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128000,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
# Qwen/Qwen-Image vae/config.json equals AutoencoderKLQwenImage's defaults; stated here so the key is explicit.
QWEN_IMAGE_VAE = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}

TINY_DIT = {
    **QWEN_IMAGE_DIT,
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "axes_dims_rope": [8, 12, 12],
}
TINY_TEXT = {
    **QWEN25_VL_7B_TEXT,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "bos_token_id": 1,
    "eos_token_id": 2,
}
TINY_VAE = {**QWEN_IMAGE_VAE, "base_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}


def _spec(name: str, dit: dict, te: dict, vae: dict, edit: bool, tokens: int, drop: int, desc: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="qwen-image",
        components={
            # the layers SGLang's text encoder and VAE declare as `layer_names` for layerwise offload
            "text_encoder": ComponentSpec("text_encoder", f"{_HERE}:build_text_encoder", te,
                                          layer_groups=TEXT_ENCODER_LAYERS),
            "dit": ComponentSpec("dit", f"{_HERE}:build_dit", dit, layer_groups=("transformer_blocks",),
                                 layer_count_keys=("num_layers",)),
            "vae": ComponentSpec("vae", f"{_HERE}:build_vae", vae, layer_groups=VAE_DECODER_LAYERS),
        },
        prompt_tokens=tokens,
        drop_tokens=drop,
        edit=edit,
        description=desc,
    )


# The full models share one checkpoint per component (same spec -> same key), so Qwen-Image and -Edit reuse it.
register(_spec("qwen-image", QWEN_IMAGE_DIT, QWEN25_VL_7B_TEXT, QWEN_IMAGE_VAE, False, 128, 34,
               "Qwen-Image 20.4B DiT, Qwen2.5-VL-7B text encoder, Qwen-Image VAE"))
register(_spec("qwen-image-edit", QWEN_IMAGE_DIT, QWEN25_VL_7B_TEXT, QWEN_IMAGE_VAE, True, 192, 64,
               "Qwen-Image-Edit: as qwen-image, attending to a VAE-encoded reference image"))
register(_spec("qwen-image-tiny", TINY_DIT, TINY_TEXT, TINY_VAE, False, 24, 4,
               "tiny twin of qwen-image for CPU tests"))
register(_spec("qwen-image-edit-tiny", TINY_DIT, TINY_TEXT, TINY_VAE, True, 24, 4,
               "tiny twin of qwen-image-edit for CPU tests"))
