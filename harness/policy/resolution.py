"""What a policy is asked and what it answers: the card and task (`EngineContext`), what it decided in SGLang's
terms (`EngineDetails`) and the whole answer (`Resolution`), which the parent hands the child in its spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from harness.common.flags import FlagError, OffloadFlags
from harness.models.standin import CheckpointSource, checkpoint_source

Task = Literal["T2I", "I2I", "T2V", "I2V"]
TASKS: tuple[str, ...] = ("T2I", "I2I", "T2V", "I2V")
FAMILY_TASKS: dict[str, str] = {"qwen-image": "T2I", "qwen-image-edit": "I2I", "flux": "T2I", "wan": "T2V"}
"""The zoo families SGLang's policy is asked about, and the task type SGLang's pipeline config gives each."""


@dataclass(frozen=True)
class EngineContext:
    """What SGLang's defaults for unset flags depend on: the card, the task type and the model family.

    Args:
        memory_gib (float): the card's total memory in GiB (SGLang reads total and available memory; a fresh card).
        task (str): SGLang's task type: T2I, I2I (image generation) or T2V, I2V (video).
        family (str): the zoo family (`FAMILY_TASKS`), which selects SGLang's pipeline config.
        performance_mode (str | None): SGLang's `--performance-mode`; None is the release's default (auto).
        checkpoint (CheckpointSource | None): the checkpoint a server would be started on (a folder model's
            folder, a zoo model's sized stand-in: `harness.models.standin`), whose sizes SGLang 0.5.23's auto
            policy reads; None: no checkpoint on disk, the model's declared policy stands.
    """

    memory_gib: float
    task: str
    family: str
    performance_mode: str | None = None
    checkpoint: CheckpointSource | None = None

    def __post_init__(self) -> None:
        if isinstance(self.memory_gib, bool) or not isinstance(self.memory_gib, int | float) or self.memory_gib <= 0:
            raise FlagError(f"context.memory_gib: expected a number of GiB > 0, got {self.memory_gib!r}")
        if self.task not in TASKS:
            raise FlagError(f"context.task: expected one of {', '.join(TASKS)}, got {self.task!r}")
        if not isinstance(self.family, str) or not self.family:
            raise FlagError(f"context.family: expected a zoo family name, got {self.family!r}")

    @property
    def is_image(self) -> bool:
        return self.task in ("T2I", "I2I")

    @classmethod
    def for_model(cls, family: str, edit: bool, memory_gib: float, model: str | None = None) -> EngineContext:
        """The context of a model (`ModelSpec.family`, `.edit`) on a card of `memory_gib` GiB; `model` (a zoo name
        or a folder) adds the checkpoint a server would be started on."""
        name = "qwen-image-edit" if family == "qwen-image" and edit else family
        return cls(memory_gib=memory_gib, task=FAMILY_TASKS.get(name, "T2I"), family=name,
                   checkpoint=checkpoint_source(model))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"memory_gib": self.memory_gib, "task": self.task, "family": self.family,
                               "performance_mode": self.performance_mode}
        if self.checkpoint is not None:  # absent, not null, so records of contexts without one stay as they were
            out["checkpoint"] = self.checkpoint.label
        return out


@dataclass(frozen=True)
class EngineDetails:
    """What a policy decided beyond the six flags, in SGLang's terms.

    Args:
        source (str): "model" (our hand-written policy's prediction) or "sglang" (the release's ServerArgs).
        version (str | None): the SGLang release asked, or the release era the model follows.
        layerwise_components (tuple[str, ...]): SGLang's `layerwise_offload_components` (empty before 0.5.13 had
            it); "image_encoder" is listed as SGLang lists it, though none of the zoo families has one.
        dit_residency (str | None): the DiT's residency mode (resident, component-offload, layerwise-offload),
            None where the release has no such notion (before 0.5.23).
        residency (dict[str, str] | None): the residency mode of each zoo role ("dit", "text_encoder", "vae"),
            where known (0.5.23's `residency_mode`).
        pipeline_config (str | None): the SGLang pipeline config class used, and why.
        context (EngineContext | None): the card and task the defaults were taken for.
        checkpoint (str | None): the checkpoint whose sizes the decision saw: "none", "folder <path>" or
            "zoo sized stand-in <model>@<digest>" (None: not recorded, a policy or record from before it).
        checkpoint_bytes (int | None): that checkpoint's tensor bytes (what a load would read).
    """

    source: str
    version: str | None
    layerwise_components: tuple[str, ...] = ()
    dit_residency: str | None = None
    pipeline_config: str | None = None
    context: EngineContext | None = None
    residency: dict[str, str] | None = None
    checkpoint: str | None = None
    checkpoint_bytes: int | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {
            "source": self.source,
            "version": self.version,
            "layerwise_components": list(self.layerwise_components),
            "dit_residency": self.dit_residency,
            "pipeline_config": self.pipeline_config,
            "context": self.context.as_dict() if self.context else None,
        }
        if self.residency is not None:  # absent in records from before it
            out["residency"] = dict(self.residency)
        if self.checkpoint is not None:  # likewise
            out["checkpoint"] = self.checkpoint
            out["checkpoint_bytes"] = self.checkpoint_bytes
        return out


@dataclass(frozen=True)
class Resolution:
    """What a policy made of the requested flags (`engine`: the details, when a context or the engine was used)."""

    policy: str
    requested: OffloadFlags
    effective: OffloadFlags
    messages: tuple[str, ...]
    engine: EngineDetails | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy,
            "requested": self.requested.as_dict(),
            "effective": self.effective.as_dict(),
            "messages": list(self.messages),
        }
        if self.engine is not None:  # absent, not null, so records of context-free cells stay as they were
            out["engine"] = self.engine.as_dict()
        return out

    @property
    def engine_asked(self) -> bool:
        """The answer came from a release's own ServerArgs (an engine policy), not from our model."""
        return self.engine is not None and self.engine.source == "sglang"
