"""Import SGLang 0.5.23's layerwise manager module alone, and read the process-global state an import can change.

Shared by the reproducers in this folder; imports nothing of the harness (each reproducer imports only SGLang's
manager module, torch and diffusers, plus this helper that sits beside it).

Where the module comes from: an installed `sglang==0.5.23` (`pip install "sglang[diffusion]==0.5.23"`), or a
folder given with `--sglang-site` (the harness's engine folder, `$OFFLOAD_BENCH_CACHE/sglang/0.5.23-py3.12/site`,
whose `sglang/__init__.py` is a one-line stub so that the LLM frontend is not imported). The folder is appended to
`sys.path` (the host's torch and diffusers win). On a machine without SGLang's CUDA kernels (`sgl_kernel`: 0.5.23's
quantization configs import it at module level) or, on a CPU box, without a working torchvision, an inert stand-in
module answers those imports; nothing on the layerwise path calls them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from typing import Any

LAYERWISE_MODULE = "sglang.multimodal_gen.runtime.managers.memory_managers.layerwise_offload"
BUDGET_MODULE = "sglang.multimodal_gen.runtime.managers.memory_managers.host_memory_budget"


class _Inert(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Inert(f"{cls.__name__}.{name}", (), {})

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return _Inert(f"{cls.__name__}()", (), {})

    def __getitem__(cls, key: Any) -> Any:
        return cls

    def __bool__(cls) -> bool:
        return False


class _StandIn(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Inert(f"{self.__name__}.{name}", (), {})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] not in self.roots:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        m = _StandIn(spec.name)
        m.__path__ = []
        m.__version__ = "0+stand-in"
        return m

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def _torchvision_works() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # PyPI's torchvision beside a CPU torch build: "operator torchvision::nms does not exist"
        for k in [k for k in sys.modules if k.split(".")[0] == "torchvision"]:
            del sys.modules[k]
        return False
    return True


def import_manager(site: str | None = None) -> tuple[types.ModuleType, list[str]]:
    """SGLang's layerwise manager module, and the modules stood in for. Import side effects happen here."""
    # transformers' generation stack (sklearn -> scipy.stats) is imported before the site joins sys.path, as the
    # harness's worker does: imported after it, scipy's docscrape saw a partial `sphinx` among the site's packages
    # and failed on `sphinx.ext` (H100 run of repro_pin_budget.py and repro_resident_layers.py;
    # experiments/sglang_numerics.py met the same on the H200).
    for name in ("scipy.stats", "transformers.generation"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    if site:
        sys.path.append(os.path.abspath(site))
    missing = {n for n in ("sgl_kernel",) if importlib.util.find_spec(n) is None}
    if not _torchvision_works():
        missing.add("torchvision")
    if missing:
        sys.meta_path.append(_Finder(missing))
    return importlib.import_module(LAYERWISE_MODULE), sorted(missing)


def global_state() -> dict[str, Any]:
    """The process-global switches that decide which kernels a forward runs (and what they compute)."""
    import torch

    b = torch.backends
    return {
        "sdp.flash": b.cuda.flash_sdp_enabled(),
        "sdp.mem_efficient": b.cuda.mem_efficient_sdp_enabled(),
        "sdp.math": b.cuda.math_sdp_enabled(),
        "sdp.cudnn": b.cuda.cudnn_sdp_enabled(),
        "matmul.allow_tf32": b.cuda.matmul.allow_tf32,
        "matmul.allow_bf16_reduced_precision_reduction": b.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "matmul.allow_fp16_reduced_precision_reduction": b.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn.enabled": b.cudnn.enabled,
        "cudnn.allow_tf32": b.cudnn.allow_tf32,
        "cudnn.benchmark": b.cudnn.benchmark,
        "cudnn.deterministic": b.cudnn.deterministic,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "default_dtype": str(torch.get_default_dtype()),
        "F.scaled_dot_product_attention": _qualname(torch.nn.functional.scaled_dot_product_attention),
        "F.layer_norm": _qualname(torch.nn.functional.layer_norm),
        "F.rms_norm": _qualname(getattr(torch.nn.functional, "rms_norm", None)),
        "F.linear": _qualname(torch.nn.functional.linear),
    }


def _qualname(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def state_diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


def env_diff(before: dict[str, str], after: dict[str, str]) -> dict[str, list[str | None]]:
    return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=1, default=str)
    print(text, flush=True)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
