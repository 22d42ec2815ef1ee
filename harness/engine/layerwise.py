"""SGLang's own layerwise runtime (`LayerwiseOffloadManager`) driving a harness DiT: the "sglang" backend.

The DiT module is the harness's (the diffusers class at its published size, synthetic weights), and SGLang does
to it what its loader and residency strategy do to theirs:

1. The loader leaves the weights where `dit_cpu_offload` says (host tensors when on; the whole DiT on the device
   when off: the #26925 path), as SGLang's `maybe_load_fsdp_model(cpu_offload=...)` does.
2. The module's class gains SGLang's layerwise mixin (`LayerwiseOffloadableModuleMixin`, `OffloadableDiTMixin` in
   January 2026) with `layer_names` = the zoo's layer groups, which are SGLang's names for these models
   (`transformer_blocks` for Qwen-Image, `blocks` for Wan). Its own `configure_layerwise_offload(server_args)`
   then computes the prefetch window and resident layers, builds one manager per layer group, packs the layers
   into pinned host buffers and moves the rest of the module to the GPU.
3. Each pipeline call is one "use", as SGLang's `LayerwiseOffloadStrategy` runs it: `prepare_for_next_req()`
   before (restoring parked non-layer weights where the release parks them), `release_after_use()` /
   `release_all()` after.

`server_args` is the release's own `ServerArgs` class, instantiated without `__post_init__` (which would resolve
a model path, probe the platform and ports): its fields take their declared defaults, then the effective flags
the policy resolved. The resolution itself is checked against SGLang's real `ServerArgs` by the engine policy
(`harness.engine.policy`); what the runtime reads of it are plain fields and `layerwise_tuning_for`.

Not used from SGLang, and why: its checkpoint loader and pipeline (they load HF folders and run SGLang's own DiT
classes; the harness feeds the same synthetic checkpoint to every backend). Its `HostPinBudget` runs with its
defaults (the host's available memory decides which layers it pins); the plan it made is recorded per group
(`layer_hosting`), because our pinned-memory counters cannot see the buffers SGLang registers itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch

from harness.common.flags import OffloadFlags
from harness.engine.install import installed
from harness.engine.runtime import activate, stand_ins

SERVER_ARGS_MODULE = "sglang.multimodal_gen.runtime.server_args"


class EngineUnavailable(RuntimeError):
    """The SGLang version is not installed (the message says how to install it)."""


def load_engine(version: str) -> tuple[Any, Any, dict[str, Any]]:
    """Imports version's layerwise module and ServerArgs class into this process (host packages win)."""
    engines = installed()
    if version not in engines:
        have = ", ".join(engines) or "none"
        raise EngineUnavailable(
            f"sglang {version} is not installed (installed: {have}); run `python -m harness.engine.install {version}`"
        )
    eng = engines[version]
    activate(eng.site, first=False)
    layerwise = importlib.import_module(eng.manifest["layerwise_module"])
    server_args = importlib.import_module(SERVER_ARGS_MODULE)
    return layerwise, server_args.ServerArgs, {"version": version, "module": eng.manifest["layerwise_module"]}


def bare_server_args(server_args_cls: Any, flags: OffloadFlags) -> Any:
    """The release's ServerArgs with declared defaults and the effective offload flags, without __post_init__."""
    args = object.__new__(server_args_cls)
    for f in dataclasses.fields(server_args_cls):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        object.__setattr__(args, f.name, value)
    for name, value in flags.as_dict().items():
        if hasattr(args, name):
            object.__setattr__(args, name, value)
    if hasattr(args, "layerwise_offload_components"):
        object.__setattr__(args, "layerwise_offload_components", ["dit"])
    if hasattr(args, "performance_mode"):
        object.__setattr__(args, "performance_mode", "manual")  # the flags are already resolved
    return args


def mixin_class(layerwise: Any) -> type:
    for name in ("LayerwiseOffloadableModuleMixin", "OffloadableDiTMixin"):
        if hasattr(layerwise, name):
            return getattr(layerwise, name)
    raise EngineUnavailable(f"{layerwise.__name__} has no layerwise mixin")


class SGLangLayerwise:
    """SGLang's managers on one harness DiT; `before_use`/`after_use` run SGLang's per-use lifecycle."""

    def __init__(self, module: torch.nn.Module, layer_groups: tuple[str, ...], flags: OffloadFlags,
                 version: str) -> None:
        layerwise, server_args_cls, info = load_engine(version)
        mixin = mixin_class(layerwise)
        cls = type(module)
        module.__class__ = type(f"SGLang{cls.__name__}", (cls, mixin), {"layer_names": list(layer_groups)})
        self.module = module
        self.server_args = bare_server_args(server_args_cls, flags)
        configure = module.configure_layerwise_offload
        named = "component_name" in inspect.signature(configure).parameters  # 0.5.23 tunes per component
        kwargs = {"component_name": "transformer"} if named else {}
        self.hosting: dict[str, dict[str, int]] = {}
        with _recording_layer_hosting(layerwise.LayerwiseOffloadManager, self.hosting):
            configure(self.server_args, **kwargs)
        self.managers = list(getattr(module, "layerwise_offload_managers", None) or [])
        if not self.managers or not all(getattr(m, "enabled", False) for m in self.managers):
            raise RuntimeError(f"sglang {version}: no enabled layerwise manager on {cls.__name__} {layer_groups}")
        self.info = {**info, "mixin": mixin.__name__, "stand_ins": stand_ins()}

    def before_use(self) -> None:
        m = self.module
        if hasattr(m, "restore_non_layer_weights"):
            m.restore_non_layer_weights()
        if hasattr(m, "prepare_for_next_req"):
            m.prepare_for_next_req()
        elif hasattr(m, "prepare_for_next_denoise"):
            m.prepare_for_next_denoise()

    def after_use(self) -> None:
        for manager in self.managers:
            if hasattr(manager, "release_after_use"):
                manager.release_after_use(keep_resident=False)
            else:
                manager.release_all()
        if hasattr(self.module, "park_non_layer_weights"):
            self.module.park_non_layer_weights()

    def describe(self) -> dict[str, Any]:
        groups = {}
        for m in self.managers:
            host = 0
            for by_dtype in getattr(m, "_consolidated_cpu_weights", {}).values():
                host += sum(t.numel() * t.element_size() for t in by_dtype.values())
            groups[m.layers_attr_str] = {
                "layers": m.num_layers,
                "prefetch": getattr(m, "prefetch_size", 1),
                "resident_layers": getattr(m, "resident_layers", 0),
                "host_bytes": host,
                "pin_cpu_memory": bool(getattr(m, "pin_cpu_memory", False)),
            }
        return {**self.info, "groups": groups, "prefetch_size_flag": self.server_args.dit_offload_prefetch_size,
                "layer_hosting": self.hosting}


@contextlib.contextmanager
def _recording_layer_hosting(manager_cls: Any, out: dict[str, dict[str, int]]) -> Iterator[None]:
    """Records where 0.5.23's managers host each group's layers (pinned / pageable / mapped: its HostPinBudget
    decides, from the host's available memory). Our pinned counters cannot see SGLang's pins (it registers its
    own buffers), and a pageable layer copies synchronously, so this is what explains its step time. Releases
    without a hosting plan record nothing."""
    plan = getattr(manager_cls, "_plan_layer_hosting", None)
    if plan is None:
        yield
        return

    def recorded(self: Any, layer_groups: Any) -> Any:
        hosting, untracked = plan(self, layer_groups)
        counts: dict[str, int] = {}
        for where in hosting.values():
            counts[where] = counts.get(where, 0) + 1
        out[self.layers_attr_str] = counts
        return hosting, untracked

    manager_cls._plan_layer_hosting = recorded
    try:
        yield
    finally:
        manager_cls._plan_layer_hosting = plan
