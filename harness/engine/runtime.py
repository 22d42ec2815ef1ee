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

Sealing (`seal(site)`, the policy child): the child sees its own folder, the standard library, the harness, and
from the host only the packages named in `HOST_SHARED` (torch and what torch itself requires, numpy, triton,
torchvision). Any other host package is invisible to it: a release's pinned transformers that probes for an
optional package finds it absent, as in a clean install of that release, instead of importing the host's copy at
whatever version the host has (SGLang 0.5.13's transformers 5.8.1 imported the host's `kernels` 0.19.1, which it
cannot use, and the child died). A module the release needs and its folder lacks is then an import error that the
child reports with the release's install command.

Needs no torch at import; activating may import torch (SGLang does).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import re
import sys
import sysconfig
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


HOST_SHARED = ("torch", "numpy", "triton", "torchvision")
"""The host distributions an engine child shares, each with everything its own requirements pull in (torch: sympy,
networkx, jinja2, fsspec, filelock, typing-extensions, its CUDA wheels). The one place that says what crosses: a
release's folder holds no torch (harness.engine.install removes it), so the host's build is the one SGLang runs on;
the harness's own package is shared too, without its requirements."""

HARNESS_DISTRIBUTION = "offload-bench"


def _requirement_names(dist: importlib.metadata.Distribution) -> list[str]:
    """Names of `dist`'s requirements that are not behind an extra."""
    names = []
    for req in dist.requires or []:
        if "extra ==" in req.replace('"', "'").replace("extra==", "extra =="):
            continue
        names.append(re.split(r"[\s<>=!~;\[(]", req.strip(), maxsplit=1)[0])
    return names


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def shared_modules(roots: tuple[str, ...] = HOST_SHARED) -> tuple[set[str], set[str]]:
    """Top-level module names and (normalised) distribution names of the host distributions in `roots` and their
    requirements (followed), plus the harness itself. Distributions the host does not have are left out (a CPU box
    has no triton)."""
    by_dist: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for d in dists:
            by_dist.setdefault(_norm(d), set()).add(module)
    seen: set[str] = set()
    todo = [_norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        todo.extend(_norm(r) for r in _requirement_names(dist))
    modules = {m for d in seen for m in by_dist.get(d, ())}
    modules.update(by_dist.get(HARNESS_DISTRIBUTION, ()))
    modules.add("harness")
    return {m for m in modules if m.isidentifier()}, seen | {HARNESS_DISTRIBUTION}


class _SharedFinder(importlib.abc.MetaPathFinder):
    """Finds the shared top-level modules, and the shared distributions' metadata (transformers asks
    importlib.metadata for numpy's version), in the host's folders, which are no longer on sys.path."""

    def __init__(self, names: set[str], dists: set[str], host_dirs: list[str]) -> None:
        self.names = names  # exact module names, plus normalised ones (an archive's exclude list is normalised)
        self.normalised = {_norm(n) for n in names}
        self.dists = dists
        self.host_dirs = host_dirs

    def find_distributions(self, context: Any = None) -> Any:
        name = getattr(context, "name", None)
        if name is not None and _norm(name) not in self.dists:
            return iter(())
        host = importlib.metadata.DistributionFinder.Context(name=name, path=self.host_dirs)
        return (d for d in importlib.metadata.MetadataPathFinder.find_distributions(host)
                if _norm(d.metadata["Name"] or "") in self.dists)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if path is not None or (fullname not in self.names and _norm(fullname) not in self.normalised):
            return None  # submodules follow their package's __path__
        return importlib.machinery.PathFinder.find_spec(fullname, self.host_dirs)


def _stdlib_dirs() -> set[str]:
    paths = sysconfig.get_paths()
    dirs = {paths["stdlib"], paths["platstdlib"]}
    dirs |= {str(Path(d) / "lib-dynload") for d in list(dirs)}
    return {str(Path(d).resolve()) for d in dirs}


def seal(site: Path, harness_root: Path, also_shared: tuple[str, ...] = ()) -> list[str]:
    """Makes this process see only `site`, the standard library, `harness_root` (the checkout holding the harness
    package, when it is not an installed wheel) and the host's `shared_modules()`, plus `also_shared` (top-level
    modules a carried folder was packed without: harness.engine.install.host_shared). Returns the host folders taken
    off sys.path. Call before anything imports a non-shared host package."""
    stdlib = _stdlib_dirs()
    keep_extra = {str(site.resolve())}
    harness_root = harness_root.resolve()
    host_dirs: list[str] = []
    kept: list[str] = []
    for entry in sys.path:
        resolved = str(Path(entry or ".").resolve())
        if resolved in stdlib or resolved in keep_extra or entry.endswith(".zip"):
            kept.append(entry)
        elif resolved == str(harness_root) and not (harness_root / "site.py").exists() and not any(
                part in ("site-packages", "dist-packages") for part in harness_root.parts):
            kept.append(entry)  # a checkout: only the harness lives there
        else:
            host_dirs.append(entry)
    names, dists = shared_modules()
    names |= set(also_shared)
    dists |= {_norm(n) for n in also_shared}
    if any(str(Path(e or ".").resolve()) == str(harness_root) for e in kept):
        names.discard("harness")  # the checkout's harness, never another copy installed on the host
    sys.path[:] = kept
    if str(site) not in sys.path and str(site.resolve()) not in map(str, sys.path):
        sys.path.insert(0, str(site))
    sys.meta_path.insert(0, _SharedFinder(names, dists, host_dirs))
    importlib.invalidate_caches()
    return host_dirs
