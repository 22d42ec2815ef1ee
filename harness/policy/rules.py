"""Rules the modelled SGLang releases share: `ServerArgs._validate_offload`'s prefetch and resident-layer handling,
the refusals of flags a release lacks, and the context unset flags need."""

from __future__ import annotations

from dataclasses import replace

from harness.common.flags import MAP_FLAGS, FlagError, OffloadFlags
from harness.policy.resolution import EngineContext


def common_prefetch_rules(flags: OffloadFlags, messages: list[str]) -> OffloadFlags:
    """Prefetch-size and resident-layer handling shared by the SGLang eras that have the flags
    (ServerArgs._validate_offload).

    SGLang keeps (and truncates) the values without layerwise too, with a warning for the resident ones; here they
    are recorded as 0 / leading there, since no manager reads them and cells that differ only in them are the same
    run. Likewise `strided` with no resident layer is the same run as `leading` (SGLang warns: no resident set to
    place) and is recorded as leading. The differential grid compares them where they act, for that reason.
    """
    v = flags.dit_offload_prefetch_size
    r = flags.dit_layerwise_resident_layers
    policy = flags.dit_layerwise_residency_policy
    if not flags.dit_layerwise_offload:
        if v != 0:
            messages.append(
                f"dit_offload_prefetch_size={v:g} has no effect without dit_layerwise_offload; recorded as 0"
            )
        if r != 0:
            messages.append("--dit-layerwise-resident-layers has no effect because the DiT is not layerwise-offloaded;"
                            " recorded as 0")
        if policy != "leading":
            messages.append("--dit-layerwise-residency-policy has no effect because the DiT is not "
                            "layerwise-offloaded; recorded as leading")
        return replace(flags, dit_offload_prefetch_size=0.0, dit_layerwise_resident_layers=0.0,
                       dit_layerwise_residency_policy="leading")
    if v > 1 and not float(v).is_integer():
        messages.append(f"Invalid --dit-offload-prefetch-size value passed, truncated to: {int(v)}")
        flags = replace(flags, dit_offload_prefetch_size=float(int(v)))
    if 0.5 <= v < 1.0:
        messages.append("We do not recommend --dit-offload-prefetch-size to be between 0.5 and 1.0")
    if r > 1 and not float(r).is_integer():
        messages.append(f"Invalid --dit-layerwise-resident-layers value passed, truncated to: {int(r)}")
        flags = replace(flags, dit_layerwise_resident_layers=float(int(r)))
    if policy != "leading" and r <= 0:
        messages.append("--dit-layerwise-residency-policy has no effect because --dit-layerwise-resident-layers is 0;"
                        " recorded as leading")
        flags = replace(flags, dit_layerwise_residency_policy="leading")
    return flags


def refuse_resident_layers(policy: str, flags: OffloadFlags, era: str) -> None:
    """Resident layers arrived with SGLang #31538 (2026-07-17) and the policy with #34534, the per-component maps
    later still: earlier eras refuse them. (Layerwise components exist from 0.5.13 on; a model that cannot
    express them refuses them itself.)"""
    if flags.dit_layerwise_resident_layers != 0 or flags.dit_layerwise_residency_policy != "leading":
        raise refuse(policy, flags, "dit_layerwise_resident_layers / dit_layerwise_residency_policy",
                      f"{era} has no resident layers (SGLang #31538, #34534)")
    if any(getattr(flags, n) for n in MAP_FLAGS):
        raise refuse(policy, flags, ", ".join(MAP_FLAGS), f"{era} has no per-component layerwise maps")


def refuse(policy: str, flags: OffloadFlags, needs: str, why: str) -> FlagError:
    return FlagError(f"policy {policy!r}: cannot express {flags.label()}: needs {needs} ({why})")


def need_context(policy: str, flags: OffloadFlags, context: EngineContext | None) -> EngineContext | None:
    """Unset flags take SGLang's defaults for a card and task, which only a context gives."""
    if context is not None and context.performance_mode not in (None, "auto"):
        raise refuse(policy, flags, f"performance_mode={context.performance_mode}",
                      "the model follows SGLang's default mode, auto; manual/speed/memory place components otherwise")
    if flags.unset() and context is None:
        raise FlagError(f"policy {policy!r}: {', '.join(flags.unset())} unset: SGLang's defaults depend on the card "
                        f"and task; pass an EngineContext")
    return context


def dit_residency(flags: OffloadFlags) -> str:
    """SGLang 0.5.23's residency_mode("transformer") for resolved flags: layerwise wins over component offload."""
    if flags.dit_layerwise_offload:
        return "layerwise-offload"
    return "component-offload" if flags.dit_cpu_offload else "resident"
