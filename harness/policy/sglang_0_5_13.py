"""SGLang 0.5.13 (policy "sglang-0.5.13"): after #26925, before resident layers; kept for the differential grid
against the 0.5.13 release."""

from __future__ import annotations

from dataclasses import replace

from harness.common.flags import OffloadFlags
from harness.policy.resolution import EngineContext, EngineDetails
from harness.policy.rules import common_prefetch_rules, dit_residency, need_context, refuse, refuse_resident_layers


def resolve(flags: OffloadFlags, context: EngineContext | None = None,
                         policy: str = "sglang-0.5.13") -> tuple[OffloadFlags, list[str], EngineDetails | None]:
    """SGLang 0.5.13 (after #26925, 2026-06-01; before resident layers): dit_cpu_offload is kept with DiT layerwise.

    The model of the June era, kept for the differential grid against 0.5.13 (`MODEL_FOR_VERSION`); policy
    "sglang" models the newest release. It refuses the flags 0.5.13 does not have and whatever it cannot express.

    Only non-DiT component CPU offload is cleared for components that layerwise manages; our layerwise runtime
    manages the DiT alone. Unset flags (with a context) take the defaults of SGLang's auto mode on one CUDA GPU
    with no local checkpoint to size (`ServerArgs._adjust_offload`, `ServerArgsAutoTuner`):

    - DiT CPU offload defaults on; from 45 GiB free on an image task it stays off when neither DiT flag is given
      (0.5.23's keep-resident rule); DiT layerwise defaults off for the zoo's families;
    - a text encoder or VAE whose flag is unset goes layerwise (the default layerwise group), which our runtime
      cannot do: refused. The VAE stays resident instead from the keep-resident threshold up (0.5.23). With
      `dit_layerwise_offload` on, the default group is not added and the text encoder defaults to CPU offload.
    """
    refuse_resident_layers(policy, flags, "0.5.13")
    if flags.layerwise_offload_components is not None:
        raise refuse(policy, flags, "layerwise_offload_components", "this model of 0.5.13 streams the DiT alone")
    messages: list[str] = []
    details: EngineDetails | None = None
    context = need_context(policy, flags, context)
    if context is not None:
        flags, details = _sglang_defaults(flags, context, policy, messages)
    flags = common_prefetch_rules(flags, messages)
    if details is not None:
        details = replace(details, dit_residency=dit_residency(flags))
    return flags, messages, details


def _sglang_defaults(flags: OffloadFlags, ctx: EngineContext, policy: str,
                     messages: list[str]) -> tuple[OffloadFlags, EngineDetails]:
    requested = flags
    if flags.dit_layerwise_offload:
        components: list[str] = ["dit"]
        te = True if flags.text_encoder_cpu_offload is None else flags.text_encoder_cpu_offload
        vae = False if flags.vae_cpu_offload is None else flags.vae_cpu_offload
        cpu = True if flags.dit_cpu_offload is None else flags.dit_cpu_offload
    else:
        components = []
        if flags.text_encoder_cpu_offload is None:
            raise refuse(policy, requested, "text encoder layerwise offload",
                          "SGLang's auto mode streams an unset text encoder layer by layer")
        if flags.vae_cpu_offload is None:
            raise refuse(policy, requested, "VAE layerwise offload",
                          "SGLang's auto mode streams an unset VAE layer by layer (0.5.23 keeps it resident on some "
                          "memory-rich cards, per model)")
        components.append("image_encoder")  # SGLang's default group; none of the zoo families has one
        te = flags.text_encoder_cpu_offload
        vae = False if flags.vae_cpu_offload is None else flags.vae_cpu_offload
        if flags.dit_cpu_offload is None:
            # 0.5.13 defaults it on; 0.5.23 clears it under an explicit `--dit-layerwise-offload false`
            # (server_args.py `_adjust_layerwise_offload_components`) and on memory-rich cards (auto_tune.py
            # `maybe_adjust_auto_component_residency_after_offload`): the releases differ, so no single answer
            raise refuse(policy, requested, "dit_cpu_offload set when DiT layerwise is not on",
                          "its default differs between SGLang 0.5.13 and 0.5.23")
        cpu = flags.dit_cpu_offload
    effective = replace(flags, dit_cpu_offload=cpu, dit_layerwise_offload=bool(flags.dit_layerwise_offload),
                        text_encoder_cpu_offload=te, vae_cpu_offload=vae,
                        pin_cpu_memory=True if flags.pin_cpu_memory is None else flags.pin_cpu_memory)
    for name in requested.unset():
        messages.append(f"{name} unset: SGLang's default for {ctx.task} on {ctx.memory_gib:g} GiB is "
                        f"{getattr(effective, name)}")
    return effective, EngineDetails(source="model", version=None, layerwise_components=tuple(components),
                                    context=ctx)
