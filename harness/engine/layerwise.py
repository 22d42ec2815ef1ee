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
(`layer_hosting`).

What SGLang pinned, counted by the harness (our other pinned counters cannot see it: 0.5.23 registers its own
buffers with cudaHostRegister):
- `count_sglang_pins` wraps the release's `_pin_in_place` / `_unpin_in_place` (every cudaHostRegister of 0.5.23's
  host stores, `_pinned_empty` buffers and mapped-layer courier slots goes through them) for the rest of the
  process, the cell's child: `SGLANG_PINS` counts the bytes registered now and at most. Releases without them
  (0.5.8, 0.5.13) pin with `pin_memory=True`, which `pinned_torch_allocator_bytes` already counts.
- `host_memory` walks the managers' host tensors and sums their bytes by `is_pinned()`: per group pinned / pageable
  / mapped bytes and layers (every release), in `describe()` after configure and in every phase's counters
  (`host_counters`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from harness.common.flags import OffloadFlags
from harness.engine.install import installed
from harness.engine.runtime import activate, stand_ins

SERVER_ARGS_MODULE = "sglang.multimodal_gen.runtime.server_args"


class EngineUnavailable(RuntimeError):
    """The SGLang version is not installed (the message says how to install it)."""


@functools.cache
def load_engine(version: str) -> tuple[Any, Any, dict[str, Any]]:
    """Imports version's layerwise module and ServerArgs class into this process (host packages win). Kept per
    version: the first call imports, and its answer (with what the import changed of torch's switches) is the one
    every later caller sees; a second import would find the modules loaded and report no change."""
    engines = installed()
    if version not in engines:
        have = ", ".join(engines) or "none"
        raise EngineUnavailable(
            f"sglang {version} is not installed (installed: {have}); run `python -m harness.engine.install {version}`"
        )
    eng = engines[version]
    activate(eng.site, first=False)
    before = torch_global_state()
    layerwise = importlib.import_module(eng.manifest["layerwise_module"])
    server_args = importlib.import_module(SERVER_ARGS_MODULE)
    changed = restore_torch_global_state(before)
    return layerwise, server_args.ServerArgs, {"version": version, "module": eng.manifest["layerwise_module"],
                                               "import_side_effects": {"changed": changed, "restored": True}}


# Process-global torch switches an import may flip. SGLang 0.5.23's CUDA platform module calls
# `torch.backends.cuda.enable_cudnn_sdp(False)` at import (sglang/multimodal_gen/runtime/platforms/cuda.py:45), which
# takes cuDNN attention away from every model in the process, the harness's DiT under SGLang's manager included
# (docs/findings/sglang-import-disables-cudnn-attention.md). The backend compares managers, not attention kernels:
# the switches are put back after the import and the record keeps what the import changed.
_SWITCHES: dict[str, tuple[Any, Any]] = {
    "sdp.cudnn": (lambda: torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.enable_cudnn_sdp),
    "sdp.flash": (lambda: torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.enable_flash_sdp),
    "sdp.mem_efficient": (lambda: torch.backends.cuda.mem_efficient_sdp_enabled(),
                          torch.backends.cuda.enable_mem_efficient_sdp),
    "sdp.math": (lambda: torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.enable_math_sdp),
    "matmul.allow_tf32": (lambda: torch.backends.cuda.matmul.allow_tf32,
                          lambda v: setattr(torch.backends.cuda.matmul, "allow_tf32", v)),
    "cudnn.allow_tf32": (lambda: torch.backends.cudnn.allow_tf32,
                         lambda v: setattr(torch.backends.cudnn, "allow_tf32", v)),
    "cudnn.benchmark": (lambda: torch.backends.cudnn.benchmark,
                        lambda v: setattr(torch.backends.cudnn, "benchmark", v)),
    "float32_matmul_precision": (torch.get_float32_matmul_precision, torch.set_float32_matmul_precision),
}


def torch_global_state() -> dict[str, Any]:
    """The process-global torch switches of `_SWITCHES`, by name."""
    return {name: get() for name, (get, _) in _SWITCHES.items()}


def restore_torch_global_state(before: dict[str, Any]) -> dict[str, list[Any]]:
    """Puts every switch of `before` back; returns the ones that had changed, {name: [before, after]}."""
    after = torch_global_state()
    changed = {name: [before[name], after[name]] for name in before if after[name] != before[name]}
    for name in changed:
        _SWITCHES[name][1](before[name])
    return changed


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
        self.counting_pins = count_sglang_pins(layerwise)  # before configure: its host stores pin there
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
        """Per group: its layers, prefetch, resident layers, host bytes of its consolidated stores, and `host`: what
        the `is_pinned()` walk finds now (`host_memory`); the release's hosting plan (`layer_hosting`)."""
        groups = {}
        walked = host_memory(self.managers)
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
                "host": walked.get(m.layers_attr_str, {}),
            }
        return {**self.info, "groups": groups, "prefetch_size_flag": self.server_args.dit_offload_prefetch_size,
                "layer_hosting": self.hosting, "pin_counter": _PIN_COUNTER if self.counting_pins else _WALK_ONLY}

    def host_counters(self) -> dict[str, int]:
        """The phase counters of what SGLang holds on the host now (`Meter.host_probe` reads them at each phase end):
        the walk's pinned / pageable / mapped bytes over every group, and, where the release registers its own
        buffers, `SGLANG_PINS`' bytes registered now and at most in this process."""
        return sglang_host_counters(host_memory(self.managers), SGLANG_PINS if self.counting_pins else None)


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


# ------------------------------------------------------------------------------------------ what SGLang pinned

_PIN_COUNTER = "cudaHostRegister through the release's _pin_in_place / _unpin_in_place, counted by the harness"
_WALK_ONLY = "no _pin_in_place in this release (it pins with pin_memory=True: torch's caching host allocator)"


class SGLangPinTally:
    """Host bytes SGLang page-locked itself with cudaHostRegister in this process: now, at most, and how many ranges
    (counted as the wrapped `_pin_in_place` / `_unpin_in_place` return; `count_sglang_pins`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ranges: dict[int, int] = {}
        self.bytes = 0
        self.peak_bytes = 0

    def pinned(self, data_ptr: int, nbytes: int) -> None:
        with self._lock:
            self.bytes += nbytes - self._ranges.get(data_ptr, 0)
            self._ranges[data_ptr] = nbytes
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def unpinned(self, data_ptr: int) -> None:
        with self._lock:
            self.bytes -= self._ranges.pop(data_ptr, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"pinned_sglang_registered_bytes": self.bytes,
                    "pinned_sglang_registered_peak_bytes": self.peak_bytes,
                    "pinned_sglang_registered_ranges": len(self._ranges)}


SGLANG_PINS = SGLangPinTally()


def count_sglang_pins(layerwise: Any, tally: SGLangPinTally = SGLANG_PINS) -> bool:
    """Wraps `layerwise`'s `_pin_in_place(tensor) -> bool` and `_unpin_in_place(data_ptr)` so that `tally` counts
    each range they register and unregister, for the rest of the process (the wrap stays: a pinned store unpins
    from a finalizer whenever its storage dies, and looks `_unpin_in_place` up when it pinned). Installed once per
    module; False where the release has no such functions (0.5.8, 0.5.13)."""
    pin, unpin = getattr(layerwise, "_pin_in_place", None), getattr(layerwise, "_unpin_in_place", None)
    if pin is None or unpin is None:
        return False
    if getattr(pin, "sglang_pin_tally", None) is not None:
        return True

    def counted_pin(tensor: torch.Tensor) -> bool:
        done = pin(tensor)
        if done:
            storage = tensor.untyped_storage()
            tally.pinned(storage.data_ptr(), storage.nbytes())
        return done

    def counted_unpin(data_ptr: int) -> None:
        unpin(data_ptr)
        tally.unpinned(data_ptr)

    counted_pin.sglang_pin_tally = tally  # type: ignore[attr-defined]
    layerwise._pin_in_place, layerwise._unpin_in_place = counted_pin, counted_unpin
    return True


def _pinned(t: torch.Tensor) -> bool:
    try:
        return bool(t.is_pinned())
    except Exception:  # no accelerator runtime to ask: not pinned
        return False


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _layer_host(copies: Iterable[torch.Tensor], mapped: Iterable[torch.Tensor],
                is_pinned: Callable[[torch.Tensor], bool]) -> tuple[str, dict[str, int]]:
    """Where one layer's host copy lives (mapped where any weight stays on its mapping; pinned where every copy is
    pinned; pageable where none is; else partly pinned) and its bytes by kind."""
    out = {"pinned_bytes": 0, "pageable_bytes": 0, "mapped_bytes": sum(_nbytes(t) for t in mapped)}
    for t in copies:
        out["pinned_bytes" if is_pinned(t) else "pageable_bytes"] += _nbytes(t)
    if out["mapped_bytes"]:
        return "mapped", out
    if not out["pageable_bytes"]:
        return "pinned", out
    return ("partly pinned" if out["pinned_bytes"] else "pageable"), out


def _group_host(manager: Any, is_pinned: Callable[[torch.Tensor], bool]) -> dict[str, Any]:
    stores = [getattr(manager, name, None) or {} for name in
              ("_consolidated_cpu_weights", "_strided_cpu_weights", "_mapped_cpu_weights")]
    out: dict[str, Any] = {"pinned_bytes": 0, "pageable_bytes": 0, "mapped_bytes": 0, "layers": {}}
    for layer in sorted(set().union(*stores)):
        copies = [*stores[0].get(layer, {}).values(), *stores[1].get(layer, {}).values()]
        where, sizes = _layer_host(copies, stores[2].get(layer, {}).values(), is_pinned)
        out["layers"][where] = out["layers"].get(where, 0) + 1
        for key, value in sizes.items():
            out[key] += value
    slots = list(getattr(getattr(manager, "_mapped_courier", None), "_slots", None) or [])
    if slots:  # the courier's staging slots for mapped layers
        out["courier_pinned_bytes"] = sum(_nbytes(t) for t in slots if is_pinned(t))
        out["courier_pageable_bytes"] = sum(_nbytes(t) for t in slots if not is_pinned(t))
    return out


def host_memory(managers: Iterable[Any], is_pinned: Callable[[torch.Tensor], bool] = _pinned
                ) -> dict[str, dict[str, Any]]:
    """Per layer group (`layers_attr_str`): the bytes of its managers' host copies by `is_pinned()` (consolidated
    and strided stores: pinned or pageable; weights left on their checkpoint mapping: mapped), the layers counted
    by where they live (`_layer_host`), and the mapped-layer courier's staging slots where it has them. Reads what
    every release keeps (0.5.8 has consolidated stores only)."""
    return {m.layers_attr_str: _group_host(m, is_pinned) for m in managers}


def sglang_host_counters(groups: dict[str, dict[str, Any]], tally: SGLangPinTally | None) -> dict[str, int]:
    """Phase counters from a `host_memory` walk (courier slots count as pinned or pageable) and the tally of
    SGLang's own registrations, where the release has one."""
    out = {"pinned_sglang_manager_bytes": 0, "pageable_sglang_manager_bytes": 0, "mapped_sglang_manager_bytes": 0}
    for g in groups.values():
        out["pinned_sglang_manager_bytes"] += g["pinned_bytes"] + g.get("courier_pinned_bytes", 0)
        out["pageable_sglang_manager_bytes"] += g["pageable_bytes"] + g.get("courier_pageable_bytes", 0)
        out["mapped_sglang_manager_bytes"] += g["mapped_bytes"]
    return {**out, **(tally.snapshot() if tally is not None else {})}
