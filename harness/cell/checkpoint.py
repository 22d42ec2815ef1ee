"""Synthetic safetensors checkpoints: seeded random weights written once, cached by spec, read through mmap.

The checkpoint is a real safetensors file (8-byte header length, JSON header, raw little-endian data), written by
streaming one tensor at a time so that a 38 GiB DiT never exists twice in host memory. Values are generated on
the fastest device available (a GPU generates the 20 B Qwen-Image DiT in seconds; the CPU would take minutes),
so the generator's device is part of the cache key. A `complete.json` marker is written last: a file without
it, or whose size or header digest disagrees with it, is regenerated.

Content digest (issue #30): the marker also holds `file_sha256`, the SHA-256 of the whole file (header and every
tensor's bytes), computed while the generator writes them (the bytes are in host memory then: no second read).
A reused checkpoint is hashed and checked against it before any cell loads it; a mismatch (a body changed at the
same size, header intact) raises `CheckpointDigestError`, naming the file and how to regenerate it, and the cell
fails: it never runs on other weights. Hashing outside the load keeps it out of the measured load (`setup_s`,
`read_s`); it runs in the cell's checkpoint check (`overhead.checkpoint_s`), and only when the file changed: a
verified file leaves `verified.json` beside it, keyed by (size, mtime_ns, ctime_ns, inode), and a file whose stat
still matches is not hashed again (the check is then one stat). What this cannot see: a change that keeps all four
(below the filesystem, e.g. bit rot); delete `verified.json` to force a re-hash.

Cost, measured on the dev machine's CPU (AMD EPYC, Python 3.11 hashlib, a 300 MiB file from the page cache):
sha256 1,045 MB/s (1.03 s/GiB), blake2b 591 MB/s (1.82 s/GiB): sha256 (SHA-NI) is chosen. A re-hash of the
38 GiB Qwen-Image DiT therefore costs about 40 s once after each change of the file; generation pays the same
per GiB inside its write loop, and an unchanged file costs nothing. The figure is `hash_s` in the record's
`components.<role>.checkpoint`.

A marker from before content digests (no `file_sha256`) is treated like a damaged one: the checkpoint is
regenerated, so every checkpoint in use has a digest taken at generation.
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


class CheckpointDigestError(CheckpointError):
    """A checkpoint's content differs from the digest written when it was generated (same size, header intact):
    the cell must not run on it. The message names the file, both digests and how to regenerate it."""


DIGEST = "sha256"  # hashlib's fastest here (SHA-NI): see the module docstring for the measured rates
_HASH_CHUNK = 8 << 20


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


def _safetensors_header(state: dict[str, torch.Tensor], names: list[str], seed: int) -> tuple[bytes, int]:
    """The safetensors header of `state` in `names` order (padded to 8 bytes), and the body's size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": "offload-bench", "seed": str(seed)}}
    offset = 0
    for name in names:
        t = state[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    return header_bytes + b" " * (-len(header_bytes) % 8), offset


def write_synthetic(
    module: torch.nn.Module, path: Path, seed: int, device: str, progress: Callable[[str], None] | None = None
) -> str:
    """Writes `module`'s state dict as a safetensors file with seeded values, one tensor at a time; returns the
    file's content digest (DIGEST, hex), taken from the bytes as they are written.

    Parameters may be on the meta device; persistent buffers (real, small) are written with their values.
    """
    state = module.state_dict()
    names = sorted(state)
    header_bytes, offset = _safetensors_header(state, names, seed)
    staging: torch.Tensor | None = None
    if device == "cuda":
        # One pinned staging buffer for every tensor: D2H at full PCIe rate, no fresh host pages per tensor.
        largest = max((state[n].numel() * state[n].element_size() for n in names), default=0)
        staging = torch.empty(largest, dtype=torch.uint8, pin_memory=True)
    tmp = path.with_suffix(".partial")
    began = started = time.monotonic()
    written = 0
    digest = hashlib.new(DIGEST)
    with open(tmp, "wb") as f:
        for head in (struct.pack("<Q", len(header_bytes)), header_bytes):
            f.write(head)
            digest.update(head)
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
            body = memoryview(host.numpy())
            digest.update(body)
            f.write(body)
            written += flat.numel()
            if progress and time.monotonic() - started > 5:
                progress(f"  {path.parent.name}: {_written(written, began)} of {offset / 2**30:.2f} GiB")
                started = time.monotonic()
    os.replace(tmp, path)
    if progress:
        progress(f"  {path.parent.name}: done, {_written(written, began)}")
    return digest.hexdigest()


def _written(nbytes: int, since: float) -> str:
    """'1.25 GiB written in 4.0 s (0.34 GB/s)': what a checkpoint's progress lines say."""
    seconds = max(time.monotonic() - since, 1e-6)
    return f"{nbytes / 2**30:.2f} GiB written in {seconds:.1f} s ({nbytes / seconds / 1e9:.2f} GB/s)"


def _cached(path: Path, marker: Path) -> tuple[dict[str, Any] | None, str | None]:
    """`complete.json` of a complete checkpoint at `path` whose size and header agree with it; else None and why
    not (None: there is none yet). The content is checked apart (`_verify_content`)."""
    if not (marker.exists() and path.exists()):
        return None, None
    try:
        want = json.loads(marker.read_text())
        reader = CheckpointReader(path)
        if reader.header_digest != want["header_sha256"] or path.stat().st_size != want["bytes"]:
            return None, "size or header digest differs from complete.json"
        if not isinstance(want.get("file_sha256"), str):
            return None, "complete.json has no content digest (written before content digests)"
        return want, None
    except (CheckpointError, json.JSONDecodeError, KeyError, TypeError, AttributeError, OSError) as e:
        return None, str(e)


def _stat_key(path: Path) -> dict[str, int]:
    """What `verified.json` is keyed by: a write, a truncation, a replacement or a utime changes one of them."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def file_digest(path: Path) -> str:
    """The content digest (DIGEST, hex) of a whole file, read in 8 MiB chunks."""
    h = hashlib.new(DIGEST)
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stamp(path: Path, digest: str) -> None:
    """Records that `path`, as its stat is now, has content `digest` (written atomically)."""
    stamp = path.parent / "verified.json"
    tmp = stamp.with_name(f".verified.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"file_sha256": digest, **_stat_key(path)}))
    os.replace(tmp, stamp)


def _stamped(path: Path, digest: str) -> bool:
    """Whether `verified.json` says `path`, unchanged since, was verified to have content `digest`."""
    try:
        stamp = json.loads((path.parent / "verified.json").read_text())
        return isinstance(stamp, dict) and stamp == {"file_sha256": digest, **_stat_key(path)}
    except (OSError, json.JSONDecodeError):
        return False


def _verify_content(path: Path, want: str) -> dict[str, Any]:
    """Hashes `path` and checks it against `want`, the digest written at generation; stamps it when it matches.

    Raises:
        CheckpointDigestError: the content differs.
    """
    t0 = time.perf_counter()
    got = file_digest(path)
    seconds = time.perf_counter() - t0
    if got != want:
        raise CheckpointDigestError(
            f"{path}: content {DIGEST} {got[:16]}... differs from {want[:16]}... written when it was generated "
            f"(complete.json): the file changed after it was written (same size, header intact), so a cell would "
            f"run on other weights. Regenerate it: rm -r '{path.parent}' (the next cell writes it again)"
        )
    _stamp(path, got)
    size = path.stat().st_size
    return {"verified": "hashed", "hash_s": round(seconds, 3), "hash_gbps": round(size / max(seconds, 1e-9) / 1e9, 3)}


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
    spec: ComponentSpec,
    seed: int,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
    integrity: dict[str, Any] | None = None,
) -> Path:
    """Returns the path of `spec`'s synthetic checkpoint, generating it (or regenerating a bad one) if needed.
    Generation holds a lock on the checkpoint's folder, so concurrent cells never write one checkpoint twice.

    A reused checkpoint's content is checked against the digest written at generation (hashed under the same lock
    when its stat changed since the last check, so concurrent cells hash it once). `integrity`, when given, is
    filled with what the check did: {"digest": "sha256", "file_sha256", "verified": "generated" (digest taken
    while writing) | "hashed" (read and hashed now, with hash_s and hash_gbps) | "unchanged" (stat matches the
    last verification)}.

    Raises:
        CheckpointDigestError: the checkpoint's content differs from its generation-time digest.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    folder = cache_root() / "checkpoints" / f"{spec.role}-{spec.key(seed)}-{device}"
    path, marker = folder / "model.safetensors", folder / "complete.json"
    info: dict[str, Any] = {}
    want, _ = _cached(path, marker)
    if want is not None and _stamped(path, want["file_sha256"]):
        info = {"verified": "unchanged"}
    else:
        with _writer_lock(folder, progress):
            want, reason = _cached(path, marker)  # again: another process may have written it while we waited
            if want is not None and _stamped(path, want["file_sha256"]):
                info = {"verified": "unchanged"}  # another process verified it while we waited
            elif want is not None:
                if progress:
                    progress(f"checkpoint {folder.name}: checking its content ({path.stat().st_size / 2**30:.2f} "
                             f"GiB, {DIGEST})")
                info = _verify_content(path, want["file_sha256"])
            else:
                if reason and progress:
                    progress(f"checkpoint {folder.name} is corrupt ({reason}); regenerating")
                want = _generate(spec, seed, device, path, marker, progress)
                info = {"verified": "generated"}
    if integrity is not None:
        integrity.update({"digest": DIGEST, "file_sha256": want["file_sha256"], **info})
    return path


def _generate(spec: ComponentSpec, seed: int, device: str, path: Path, marker: Path,
              progress: Callable[[str], None] | None) -> dict[str, Any]:
    """Writes the checkpoint and its marker (header digest, size, content digest taken while writing) and stamps it
    verified; returns the marker's content. The caller holds the folder's lock."""
    marker.unlink(missing_ok=True)
    if progress:
        progress(f"generating synthetic checkpoint {path.parent.name} on {device}")
    digest = write_synthetic(spec.build_on_meta(), path, seed, device, progress)
    want = {"header_sha256": CheckpointReader(path).header_digest, "bytes": path.stat().st_size,
            "file_sha256": digest, "spec": spec.factory}
    marker.write_text(json.dumps(want))
    _stamp(path, digest)
    return want


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
