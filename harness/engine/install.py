"""Install released SGLang versions side by side, for their offload policy and layerwise manager only.

`python -m harness.engine.install 0.5.8 0.5.13 0.5.23` puts each version in its own folder,
`$OFFLOAD_BENCH_CACHE/sglang/<version>/site`, that a child process puts on `sys.path`. Nothing is installed into
the running environment, so several versions coexist and the harness's own diffusers/transformers stay as they are.

What goes into a version's folder, and why:

- **The `sglang` wheel, unpacked without its compiled extensions** (`*.so`). `multimodal_gen` is pure Python; the
  `.so` files belong to the LLM server (gRPC, radix cache) and are built for CPython 3.11 only, while the lent GPU
  machine runs 3.12. Unpacking (a wheel is a zip) instead of `pip install` is what makes a cp311 wheel usable on
  3.12: pip refuses the tag, the Python code does not care.
- **`sglang/__init__.py` replaced by a one-line version stub.** The real one imports the LLM frontend, which pulls
  FlashInfer and SGLang's CUDA kernels at import time; `multimodal_gen` never uses what it exports. The original
  file's sha256 is kept in `engine.json`.
- **The pure-Python packages its imports need** (`IMPORT_DEPS`, found by importing `ServerArgs` and the layerwise
  manager of 0.5.8, 0.5.13 and 0.5.23 until nothing was missing), with the versions the wheel pins where it pins
  them, and their own dependencies. Not installed: torch, triton, torchvision (the GPU machine has them; see
  `harness.engine.runtime` for the CPU box), SGLang's kernels, FlashInfer, cutlass, deep-gemm.
- **The transformers the wheel pins** (e.g. 0.5.8: 4.57.1), with the tokenizers and huggingface-hub that it
  accepts: SGLang registers its own model configs with transformers at import, and a newer transformers that
  already has one of them refuses the import (0.5.13 under transformers 5.24: "'qwen3_asr' is already used").

`--python 3.12` builds a folder for another interpreter (binary wheels for that version, fetched by pip), which
`--archive` packs as a .tar.xz for a machine without a network (the lent GPU machine). `--wheels` unpacks from a
folder of already downloaded `sglang-*.whl` files instead of asking pip.

This module imports no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VERSIONS = ("0.5.8", "0.5.13", "0.5.23")
"""0.5.8: the last release that forces dit_cpu_offload off under layerwise (built 2026-01-23, before #18997);
0.5.13: the first release with #26925; 0.5.23: the newest at the time of writing."""

IMPORT_DEPS = (
    "aiohttp", "addict", "apache-tvm-ffi", "compressed-tensors", "dill", "einops", "fastapi", "gguf", "imageio",
    "IPython", "loguru", "msgspec", "opentelemetry-api", "opentelemetry-sdk", "pillow", "psutil", "pybase64",
    "pydantic", "python-multipart", "pyzmq", "remote-pdb", "requests", "sentencepiece", "starlette", "tqdm",
    "uvicorn", "httpx", "pyyaml", "regex", "safetensors", "diffusers", "setproctitle", "openai",
    "partial-json-parser", "cache-dit", "opencv-python-headless", "trimesh", "orjson", "cloudpickle",
    "python-dateutil", "scipy",
)
"""What `sglang.multimodal_gen`'s ServerArgs and layerwise manager import, beyond torch/triton/torchvision/numpy:
found by importing them in a virtual environment holding only torch and numpy (a developer's machine hides what it
already has: the first GPU run failed on orjson, which every CPU box here happened to have)."""

NO_DEPS = ("cache-dit", "compressed-tensors", "diffusers", "gguf", "opencv-python-headless", "transformers")
"""Installed without their dependencies: those name torch (which must stay the host's) or numpy."""

TRANSFORMERS_COMPANIONS = ("tokenizers", "huggingface-hub")

CPU_TRITON = "triton==3.7.1"
"""SGLang imports triton at module level throughout; torch's CUDA builds bring it, the CPU build does not. Where the
target interpreter has none, this one goes into the version's folder: it imports beside torch 2.13+cpu (checked),
and nothing here compiles a kernel with it."""


class InstallError(RuntimeError):
    """A version could not be fetched or installed. The message names it and says what failed."""


def engine_root() -> Path:
    base = Path(os.environ.get("OFFLOAD_BENCH_CACHE", Path.home() / ".cache" / "offload-bench")).expanduser()
    return Path(os.environ.get("OFFLOAD_BENCH_SGLANG_ROOT", base / "sglang")).expanduser()


def python_tag(python: str | None = None) -> str:
    return python or f"{sys.version_info.major}.{sys.version_info.minor}"


def version_dir(version: str, python: str | None = None, root: Path | None = None) -> Path:
    return (root or engine_root()) / f"{version}-py{python_tag(python)}"


@dataclass(frozen=True)
class InstalledEngine:
    """One installed SGLang version: where its folder is and what went into it (engine.json)."""

    version: str
    site: Path
    manifest: dict

    @property
    def has_layerwise_manager(self) -> bool:
        return bool(self.manifest.get("layerwise_module"))


def installed(root: Path | None = None, python: str | None = None) -> dict[str, InstalledEngine]:
    """Complete installs for this interpreter, by version (a folder without engine.json is not complete)."""
    found: dict[str, InstalledEngine] = {}
    base = root or engine_root()
    if not base.is_dir():
        return found
    suffix = f"-py{python_tag(python)}"
    for d in sorted(base.iterdir()):
        manifest_path = d / "engine.json"
        if not d.name.endswith(suffix) or not manifest_path.is_file():
            continue
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        found[manifest["version"]] = InstalledEngine(manifest["version"], d / "site", manifest)
    return found


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING"))[-1500:]
        raise InstallError(f"{what}: pip failed ({' '.join(cmd[3:])}):\n{tail}")


def _cross_args(python: str | None) -> list[str]:
    """pip arguments that select wheels for another interpreter (binary only, as pip requires)."""
    if python is None or python == python_tag():
        return []
    platforms = ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for p in platforms:
        args += ["--platform", p]
    return args


def fetch_wheel(version: str, dest: Path, wheels: Path | None = None) -> Path:
    """The `sglang==version` wheel: from `wheels` if given, else downloaded (no dependencies) into `dest`."""
    pattern = f"sglang-{version}-*.whl"
    for folder in (wheels, dest):
        if folder and (hits := sorted(folder.glob(pattern))):
            return hits[0]
    if wheels:
        raise InstallError(f"sglang {version}: no {pattern} in {wheels}")
    dest.mkdir(parents=True, exist_ok=True)
    _pip(["download", "--no-deps", "-q", "-d", str(dest), f"sglang=={version}"], f"sglang {version}")
    hits = sorted(dest.glob(pattern))
    if not hits:
        raise InstallError(f"sglang {version}: pip downloaded no {pattern}")
    return hits[0]


def wheel_requirements(wheel: Path) -> dict[str, str]:
    """The wheel's unconditional and `diffusion`-extra Requires-Dist, as {normalised name: requirement}."""
    with zipfile.ZipFile(wheel) as z:
        meta_name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = z.read(meta_name).decode()
    reqs: dict[str, str] = {}
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if 'extra == "diffusion"' in req:  # the pins of `sglang[diffusion]` (diffusers) are multimodal_gen's own
            req = req.split(";")[0].strip()
        elif ";" in req:
            continue
        name = re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0]
        reqs[_norm(name)] = req
    return reqs


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def unpack_engine(wheel: Path, site: Path, version: str) -> dict:
    """Unpacks `sglang/` without compiled extensions; swaps the package __init__ for a version stub."""
    skipped: list[str] = []
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            if not name.startswith("sglang/") or name.endswith("/"):
                continue
            if name.endswith(".so"):
                skipped.append(name)
                continue
            z.extract(info, site)
        original_init = z.read("sglang/__init__.py")
    init = site / "sglang" / "__init__.py"
    init.write_text(
        "# offload-bench: the wheel's own __init__ imports SGLang's LLM frontend and CUDA kernels, which\n"
        "# multimodal_gen does not use; replaced so that the diffusion runtime imports alone.\n"
        f"__version__ = {version!r}\n"
    )
    return {"skipped_extensions": skipped, "original_init_sha256": hashlib.sha256(original_init).hexdigest()}


def _transformers_companions(site: Path) -> list[str]:
    """tokenizers / huggingface-hub requirements of the transformers just installed in `site`."""
    table = site / "transformers" / "dependency_versions_table.py"
    namespace: dict = {}
    exec(compile(table.read_text(), str(table), "exec"), namespace)  # a plain dict literal, written by transformers
    deps = namespace["deps"]
    return [deps[name] for name in TRANSFORMERS_COMPANIONS if name in deps]


def _install_deps(
    wheel: Path, site: Path, version: str, python: str | None, log: Callable[[str], None]
) -> dict[str, str | list[str]]:
    """The transformers the wheel pins and the pure-Python packages its imports need, into `site`; the host's
    torch, triton and numpy stay the only ones. Returns what the manifest records of them."""
    pins = wheel_requirements(wheel)
    cross = _cross_args(python)
    with_deps = [pins.get(_norm(d), d) for d in IMPORT_DEPS if d not in NO_DEPS]
    no_deps = [pins.get(_norm(d), d) for d in NO_DEPS if d != "transformers"]
    transformers_req = pins.get("transformers", "transformers")
    log(f"sglang {version}: installing {transformers_req} and {len(with_deps) + len(no_deps)} import deps")
    common = ["install", "-q", "--no-compile", "--target", str(site), *cross]
    _pip([*common, "--no-deps", transformers_req, *no_deps], f"sglang {version}")
    companions = _transformers_companions(site)
    # torch, triton and numpy stay the host's: a second torch is what `--no-deps` on the wheel is for.
    host_triton = cross or importlib.util.find_spec("triton") is not None  # another Python: the GPU box's own
    extra = [] if host_triton else [CPU_TRITON]
    _pip([*common, *with_deps, *companions, *extra], f"sglang {version}")
    for shadow in ("torch", "numpy", "nvidia", *(("triton",) if host_triton else ())):
        for path in site.glob(f"{shadow}*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    return {"transformers": transformers_req, "import_deps": with_deps + no_deps + companions + extra}


def install(version: str, *, python: str | None = None, root: Path | None = None, wheels: Path | None = None,
            log=print) -> InstalledEngine:
    """Installs one version (a no-op when it is already complete). Returns what is installed."""
    target = version_dir(version, python, root)
    manifest_path = target / "engine.json"
    if manifest_path.is_file():
        return installed(root, python)[version]  # complete: nothing to say, nothing to fetch
    download = (root or engine_root()) / "wheels"
    wheel = fetch_wheel(version, download, wheels)
    # The folder is built beside its final place, so the rename below stays on one filesystem (with --wheels on a
    # fresh cache nothing else has created the engine root yet).
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
    try:
        site = tmp / "site"
        site.mkdir(parents=True)
        log(f"sglang {version}: unpacking {wheel.name}")
        unpacked = unpack_engine(wheel, site, version)
        deps = _install_deps(wheel, site, version, python, log)
        layerwise = _layerwise_module(site)
        manifest = {
            "version": version,
            "python": python_tag(python),
            "wheel": wheel.name,
            "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            **deps,
            "layerwise_module": layerwise,
            **unpacked,
        }
        (tmp / "engine.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"sglang {version}: installed in {target}")
    return installed(root, python)[version]


LAYERWISE_MODULES = (
    "sglang.multimodal_gen.runtime.managers.memory_managers.layerwise_offload",  # June 2026 on
    "sglang.multimodal_gen.runtime.managers.layerwise_offload",
    "sglang.multimodal_gen.runtime.utils.layerwise_offload",  # January 2026 (0.5.8)
)


def _layerwise_module(site: Path) -> str | None:
    for mod in LAYERWISE_MODULES:
        if (site / (mod.replace(".", "/") + ".py")).is_file():
            return mod
    return None


def archive(versions: list[str], python: str, out: Path, root: Path | None = None,
            exclude: tuple[str, ...] = ()) -> Path:
    """Packs installed folders for `python` into one .tar.xz, to carry to a machine without a network.

    `exclude`: top-level package folders of `site/` to leave out, for a machine that has them already (the
    worker puts a version's folder last on sys.path, so the machine's own copies are the ones imported there).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = {_norm(e) for e in exclude}

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if len(parts) >= 3 and parts[1] == "site":
            top = parts[2].split("-")[0] if parts[2].endswith(".dist-info") else parts[2]
            if _norm(top.removesuffix(".libs").removesuffix(".py")) in skip:
                return None
        return info

    with tarfile.open(out, "w:xz", preset=6) as tar:
        for v in versions:
            d = version_dir(v, python, root)
            if not (d / "engine.json").is_file():
                raise InstallError(f"sglang {v} for Python {python} is not installed in {d}")
            tar.add(d, arcname=d.name, filter=keep)
            # what was left out is what the sealed policy child must take from the target machine instead
            listing = json.dumps(sorted(skip), indent=1).encode() + b"\n"
            info = tarfile.TarInfo(f"{d.name}/{HOST_SHARED_FILE}")
            info.size = len(listing)
            tar.addfile(info, io.BytesIO(listing))
    return out


HOST_SHARED_FILE = "host-shared.json"
"""In a version's folder unpacked from an archive made with `--exclude`: the packages left out, which the sealed
policy child then shares with the host (harness.engine.runtime.seal) instead of failing to import them."""


def host_shared(site: Path) -> tuple[str, ...]:
    """The packages a version's folder was packed without (none for a folder installed here)."""
    path = site.parent / HOST_SHARED_FILE
    try:
        return tuple(json.loads(path.read_text()))
    except (OSError, ValueError):
        return ()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.engine.install", description=__doc__.split("\n")[0])
    parser.add_argument("versions", nargs="*", default=list(DEFAULT_VERSIONS))
    parser.add_argument("--python", help="build for this interpreter (e.g. 3.12), not the running one")
    parser.add_argument("--wheels", type=Path, help="a folder holding the sglang wheels (no download)")
    parser.add_argument("--archive", type=Path, help="also pack the installed folders into this .tar.xz")
    parser.add_argument("--exclude", default="", help="comma-separated packages the target machine has (archive)")
    parser.add_argument("--list", action="store_true", help="print what is installed and exit")
    args = parser.parse_args(argv)
    if args.list:
        for v, eng in installed(python=args.python).items():
            print(f"{v}\t{eng.site}")
        return 0
    try:
        for v in args.versions:
            install(v, python=args.python, wheels=args.wheels)
        if args.archive:
            exclude = tuple(e for e in args.exclude.split(",") if e)
            print(f"wrote {archive(args.versions, python_tag(args.python), args.archive, exclude=exclude)}")
    except InstallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
