"""The end-to-end pipeline a cell runs: text encode -> denoise loop -> VAE decode, each phase measured.

This follows diffusers' QwenImagePipeline / QwenImageEditPipeline step for step (prompt template tokens dropped,
2x2 latent packing, dynamic-shift flow-match schedule, true CFG as two DiT forwards per step with the norm
rescale, the edit model's reference-image latents appended to the sequence) but drives our own loaded
components, so every weight movement is the offload runtime's and every phase is measured separately.

Inputs (token ids, the reference image, the initial noise) come from one CPU generator seeded by the scenario, so
every cell of a scenario computes the same function and its final latents can be compared bit for bit.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch

from harness.measure import Meter, Timer
from harness.models import ModelSpec
from harness.offload.loader import LoadedComponent
from harness.offload.memory import Device

# Qwen/Qwen-Image scheduler/scheduler_config.json
QWEN_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}


@dataclass(frozen=True)
class RunSettings:
    """What one pipeline call computes.

    Args:
        height (int), width (int): output image size in pixels (multiples of vae_scale * patch).
        steps (int): denoise steps.
        true_cfg_scale (float): > 1 runs true CFG, two DiT forwards a step; 1 runs one forward.
        seed (int): seeds every input.
        frames (int, defaults to 1): video frames (video models only).
    """

    height: int
    width: int
    steps: int
    true_cfg_scale: float
    seed: int
    frames: int = 1

    @property
    def forwards_per_step(self) -> int:
        return 2 if self.true_cfg_scale > 1 else 1


def _shift_mu(seq_len: int, cfg: dict[str, Any]) -> float:
    # Linear in the image sequence length between (base_len, base_shift) and (max_len, max_shift).
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return seq_len * m + cfg["base_shift"] - m * cfg["base_image_seq_len"]


def _pack(latents: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, 1, H, W) latents -> (B, H/p * W/p, C*p*p) tokens, as QwenImagePipeline._pack_latents."""
    b, c, _, h, w = latents.shape
    x = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def _unpack(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // (p * p)
    x = tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, 1, h, w)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


def _stats(t: torch.Tensor) -> dict[str, Any]:
    f = t.detach().float()
    finite = bool(torch.isfinite(f).all())
    return {
        "shape": list(f.shape),
        "mean": float(f.mean()) if finite else None,
        "std": float(f.std()) if finite else None,
        "absmax": float(f.abs().max()) if finite else None,
        "finite": finite,
    }


def run_qwen_image(
    model: ModelSpec,
    comps: dict[str, LoadedComponent],
    settings: RunSettings,
    device: Device,
    meter: Meter,
    progress: Any = None,
) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    dev, dtype = device.torch, torch.bfloat16
    te, dit, vae = comps["text_encoder"], comps["dit"], comps["vae"]
    scale, p = model.vae_scale, model.patch
    lat_h, lat_w = settings.height // scale, settings.width // scale
    if lat_h % p or lat_w % p:
        raise ValueError(f"height/width must be multiples of {scale * p}, got {settings.height}x{settings.width}")
    gen = torch.Generator("cpu").manual_seed(settings.seed)
    vocab = int(te.module.config.vocab_size)
    pos_ids = torch.randint(0, vocab, (1, model.prompt_tokens), generator=gen)
    neg_ids = torch.randint(0, vocab, (1, model.prompt_tokens), generator=gen)
    z_dim = int(vae.module.config.z_dim)
    noise = torch.randn(1, z_dim, 1, lat_h, lat_w, generator=gen)
    ref_image = torch.rand(1, 3, 1, settings.height, settings.width, generator=gen) * 2 - 1 if model.edit else None
    lat_mean = torch.tensor(vae.module.config.latents_mean).view(1, z_dim, 1, 1, 1)
    lat_std = torch.tensor(vae.module.config.latents_std).view(1, z_dim, 1, 1, 1)

    with meter.phase("encode"), torch.inference_mode():
        te.before_use()
        embeds = []
        for ids in (pos_ids, neg_ids)[: settings.forwards_per_step]:
            out = te.module(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev))
            embeds.append(out.last_hidden_state[:, model.drop_tokens :].to(dtype))
        te.after_use()
        cond_tokens = None
        if ref_image is not None:
            vae.before_use()
            z = vae.module.encode(ref_image.to(dev, dtype)).latent_dist.mode()
            z = (z - lat_mean.to(dev, z.dtype)) / lat_std.to(dev, z.dtype)
            cond_tokens = _pack(z.to(dtype), p)
            vae.after_use()

    with meter.phase("denoise") as rec, torch.inference_mode():
        dit.before_use()
        scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
        latents = _pack(noise, p).to(dev, dtype)
        seq = latents.shape[1]
        sigmas = [1.0 - i * (1.0 - 1.0 / settings.steps) / max(settings.steps - 1, 1) for i in range(settings.steps)]
        scheduler.set_timesteps(sigmas=sigmas, device=dev, mu=_shift_mu(seq, QWEN_SCHEDULER))
        shapes = [(1, lat_h // p, lat_w // p)]
        if cond_tokens is not None:
            shapes.append((1, lat_h // p, lat_w // p))
        img_shapes = [shapes]
        timer = Timer(device)
        timer.mark()
        for i, t in enumerate(scheduler.timesteps):
            x = latents if cond_tokens is None else torch.cat([latents, cond_tokens], dim=1)
            timestep = t.expand(1).to(dtype) / 1000
            preds = []
            for emb in embeds:
                out = dit.module(
                    hidden_states=x,
                    timestep=timestep,
                    encoder_hidden_states=emb,
                    encoder_hidden_states_mask=None,  # all tokens valid: diffusers skips the mask then too
                    img_shapes=img_shapes,
                    return_dict=False,
                )[0]
                preds.append(out[:, :seq])
            if len(preds) == 2:
                cond, uncond = preds
                comb = uncond + settings.true_cfg_scale * (cond - uncond)
                noise_pred = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            else:
                noise_pred = preds[0]
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            timer.mark()
            if progress:
                progress(f"denoise step {i + 1}/{settings.steps}")
        dit.after_use()
        rec["step_ms"] = timer.intervals_ms()
        rec["forwards"] = settings.steps * settings.forwards_per_step

    with meter.phase("decode"), torch.inference_mode():
        vae.before_use()
        z = _unpack(latents, lat_h, lat_w, p).to(dtype)
        z = z * lat_std.to(dev, dtype) + lat_mean.to(dev, dtype)
        image = vae.module.decode(z, return_dict=False)[0][:, :, 0]
        image = image.clamp(-1, 1)
        vae.after_use()

    return {
        "latents_sha256": _digest(latents),
        "latents_stats": _stats(latents),
        "image_stats": _stats(image),
        "image_seq_len": seq,
        "cond_seq_len": 0 if cond_tokens is None else int(cond_tokens.shape[1]),
        "text_seq_len": int(embeds[0].shape[1]),
        "final_latents": latents.detach().float().cpu(),
    }


FAMILIES = {"qwen-image": run_qwen_image}


def run_pipeline(model: ModelSpec, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        runner = FAMILIES[model.family]
    except KeyError:
        raise ValueError(f"model {model.name!r}: no pipeline for family {model.family!r}") from None
    return runner(model, *args, **kwargs)


def isclose_latents(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Relative L2 closeness: ||a - b|| <= rtol * ||b||, used where the math differs (none of our runtimes)."""
    return float(torch.linalg.vector_norm(a - b)) <= rtol * max(float(torch.linalg.vector_norm(b)), math.ulp(1.0))
