"""The model zoo: real diffusers / transformers architectures at their published sizes, plus tiny twins for CPU.

No weights can be downloaded here, so every model is built from its published config numbers and filled from a
synthetic, seeded safetensors checkpoint (`checkpoint.py`). A `ComponentSpec` names the class and config of one
component; a `ModelSpec` groups the three components a DiT pipeline runs (text encoder, DiT, VAE).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.common.contract import ROLES

if TYPE_CHECKING:
    import torch


class UnknownModelError(KeyError):
    def __str__(self) -> str:  # KeyError's default repr-quotes the message
        return str(self.args[0])


PLAN_DATA_PATH = Path(__file__).resolve().parent / "plan_data.json"
"""The zoo's weight sizes (`python -m harness.models.sizes --write`) and the planner's fits, beside the zoo."""

VAE_DECODER_LAYERS = ("decoder.up_blocks",)
"""What a VAE streams under layerwise offload: its decoder's blocks (SGLang's VAE `layer_names`); the encoder,
which only the edit models run, stays on the device."""


@dataclass(frozen=True)
class ComponentSpec:
    """One component: which class, which config, which dtype, and which ModuleLists layerwise may stream.

    Args:
        role (str): "text_encoder", "dit" or "vae".
        factory (str): "module:function" that takes the config dict and returns the nn.Module.
        config (Mapping): the published config numbers (or a tiny twin's).
        dtype (str, defaults to "bfloat16"): the weight dtype of the checkpoint.
        layer_groups (tuple[str, ...], defaults to ()): attribute names of the ModuleLists that the layerwise
            runtime streams (SGLang's `layer_names`).
        layer_count_keys (tuple[str, ...], defaults to ()): the config key holding each layer group's length, in
            `layer_groups` order, so a scenario's prefetch size can be checked without building the module.
    """

    role: str
    factory: str
    config: Mapping[str, Any]
    dtype: str = "bfloat16"
    layer_groups: tuple[str, ...] = ()
    layer_count_keys: tuple[str, ...] = ()
    layer_counts: tuple[tuple[str, int], ...] = ()  # a pipeline folder's groups, counted from its tensor names

    def layer_group_sizes(self) -> dict[str, int]:
        """Layers per streamed group, from the config (no torch): {"transformer_blocks": 60}."""
        if self.layer_counts:
            return dict(self.layer_counts)
        return {g: int(self.config[k]) for g, k in zip(self.layer_groups, self.layer_count_keys, strict=True)}

    def key(self, seed: int) -> str:
        """A short digest of everything that decides the checkpoint's bytes, for the checkpoint cache."""
        blob = json.dumps(
            {"factory": self.factory, "config": self.config, "dtype": self.dtype, "seed": seed, "format": 1},
            sort_keys=True,
            default=list,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def build_on_meta(self) -> torch.nn.Module:
        """Builds the module with parameters on the meta device (no memory), buffers real and small."""
        import torch

        module_name, fn_name = self.factory.split(":")
        factory: Callable[[Mapping[str, Any]], torch.nn.Module] = getattr(
            importlib.import_module(module_name), fn_name
        )
        with parameters_on_meta():
            # A deep copy: transformers' configs write into nested dicts (rope_scaling), which would otherwise
            # change this spec's config, and with it its checkpoint cache key.
            module = factory(copy.deepcopy(dict(self.config)))
        return module.to(getattr(torch, self.dtype)).eval().requires_grad_(False)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Creates every parameter registered inside the block on the meta device.

    A plain `with torch.device("meta")` would also put tensors that modules compute in __init__ (Qwen-Image's RoPE
    tables) on meta, where they cannot be recovered; patching register_parameter moves only parameters, each as
    it is registered, so the host never holds more than one freshly created (untouched) parameter.

    The `torch.nn.init` functions return a meta tensor untouched (a real one is initialised as usual): random init
    of values that do not exist was 70 % of Qwen-Image's DiT build (0.33 of 0.47 s profiled here; 0.46 s of the
    2.13 s DiT setup on the H200, `docs/findings/host-cost.md`), all of it dispatch through the meta decompositions.
    """
    import torch

    original = torch.nn.Module.register_parameter
    inits = {name: fn for name, fn in vars(torch.nn.init).items() if name.endswith("_") and not name.startswith("_")
             and callable(fn)}

    def skip_on_meta(fn: Callable[..., Any]) -> Callable[..., Any]:
        def init(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            return tensor if tensor.device.type == "meta" else fn(tensor, *args, **kwargs)
        return init

    def register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    for name, fn in inits.items():
        setattr(torch.nn.init, name, skip_on_meta(fn))
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]
        for name, fn in inits.items():
            setattr(torch.nn.init, name, fn)


@dataclass(frozen=True)
class ModelSpec:
    """A whole DiT pipeline: its components and the shape of its inputs.

    Args:
        name (str): the zoo name scenario files use.
        family (str): which pipeline code runs it (see `harness.cell.pipeline`).
        components (Mapping[str, ComponentSpec]): by role.
        prompt_tokens (int): text tokens fed to the text encoder (template included).
        drop_tokens (int): leading template tokens dropped from the encoder output (Qwen-Image drops 34).
        edit (bool, defaults to False): an edit model also encodes a reference image and attends to its latents.
        vae_scale (int, defaults to 8): pixels per latent, per side.
        patch (int, defaults to 2): latents per token, per side.
        description (str): one line for reports.
    """

    name: str
    family: str
    components: Mapping[str, ComponentSpec]
    prompt_tokens: int
    drop_tokens: int
    edit: bool = False
    vae_scale: int = 8
    patch: int = 2
    description: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


ZOO: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in ZOO:
        raise ValueError(f"model {spec.name!r} is already registered")
    missing = [r for r in ROLES if r not in spec.components]
    if missing:
        raise ValueError(f"model {spec.name!r} lacks components {missing}")
    ZOO[spec.name] = spec
    return spec


def get_model(name: Any, where: str = "model") -> ModelSpec:
    _load_families()
    if isinstance(name, str) and name not in ZOO:
        from harness.models.folder import folder_spec, is_folder_model

        if is_folder_model(name):  # a diffusers pipeline folder on disk (harness.models.folder)
            return folder_spec(name)
    if not isinstance(name, str) or name not in ZOO:
        raise UnknownModelError(f"{where}: unknown model {name!r}; known models: {', '.join(sorted(ZOO))}, "
                                f"or a diffusers pipeline folder (a path holding model_index.json)")
    return ZOO[name]


def model_names() -> list[str]:
    _load_families()
    return sorted(ZOO)


def _load_families() -> None:
    # Imported lazily so that `harness.models` itself stays free of torch/diffusers imports.
    from harness.models import flux, qwen_image, wan  # noqa: F401
