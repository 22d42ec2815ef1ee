"""SGLang 0.5.8 (policy "sglang-pre18997"), the release before #18997: DiT layerwise forces dit_cpu_offload off,
unconditionally."""

from __future__ import annotations

from dataclasses import replace

from harness.common.flags import OffloadFlags
from harness.policy.resolution import EngineContext, EngineDetails
from harness.policy.rules import need_context, refuse, refuse_resident_layers


def resolve(flags: OffloadFlags, context: EngineContext | None = None,
                             policy: str = "sglang-pre18997") -> tuple[OffloadFlags, list[str], EngineDetails | None]:
    """Before SGLang #18997 (2026-02-19; release 0.5.8): DiT layerwise forces dit_cpu_offload off, unconditionally.

    0.5.8's `ServerArgs` (`runtime/server_args.py`, `adjust_offload` and `check_server_args`): unset component flags
    default by task type (image: DiT and text encoder offloaded, VAE resident; video: all three offloaded), with no
    memory rule; a Wan pipeline gets DiT layerwise when the flag is unset; then layerwise on clears
    dit_cpu_offload, whether the user set it or the default did. 0.5.8 has no `dit_offload_prefetch_size` (its
    manager prefetches the next layer, which is 0 here): any other value is refused.
    """
    if flags.dit_offload_prefetch_size != 0:
        raise refuse(policy, flags, "dit_offload_prefetch_size",
                      "0.5.8 has no such flag; its layerwise manager always prefetches the next layer")
    refuse_resident_layers(policy, flags, "0.5.8")
    if flags.layerwise_offload_components is not None:
        raise refuse(policy, flags, "layerwise_offload_components", "0.5.8 has no such flag")
    context = need_context(policy, flags, context)
    messages: list[str] = []
    details: EngineDetails | None = None
    if context is not None:
        image = context.is_image
        lw = flags.dit_layerwise_offload
        if lw is None and context.family == "wan":
            messages.append("Automatically enable dit_layerwise_offload for Wan for best performance")
            lw = True
        flags = replace(
            flags,
            dit_cpu_offload=True if flags.dit_cpu_offload is None else flags.dit_cpu_offload,
            dit_layerwise_offload=bool(lw),
            text_encoder_cpu_offload=True if flags.text_encoder_cpu_offload is None else flags.text_encoder_cpu_offload,
            vae_cpu_offload=(not image) if flags.vae_cpu_offload is None else flags.vae_cpu_offload,
            pin_cpu_memory=True if flags.pin_cpu_memory is None else flags.pin_cpu_memory,
        )
        details = EngineDetails(source="model", version="0.5.8", context=context)
    if flags.dit_layerwise_offload and flags.dit_cpu_offload:
        messages.append("dit_layerwise_offload is enabled, automatically disabling dit_cpu_offload.")
        flags = replace(flags, dit_cpu_offload=False)
    return flags, messages, details
