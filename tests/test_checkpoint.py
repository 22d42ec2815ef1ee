"""harness/cell/checkpoint.py: synthetic safetensors checkpoints, their cache, and corruption handling."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import harness.cell.checkpoint as checkpoint_module
from harness.cell.checkpoint import (
    CheckpointDigestError,
    CheckpointError,
    CheckpointReader,
    cache_root,
    ensure_checkpoint,
    file_digest,
)
from harness.models import get_model

SPEC = get_model("qwen-image-tiny").components["dit"]
OLD = 1_000_000_000  # an mtime (s) long before any test ran: a rewritten file gets a fresh one


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache for tests that damage files (the session cache stays intact for the others)."""
    monkeypatch.setenv("OFFLOAD_BENCH_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture
def checkpoint(cache: Path) -> tuple[Path, bytes]:
    path = ensure_checkpoint(SPEC, seed=0, device="cpu")
    os.utime(path, (OLD, OLD))
    return path, path.read_bytes()


def test_cache_lives_under_the_env_folder(cache: Path) -> None:
    assert cache_root() == cache
    path = ensure_checkpoint(SPEC, seed=0, device="cpu")
    assert path == cache / "checkpoints" / f"dit-{SPEC.key(0)}-cpu" / "model.safetensors"
    assert (path.parent / "complete.json").exists()


def test_checkpoint_reads_the_same_through_safetensors_and_our_reader() -> None:
    path = ensure_checkpoint(SPEC, seed=0, device="cpu")  # the session cache
    reference = load_file(str(path))
    reader = CheckpointReader(path)
    module = SPEC.build_on_meta()
    assert set(reference) == set(reader.names()) == set(module.state_dict())
    assert reader.total_bytes() == sum(t.numel() * t.element_size() for t in reference.values())
    for name, expected in reference.items():
        view = reader.tensor(name)
        assert view.dtype == expected.dtype == torch.bfloat16 and view.shape == expected.shape
        assert torch.equal(view, expected)
        copy = torch.empty_like(expected)
        reader.read_into(name, copy)
        assert torch.equal(copy, expected)
    weights = [t for n, t in reference.items() if n.endswith(".weight") and t.dim() >= 2]
    assert all(0 < float(t.float().std()) < 1 for t in weights)  # seeded values with 1/sqrt(fan_in) scale


def test_read_into_raises_if_destination_has_the_wrong_size() -> None:
    reader = CheckpointReader(ensure_checkpoint(SPEC, seed=0, device="cpu"))
    name = reader.names()[0]
    with pytest.raises(ValueError, match="destination must be"):
        reader.read_into(name, torch.empty(reader.nbytes(name) + 2, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        reader.tensor("nope")


def test_second_call_returns_the_cached_file_without_rewriting(checkpoint: tuple[Path, bytes]) -> None:
    path, _ = checkpoint
    inode = path.stat().st_ino
    assert ensure_checkpoint(SPEC, seed=0, device="cpu") == path
    assert path.stat().st_mtime == OLD and path.stat().st_ino == inode


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)


def _header_not_json(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"X")  # the header's opening brace


def _header_changed(path: Path) -> None:
    data = path.read_bytes()
    assert data.count(b"offload-bench") == 1  # the metadata's generator name: same length, still valid JSON
    path.write_bytes(data.replace(b"offload-bench", b"offload-bencX"))


def _marker_deleted(path: Path) -> None:
    (path.parent / "complete.json").unlink()


def _marker_garbage(path: Path) -> None:
    (path.parent / "complete.json").write_text("{not json")


def _marker_wrong_size(path: Path) -> None:
    marker = path.parent / "complete.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "bytes": 1}))


@pytest.mark.parametrize(
    "damage",
    [_truncate, _header_not_json, _header_changed, _marker_deleted, _marker_garbage, _marker_wrong_size],
    ids=lambda f: f.__name__.strip("_"),
)
def test_damaged_checkpoint_is_regenerated(checkpoint: tuple[Path, bytes], damage) -> None:
    path, original = checkpoint
    damage(path)
    os.utime(path, (OLD, OLD))
    messages: list[str] = []
    assert ensure_checkpoint(SPEC, seed=0, device="cpu", progress=messages.append) == path
    assert path.stat().st_mtime != OLD, "the file was not rewritten"
    assert path.read_bytes() == original
    assert (path.parent / "complete.json").exists()
    assert any("generating" in m for m in messages)
    reader = CheckpointReader(path)
    assert torch.equal(reader.tensor(reader.names()[0]), load_file(str(path))[reader.names()[0]])


def _header_is_array(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 : 8 + header_len] = b"[" + b" " * (header_len - 2) + b"]"
    path.write_bytes(bytes(data))


def _marker_is_array(path: Path) -> None:
    (path.parent / "complete.json").write_text("[]")


@pytest.mark.parametrize("damage", [_header_is_array, _marker_is_array], ids=["header-array", "marker-array"])
def test_checkpoint_is_regenerated_if_json_is_not_an_object(checkpoint: tuple[Path, bytes], damage) -> None:
    path, original = checkpoint
    damage(path)
    assert ensure_checkpoint(SPEC, seed=0, device="cpu") == path
    assert path.read_bytes() == original


@pytest.mark.parametrize("keep", [0, 5, 8, 30, -1], ids=["empty", "in-length", "no-header", "mid-header", "mid-data"])
def test_reader_raises_naming_the_file_if_truncated(checkpoint: tuple[Path, bytes], keep: int) -> None:
    path, original = checkpoint
    path.write_bytes(original[:keep])
    with pytest.raises(CheckpointError) as info:
        CheckpointReader(path)
    assert str(path) in str(info.value)


def test_reader_raises_naming_the_file_if_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=str(tmp_path / "missing.safetensors")):
        CheckpointReader(tmp_path / "missing.safetensors")


def test_same_seed_gives_same_bytes_and_other_seed_other_bytes(tmp_path: Path, monkeypatch) -> None:
    assert SPEC.key(0) == SPEC.key(0) != SPEC.key(1)
    paths = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 1)):
        monkeypatch.setenv("OFFLOAD_BENCH_CACHE", str(tmp_path / label))
        paths[label] = ensure_checkpoint(SPEC, seed=seed, device="cpu")
    assert paths["a"].read_bytes() == paths["b"].read_bytes()
    assert paths["c"].parent.name == f"dit-{SPEC.key(1)}-cpu"
    a, c = CheckpointReader(paths["a"]), CheckpointReader(paths["c"])
    assert a.names() == c.names()
    name = next(n for n in a.names() if n.endswith("weight") and len(a.entries[n].shape) == 2)
    assert not torch.equal(a.tensor(name), c.tensor(name))


@pytest.mark.parametrize(
    "role",
    [
        "dit",
        "vae",
        pytest.param(
            "text_encoder",
        ),
    ],
)
def test_spec_key_is_unchanged_if_module_is_built(role: str) -> None:
    spec = get_model("qwen-image-tiny").components[role]
    config = copy.deepcopy(dict(spec.config))
    if isinstance(config.get("rope_scaling"), dict):  # as qwen_image.py publishes it (an earlier build adds keys)
        config["rope_scaling"] = {k: config["rope_scaling"][k] for k in ("type", "mrope_section")}
    fresh = dataclasses.replace(spec, config=config)
    snapshot, key = copy.deepcopy(config), fresh.key(0)
    fresh.build_on_meta()
    assert fresh.config == snapshot
    assert fresh.key(0) == key


def test_generation_reports_bytes_written_and_rate(cache: Path) -> None:
    """A person watching a 40 GiB checkpoint being generated sees how much is written and how fast."""
    messages: list[str] = []
    path = ensure_checkpoint(SPEC, seed=0, device="cpu", progress=messages.append)
    size_gib = f"{(path.stat().st_size - CheckpointReader(path).data_start) / 2**30:.2f} GiB written in "
    assert any(m.endswith("GB/s)") and "done, " + size_gib in m for m in messages), messages


# ------------------------------------------------------------------------------ content digest (issue #30)


def _flip_body_byte(path: Path) -> None:
    """One byte in the middle of the largest tensor's bytes: same size, header (and its digest) untouched."""
    reader = CheckpointReader(path)
    name = max(reader.names(), key=reader.nbytes)
    e = reader.entries[name]
    at = reader.data_start + (e.begin + e.end) // 2
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_body_changed_at_the_same_size_fails_with_the_digest_error(checkpoint: tuple[Path, bytes]) -> None:
    path, original = checkpoint
    _flip_body_byte(path)
    os.utime(path, (OLD, OLD))  # even with its mtime put back: ctime and the content tell
    assert path.stat().st_size == len(original) and CheckpointReader(path).header_digest  # header still fine
    with pytest.raises(CheckpointDigestError, match=r"content sha256 .* differs .*Regenerate it: rm -r") as err:
        ensure_checkpoint(SPEC, seed=0, device="cpu")
    assert str(path) in str(err.value) and isinstance(err.value, CheckpointError)
    assert path.read_bytes() != original, "a failure, never a silent regeneration"
    with pytest.raises(CheckpointDigestError):  # and again: no stamp was left for the bad file
        ensure_checkpoint(SPEC, seed=0, device="cpu")


def test_untouched_checkpoint_is_verified_once_then_trusted_while_its_stat_holds(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info: dict = {}
    path = ensure_checkpoint(SPEC, seed=0, device="cpu", integrity=info)
    assert info["verified"] == "generated" and info["file_sha256"] == file_digest(path)
    marker = json.loads((path.parent / "complete.json").read_text())
    assert marker["file_sha256"] == info["file_sha256"]

    os.utime(path, (OLD, OLD))  # stat changed: hashed again, and passes
    info = {}
    assert ensure_checkpoint(SPEC, seed=0, device="cpu", integrity=info) == path
    assert info["verified"] == "hashed" and info["hash_s"] >= 0

    def no_hashing(p: Path) -> str:
        raise AssertionError("an unchanged, verified file was hashed again")

    monkeypatch.setattr(checkpoint_module, "file_digest", no_hashing)
    info = {}
    assert ensure_checkpoint(SPEC, seed=0, device="cpu", integrity=info) == path
    assert info["verified"] == "unchanged"


def test_marker_without_content_digest_is_regenerated(checkpoint: tuple[Path, bytes]) -> None:
    path, original = checkpoint
    marker = path.parent / "complete.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "file_sha256"}))
    messages: list[str] = []
    info: dict = {}
    assert ensure_checkpoint(SPEC, seed=0, device="cpu", progress=messages.append, integrity=info) == path
    assert any("no content digest" in m for m in messages) and info["verified"] == "generated"
    assert path.read_bytes() == original
