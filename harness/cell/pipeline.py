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
from typing import Any

import torch

from harness.cell.measure import Meter, Timer
from harness.cell.offload import timeline as copy_timeline
from harness.cell.offload.layerwise import LayerwiseRuntime
from harness.cell.offload.loader import LoadedComponent
from harness.cell.offload.memory import Device
from harness.common.contract import RunSettings
from harness.models import ModelSpec

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


class Family:
    """What one model family's pipeline does differently; `run_pipeline` drives every family the same way.

    The constructor draws every seeded input (token ids, reference image, noise) from one CPU generator, in a fixed
    order, before any phase starts. Then, per phase: `encode_prompts` (the text encoder is on the device only
    meanwhile) and `encode_conditions` (anything else, e.g. the edit model's reference image through the VAE);
    `schedule` (the scheduler and the initial latents, with the DiT on the device), then per step `forward` (one
    DiT forward per prompt) and `combine` (true CFG); `decode` (the VAE on the device meanwhile); `outputs`.
    """

    def __init__(self, model: ModelSpec, comps: dict[str, LoadedComponent], settings: RunSettings,
                 device: Device) -> None:
        self.model, self.settings = model, settings
        self.te, self.dit, self.vae = comps["text_encoder"], comps["dit"], comps["vae"]
        # The DiT's inputs (latents, timesteps, text states) in its stored dtype and the VAE's in its own, as
        # diffusers' pipelines cast to transformer.dtype / vae.dtype: bfloat16 for the zoo, as stored for a folder.
        self.dev = device.torch
        self.dtype = getattr(torch, model.components["dit"].dtype)
        self.vae_dtype = getattr(torch, model.components["vae"].dtype)
        self.lat_h, self.lat_w = _latent_size(model, settings)
        self.gen = torch.Generator("cpu").manual_seed(settings.seed)

    def encode_prompts(self) -> None:
        raise NotImplementedError

    def encode_conditions(self) -> None:
        """Conditions other than the prompts (none by default)."""

    def schedule(self) -> tuple[Any, torch.Tensor]:
        raise NotImplementedError

    def forward(self, t: torch.Tensor, latents: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def combine(self, preds: list[torch.Tensor]) -> torch.Tensor:
        """Plain true CFG (cond, then uncond)."""
        cond, uncond = preds
        return uncond + self.settings.true_cfg_scale * (cond - uncond)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def outputs(self, latents: torch.Tensor, image: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError


def run_pipeline(
    model: ModelSpec,
    comps: dict[str, LoadedComponent],
    settings: RunSettings,
    device: Device,
    meter: Meter,
    progress: Any = None,
) -> dict[str, Any]:
    """One pipeline call, each phase measured: encode -> denoise (true CFG) -> decode."""
    try:
        family = FAMILIES[model.family](model, comps, settings, device)
    except KeyError:
        raise ValueError(f"model {model.name!r}: no pipeline for family {model.family!r}") from None
    with meter.phase("encode"), torch.inference_mode():
        family.te.before_use()
        family.encode_prompts()
        family.te.after_use()
        family.encode_conditions()
    with meter.phase("denoise") as rec, torch.inference_mode():
        family.dit.before_use()
        scheduler, latents = family.schedule()
        latents = _denoise_loop(rec, meter, family, scheduler, latents, device, progress)
    with meter.phase("decode"), torch.inference_mode():
        family.vae.before_use()
        image = family.decode(latents).clamp(-1, 1)
        family.vae.after_use()
    return family.outputs(latents, image)


def _denoise_loop(
    rec: dict[str, Any], meter: Meter, family: Family, scheduler: Any, latents: torch.Tensor, device: Device,
    progress: Any,
) -> torch.Tensor:
    """Per step, `forward(t, latents)` runs the DiT once per prompt (true CFG: cond then uncond), `combine(preds)`
    turns the predictions into one, the scheduler steps. Each step is timed (CUDA events on the device), and the
    DiT is handed back (component offload, layerwise release) at the end.

    With the meter's `step_probe`, each step mark also reads the machine (clocks, temperature, power, throttle
    reasons: `step_machine`); with a copy recorder on our layerwise runtime, the copies are cut at the step marks
    (`copy_timeline`, harness.cell.offload.timeline)."""
    settings = family.settings
    timer = Timer(device, probe=meter.step_probe)
    runtime = family.dit.runtime
    recorder = runtime.copy_recorder if isinstance(runtime, LayerwiseRuntime) else None
    if recorder is not None:
        recorder.clear()
    timer.mark()
    for i, t in enumerate(scheduler.timesteps):
        preds = family.forward(t, latents)
        noise_pred = family.combine(preds) if len(preds) == 2 else preds[0]
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        timer.mark()
        if progress:
            progress(f"denoise step {i + 1}/{settings.steps}")
    family.dit.after_use()
    rec["step_ms"] = timer.intervals_ms()
    rec["forwards"] = settings.steps * settings.dit_calls_per_step  # DiT calls: each streams every layer once
    rec["forward_batch"] = settings.cfg_passes_per_step // settings.dit_calls_per_step
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


def _latent_size(model: ModelSpec, settings: RunSettings) -> tuple[int, int]:
    """Latent height and width; the image must split into whole VAE cells and whole DiT patches."""
    scale, p = model.vae_scale, model.patch
    lat_h, lat_w = settings.height // scale, settings.width // scale
    if lat_h % p or lat_w % p:
        raise ValueError(f"height/width must be multiples of {scale * p}, got {settings.height}x{settings.width}")
    return lat_h, lat_w


class _TokenPrompts(Family):
    """A single-tokenizer text encoder: seeded positive and negative prompt ids (drawn in that order), encoded to
    the last hidden states with the template tokens dropped (the negative only with true CFG)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        vocab = int(self.te.module.config.vocab_size)
        self.prompts = [torch.randint(0, vocab, (1, self.model.prompt_tokens), generator=self.gen) for _ in range(2)]
        self.embeds: list[torch.Tensor] = []

    def encode_prompts(self) -> None:
        for ids in self.prompts[: self.settings.cfg_passes_per_step]:
            out = self.te.module(input_ids=ids.to(self.dev), attention_mask=torch.ones_like(ids).to(self.dev))
            self.embeds.append(out.last_hidden_state[:, self.model.drop_tokens :].to(self.dtype))

    def batched_text(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Under cfg_batch, cond and uncond text as one batch (and its mask); (None, None) otherwise."""
        if self.settings.dit_calls_per_step == 1 < len(self.embeds):
            return batch_text(self.embeds)
        return None, None


class QwenImage(_TokenPrompts):
    """Qwen-Image (and -Edit) as diffusers' QwenImagePipeline: 2x2 packing, the edit model's reference latents
    appended to the sequence, true CFG with the norm rescale, dynamic-shift flow match."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        s, vcfg = self.settings, self.vae.module.config
        self.z_dim = int(vcfg.z_dim)
        self.noise = torch.randn(1, self.z_dim, 1, self.lat_h, self.lat_w, generator=self.gen)
        self.ref_image = (torch.rand(1, 3, 1, s.height, s.width, generator=self.gen) * 2 - 1
                          if self.model.edit else None)
        self.lat_mean = torch.tensor(vcfg.latents_mean).view(1, self.z_dim, 1, 1, 1)
        self.lat_std = torch.tensor(vcfg.latents_std).view(1, self.z_dim, 1, 1, 1)
        self.cond_tokens: torch.Tensor | None = None

    def encode_conditions(self) -> None:
        if self.ref_image is None:
            return
        self.vae.before_use()
        z = self.vae.module.encode(self.ref_image.to(self.dev, self.vae_dtype)).latent_dist.mode()
        z = (z - self.lat_mean.to(self.dev, z.dtype)) / self.lat_std.to(self.dev, z.dtype)
        self.cond_tokens = _pack(z.to(self.dtype), self.model.patch)
        self.vae.after_use()

    def schedule(self) -> tuple[Any, torch.Tensor]:
        from diffusers import FlowMatchEulerDiscreteScheduler

        steps, p = self.settings.steps, self.model.patch
        scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)
        latents = _pack(self.noise, p).to(self.dev, self.dtype)
        self.seq = latents.shape[1]
        sigmas = [1.0 - i * (1.0 - 1.0 / steps) / max(steps - 1, 1) for i in range(steps)]
        scheduler.set_timesteps(sigmas=sigmas, device=self.dev, mu=_shift_mu(self.seq, QWEN_SCHEDULER))
        shapes = [(1, self.lat_h // p, self.lat_w // p)]
        if self.cond_tokens is not None:
            shapes.append((1, self.lat_h // p, self.lat_w // p))
        self.img_shapes = [shapes]
        self.batched, self.batched_mask = self.batched_text()
        return scheduler, latents

    def forward(self, t: torch.Tensor, latents: torch.Tensor) -> list[torch.Tensor]:
        x = latents if self.cond_tokens is None else torch.cat([latents, self.cond_tokens], dim=1)
        timestep = t.expand(1).to(self.dtype) / 1000
        if self.batched is not None:  # cfg_batch: cond and uncond in one call, split after
            n = self.batched.shape[0]
            out = self.dit.module(
                hidden_states=x.expand(n, -1, -1),
                timestep=timestep.expand(n),
                encoder_hidden_states=self.batched,
                encoder_hidden_states_mask=self.batched_mask,
                img_shapes=self.img_shapes * n,
                return_dict=False,
            )[0][:, : self.seq]
            return list(out.chunk(n))
        return [
            self.dit.module(
                hidden_states=x,
                timestep=timestep,
                encoder_hidden_states=emb,
                encoder_hidden_states_mask=None,  # all tokens valid: diffusers skips the mask then too
                img_shapes=self.img_shapes,
                return_dict=False,
            )[0][:, : self.seq]
            for emb in self.embeds
        ]

    def combine(self, preds: list[torch.Tensor]) -> torch.Tensor:
        # true CFG with QwenImagePipeline's norm rescale
        cond, _ = preds
        comb = super().combine(preds)
        return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = _unpack(latents, self.lat_h, self.lat_w, self.model.patch).to(self.vae_dtype)
        z = z * self.lat_std.to(self.dev, self.vae_dtype) + self.lat_mean.to(self.dev, self.vae_dtype)
        return self.vae.module.decode(z, return_dict=False)[0][:, :, 0]

    def outputs(self, latents: torch.Tensor, image: torch.Tensor) -> dict[str, Any]:
        cond_len = 0 if self.cond_tokens is None else int(self.cond_tokens.shape[1])
        return _outputs(latents, image, seq_len=self.seq, cond_seq_len=cond_len,
                        text_seq_len=int(self.embeds[0].shape[1]))


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


class Flux(Family):
    """FLUX.1-dev as diffusers' FluxPipeline: CLIP pooled + T5 hidden states, 2x2 packing, the guidance embedding,
    one DiT forward a step (guidance-distilled; true CFG only when true_cfg_scale > 1), dynamic-shift flow match."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.prompts = [self._prompt(), self._prompt()]  # positive, negative (the negative only with true CFG)
        vcfg = self.vae.module.config
        self.noise = torch.randn(1, int(vcfg.latent_channels), 1, self.lat_h, self.lat_w, generator=self.gen)
        self.vae_scaling, self.vae_shift = float(vcfg.scaling_factor), float(vcfg.shift_factor)
        self.conds: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        # CLIP ids as its tokenizer lays out a prompt that fills the 77 slots: start-of-text (vocab - 2), words,
        # end-of-text (vocab - 1), which CLIPTextModel pools; T5 ids fill max_sequence_length.
        clip_vocab, t5_vocab = int(self.te.module.clip.config.vocab_size), int(self.te.module.t5.config.vocab_size)
        words = torch.randint(0, clip_vocab - 2, (1, int(self.model.extra["clip_tokens"]) - 2), generator=self.gen)
        clip_ids = torch.cat([torch.tensor([[clip_vocab - 2]]), words, torch.tensor([[clip_vocab - 1]])], dim=1)
        t5_ids = torch.randint(0, t5_vocab, (1, self.model.prompt_tokens), generator=self.gen)
        return clip_ids, t5_ids

    def encode_prompts(self) -> None:
        for clip_ids, t5_ids in self.prompts[: self.settings.cfg_passes_per_step]:
            pooled, hidden = self.te.module(clip_ids.to(self.dev), t5_ids.to(self.dev))
            self.conds.append((pooled.to(self.dtype), hidden.to(self.dtype)))

    def schedule(self) -> tuple[Any, torch.Tensor]:
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        p, dev, dtype, steps = self.model.patch, self.dev, self.dtype, self.settings.steps
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
        latents = _pack(self.noise, p).to(dev, dtype)
        self.seq = latents.shape[1]
        self.text_len = self.conds[0][1].shape[1]
        self.txt_ids = torch.zeros(self.text_len, 3).to(dev, dtype)
        img_ids = torch.zeros(self.lat_h // p, self.lat_w // p, 3)
        img_ids[..., 1] += torch.arange(self.lat_h // p)[:, None]
        img_ids[..., 2] += torch.arange(self.lat_w // p)[None, :]
        self.img_ids = img_ids.reshape(-1, 3).to(dev, dtype)
        self.guidance = None
        if self.dit.module.config.guidance_embeds:
            scale = float(self.model.extra.get("guidance_scale", 3.5))
            self.guidance = torch.full([1], scale, device=dev, dtype=torch.float32)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=dev,
                                mu=_shift_mu(self.seq, FLUX_SCHEDULER))
        scheduler.set_begin_index(0)
        return scheduler, latents

    def forward(self, t: torch.Tensor, latents: torch.Tensor) -> list[torch.Tensor]:
        timestep = t.expand(1).to(self.dtype)
        return [
            self.dit.module(
                hidden_states=latents,
                timestep=timestep / 1000,
                guidance=self.guidance,
                pooled_projections=pooled,
                encoder_hidden_states=hidden,
                txt_ids=self.txt_ids,
                img_ids=self.img_ids,
                return_dict=False,
            )[0]
            for pooled, hidden in self.conds
        ]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = _unpack(latents, self.lat_h, self.lat_w, self.model.patch)[:, :, 0]
        z = z / self.vae_scaling + self.vae_shift
        return self.vae.module.decode(z.to(self.vae_dtype), return_dict=False)[0]

    def outputs(self, latents: torch.Tensor, image: torch.Tensor) -> dict[str, Any]:
        return _outputs(latents, image, seq_len=self.seq, cond_seq_len=0, text_seq_len=int(self.text_len))


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


class Wan(_TokenPrompts):
    """Wan2.1 text-to-video as diffusers' WanPipeline: UMT5 hidden states, float32 latents of
    (1, z, (frames - 1) // 4 + 1, H/8, W/8), true CFG as two DiT forwards a step (no norm rescale), UniPC with
    flow sigmas, decode with latents / (1 / std) + mean."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        vcfg, frames = self.vae.module.config, self.settings.frames
        temporal = int(getattr(vcfg, "scale_factor_temporal", None) or 2 ** sum(vcfg.temperal_downsample))
        if frames < 1 or (frames - 1) % temporal:
            raise ValueError(f"frames must be 1 + a multiple of {temporal}, got {frames}")
        self.lat_f = (frames - 1) // temporal + 1
        self.z_dim = int(vcfg.z_dim)
        self.noise = torch.randn(1, self.z_dim, self.lat_f, self.lat_h, self.lat_w, generator=self.gen)

    def schedule(self) -> tuple[Any, torch.Tensor]:
        from diffusers import UniPCMultistepScheduler

        scheduler = UniPCMultistepScheduler(**WAN_SCHEDULER)
        scheduler.set_timesteps(self.settings.steps, device=self.dev)
        scheduler.set_begin_index(0)
        p = self.model.patch
        self.seq = self.lat_f * (self.lat_h // p) * (self.lat_w // p)
        self.batched = self.batched_text()[0]  # Wan takes no text mask
        return scheduler, self.noise.to(self.dev)  # float32, as WanPipeline keeps them; the DiT sees a bf16 copy

    def forward(self, t: torch.Tensor, latents: torch.Tensor) -> list[torch.Tensor]:
        x, timestep = latents.to(self.dtype), t.expand(1)
        if self.batched is not None:  # cfg_batch: cond and uncond in one call
            n = self.batched.shape[0]
            out = self.dit.module(hidden_states=x.expand(n, *x.shape[1:]), timestep=timestep.expand(n),
                                  encoder_hidden_states=self.batched, return_dict=False)[0]
            return list(out.chunk(n))
        return [
            self.dit.module(hidden_states=x, timestep=timestep, encoder_hidden_states=emb, return_dict=False)[0]
            for emb in self.embeds
        ]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vcfg, dev, dtype = self.vae.module.config, self.dev, self.vae_dtype
        z = latents.to(dev, dtype)
        lat_mean = torch.tensor(vcfg.latents_mean).view(1, self.z_dim, 1, 1, 1).to(dev, dtype)
        lat_inv_std = 1.0 / torch.tensor(vcfg.latents_std).view(1, self.z_dim, 1, 1, 1).to(dev, dtype)
        z = z / lat_inv_std + lat_mean
        return self.vae.module.decode(z, return_dict=False)[0]

    def outputs(self, latents: torch.Tensor, image: torch.Tensor) -> dict[str, Any]:
        return _outputs(latents, image, seq_len=self.seq, cond_seq_len=0, text_seq_len=int(self.embeds[0].shape[1]),
                        latent_frames=self.lat_f)


FAMILIES: dict[str, type[Family]] = {"qwen-image": QwenImage, "flux": Flux, "wan": Wan}
