"""SGLang's own flag resolution, asked in a child process: the real `ServerArgs` of an installed release.

The parent never imports SGLang: each version lives in its own folder with its own pinned transformers
(`harness.engine.install`), so a child (`python -m harness.engine.serverargs`) puts that folder on `sys.path`,
builds `ServerArgs` as SGLang's unit tests build it (platform mocked as a CUDA GPU of the card's memory), and
answers a batch of requests as JSON. One child per version answers a whole grid.

This module imports no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Task = Literal["T2I", "I2I", "T2V", "I2V"]


@dataclass(frozen=True)
class EngineRequest:
    """What a user hands SGLang: flags as typed (None = not passed, the engine's defaults decide), the card's memory,
    and the model (which selects SGLang's pipeline config and task type)."""

    flags: dict[str, bool | float | None]
    memory_gib: float
    family: str  # a harness zoo family: "qwen-image", "qwen-image-edit", "flux", "wan"
    task: Task
    performance_mode: str | None = None  # None: the release's default (auto where it exists)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EngineResolution:
    """What the release's ServerArgs made of a request."""

    version: str
    effective: dict[str, bool | float | None]  # the six modelled flags after resolution
    layerwise_components: tuple[str, ...]  # SGLang's layerwise_offload_components ([] before it existed)
    dit_residency: str | None  # residency_mode("transformer") where the release has it
    messages: tuple[str, ...]  # what SGLang logged while resolving (warnings and info)
    pipeline_config: str  # the pipeline config class used, and how it was chosen
    error: str | None = None  # ServerArgs refused the request (its exception, one line)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
