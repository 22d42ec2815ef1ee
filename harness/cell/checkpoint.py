"""Synthetic safetensors checkpoints: seeded random weights written once, cached by spec, read through mmap.

The checkpoint is a real safetensors file (8-byte header length, JSON header, raw little-endian data), written by
streaming one tensor at a time so that a 38 GiB DiT never exists twice in host memory. Values are generated on
the fastest device available (a GPU generates the 20 B Qwen-Image DiT in seconds; the CPU would take minutes),
so the generator's device is part of the cache key. A `complete.json` marker is written last: a file without
it, or whose size or header digest disagrees with it, is regenerated.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.models import ComponentSpec

_DTYPES: dict[torch.dtype, str] = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


_MAX_READ = 1 << 30  # Linux returns at most ~2 GiB per read call


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupt. The message names the file."""


def cache_root() -> Path:
    return Path(os.environ.get("OFFLOAD_BENCH_CACHE", Path.home() / ".cache" / "offload-bench")).expanduser()


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class CheckpointReader:
    """Zero-copy view of a safetensors file: `tensor(name)` is a CPU tensor backed by the file's mmap.

    Copying such a view into a pinned buffer or a GPU tensor is the one and only host-side copy of the load.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) != 8:
                    raise CheckpointError(f"{self.path}: truncated before the header length")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > 100 * 2**20:
                    raise CheckpointError(f"{self.path}: header length {header_len} is not plausible")
                header_bytes = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e})") from e
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is {type(header).__name__}, not a JSON object")
        self.header_digest = hashlib.sha256(header_bytes).hexdigest()
        self.data_start = 8 + header_len
        self.entries: dict[str, TensorEntry] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                if not isinstance(info, dict):
                    raise TypeError(f"entry is {type(info).__name__}")
                dtype = _FROM_NAME[info["dtype"]]
                begin, end = info["data_offsets"]
                shape = tuple(int(s) for s in info["shape"])
            except (KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{self.path}: bad header entry for {name!r} ({e})") from e
            self.entries[name] = TensorEntry(dtype, shape, begin, end)
        expected = self.data_start + max((e.end for e in self.entries.values()), default=0)
        size = self.path.stat().st_size
        if size != expected:
            raise CheckpointError(f"{self.path}: {size} bytes on disk, header says {expected} (truncated?)")
        self._file = open(self.path, "rb")
        # ACCESS_COPY gives a writable private mapping (torch.frombuffer wants one) without copying any page.
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, name: str) -> int:
        return self._entry(name).nbytes

    def _entry(self, name: str) -> TensorEntry:
        e = self.entries.get(name)
        if e is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return e

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        """Reads tensor `name` straight from the file into `dst`, a contiguous CPU tensor of the same size.

        One copy (page cache -> dst) and no mapping left behind: unlike copying from `tensor(name)`, the file's
        pages never count in this process's RSS, so the host cost of a load is the destination alone.
        """
        e = self._entry(name)
        if not dst.is_contiguous() or dst.device.type != "cpu" or dst.numel() * dst.element_size() != e.nbytes:
            raise ValueError(f"read_into({name!r}): destination must be a contiguous CPU tensor of {e.nbytes} bytes")
        if e.nbytes == 0:
            return
        view = memoryview(dst.view(torch.uint8).reshape(-1).numpy())
        pos, done = self.data_start + e.begin, 0
        while done < e.nbytes:
            n = os.preadv(self._file.fileno(), [view[done : done + _MAX_READ]], pos + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: unexpected end of file reading {name!r}")
            done += n

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view backed by the file's mapping (its pages count in RSS while touched)."""
        e = self._entry(name)
        if e.nbytes == 0 or self._mmap is None:
            return torch.empty(e.shape, dtype=e.dtype)
        flat = torch.frombuffer(self._mmap, dtype=torch.uint8, count=e.nbytes, offset=self.data_start + e.begin)
        return flat.view(e.dtype).view(e.shape)

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def _synthetic_values(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    """Seeded values with sensible scales: matrices ~ N(0, 1/fan_in), norm weights ~ 1, biases small."""
    gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype, device=device)
    t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        t.mul_(1.0 / math.sqrt(max(fan_in, 1)))
    elif name.endswith("weight"):
        t.mul_(0.02).add_(1.0)
    else:
        t.mul_(0.02)
    return t.to(dtype)


def write_synthetic(
    module: torch.nn.Module, path: Path, seed: int, device: str, progress: Callable[[str], None] | None = None
) -> None:
    """Writes `module`'s state dict as a safetensors file with seeded values, one tensor at a time.

    Parameters may be on the meta device; persistent buffers (real, small) are written with their values.
    """
    state = module.state_dict()
    names = sorted(state)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": "offload-bench", "seed": str(seed)}}
    offset = 0
    for name in names:
        t = state[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    staging: torch.Tensor | None = None
    if device == "cuda":
        # One pinned staging buffer for every tensor: D2H at full PCIe rate, no fresh host pages per tensor.
        largest = max((state[n].numel() * state[n].element_size() for n in names), default=0)
        staging = torch.empty(largest, dtype=torch.uint8, pin_memory=True)
    tmp = path.with_suffix(".partial")
    began = started = time.monotonic()
    written = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name in names:
            t = state[name]
            if t.device.type == "meta":
                t = _synthetic_values(name, tuple(t.shape), t.dtype, seed, device)
            flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
            if staging is not None:
                host = staging[: flat.numel()]
                host.copy_(flat)
            else:
                host = flat.cpu()
            f.write(memoryview(host.numpy()))
            written += flat.numel()
            if progress and time.monotonic() - started > 5:
                progress(f"  {path.parent.name}: {_written(written, began)} of {offset / 2**30:.2f} GiB")
                started = time.monotonic()
    os.replace(tmp, path)
    if progress:
        progress(f"  {path.parent.name}: done, {_written(written, began)}")


def _written(nbytes: int, since: float) -> str:
    """'1.25 GiB written in 4.0 s (0.34 GB/s)': what a checkpoint's progress lines say."""
    seconds = max(time.monotonic() - since, 1e-6)
    return f"{nbytes / 2**30:.2f} GiB written in {seconds:.1f} s ({nbytes / seconds / 1e9:.2f} GB/s)"


def _cached(path: Path, marker: Path) -> tuple[bool, str | None]:
    """Whether a complete, intact checkpoint is at `path`; else why not (None: there is none yet)."""
    if not (marker.exists() and path.exists()):
        return False, None
    try:
        want = json.loads(marker.read_text())
        reader = CheckpointReader(path)
        if reader.header_digest == want["header_sha256"] and path.stat().st_size == want["bytes"]:
            return True, None
        return False, "size or header digest differs from complete.json"
    except (CheckpointError, json.JSONDecodeError, KeyError, TypeError, OSError) as e:
        return False, str(e)


@contextlib.contextmanager
def _writer_lock(folder: Path, progress: Callable[[str], None] | None) -> Iterator[None]:
    """An exclusive lock on the checkpoint's folder: cells running at once (pytest-xdist workers, one per GPU) that
    need the same checkpoint generate it once, the others wait and then read it."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress(f"checkpoint {folder.name} is being written by another process; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_checkpoint(
    spec: ComponentSpec, seed: int, device: str | None = None, progress: Callable[[str], None] | None = None
) -> Path:
    """Returns the path of `spec`'s synthetic checkpoint, generating it (or regenerating a bad one) if needed.
    Generation holds a lock on the checkpoint's folder, so concurrent cells never write one checkpoint twice."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = cache_root() / "checkpoints" / f"{spec.role}-{spec.key(seed)}-{device}"
    path, marker = folder / "model.safetensors", folder / "complete.json"
    if _cached(path, marker)[0]:
        return path
    with _writer_lock(folder, progress):
        ok, reason = _cached(path, marker)  # again: another process may have written it while we waited
        if ok:
            return path
        if reason and progress:
            progress(f"checkpoint {folder.name} is corrupt ({reason}); regenerating")
        marker.unlink(missing_ok=True)
        if progress:
            progress(f"generating synthetic checkpoint {folder.name} on {device}")
        module = spec.build_on_meta()
        write_synthetic(module, path, seed, device, progress)
        reader = CheckpointReader(path)
        marker.write_text(
            json.dumps({"header_sha256": reader.header_digest, "bytes": path.stat().st_size, "spec": spec.factory})
        )
    return path


class FolderReader:
    """A pipeline folder's component as one checkpoint (harness.models.folder): each tensor read from the
    safetensors file that holds it (shards included), under the name the harness's module gives it."""

    def __init__(self, manifest: Path) -> None:
        self.path = Path(manifest)
        data = json.loads(self.path.read_text())
        self._files: dict[str, CheckpointReader] = {}
        self._where: dict[str, tuple[CheckpointReader, str]] = {}
        self.entries: dict[str, TensorEntry] = {}
        for name, (file, stored) in data["tensors"].items():
            reader = self._files.get(file) or self._files.setdefault(file, CheckpointReader(Path(file)))
            self._where[name] = (reader, stored)
            self.entries[name] = reader.entries[stored]
        self.header_digest = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, name: str) -> int:
        return self.entries[name].nbytes

    def read_into(self, name: str, dst: torch.Tensor) -> None:
        reader, stored = self._where[name]
        reader.read_into(stored, dst)

    def tensor(self, name: str) -> torch.Tensor:
        reader, stored = self._where[name]
        return reader.tensor(stored)

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())


def open_checkpoint(path: Path) -> CheckpointReader | FolderReader:
    """A synthetic checkpoint (one safetensors file) or a pipeline folder's component (its manifest, .json)."""
    return FolderReader(path) if Path(path).suffix == ".json" else CheckpointReader(path)


def folder_checkpoint(model: Any, role: str) -> Path:
    """The manifest of a pipeline folder's component, written beside the synthetic checkpoints."""
    from harness.models.folder import checkpoint_manifest

    manifest = checkpoint_manifest(model, role)
    blob = json.dumps(manifest, sort_keys=True)
    path = cache_root() / "checkpoints" / f"folder-{hashlib.sha256(blob.encode()).hexdigest()[:16]}-{role}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(blob)
    return path
