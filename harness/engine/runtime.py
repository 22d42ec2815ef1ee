"""Importing an installed SGLang version inside a child process (`harness.engine.install` installs them).

`activate(site)` puts one version's folder on `sys.path`, first for the policy child (SGLang's pinned
transformers must win there) or last for the GPU worker (our pipeline keeps the host's diffusers/transformers; the
layerwise manager needs nothing the host lacks but SGLang's own modules).

Modules may be missing that SGLang imports but the offload path never runs. On a CPU box: torchvision. SGLang
imports it at module level in files that
`ServerArgs` reaches (0.5.13 `srt/utils/common.py`: `decode_jpeg`; 0.5.23 the OCR configs) but never calls it for
offload decisions, and PyPI's torchvision cannot load beside the CPU build of torch ("operator torchvision::nms
does not exist"). So where `import torchvision` fails, and only then, a stand-in module answers every attribute
with an inert class. The GPU machine has a real torchvision and gets no stand-in. Which modules were stood in is
recorded (`stand_ins()`).

Needs no torch at import; activating may import torch (SGLang does).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

STAND_IN_CANDIDATES = ("torchvision", "sgl_kernel")
"""torchvision (CPU box only, see above) and SGLang's CUDA kernel packages, never installed here: on CUDA,
0.5.23's quantization configs import `sgl_kernel` at module level (`compressed_tensors_w8a8_int8`: int8_scaled_mm),
which ServerArgs and the layerwise manager reach through the DiT config classes; nothing on the offload path calls
a kernel. Found on the lent H200 (the first sglang-backend cell failed there on exactly that import) and by
importing the manager with torch.cuda patched to report an H200 on this box. Keep the list to what was seen: a
stand-in also answers `importlib.util.find_spec`, and libraries that probe for an optional package then believe it
is there (transformers 5.8 with a flash_attn stand-in: KeyError 'flash_attn' in is_flash_attn_2_available)."""
_stood_in: list[str] = []


class _Inert(type):
    """A class that answers any attribute with another inert class, is falsy, and passes a function through when
    used as a decorator: what module-level code does with a library it only imports."""

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


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Inert(f"{self.__name__}.{name}", (), {})


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots: set[str]) -> None:
        self.roots = roots

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__version__ = "0+offload-bench-stand-in"
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def stand_ins() -> list[str]:
    return list(_stood_in)


def activate(site: Path, *, first: bool) -> None:
    """Makes one installed version importable in this process (once; a second version is refused)."""
    site_s = str(site)
    active = [p for p in sys.path if p.endswith("/site") and "sglang" in p and p != site_s]
    if active:
        raise RuntimeError(f"another SGLang version is already active in this process: {active[0]}")
    if site_s not in sys.path:
        sys.path.insert(0, site_s) if first else sys.path.append(site_s)
    missing = {name for name in STAND_IN_CANDIDATES if importlib.util.find_spec(name) is None}
    if missing:
        _stood_in.extend(sorted(missing))
        sys.meta_path.append(_StandInFinder(missing))
