"""Wan2.1-T2V-14B: the 14.3 B video DiT, the UMT5-XXL text encoder and the Wan 2.1 causal 3D VAE.

Config numbers are the published ones (Wan-AI/Wan2.1-T2V-14B-Diffusers `transformer/config.json`,
`text_encoder/config.json` (the UMT5-XXL encoder) and `vae/config.json`, which equals AutoencoderKLWan's
defaults, latents_mean/std included).

Two deliberate details:
- the RoPE tables of WanRotaryPosEmbed stay float32, as in a diffusers load (`_keep_in_fp32_modules` names
  "rope", and from_pretrained never casts its non-persistent buffers); `ComponentSpec.build_on_meta` casts every
  buffer to the weight dtype, so the factory turns the two tables into plain attributes, which the loader still
  moves to the device (`loader._place_buffers`). The other fp32-kept modules (time_embedder, scale_shift_table,
  norm1-3: about 0.2 % of the bytes) are bf16 here, as every weight of a ComponentSpec has one dtype.
- UMT5's tied token embedding is kept once (see `harness.models.flux.untie_t5_embedding`).

The tiny twin keeps every structural choice (3D patching (1, 2, 2), RoPE split of the head dim over t/h/w,
cross-attention norm, rms_norm_across_heads, the VAE's 4x temporal / 8x spatial compression with z_dim 16) and
shrinks widths, depths and the vocabulary. Its DiT is several times its text encoder + VAE (see flux.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.models import VAE_DECODER_LAYERS, ComponentSpec, ModelSpec, register
from harness.models.flux import untie_t5_embedding


def build_dit(config: Mapping[str, Any]) -> Any:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**config)
    rope = model.rope
    for name in ("freqs_cos", "freqs_sin"):
        table = rope._buffers.pop(name)
        setattr(rope, name, table)  # a plain attribute now: module.to(dtype) leaves it float32
    return model


def build_text_encoder(config: Mapping[str, Any]) -> Any:
    from transformers import UMT5Config, UMT5EncoderModel

    return untie_t5_embedding(UMT5EncoderModel(UMT5Config(**config)))


def build_vae(config: Mapping[str, Any]) -> Any:
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(**config)


TEXT_ENCODER_LAYERS = ("encoder.block",)
_HERE = "harness.models.wan"

# Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json: 40 blocks, 40 heads x 128, ffn 13824 -> 14.29 B params.
WAN21_T2V_14B_DIT = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}
# text_encoder/config.json: the UMT5-XXL encoder (5.68 B; its 256384 x 4096 embedding alone is 1.05 B).
UMT5_XXL_ENCODER = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}
# vae/config.json equals AutoencoderKLWan's defaults (latents_mean / latents_std included); stated for the key.
WAN21_VAE = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
}

TINY_DIT = {
    **WAN21_T2V_14B_DIT,
    "num_attention_heads": 4,
    "attention_head_dim": 32,  # RoPE: h = w = 2 * (32 // 6) = 10, t = 12, all even
    "text_dim": 64,
    "ffn_dim": 512,
    "num_layers": 12,
}
TINY_TEXT = {**UMT5_XXL_ENCODER, "vocab_size": 1000, "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2,
             "num_heads": 4}
TINY_VAE = {**WAN21_VAE, "base_dim": 16, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}


def _spec(name: str, dit: dict, te: dict, vae: dict, tokens: int, desc: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="wan",
        components={
            # the layers SGLang's text encoder and VAE declare as `layer_names` for layerwise offload
            "text_encoder": ComponentSpec("text_encoder", f"{_HERE}:build_text_encoder", te,
                                          layer_groups=TEXT_ENCODER_LAYERS),
            "dit": ComponentSpec("dit", f"{_HERE}:build_dit", dit, layer_groups=("blocks",),
                                 layer_count_keys=("num_layers",)),
            "vae": ComponentSpec("vae", f"{_HERE}:build_vae", vae, layer_groups=VAE_DECODER_LAYERS),
        },
        prompt_tokens=tokens,  # WanPipeline's max_sequence_length: 512
        drop_tokens=0,
        vae_scale=8,
        patch=2,  # spatial; the DiT's temporal patch is 1
        description=desc,
    )


register(_spec("wan2.1-t2v-14b", WAN21_T2V_14B_DIT, UMT5_XXL_ENCODER, WAN21_VAE, 512,
               "Wan2.1-T2V-14B 14.3B video DiT, UMT5-XXL text encoder, Wan 2.1 VAE"))
register(_spec("wan-tiny", TINY_DIT, TINY_TEXT, TINY_VAE, 16, "tiny twin of wan2.1-t2v-14b for CPU tests"))
