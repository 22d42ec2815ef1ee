"""FLUX.1-dev: the 11.9 B guidance-distilled DiT, CLIP-L + T5-v1.1-XXL text encoders and the 16-channel FLUX VAE.

Config numbers are the published ones (black-forest-labs/FLUX.1-dev `transformer/config.json`,
`text_encoder/config.json` (CLIP ViT-L/14 text tower), `text_encoder_2/config.json` (T5-v1.1-XXL encoder) and
`vae/config.json`). The harness has one text-encoder role, so both encoders live in one module (`clip` and `t5`)
built by one factory: `text_encoder_cpu_offload` then moves both, as SGLang does.

The tiny twin keeps every structural choice (double + single stream blocks, guidance embedding, 3-axis RoPE with
attention_head_dim == sum(axes_dims_rope), 2x2 packing of 16 latent channels into the DiT's 64, the VAE's 8x
downsampling) and shrinks widths, depths and vocabularies. Its DiT is several times its text encoders + VAE, so
a few-MiB simulated card holds both-on but not the whole DiT (the #26925 load OOM on CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from harness.models import VAE_DECODER_LAYERS, ComponentSpec, ModelSpec, register


@functools.cache
def text_encoders_class() -> type:
    """The module that owns both FLUX text encoders (defined on first use: `harness.models` imports no torch)."""
    import torch

    class FluxTextEncoders(torch.nn.Module):
        """CLIP-L text tower (pooled output) and T5-XXL encoder (last hidden state), as FluxPipeline.encode_prompt."""

        def __init__(self, clip: torch.nn.Module, t5: torch.nn.Module) -> None:
            super().__init__()
            self.clip = clip
            self.t5 = t5

        def forward(
            self, clip_input_ids: torch.Tensor, t5_input_ids: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # FluxPipeline calls both without an attention mask (CLIP padded to 77, T5 to max_sequence_length).
            pooled = self.clip(input_ids=clip_input_ids, output_hidden_states=False).pooler_output
            hidden = self.t5(input_ids=t5_input_ids).last_hidden_state
            return pooled, hidden

    return FluxTextEncoders


def untie_t5_embedding(model: Any) -> Any:
    """Keeps one copy of a T5/UMT5 encoder's token embedding.

    `shared` and `encoder.embed_tokens` are one tied Parameter; the state dict lists it under both names, so the
    loader would place it twice (a second 0.26 GB for T5-XXL, 2.1 GB for UMT5-XXL) and component offload would
    leave the second name on meta. The encoder's forward reads only `encoder.embed_tokens`, so `shared` goes.
    """
    model.shared = None
    return model


def build_text_encoder(config: Mapping[str, Any]) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(**config["clip"]))
    t5 = untie_t5_embedding(T5EncoderModel(T5Config(**config["t5"])))
    return text_encoders_class()(clip, t5)


def build_dit(config: Mapping[str, Any]) -> Any:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**config)


def build_vae(config: Mapping[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**config)


TEXT_ENCODER_LAYERS = ("clip.encoder.layers", "t5.encoder.block")
_HERE = "harness.models.flux"

# black-forest-labs/FLUX.1-dev transformer/config.json: 19 double + 38 single blocks, 24 heads x 128 -> 11.90 B.
FLUX_DEV_DIT = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
# text_encoder/config.json: the CLIP ViT-L/14 text tower (123 M). bos/eos/pad 0/2/1 as published (the legacy eos
# id 2 makes CLIPTextModel pool at the argmax token id, i.e. the tokenizer's end-of-text 49407).
CLIP_L_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# text_encoder_2/config.json: the T5-v1.1-XXL encoder (4.76 B).
T5_XXL_ENCODER = {
    "vocab_size": 32128,
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
# vae/config.json: 16 latent channels, no quant convs, scaling 0.3611 / shift 0.1159 (83.8 M).
FLUX_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

TINY_DIT = {
    **FLUX_DEV_DIT,
    "num_layers": 4,
    "num_single_layers": 8,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [8, 12, 12],  # sums to attention_head_dim, each even
}
TINY_CLIP = {
    **CLIP_L_TEXT,
    "vocab_size": 1000,
    "hidden_size": 32,  # CLIPTextModel pools hidden_size features: the DiT's pooled_projection_dim
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 16,
    "projection_dim": 32,
}
TINY_T5 = {**T5_XXL_ENCODER, "vocab_size": 1000, "d_model": 64, "d_ff": 128, "d_kv": 16, "num_layers": 2,
           "num_heads": 4}
TINY_VAE = {**FLUX_VAE, "block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
            "sample_size": 64}


def _spec(name: str, dit: dict, clip: dict, t5: dict, vae: dict, t5_tokens: int, desc: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="flux",
        components={
            # the layers SGLang's text encoders and VAE declare as `layer_names` for layerwise offload
            "text_encoder": ComponentSpec("text_encoder", f"{_HERE}:build_text_encoder", {"clip": clip, "t5": t5},
                                          layer_groups=TEXT_ENCODER_LAYERS),
            "dit": ComponentSpec(
                "dit", f"{_HERE}:build_dit", dit, layer_groups=("transformer_blocks", "single_transformer_blocks"),
                layer_count_keys=("num_layers", "num_single_layers"),
            ),
            "vae": ComponentSpec("vae", f"{_HERE}:build_vae", vae, layer_groups=VAE_DECODER_LAYERS),
        },
        prompt_tokens=t5_tokens,  # T5 tokens (FluxPipeline's max_sequence_length: 512 for FLUX.1-dev)
        drop_tokens=0,
        vae_scale=8,
        patch=2,
        description=desc,
        # CLIP is always padded to its max_position_embeddings; FLUX.1-dev's default guidance_scale is 3.5.
        extra={"clip_tokens": clip["max_position_embeddings"], "guidance_scale": 3.5},
    )


register(_spec("flux-dev", FLUX_DEV_DIT, CLIP_L_TEXT, T5_XXL_ENCODER, FLUX_VAE, 512,
               "FLUX.1-dev 11.9B DiT (guidance-distilled), CLIP-L + T5-v1.1-XXL text encoders, FLUX VAE"))
register(_spec("flux-tiny", TINY_DIT, TINY_CLIP, TINY_T5, TINY_VAE, 24, "tiny twin of flux-dev for CPU tests"))
