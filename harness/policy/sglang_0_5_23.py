"""SGLang 0.5.23, the newest release modelled (policy "sglang"): `ServerArgs._adjust_parameters` and
`_validate_offload` for the offload fields (`ServerArgsModel`), with the memory and task defaults of
`performance_mode` and the per-model deployment hints."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from harness.common.flags import DEFAULT_GROUP, FlagError, OffloadFlags, streamed_roles
from harness.policy.resolution import EngineContext, EngineDetails
from harness.policy.rules import common_prefetch_rules


@dataclass(frozen=True)
class DeploymentHints:
    """What SGLang 0.5.23's pipeline config declares for the auto policy (`ModelDeploymentConfig`), per family, and
    the precisions it loads each component in (bytes per parameter), by which its auto policy sizes a checkpoint.

    Args:
        keep_resident_min_available_gb (float | None): free GiB from which `keep_resident_components` stay
            resident; None takes the task's default (45 for image generation, 120 otherwise).
        keep_resident_components (tuple[str, ...]): those components ("dit" is added for image generation).
        dit_layerwise_offload_modes (tuple[str, ...]): performance modes that stream the DiT by default.
        dit_bytes, vae_bytes, image_encoder_bytes (int): `dit_precision`, `vae_precision`,
            `image_encoder_precision` in bytes.
        text_encoder_bytes (tuple[int, ...]): `text_encoder_precisions`, one per text encoder in order.
    """

    keep_resident_min_available_gb: float | None = None
    keep_resident_components: tuple[str, ...] = ("vae",)
    dit_layerwise_offload_modes: tuple[str, ...] = ()
    dit_bytes: int = 2
    vae_bytes: int = 2
    image_encoder_bytes: int = 4
    text_encoder_bytes: tuple[int, ...] = (2,)

    def load_bytes(self, component: str) -> int | None:
        """utils/precision.resolve_component_precision's itemsize for a checkpoint component (None: as stored)."""
        if component in ("vae", "video_vae", "diffusion_decoder"):
            return self.vae_bytes
        if component in ("transformer", "transformer_2"):
            return self.dit_bytes
        if component == "image_encoder":
            return self.image_encoder_bytes
        if component == "text_encoder" or component.startswith("text_encoder_"):
            suffix = component.removeprefix("text_encoder").removeprefix("_")
            index = int(suffix) - 1 if suffix.isdigit() else 0
            return self.text_encoder_bytes[index] if 0 <= index < len(self.text_encoder_bytes) else None
        return None


DEPLOYMENT_HINTS: dict[str, DeploymentHints] = {
    # Read from 0.5.23's registered configs (QwenImagePipelineConfig, QwenImageEditPlusPipelineConfig,
    # FluxPipelineConfig: the defaults, BF16 everywhere but the image encoder, FLUX's two text encoders BF16;
    # WanT2V720PConfig: 60 GiB, ("dit",), ("memory",), the VAE and UMT5 in FP32).
    "qwen-image": DeploymentHints(),
    "qwen-image-edit": DeploymentHints(),
    "flux": DeploymentHints(text_encoder_bytes=(2, 2)),
    "wan": DeploymentHints(60.0, ("dit",), ("memory",), vae_bytes=4, text_encoder_bytes=(4,)),
}
PERFORMANCE_MODES: tuple[str, ...] = ("auto", "manual", "speed", "memory")
LOW_MEMORY_GIB = 30.0  # ServerArgs._adjust_offload: total device memory below this offloads the large components
IMAGE_KEEP_RESIDENT_GIB = 45.0  # auto_tune.IMAGE_GEN_KEEP_RESIDENT_MIN_AVAILABLE_GB
DEFAULT_KEEP_RESIDENT_GIB = 120.0  # auto_tune.DEFAULT_KEEP_RESIDENT_MIN_AVAILABLE_GB
ALL_RESIDENT_WEIGHT_MULTIPLE = 2  # auto_tune.AUTO_ALL_RESIDENT_WEIGHT_MULTIPLE
DIT_MAX_DEVICE_FRACTION = 0.8  # auto_tune.AUTO_DIT_MAX_DEVICE_FRACTION
ALL_COMPONENTS = ("dit", "text_encoder", "image_encoder", "vae")  # auto_tune.ALL_OFFLOAD_COMPONENTS
GIB = 1024**3  # SGLang's BYTES_PER_GB
_CPU_FLAG = {"dit": "dit_cpu_offload", "text_encoder": "text_encoder_cpu_offload",
             "image_encoder": "image_encoder_cpu_offload", "vae": "vae_cpu_offload"}


class ServerArgsModel:
    """SGLang 0.5.23's `ServerArgs._adjust_parameters` and `_validate_offload`, for the offload fields, on one
    CUDA GPU with all of `memory_gib` free, no FSDP, no cache-dit and no canonical residency, as the engine child
    runs it. The context's checkpoint (`EngineContext.checkpoint`: the sizes SGLang reads from a folder model's
    files or a zoo model's sized stand-in) feeds the auto policy's two sizing rules, the memory-rich "every weight
    twice over" tier and the DiT that overflows the card; without one neither fires, as in SGLang without files.
    Written from the release's rules, each step named after the method it follows."""

    def __init__(self, flags: OffloadFlags, ctx: EngineContext | None, messages: list[str]) -> None:
        self.flags = flags
        self.msgs = messages
        self.explicit = {n for n in ("dit_cpu_offload", "dit_layerwise_offload", "text_encoder_cpu_offload",
                                     "vae_cpu_offload", "pin_cpu_memory") if getattr(flags, n) is not None}
        self.components_explicit = flags.layerwise_offload_components is not None
        mode = (ctx.performance_mode if ctx else None) or "auto"
        if mode.lower() not in PERFORMANCE_MODES:  # _normalize_performance_mode: ValueError
            raise FlagError(f"performance_mode: expected one of {', '.join(PERFORMANCE_MODES)}, got {mode!r}")
        self.mode = mode.lower()
        self.ctx = ctx
        self.v: dict[str, Any] = {
            "dit_cpu_offload": flags.dit_cpu_offload,
            "dit_layerwise_offload": flags.dit_layerwise_offload,
            "text_encoder_cpu_offload": flags.text_encoder_cpu_offload,
            "image_encoder_cpu_offload": None,  # no zoo family has an image encoder; the flag is never passed
            "vae_cpu_offload": False if flags.vae_cpu_offload is None else flags.vae_cpu_offload,  # field default
        }
        # an explicit empty list stays [] (not None) until _adjust_layerwise_offload_components normalises it, so
        # the auto steps that only fill a None list leave it alone
        self.components: list[str] | None = (None if flags.layerwise_offload_components is None
                                              else list(flags.layerwise_offload_components))
        self._all_resident: bool | None = None

    # -------------------------------------------------------------------------------------------- helpers
    @property
    def hints(self) -> DeploymentHints:
        return DEPLOYMENT_HINTS.get(self.ctx.family, DeploymentHints()) if self.ctx else DeploymentHints()

    @property
    def keep_resident_gib(self) -> float:
        explicit = self.hints.keep_resident_min_available_gb
        if explicit is not None:
            return explicit
        return IMAGE_KEEP_RESIDENT_GIB if self.ctx is None or self.ctx.is_image else DEFAULT_KEEP_RESIDENT_GIB

    def rich(self) -> bool:
        """At least the keep-resident threshold free (a fresh card: free = total)."""
        return self.ctx is not None and self.ctx.memory_gib >= self.keep_resident_gib

    def all_resident(self) -> bool:
        """_keeps_all_components_resident / _fits_all_components_resident (asked once): in auto mode, the card
        holds every weight of the checkpoint twice over, each component in the precision it loads in."""
        if self._all_resident is None:
            self._all_resident = self._fits_all()
        return self._all_resident

    def _fits_all(self) -> bool:
        sizes = self.ctx.checkpoint.component_sizes() if self.ctx and self.ctx.checkpoint else None
        if self.mode != "auto" or self.ctx is None or sizes is None:
            return False
        weight = sum(params * b if (b := self.hints.load_bytes(name)) is not None else stored
                     for name, (params, stored) in sizes.items()) / GIB
        fits = self.ctx.memory_gib >= ALL_RESIDENT_WEIGHT_MULTIPLE * weight
        if fits:
            self.msgs.append(f"Auto memory policy: {self.ctx.memory_gib:.1f} GiB free holds the {weight:.1f} GiB of "
                             f"weights at least {ALL_RESIDENT_WEIGHT_MULTIPLE}x, so every component without an "
                             "explicit placement stays resident.")
        return fits

    def dit_overflows(self) -> bool:
        """_dit_overflows_device_in_auto: in auto mode, below the keep-resident threshold, for a model that streams
        its DiT in memory mode, the DiT (sized from the checkpoint, in its precision) needs more than 80 % of the
        card."""
        if (self.mode != "auto" or self.ctx is None or "memory" not in self.hints.dit_layerwise_offload_modes
                or self.ctx.memory_gib >= self.keep_resident_gib):
            return False
        params = self.ctx.checkpoint.dit_params if self.ctx.checkpoint else None
        if params is None:
            self.msgs.append("Auto memory policy could not size the DiT, so it keeps its declared placement")
            return False
        dit_gib = params * self.hints.dit_bytes / GIB
        overflows = dit_gib > self.ctx.memory_gib * DIT_MAX_DEVICE_FRACTION
        self.msgs.append(f"Auto memory policy: the DiT needs {dit_gib:.1f} GiB, "
                         f"{'more than' if overflows else 'within'} {DIT_MAX_DEVICE_FRACTION:.0%} of the "
                         f"{self.ctx.memory_gib:.1f} GiB free, so it "
                         f"{'streams layer by layer' if overflows else 'keeps its declared placement'}")
        return overflows

    def explicit_layerwise(self, component: str) -> bool:
        """is_explicit_layerwise_offload_component: an explicit selection naming it (or "all"), or an explicit
        `--dit-layerwise-offload true` for the DiT."""
        if self.components_explicit and self.components and ("all" in self.components
                                                             or component in self.components):
            return True
        return component == "dit" and "dit_layerwise_offload" in self.explicit and bool(self.v["dit_layerwise_offload"])

    def explicit_mode(self, component: str) -> str | None:
        """explicit_residency_mode: explicit layerwise, then an explicit legacy flag, then an explicit
        `--dit-layerwise-offload false` (the DiT resident)."""
        if self.explicit_layerwise(component):
            return "layerwise-offload"
        flag = _CPU_FLAG[component]
        if flag in self.explicit:
            return "component-offload" if self.v[flag] else "resident"
        if component == "dit" and "dit_layerwise_offload" in self.explicit:
            return "resident"
        return None

    def residency(self, component: str) -> str:
        """residency_mode: explicit first, then the (implicit) layerwise list, then the legacy flag."""
        mode = self.explicit_mode(component)
        if mode is not None:
            return mode
        if self.components and ("all" in self.components or component in self.components):
            return "layerwise-offload"
        return "component-offload" if self.v[_CPU_FLAG[component]] else "resident"

    def fill(self, **values: bool) -> None:
        for name, value in values.items():
            if self.v[name] is None:
                self.v[name] = value

    def default_components(self) -> list[str]:
        """_default_layerwise_components_for_unset_placement (+ _filter_high_memory_resident_components)."""
        if self.components_explicit or self.v["dit_layerwise_offload"] is True:
            return []
        comps = [c for c in DEFAULT_GROUP if self.explicit_mode(c) is None]
        if self.mode == "auto" and self.all_resident():
            comps = []
        elif self.mode == "auto" and self.rich():
            kept = [c for c in comps if c in self.hints.keep_resident_components]
            comps = [c for c in comps if c not in self.hints.keep_resident_components]
            if kept:
                self.msgs.append(f"Keeping default layerwise components resident because minimum available memory "
                                 f"on selected GPUs is {self.ctx.memory_gib:.2f} GiB: {', '.join(kept)}")
        # _should_auto_enable_dit_layerwise_offload: not when every weight stays resident; then the model lists the
        # mode, or the DiT overflows the card (auto, sized from the checkpoint)
        if self.explicit_mode("dit") is None and not self.all_resident() and (
                self.mode in self.hints.dit_layerwise_offload_modes or self.dit_overflows()):
            comps.insert(0, "dit")
        return comps

    # -------------------------------------------------------------------------------------------- steps
    def adjust(self) -> None:
        mode = self.mode
        if mode == "speed":  # _set_gpu_resident_defaults(use_fsdp=False)
            self.fill(dit_cpu_offload=False, dit_layerwise_offload=False, text_encoder_cpu_offload=False,
                      image_encoder_cpu_offload=False)
        elif mode == "memory":  # _set_layerwise_offload_defaults (CUDA)
            if self.components is None:
                self.components = self.default_components() or None
            self.fill(dit_cpu_offload=True, text_encoder_cpu_offload=False, image_encoder_cpu_offload=False)
        if mode != "manual":
            self.adjust_offload()
            if mode == "auto":
                self.auto_default_layerwise()
                self.auto_residency_after_offload()
            self.replace_cpu_offload_with_layerwise()
        self.adjust_layerwise_components()
        if mode != "manual":  # finalize_auto_flags
            self.fill(dit_cpu_offload=False, dit_layerwise_offload=False, text_encoder_cpu_offload=False,
                      image_encoder_cpu_offload=False)

    def adjust_offload(self) -> None:
        """_adjust_offload: the < 30 GiB row, then image vs video; the VAE is not touched."""
        if self.ctx is None:  # every switch is set (checked by the caller): nothing to fill
            return
        if self.ctx.memory_gib < LOW_MEMORY_GIB:
            self.msgs.append("Enabling large component offloading for GPU with low device memory")
            self.fill(dit_cpu_offload=True, text_encoder_cpu_offload=True, image_encoder_cpu_offload=True)
        elif self.ctx.is_image:
            self.fill(dit_cpu_offload=True, text_encoder_cpu_offload=True, image_encoder_cpu_offload=False)
        else:
            self.fill(dit_cpu_offload=True, text_encoder_cpu_offload=True, image_encoder_cpu_offload=True)

    def auto_default_layerwise(self) -> None:
        """maybe_adjust_auto_default_layerwise_offload."""
        if self.components is not None or self.v["dit_layerwise_offload"] is True:
            return
        comps = self.default_components()
        if comps:
            self.msgs.append(f"Auto memory policy selects layerwise offload for {', '.join(comps)}")
            self.components = comps

    def auto_residency_after_offload(self) -> None:
        """maybe_adjust_auto_component_residency_after_offload: from the keep-resident threshold, the model's
        keep-resident components (+ the DiT for image generation) leave the implicit layerwise list and lose an
        implicit CPU offload; with every weight resident (the memory-rich tier), every component does."""
        all_resident = self.all_resident()
        if not (all_resident or self.rich()):
            return
        keep = set(ALL_COMPONENTS if all_resident else self.hints.keep_resident_components)
        if self.ctx is not None and self.ctx.is_image:
            keep.add("dit")
        changed = []
        if self.components is not None and not self.components_explicit:
            left = [c for c in self.components if c not in keep]
            if left != self.components:
                self.components = left or None
                changed.append(f"layerwise_offload_components={self.components}")
        explicit_dit_layerwise = self.explicit_layerwise("dit") or (
            self.components_explicit and bool(self.components) and "all" in (self.components or []))
        if (self.v["dit_cpu_offload"] and "dit" in keep and self.explicit_mode("dit") is None
                and "dit_layerwise_offload" not in self.explicit and not explicit_dit_layerwise):
            self.v["dit_cpu_offload"] = False
            changed.append("dit_cpu_offload=False")
        for component in ("text_encoder", "image_encoder", "vae"):
            flag = _CPU_FLAG[component]
            if self.v[flag] and component in keep and self.explicit_mode(component) is None:
                self.v[flag] = False
                changed.append(f"{flag}=False")
        if changed:
            self.msgs.append(f"Disabling component offload because minimum available memory on selected GPUs is "
                             f"{self.ctx.memory_gib:.2f} GiB: {', '.join(changed)}")  # type: ignore[union-attr]

    def replace_cpu_offload_with_layerwise(self) -> None:
        """maybe_replace_cpu_offloaded_components_with_layerwise: implicit te/ie/vae CPU offload goes layerwise."""
        if self.components is not None or self.v["dit_layerwise_offload"] is True:
            return
        comps = ["dit"] if self.v["dit_layerwise_offload"] else []
        changed = [c for c in DEFAULT_GROUP if self.v[_CPU_FLAG[c]] and self.explicit_mode(c) is None]
        if changed:
            self.components = comps + changed
            self.msgs.append("Automatically replacing CPU offload with layerwise offload for components: "
                             + ", ".join(changed))

    def adjust_layerwise_components(self) -> None:
        """_adjust_layerwise_offload_components: `dit_layerwise_offload` adds "dit" first; selected groups clear
        their component's CPU offload (not the DiT's, since #26925); an explicit `--dit-layerwise-offload false`
        with no explicit DiT offload keeps the DiT resident."""
        sel = list(self.components) if self.components else None
        if self.v["dit_layerwise_offload"]:
            if sel is None:
                sel = ["dit"]
            elif "dit" not in sel:
                sel = ["dit", *sel]
        self.components = sel
        chosen = set(sel or ())
        cleared = []
        for component in ("text_encoder", "image_encoder", "vae"):
            flag = _CPU_FLAG[component]
            if ("all" in chosen or component in chosen) and self.v[flag] is not False:
                self.v[flag] = False
                if flag in self.explicit:
                    cleared.append(flag)
        if cleared:
            self.msgs.append("Ignoring component-offload flags because layerwise offload controls the same "
                             f"component groups: {', '.join(cleared)}")
        has_explicit_dit_offload = self.explicit_layerwise("dit") or (
            "dit_cpu_offload" in self.explicit and bool(self.v["dit_cpu_offload"]))
        if ("dit_layerwise_offload" in self.explicit and not self.v["dit_layerwise_offload"]
                and not has_explicit_dit_offload):
            self.v["dit_cpu_offload"] = False


def resolve(flags: OffloadFlags, context: EngineContext | None = None,
                    policy: str = "sglang") -> tuple[OffloadFlags, list[str], EngineDetails | None]:
    """SGLang 0.5.23 (the newest release modelled): after #26925 dit_cpu_offload is kept with DiT layerwise, and
    layerwise offload covers the text encoder and the VAE too (`layerwise_offload_components`, per-component
    maps), with resident DiT layers and the memory/task defaults of `performance_mode` (`ServerArgsModel`).

    Unset switches need a context (the card's memory, the task, the family). The effective flags say what runs:
    `dit_layerwise_offload` is whether the DiT resolves to layerwise offload (SGLang's residency_mode, so a
    selection of "dit" or "all" counts), `layerwise_offload_components` the text encoder / VAE that stream
    (`streamed_roles`; SGLang's final list is `engine.layerwise_components`), the CPU-offload flags after
    layerwise cleared them; in manual mode a switch left unset is off, as the runtime
    reads it.
    """
    if context is None and flags.unset():
        raise FlagError(f"policy {policy!r}: {', '.join(flags.unset())} unset: SGLang's defaults depend on the card "
                        f"and task; pass an EngineContext")
    messages: list[str] = []
    state = ServerArgsModel(flags, context, messages)
    state.adjust()
    residency = {c: state.residency(c) for c in ("dit", "text_encoder", "vae")}
    v = state.v
    effective = replace(
        flags,
        dit_cpu_offload=bool(v["dit_cpu_offload"]),
        dit_layerwise_offload=residency["dit"] == "layerwise-offload",
        text_encoder_cpu_offload=bool(v["text_encoder_cpu_offload"]),
        vae_cpu_offload=bool(v["vae_cpu_offload"]),
        pin_cpu_memory=True if flags.pin_cpu_memory is None else flags.pin_cpu_memory,
        layerwise_offload_components=streamed_roles(state.components),
    )
    effective = common_prefetch_rules(effective, messages)
    for name in flags.unset():
        messages.append(f"{name} unset: SGLang 0.5.23's default ({state.mode} mode) is {getattr(effective, name)}")
    checkpoint = context.checkpoint if context is not None else None
    details = EngineDetails(source="model", version="0.5.23", layerwise_components=tuple(state.components or ()),
                            dit_residency=residency["dit"], context=context, residency=residency,
                            checkpoint=(checkpoint.label if checkpoint else "none") if context is not None else None,
                            checkpoint_bytes=checkpoint.total_bytes if checkpoint else None) \
        if context is not None or flags.layerwise_offload_components is not None else None
    return effective, messages, details
