"""Policy `sglang@<version>`: a release's own ServerArgs, asked through the engine adapter
(`harness.engine.policy`), and its answer as `OffloadFlags`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.common.flags import MAP_FLAGS, NUMBER_FLAGS, FlagError, OffloadFlags, component_map, streamed_roles
from harness.engine.policy import EngineRequest, available_versions, resolve_engine
from harness.policy.resolution import EngineContext, EngineDetails, Resolution

ENGINE_PREFIX = "sglang@"


def engine_version(policy: str) -> str | None:
    """The SGLang release an engine policy names (`installed`: the newest installed), or None for our models.

    Raises:
        FlagError: `sglang@installed` with no release installed.
    """
    if not policy.startswith(ENGINE_PREFIX):
        return None
    version = policy[len(ENGINE_PREFIX):]
    if version == "installed":
        versions = available_versions()
        if not versions:
            raise FlagError("policy 'sglang@installed': no SGLang release is installed; install one with "
                            "`python -m harness.engine.install 0.5.23`")
        version = versions[-1]
    return version


def resolve_with_engine(flags_list: list[OffloadFlags], policy: str, version: str,
                        context: EngineContext | None) -> list[Resolution]:
    """`flags_list` as SGLang `version`'s own ServerArgs resolves them on the context's card (one child for all)."""
    if context is None:
        raise FlagError(f"policy {policy!r}: SGLang's ServerArgs needs the card and task; pass an EngineContext")
    requests = [EngineRequest(flags=flags.as_dict(), memory_gib=float(context.memory_gib), family=context.family,
                              task=context.task, performance_mode=context.performance_mode,  # type: ignore[arg-type]
                              checkpoint=context.checkpoint)
                for flags in flags_list]
    out = []
    for flags, answer in zip(flags_list, resolve_engine(version, requests), strict=True):
        if answer.error:
            raise FlagError(f"policy {policy!r}: SGLang {version} refuses {flags.label()}: {answer.error}")
        streamed = [c for c in answer.layerwise_components if c not in RUNNABLE_LAYERWISE_COMPONENTS]
        if streamed:
            raise FlagError(
                f"policy {policy!r}: SGLang {version} streams {', '.join(streamed)} layer by layer for "
                f"{flags.label()}; the harness streams the zoo's roles only (DiT, text encoder, VAE)"
            )
        effective = engine_flags(answer.effective, answer.layerwise_components, answer.dit_residency)
        details = EngineDetails(source="sglang", version=answer.version,
                                layerwise_components=answer.layerwise_components,
                                dit_residency=answer.dit_residency, pipeline_config=answer.pipeline_config,
                                context=context, residency=answer.extra.get("residency"),
                                checkpoint=answer.checkpoint, checkpoint_bytes=answer.checkpoint_bytes)
        out.append(Resolution(policy, flags, effective, answer.messages, details))
    return out


RUNNABLE_LAYERWISE_COMPONENTS = ("dit", "text_encoder", "image_encoder", "vae", "all")
"""Layerwise selections the harness can run: the DiT, the text encoder and the VAE (harness.cell.offload.layerwise), and
SGLang's image_encoder group, which selects nothing in the zoo's families (none has a separate image encoder)."""


def engine_flags(effective: Mapping[str, Any], components: tuple[str, ...] | list[str] | None = None,
                 dit_residency: str | None = None) -> OffloadFlags:
    """SGLang's resolved values as OffloadFlags: a None left by a release without finalisation (0.5.8) is off, as
    SGLang's runtime reads it; a release without the prefetch flag (0.5.8) prefetches the next layer, 0 here; one
    without resident layers (before 0.5.23) streams every layer (0, leading). With the release's final component
    list and DiT residency (0.5.23), `dit_layerwise_offload` is whether the DiT resolves to layerwise offload and
    `layerwise_offload_components` the roles beyond the DiT it streams (`streamed_roles`), as our model reports."""
    values: dict[str, Any] = {}
    defaults = OffloadFlags()
    for name in OffloadFlags.names():
        value = effective.get(name)
        if name in NUMBER_FLAGS:
            values[name] = float(value) if value is not None else 0.0
        elif name == "dit_layerwise_residency_policy":  # absent before 0.5.23: every layer streamed
            values[name] = str(value) if value is not None else defaults.dit_layerwise_residency_policy
        elif name == "layerwise_offload_components":
            values[name] = streamed_roles(components)
        elif name in MAP_FLAGS:
            values[name] = component_map(name, value, "engine") if value else ()
        else:
            values[name] = bool(value) if name != "pin_cpu_memory" or value is not None else True
    if dit_residency is not None:
        values["dit_layerwise_offload"] = dit_residency == "layerwise-offload"
    return OffloadFlags(**values)
