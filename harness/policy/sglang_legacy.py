"""The unreleased SGLang code between #24593 and #26925 (policy "sglang-legacy"): DiT layerwise forces
dit_cpu_offload off, the #26925 bug."""

from __future__ import annotations

from dataclasses import replace

from harness.common.flags import OffloadFlags
from harness.policy.resolution import EngineContext, EngineDetails
from harness.policy.rules import common_prefetch_rules, refuse, refuse_resident_layers


def resolve(flags: OffloadFlags, context: EngineContext | None = None,
                           policy: str = "sglang-legacy") -> tuple[OffloadFlags, list[str], EngineDetails | None]:
    """Between SGLang #24593 and #26925 (2026-05-07 .. 2026-06-01): DiT layerwise forces dit_cpu_offload off.

    This is the bug: the loader then materialises the whole DiT on the GPU before layerwise packs it to the host.
    No release shipped this era's code (0.5.13 already has #26925), so there is no engine to check it against and
    it models fully set flags only.
    """
    if flags.unset():
        raise refuse(policy, flags, "set flags", "this era's defaults were never released; use sglang@<version>")
    refuse_resident_layers(policy, flags, "this era (May 2026)")
    if flags.layerwise_offload_components is not None:
        raise refuse(policy, flags, "layerwise_offload_components", "this model streams the DiT alone")
    messages: list[str] = []
    flags = common_prefetch_rules(flags, messages)
    if flags.dit_layerwise_offload and flags.dit_cpu_offload:
        messages.append(
            "layerwise offload is selected for DiT components, automatically disabling dit_cpu_offload."
        )
        flags = replace(flags, dit_cpu_offload=False)
    return flags, messages, None
