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
from harness.offload import timeline as copy_timeline
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
        cfg_batch (bool, defaults to False): true CFG's two passes as one forward of batch 2 (Qwen-Image, Wan), so
            each streamed layer crosses to the device once a step instead of twice.
    """

    height: int
    width: int
    steps: int
    true_cfg_scale: float
    seed: int
    frames: int = 1
    cfg_batch: bool = False

    @property
    def forwards_per_step(self) -> int:
        """Prompts a step conditions on (two with true CFG), whether or not they share one DiT call."""
        return 2 if self.true_cfg_scale > 1 else 1

    @property
    def dit_calls_per_step(self) -> int:
        return 1 if self.cfg_batch and self.forwards_per_step == 2 else self.forwards_per_step


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


def _outputs(latents: torch.Tensor, image: torch.Tensor, *, seq_len: int, cond_seq_len: int, text_seq_len: int,
             **extra: Any) -> dict[str, Any]:
    """What every family's run returns: the final latents' digest (bitwise equivalence across cells), stats of
    latents and image, sequence lengths, and the latents themselves (saved by the worker, not recorded)."""
    return {
        "latents_sha256": _digest(latents),
        "latents_stats": _stats(latents),
        "image_stats": _stats(image),
        "image_seq_len": seq_len,
        "cond_seq_len": cond_seq_len,
        "text_seq_len": text_seq_len,
        "final_latents": latents.detach().float().cpu(),
        **extra,
    }


def _denoise_loop(
    rec: dict[str, Any],
    meter: Meter,
    dit: LoadedComponent,
    scheduler: Any,
    latents: torch.Tensor,
    settings: RunSettings,
    device: Device,
    forward: Any,
    combine: Any,
    progress: Any,
) -> torch.Tensor:
    """The loop every family shares: per step, `forward(t, latents)` runs the DiT once per prompt (true CFG: cond
    then uncond), `combine(preds)` turns the predictions into one, the scheduler steps. Each step is timed (CUDA
    events on the device), and the DiT is handed back (component offload, layerwise release) at the end.

    With the meter's `step_probe`, each step mark also reads the machine (clocks, temperature, power, throttle
    reasons: `step_machine`); with a copy recorder on our layerwise runtime, the copies are cut at the step marks
    (`copy_timeline`, harness.offload.timeline)."""
    timer = Timer(device, probe=meter.step_probe)
    recorder = dit.layerwise.copy_recorder if dit.layerwise is not None else None
    if recorder is not None:
        recorder.clear()
    timer.mark()
    for i, t in enumerate(scheduler.timesteps):
        preds = forward(t, latents)
        noise_pred = combine(preds) if len(preds) == 2 else preds[0]
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        timer.mark()
        if progress:
            progress(f"denoise step {i + 1}/{settings.steps}")
    dit.after_use()
    rec["step_ms"] = timer.intervals_ms()
    rec["forwards"] = settings.steps * settings.dit_calls_per_step  # DiT calls: each streams every layer once
    rec["forward_batch"] = settings.forwards_per_step // settings.dit_calls_per_step
    if timer.readings:
        rec["step_machine"] = step_machine(timer.readings)
    if recorder is not None:
        steps = copy_timeline.per_step(recorder.spans(timer.marks[0]), timer.offsets_ms(), meter.link_gbps)
        rec["copy_timeline"] = {"steps": steps, **copy_timeline.summary(steps)}
    return latents


def step_machine(readings: list[tuple[dict[str, Any], dict[str, str]]]) -> dict[str, Any]:
    """The machine readings of one denoise loop: the one before step 1, one at the end of each step, and why any
    field is null (the union of the readings' reasons)."""
    unavailable: dict[str, str] = {}
    for _, missing in readings:
        unavailable.update(missing)
    return {"at_start": readings[0][0], "steps": [values for values, _ in readings[1:]], "unavailable": unavailable}


def batch_text(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The prompts' hidden states (1, L_i, D) as one batch (n, max L, D): shorter ones zero-padded at the end, as
    WanPipeline pads every prompt, with a mask of the real tokens (1) for models that take one; the mask is None
    when every prompt has the same length (nothing padded: the models then skip masking, as for one prompt)."""
    longest = max(e.shape[1] for e in embeds)
    padded = [torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])) for e in embeds]
    if all(e.shape[1] == longest for e in embeds):
        return torch.cat(padded), None
    mask = torch.zeros(len(embeds), longest, dtype=torch.long, device=embeds[0].device)
    for i, e in enumerate(embeds):
        mask[i, : e.shape[1]] = 1
    return torch.cat(padded), mask


def _plain_cfg(scale: float) -> Any:
    def combine(preds: list[torch.Tensor]) -> torch.Tensor:
        cond, uncond = preds
        return uncond + scale * (cond - uncond)

    return combine


def _latent_size(model: ModelSpec, settings: RunSettings) -> tuple[int, int]:
    """Latent height and width; the image must split into whole VAE cells and whole DiT patches."""
    scale, p = model.vae_scale, model.patch
    lat_h, lat_w = settings.height // scale, settings.width // scale
    if lat_h % p or lat_w % p:
        raise ValueError(f"height/width must be multiples of {scale * p}, got {settings.height}x{settings.width}")
    return lat_h, lat_w


def _token_prompts(te: LoadedComponent, model: ModelSpec, gen: torch.Generator) -> list[torch.Tensor]:
    """Seeded positive and negative prompt ids for a single-tokenizer text encoder (drawn in that order)."""
    vocab = int(te.module.config.vocab_size)
    return [torch.randint(0, vocab, (1, model.prompt_tokens), generator=gen) for _ in range(2)]


def _encode_token_prompts(
    te: LoadedComponent, prompts: list[torch.Tensor], model: ModelSpec, settings: RunSettings,
    dev: torch.device, dtype: torch.dtype,
) -> list[torch.Tensor]:
    """The text encoder's last hidden states, template tokens dropped, for the prompts a step uses (the negative
    only with true CFG); the encoder is on the device only meanwhile."""
    te.before_use()
    embeds = []
    for ids in prompts[: settings.forwards_per_step]:
        out = te.module(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev))
        embeds.append(out.last_hidden_state[:, model.drop_tokens :].to(dtype))
    te.after_use()
    return embeds


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
    p = model.patch
    lat_h, lat_w = _latent_size(model, settings)
    gen = torch.Generator("cpu").manual_seed(settings.seed)
    prompts = _token_prompts(te, model, gen)
    z_dim = int(vae.module.config.z_dim)
    noise = torch.randn(1, z_dim, 1, lat_h, lat_w, generator=gen)
    ref_image = torch.rand(1, 3, 1, settings.height, settings.width, generator=gen) * 2 - 1 if model.edit else None
    lat_mean = torch.tensor(vae.module.config.latents_mean).view(1, z_dim, 1, 1, 1)
    lat_std = torch.tensor(vae.module.config.latents_std).view(1, z_dim, 1, 1, 1)

    with meter.phase("encode"), torch.inference_mode():
        embeds = _encode_token_prompts(te, prompts, model, settings, dev, dtype)
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

        batched_text, batched_mask = batch_text(embeds) if settings.dit_calls_per_step == 1 < len(embeds) \
            else (None, None)

        def forward(t: torch.Tensor, latents: torch.Tensor) -> list[torch.Tensor]:
            x = latents if cond_tokens is None else torch.cat([latents, cond_tokens], dim=1)
            timestep = t.expand(1).to(dtype) / 1000
            if batched_text is not None:  # cfg_batch: cond and uncond in one call, split after
                n = batched_text.shape[0]
                out = dit.module(
                    hidden_states=x.expand(n, -1, -1),
                    timestep=timestep.expand(n),
                    encoder_hidden_states=batched_text,
                    encoder_hidden_states_mask=batched_mask,
                    img_shapes=img_shapes * n,
                    return_dict=False,
                )[0][:, :seq]
                return list(out.chunk(n))
            return [
                dit.module(
                    hidden_states=x,
                    timestep=timestep,
                    encoder_hidden_states=emb,
                    encoder_hidden_states_mask=None,  # all tokens valid: diffusers skips the mask then too
                    img_shapes=img_shapes,
                    return_dict=False,
                )[0][:, :seq]
                for emb in embeds
            ]

        def combine(preds: list[torch.Tensor]) -> torch.Tensor:
            # true CFG with QwenImagePipeline's norm rescale
            cond, uncond = preds
            comb = uncond + settings.true_cfg_scale * (cond - uncond)
            return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

        latents = _denoise_loop(rec, meter, dit, scheduler, latents, settings, device, forward, combine, progress)

    with meter.phase("decode"), torch.inference_mode():
        vae.before_use()
        z = _unpack(latents, lat_h, lat_w, p).to(dtype)
        z = z * lat_std.to(dev, dtype) + lat_mean.to(dev, dtype)
        image = vae.module.decode(z, return_dict=False)[0][:, :, 0]
        image = image.clamp(-1, 1)
        vae.after_use()

    cond_len = 0 if cond_tokens is None else int(cond_tokens.shape[1])
    return _outputs(latents, image, seq_len=seq, cond_seq_len=cond_len, text_seq_len=int(embeds[0].shape[1]))


# black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json
FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def run_flux(
    model: ModelSpec,
    comps: dict[str, LoadedComponent],
    settings: RunSettings,
    device: Device,
    meter: Meter,
    progress: Any = None,
) -> dict[str, Any]:
    """FLUX.1-dev as diffusers' FluxPipeline: CLIP pooled + T5 hidden states, 2x2 packing, the guidance embedding,
    one DiT forward a step (guidance-distilled; true CFG only when true_cfg_scale > 1), dynamic-shift flow match."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    dev, dtype = device.torch, torch.bfloat16
    te, dit, vae = comps["text_encoder"], comps["dit"], comps["vae"]
    p = model.patch
    lat_h, lat_w = _latent_size(model, settings)
    gen = torch.Generator("cpu").manual_seed(settings.seed)
    clip_vocab, t5_vocab = int(te.module.clip.config.vocab_size), int(te.module.t5.config.vocab_size)
    clip_tokens = int(model.extra["clip_tokens"])

    def prompt() -> tuple[torch.Tensor, torch.Tensor]:
        # CLIP ids as its tokenizer lays out a prompt that fills the 77 slots: start-of-text (vocab - 2), words,
        # end-of-text (vocab - 1), which CLIPTextModel pools; T5 ids fill max_sequence_length.
        words = torch.randint(0, clip_vocab - 2, (1, clip_tokens - 2), generator=gen)
        clip_ids = torch.cat([torch.tensor([[clip_vocab - 2]]), words, torch.tensor([[clip_vocab - 1]])], dim=1)
        t5_ids = torch.randint(0, t5_vocab, (1, model.prompt_tokens), generator=gen)
        return clip_ids, t5_ids

    prompts = [prompt(), prompt()]  # positive, negative (the negative is used only with true CFG)
    channels = int(vae.module.config.latent_channels)
    noise = torch.randn(1, channels, 1, lat_h, lat_w, generator=gen)
    vae_scaling, vae_shift = float(vae.module.config.scaling_factor), float(vae.module.config.shift_factor)

    with meter.phase("encode"), torch.inference_mode():
        te.before_use()
        conds = []
        for clip_ids, t5_ids in prompts[: settings.forwards_per_step]:
            pooled, hidden = te.module(clip_ids.to(dev), t5_ids.to(dev))
            conds.append((pooled.to(dtype), hidden.to(dtype)))
        te.after_use()

    with meter.phase("denoise") as rec, torch.inference_mode():
        dit.before_use()
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        latents = _pack(noise, p).to(dev, dtype)
        seq = latents.shape[1]
        text_len = conds[0][1].shape[1]
        txt_ids = torch.zeros(text_len, 3).to(dev, dtype)
        img_ids = torch.zeros(lat_h // p, lat_w // p, 3)
        img_ids[..., 1] += torch.arange(lat_h // p)[:, None]
        img_ids[..., 2] += torch.arange(lat_w // p)[None, :]
        img_ids = img_ids.reshape(-1, 3).to(dev, dtype)
        guidance = None
        if dit.module.config.guidance_embeds:
            guidance = torch.full([1], float(model.extra.get("guidance_scale", 3.5)), device=dev, dtype=torch.float32)
        sigmas = np.linspace(1.0, 1 / settings.steps, settings.steps)
        scheduler.set_timesteps(sigmas=sigmas, device=dev, mu=_shift_mu(seq, FLUX_SCHEDULER))
        scheduler.set_begin_index(0)

        def forward(t: torch.Tensor, latents: torch.Tensor) -> list[torch.Tensor]:
            timestep = t.expand(1).to(dtype)
            return [
                dit.module(
                    hidden_states=latents,
                    timestep=timestep / 1000,
                    guidance=guidance,
                    pooled_projections=pooled,
                    encoder_hidden_states=hidden,
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )[0]
                for pooled, hidden in conds
            ]

        combine = _plain_cfg(settings.true_cfg_scale)
        latents = _denoise_loop(rec, meter, dit, scheduler, latents, settings, device, forward, combine, progress)

    with meter.phase("decode"), torch.inference_mode():
        vae.before_use()
        z = _unpack(latents, lat_h, lat_w, p)[:, :, 0]
        z = z / vae_scaling + vae_shift
        image = vae.module.decode(z.to(dtype), return_dict=False)[0]
        image = image.clamp(-1, 1)
        vae.after_use()

    return _outputs(latents, image, seq_len=seq, cond_seq_len=0, text_seq_len=int(text_len))


# Wan-AI/Wan2.1-T2V-14B-Diffusers scheduler/scheduler_config.json (UniPC, flow prediction, flow_shift 3.0 for 480p)
WAN_SCHEDULER = {
    "num_train_timesteps": 1000,
    "solver_order": 2,
    "prediction_type": "flow_prediction",
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "timestep_spacing": "linspace",
    "final_sigmas_type": "zero",
}


def run_wan(
    model: ModelSpec,
    comps: dict[str, LoadedComponent],
    settings: RunSettings,
    device: Device,
    meter: Meter,
    progress: Any = None,
) -> dict[str, Any]:
    """Wan2.1 text-to-video as diffusers' WanPipeline: UMT5 hidden states, float32 latents of
    (1, z, (frames - 1) // 4 + 1, H/8, W/8), true CFG as two DiT forwards a step (no norm rescale), UniPC with
    flow sigmas, decode with latents / (1 / std) + mean."""
    from diffusers import UniPCMultistepScheduler

    dev, dtype = device.torch, torch.bfloat16
    te, dit, vae = comps["text_encoder"], comps["dit"], comps["vae"]
    p = model.patch
    lat_h, lat_w = _latent_size(model, settings)
    vcfg = vae.module.config
    temporal = int(getattr(vcfg, "scale_factor_temporal", None) or 2 ** sum(vcfg.temperal_downsample))
    if settings.frames < 1 or (settings.frames - 1) % temporal:
        raise ValueError(f"frames must be 1 + a multiple of {temporal}, got {settings.frames}")
    lat_f = (settings.frames - 1) // temporal + 1
    gen = torch.Generator("cpu").manual_seed(settings.seed)
    prompts = _token_prompts(te, model, gen)
    z_dim = int(vcfg.z_dim)
    noise = torch.randn(1, z_dim, lat_f, lat_h, lat_w, generator=gen)

    with meter.phase("encode"), torch.inference_mode():
        embeds = _encode_token_prompts(te, prompts, model, settings, dev, dtype)

    with meter.phase("denoise") as rec, torch.inference_mode():
        dit.before_use()
        scheduler = UniPCMultistepScheduler(**WAN_SCHEDULER)
        scheduler.set_timesteps(settings.steps, device=dev)
        scheduler.set_begin_index(0)
        latents = noise.to(dev)  # float32, as WanPipeline keeps them; the DiT sees a bf16 copy
        seq = lat_f * (lat_h // p) * (lat_w // p)

        batched_text = batch_text(embeds)[0] if settings.dit_calls_per_step == 1 < len(embeds) else None

        def forward(t: torch.Tensor, latents: torch.Tensor) -> list[torch.Tensor]:
            x, timestep = latents.to(dtype), t.expand(1)
            if batched_text is not None:  # cfg_batch: cond and uncond in one call (Wan takes no text mask)
                n = batched_text.shape[0]
                out = dit.module(hidden_states=x.expand(n, *x.shape[1:]), timestep=timestep.expand(n),
                                 encoder_hidden_states=batched_text, return_dict=False)[0]
                return list(out.chunk(n))
            return [
                dit.module(hidden_states=x, timestep=timestep, encoder_hidden_states=emb, return_dict=False)[0]
                for emb in embeds
            ]

        combine = _plain_cfg(settings.true_cfg_scale)
        latents = _denoise_loop(rec, meter, dit, scheduler, latents, settings, device, forward, combine, progress)

    with meter.phase("decode"), torch.inference_mode():
        vae.before_use()
        z = latents.to(dev, dtype)
        lat_mean = torch.tensor(vcfg.latents_mean).view(1, z_dim, 1, 1, 1).to(dev, dtype)
        lat_inv_std = 1.0 / torch.tensor(vcfg.latents_std).view(1, z_dim, 1, 1, 1).to(dev, dtype)
        z = z / lat_inv_std + lat_mean
        video = vae.module.decode(z, return_dict=False)[0]
        video = video.clamp(-1, 1)
        vae.after_use()

    return _outputs(
        latents, video, seq_len=seq, cond_seq_len=0, text_seq_len=int(embeds[0].shape[1]), latent_frames=lat_f
    )


FAMILIES = {"qwen-image": run_qwen_image, "flux": run_flux, "wan": run_wan}


def run_pipeline(model: ModelSpec, *args: Any, **kwargs: Any) -> dict[str, Any]:
    try:
        runner = FAMILIES[model.family]
    except KeyError:
        raise ValueError(f"model {model.name!r}: no pipeline for family {model.family!r}") from None
    return runner(model, *args, **kwargs)


def isclose_latents(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    """Relative L2 closeness: ||a - b|| <= rtol * ||b||, used where the math differs (none of our runtimes)."""
    return float(torch.linalg.vector_norm(a - b)) <= rtol * max(float(torch.linalg.vector_norm(b)), math.ulp(1.0))
