"""The checkpoint a resolution is asked with: a folder model's own files, or a zoo model's sized stand-in (#29).

SGLang 0.5.23's automatic memory policy sizes the model from its checkpoint before anything is loaded: the size of
each component of a locally cached Diffusers checkpoint (`runtime/loader/utils.checkpoint_component_sizes`, every
`model_index.json` component's safetensors headers: the "every weight fits twice over" tier) and the DiT's
parameter count (`dit_parameter_count`: streaming a DiT that overflows the card). Without files both answer None
and the model's declared policy stands. A server started on a real checkpoint sees them, so a resolution is asked
with one:

- a folder model (`--model PATH`, `harness.models.folder`): that folder, read as SGLang reads it;
- a zoo model: its **sized stand-in**, laid out as the published checkpoint (`LAYOUTS`: `model_index.json`, one
  folder per component with its config and safetensors files, sharded with an index past 10 GB as diffusers'
  `save_pretrained` does) whose headers list every tensor of the zoo's module under its published name, dtype,
  shape and offsets, and whose data region is a hole (`truncate`): SGLang's sizing reads headers only, so it costs
  no disk. It is written once per spec under the harness cache (`<cache>/standins/<model>-<digest>/`), its tensor
  table built on the meta device in a child process (`python -m harness.models.standin NAME`), so the parent never
  imports torch.

`CheckpointSource` names the checkpoint: its kind, its name, the table SGLang reads from it (per component,
parameters by dtype) and that table's digest, which keys the recorded answers. A zoo model's table is committed
(`standin_sizes.json`, written by `python -m harness.models.sizes --write` from the module on meta and checked
against it by the tests and by every stand-in written), so asking needs neither torch nor files.

A zoo stand-in holds what the zoo runs: Qwen-Image's text encoder is Qwen2.5-VL's language model without its
vision tower and LM head (7.07 B parameters; the published folder has 8.29 B), and every tensor is BF16 (the
published Wan VAE is F32). SGLang sizes a component by its parameters in the precision it loads it in (the
pipeline config's), so the stored dtype does not move its decisions; the missing 1.2 B move Qwen-Image's
"fits twice over" line from 107.6 to 102.9 GiB, between the cards anyone asks about (80 and 141 GiB).

This module imports no torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from harness.common.locations import cache_root
from harness.models import ModelSpec, get_model

STANDIN_FORMAT = 1
"""Bumped when the stand-in's layout changes: part of every digest, so stale stand-ins and answers go unused."""
SIZES_PATH = Path(__file__).with_name("standin_sizes.json")
SHARD_BYTES = 10 * 10**9  # diffusers' save_pretrained default max_shard_size, "10GB"
FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # SGLang's _FLOAT_DTYPE_BYTES: the dtypes it sizes
DTYPE_BYTES = {**FLOAT_BYTES, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DIT_FOLDER = "transformer"  # SGLang's _DIT_SUBFOLDER
_UNSIZED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf")  # weights SGLang cannot size: no answer
_PREFERRED_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# SGLang's weights/source.py: a precision variant (x.fp16.safetensors) is ignored beside its canonical file
_VARIANT = re.compile(r"^(?P<stem>.+?)\.(?:fp16|bf16|fp32)(?:-\d+-of-\d+)?(?P<suffix>\.safetensors(?:\.index\.json)?)$")
_CANONICAL = re.compile(r"^(?P<stem>.+?)(?:-\d+-of-\d+)?(?P<suffix>\.safetensors(?:\.index\.json)?)$")

Counts = dict[str, int]  # parameters by safetensors dtype
Rows = list[tuple[str, str, list[int]]]  # (published tensor name, dtype, shape)


class StandinError(RuntimeError):
    """A stand-in could not be made or its committed sizes are stale; the message says what to run."""


# ------------------------------------------------------------------------------------------------ the layout


@dataclass(frozen=True)
class Part:
    """One folder of the published checkpoint and which of the zoo module's tensors it holds.

    Args:
        folder (str): its name in model_index.json.
        library (str), cls (str): what model_index.json says loads it.
        role (str | None): the zoo role whose tensors it holds (None: no weights, e.g. a tokenizer).
        take (str): the zoo module's name prefix it holds (stripped): FLUX's "clip." and "t5.".
        put (str): the published name prefix: Qwen2.5-VL's "model.".
        renames (tuple): zoo name -> published name (T5's embedding, untied in the zoo).
        config_key (str | None): the part of the zoo config that is this folder's (FLUX: "clip", "t5").
    """

    folder: str
    library: str
    cls: str
    role: str | None = None
    take: str = ""
    put: str = ""
    renames: tuple[tuple[str, str], ...] = ()
    config_key: str | None = None

    def published(self, zoo_name: str) -> str | None:
        """A zoo module's tensor name as this folder holds it, or None: not this folder's."""
        if not zoo_name.startswith(self.take):
            return None
        name = zoo_name[len(self.take):]
        return self.put + dict(self.renames).get(name, name)


_T5_SHARED = (("encoder.embed_tokens.weight", "shared.weight"),)  # one embedding, published under T5's name
_QWEN_PARTS = (
    Part("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler"),
    Part("text_encoder", "transformers", "Qwen2_5_VLForConditionalGeneration", "text_encoder", put="model."),
    Part("tokenizer", "transformers", "Qwen2Tokenizer"),
    Part("transformer", "diffusers", "QwenImageTransformer2DModel", "dit"),
    Part("vae", "diffusers", "AutoencoderKLQwenImage", "vae"),
)
LAYOUTS: dict[tuple[str, bool], tuple[str, tuple[Part, ...]]] = {
    # (family, edit): the published checkpoint's pipeline class and folders (harness.engine.serverargs'
    # FAMILY_CHECKPOINTS names the checkpoints: Qwen-Image, Qwen-Image-Edit-2509, FLUX.1-dev, Wan2.1-T2V-14B)
    ("qwen-image", False): ("QwenImagePipeline", _QWEN_PARTS),
    ("qwen-image", True): ("QwenImageEditPlusPipeline",
                           (*_QWEN_PARTS, Part("processor", "transformers", "Qwen2VLProcessor"))),
    ("flux", False): ("FluxPipeline", (
        Part("scheduler", "diffusers", "FlowMatchEulerDiscreteScheduler"),
        Part("text_encoder", "transformers", "CLIPTextModel", "text_encoder", take="clip.", config_key="clip"),
        Part("text_encoder_2", "transformers", "T5EncoderModel", "text_encoder", take="t5.", renames=_T5_SHARED,
             config_key="t5"),
        Part("tokenizer", "transformers", "CLIPTokenizer"),
        Part("tokenizer_2", "transformers", "T5TokenizerFast"),
        Part("transformer", "diffusers", "FluxTransformer2DModel", "dit"),
        Part("vae", "diffusers", "AutoencoderKL", "vae"),
    )),
    ("wan", False): ("WanPipeline", (
        Part("scheduler", "diffusers", "UniPCMultistepScheduler"),
        Part("text_encoder", "transformers", "UMT5EncoderModel", "text_encoder", renames=_T5_SHARED),
        Part("tokenizer", "transformers", "T5TokenizerFast"),
        Part("transformer", "diffusers", "WanTransformer3DModel", "dit"),
        Part("vae", "diffusers", "AutoencoderKLWan", "vae"),
    )),
}


def layout_of(spec: ModelSpec) -> tuple[str, tuple[Part, ...]] | None:
    return LAYOUTS.get((spec.family, spec.edit))


def spec_digest(spec: ModelSpec) -> str:
    """A digest of what decides a zoo model's stand-in: its components' checkpoint keys and the layout."""
    layout = layout_of(spec)
    keys = {role: comp.key(0) for role, comp in sorted(spec.components.items())}
    blob = json.dumps({"format": STANDIN_FORMAT, "components": keys, "layout": repr(layout)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- reading, as SGLang reads


def read_counts(path: Path) -> tuple[Counts, int]:
    """A safetensors file's parameters by dtype and its tensor bytes, from its header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    counts: Counts = {}
    nbytes = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for s in info["shape"]:
            numel *= int(s)
        counts[info["dtype"]] = counts.get(info["dtype"], 0) + numel
        nbytes += info["data_offsets"][1] - info["data_offsets"][0]
    return counts, nbytes


def _unvaried(names: list[str]) -> list[str]:
    """SGLang's filter_duplicate_precision_variant_safetensors: a variant goes where its canonical file is."""
    canonical = {(m["stem"], m["suffix"]) for n in names if not _VARIANT.match(n) and (m := _CANONICAL.match(n))}
    return [n for n in names if not ((m := _VARIANT.match(n)) and (m["stem"], m["suffix"]) in canonical)]


def folder_shards(folder: Path) -> list[Path] | None:
    """The safetensors files SGLang sizes a component folder by (`_local_dit_parameter_counts`): its index's
    shards, else every canonical file; None where one is missing or there is none."""
    index = folder / _PREFERRED_INDEX
    if not index.is_file():
        found = _unvaried(sorted(p.name for p in folder.glob("*.safetensors.index.json")))
        index = folder / found[0] if len(found) == 1 else index
    if index.is_file():
        shards = [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        shards = [folder / n for n in _unvaried(sorted(p.name for p in folder.glob("*.safetensors")))]
    return shards if shards and all(s.is_file() for s in shards) else None


def folder_counts(folder: Path) -> tuple[Counts, int] | None:
    """A component folder's parameters by dtype and its tensor bytes, as SGLang sizes it."""
    shards = folder_shards(folder)
    if shards is None:
        return None
    counts: Counts = {}
    nbytes = 0
    for shard in shards:
        c, b = read_counts(shard)
        nbytes += b
        for dtype, n in c.items():
            counts[dtype] = counts.get(dtype, 0) + n
    return counts, nbytes


def component_counts(root: Path) -> dict[str, Counts] | None:
    """SGLang 0.5.23's `checkpoint_component_sizes` on a local pipeline folder, as parameters by dtype: every
    model_index.json component with safetensors weights; None where SGLang answers None (a listed component
    missing, unsizable weights, a non-float dtype, an unreadable file)."""
    try:
        index = json.loads((root / "model_index.json").read_text())
        out: dict[str, Counts] = {}
        for name, entry in index.items():
            if not isinstance(entry, list) or entry[0] is None:
                continue
            files = os.listdir(root / name)
            if not any(f.endswith(".safetensors") for f in files):
                if any(f.endswith(_UNSIZED_SUFFIXES) for f in files):
                    return None
                continue
            read = folder_counts(root / name)
            if read is None or not read[0] or not read[0].keys() <= FLOAT_BYTES.keys():
                return None
            out[name] = read[0]
        return out
    except Exception:  # SGLang's own catch-all: any failure to size is "cannot size"
        return None


# ------------------------------------------------------------------------------------------- the source


def _pairs(counts: Counts) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(counts.items()))


@dataclass(frozen=True)
class CheckpointSource:
    """The checkpoint SGLang is shown for a resolution.

    Args:
        kind (str): "folder" (a folder model's own) or "zoo" (a zoo model's sized stand-in).
        name (str): the folder (resolved), or the zoo model's name.
        digest (str): a digest of what SGLang reads (the tables below and the bytes; a zoo model's spec too):
            recorded answers are keyed by it, so answers with and without a checkpoint, or for two checkpoints,
            never mix.
        components (tuple | None): `checkpoint_component_sizes`'s reading: per component, parameters by dtype;
            None where SGLang cannot size the checkpoint.
        dit (tuple | None): `dit_parameter_count`'s reading of the transformer folder, parameters by dtype.
        total_bytes (int): the tensor bytes of every component's safetensors files (what a load reads).
        path (str | None): the folder SGLang is shown (a zoo model's once its stand-in is written).
    """

    kind: str
    name: str
    digest: str
    components: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] | None
    dit: tuple[tuple[str, int], ...] | None
    total_bytes: int
    path: str | None = None

    @property
    def label(self) -> str:
        """What the record says SGLang saw: "folder <path>" or "zoo sized stand-in <model>@<digest>"."""
        return f"folder {self.name}" if self.kind == "folder" else f"zoo sized stand-in {self.name}@{self.digest}"

    def component_sizes(self) -> dict[str, tuple[int, int]] | None:
        """SGLang's `checkpoint_component_sizes` answer: component -> (parameters, stored bytes)."""
        if self.components is None:
            return None
        return {name: (sum(n for _, n in counts), sum(n * FLOAT_BYTES[d] for d, n in counts))
                for name, counts in self.components}

    @property
    def dit_params(self) -> int | None:
        """SGLang's `dit_parameter_count`: None without a float-only transformer."""
        if not self.dit or not {d for d, _ in self.dit} <= FLOAT_BYTES.keys():
            return None
        return sum(n for _, n in self.dit)

    def identity(self) -> dict[str, Any]:
        """What keys an answer: a zoo stand-in's place on disk is this machine's, not part of it."""
        return {"kind": self.kind, "name": self.name, "digest": self.digest}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointSource:
        comps = d.get("components")
        return cls(kind=str(d["kind"]), name=str(d["name"]), digest=str(d["digest"]),
                   components=None if comps is None else tuple((str(c), tuple((str(k), int(v)) for k, v in counts))
                                                               for c, counts in comps),
                   dit=None if d.get("dit") is None else tuple((str(k), int(v)) for k, v in d["dit"]),
                   total_bytes=int(d.get("total_bytes") or 0), path=d.get("path"))


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"format": STANDIN_FORMAT, **payload}, sort_keys=True).encode()).hexdigest()[:16]


@cache
def folder_source(path: str) -> CheckpointSource:
    """A folder model's checkpoint: the folder SGLang would be started on, read as it reads it."""
    from harness.models.folder import snapshot_of

    root = snapshot_of(path)
    if root is None:
        raise StandinError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    comps = component_counts(root)
    dit = folder_counts(root / DIT_FOLDER) if (root / DIT_FOLDER).is_dir() else None
    index = json.loads((root / "model_index.json").read_text())
    total = 0
    for name, entry in index.items():
        read = folder_counts(root / name) if isinstance(entry, list) and (root / name).is_dir() else None
        total += read[1] if read else 0
    components = None if comps is None else tuple((c, _pairs(n)) for c, n in sorted(comps.items()))
    dit_pairs = None if dit is None else _pairs(dit[0])
    digest = _digest({"components": components, "dit": dit_pairs, "total": total})
    return CheckpointSource("folder", str(root), digest, components, dit_pairs, total, str(root))


@cache
def committed_sizes() -> dict[str, Any]:
    return json.loads(SIZES_PATH.read_text()) if SIZES_PATH.is_file() else {}


def zoo_source(name: str) -> CheckpointSource | None:
    """A zoo model's sized stand-in (its path set if it is written here already); None for a family without a
    published layout.

    Raises:
        StandinError: the committed sizes lack the model or were written for another spec.
    """
    spec = get_model(name)
    if layout_of(spec) is None:
        return None
    entry = committed_sizes().get(name)
    if entry is None or entry.get("spec") != spec_digest(spec):
        raise StandinError(f"{SIZES_PATH.name} has no sizes for zoo model {name!r} as it is now (its spec changed?): "
                           "run `python -m harness.models.sizes --write`")
    components = tuple((c, _pairs(n)) for c, n in sorted(entry["components"].items()))
    dit = dict(components).get(DIT_FOLDER)
    total = sum(n * FLOAT_BYTES[d] for _, counts in components for d, n in counts)
    digest = _digest({"spec": entry["spec"], "components": components, "dit": dit, "total": total})
    dest = standin_dir(name, digest)
    return CheckpointSource("zoo", name, digest, components, dit, total,
                            str(dest) if (dest / "standin.json").is_file() else None)


def checkpoint_source(model: str | None) -> CheckpointSource | None:
    """The checkpoint a server would be started on for `model` (a zoo name or a folder), or None: none known."""
    from harness.models import ZOO, _load_families
    from harness.models.folder import is_folder_model

    if not model:
        return None
    _load_families()
    if model in ZOO:
        return zoo_source(model)
    return folder_source(model) if is_folder_model(model) else None


def standin_dir(name: str, digest: str) -> Path:
    return cache_root() / "standins" / f"{name}-{digest}"


def ensure_written(source: CheckpointSource, timeout_s: float = 600.0) -> CheckpointSource:
    """`source` with a folder on disk: a zoo stand-in is written (in a child process, torch on meta) unless it is
    there already. A folder model is its own folder.

    Raises:
        StandinError: the child failed (with its stderr's tail).
    """
    if source.kind != "zoo":
        return source
    dest = standin_dir(source.name, source.digest)
    if not (dest / "standin.json").is_file():
        from harness import REPO

        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH"))
                                                           if p)}
        proc = subprocess.run([sys.executable, "-m", "harness.models.standin", source.name, "--dest", str(dest)],
                              capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise StandinError(f"the sized stand-in of {source.name} could not be written to {dest}:\n{tail}")
    return replace(source, path=str(dest))


# ------------------------------------------------------------------------------------------------- writing


def tensor_table(spec: ModelSpec) -> dict[str, Rows]:
    """Every tensor of the zoo's modules, built on meta, by published folder: (published name, dtype, shape).

    Raises:
        StandinError: a family without a layout, or a tensor no folder (or two) holds.
    """
    layout = layout_of(spec)
    if layout is None:
        raise StandinError(f"{spec.name}: no published layout for family {spec.family}{' (edit)' if spec.edit else ''}")
    codes = {"torch.bfloat16": "BF16", "torch.float16": "F16", "torch.float32": "F32", "torch.float64": "F64"}
    out: dict[str, Rows] = {}
    for role, comp in sorted(spec.components.items()):
        parts = [p for p in layout[1] if p.role == role]
        for zoo_name, t in comp.build_on_meta().state_dict().items():
            homes = [(p, p.published(zoo_name)) for p in parts if p.published(zoo_name) is not None]
            if len(homes) != 1:
                raise StandinError(f"{spec.name}: {role} tensor {zoo_name} goes to {len(homes)} folders, not one")
            part, name = homes[0]
            out.setdefault(part.folder, []).append((str(name), codes[str(t.dtype)], list(t.shape)))
    return {folder: sorted(rows) for folder, rows in sorted(out.items())}


def table_counts(table: dict[str, Rows]) -> dict[str, Counts]:
    out: dict[str, Counts] = {}
    for folder, rows in table.items():
        counts = out.setdefault(folder, {})
        for _, dtype, shape in rows:
            numel = 1
            for s in shape:
                numel *= s
            counts[dtype] = counts.get(dtype, 0) + numel
    return out


def _nbytes(row: tuple[str, str, list[int]]) -> int:
    numel = 1
    for s in row[2]:
        numel *= s
    return numel * DTYPE_BYTES[row[1]]


def write_sparse_safetensors(path: Path, rows: Rows) -> int:
    """A safetensors file of `rows` (in order, back to back) whose data region is a hole; returns its tensor bytes.
    Its header is what safetensors writes (8-byte length, JSON padded with spaces to 8 bytes); reading a tensor
    gives zeros."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "generator": "offload-bench sized stand-in"}}
    offset = 0
    for row in rows:
        header[row[0]] = {"dtype": row[1], "shape": row[2], "data_offsets": [offset, offset + _nbytes(row)]}
        offset += _nbytes(row)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.truncate(8 + len(text) + offset)
    return offset


def _shards(rows: Rows, limit: int) -> list[Rows]:
    shards: list[Rows] = [[]]
    size = 0
    for row in rows:
        if shards[-1] and size + _nbytes(row) > limit:
            shards.append([])
            size = 0
        shards[-1].append(row)
        size += _nbytes(row)
    return shards


def write_weights(folder: Path, library: str, rows: Rows, limit: int = SHARD_BYTES) -> None:
    """A component's weights as its library saves them: one file, or shards and their index past `limit`."""
    stem = "diffusion_pytorch_model" if library == "diffusers" else "model"
    shards = _shards(rows, limit)
    if len(shards) == 1:
        write_sparse_safetensors(folder / f"{stem}.safetensors", rows)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_sparse_safetensors(folder / name, shard)
        weight_map.update({row[0]: name for row in shard})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _part_config(spec: ModelSpec, part: Part) -> tuple[str, dict[str, Any]]:
    """A folder's config file and content: the zoo's config numbers under the published class."""
    if part.role is None:
        name = {"scheduler": "scheduler_config.json", "processor": "preprocessor_config.json"}.get(
            part.folder, "tokenizer_config.json")
        key = "_class_name" if part.library == "diffusers" else ("processor_class" if part.folder == "processor"
                                                                 else "tokenizer_class")
        return name, {key: part.cls}
    config = dict(spec.components[part.role].config)
    if part.config_key:
        config = dict(config[part.config_key])
    if part.library == "diffusers":
        return "config.json", {"_class_name": part.cls, **config}
    return "config.json", {"architectures": [part.cls], **config}


def write_standin(spec: ModelSpec, dest: Path, table: dict[str, Rows]) -> None:
    """The stand-in folder of `spec` at `dest` (which must not exist), from its tensor table."""
    layout = layout_of(spec)
    assert layout is not None
    dest.mkdir(parents=True)
    index: dict[str, Any] = {"_class_name": layout[0], "_diffusers_version": "0.42.1"}
    for part in layout[1]:
        folder = dest / part.folder
        folder.mkdir()
        config_name, config = _part_config(spec, part)
        (folder / config_name).write_text(json.dumps(config, indent=2, default=list))
        if part.role is not None:
            write_weights(folder, part.library, table[part.folder])
        index[part.folder] = [part.library, part.cls]
    (dest / "model_index.json").write_text(json.dumps(index, indent=2))


def build(name: str, dest: Path) -> Path:
    """Writes zoo model `name`'s stand-in at `dest` (through a sibling folder renamed into place), after checking
    that its tensors are the committed sizes and that it reads back, as SGLang reads it, as them."""
    spec = get_model(name)
    source = zoo_source(name)
    if source is None:
        raise StandinError(f"{name}: no published layout for family {spec.family}")
    table = tensor_table(spec)
    want = {c: dict(n) for c, n in source.components or ()}
    if table_counts(table) != want:
        raise StandinError(f"{name}: the zoo's modules are not the sizes in {SIZES_PATH.name}: run `python -m "
                           "harness.models.sizes --write`")
    tmp = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_standin(spec, tmp, table)
    if component_counts(tmp) != want:
        raise StandinError(f"{name}: the stand-in at {tmp} does not read back as its sizes")
    (tmp / "standin.json").write_text(json.dumps({"model": name, "digest": source.digest,
                                                  "total_bytes": source.total_bytes}, indent=1))
    try:
        tmp.rename(dest)
    except OSError:  # another process wrote it first: theirs is the same
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.models.standin", description=__doc__.split("\n")[0])
    p.add_argument("model", help="a zoo model, e.g. wan2.1-t2v-14b")
    p.add_argument("--dest", type=Path, help="where to write it (default: its place in the harness cache)")
    args = p.parse_args(argv)
    source = zoo_source(args.model)
    if source is None:
        print(f"{args.model}: no published layout for its family", file=sys.stderr)
        return 2
    print(build(args.model, args.dest or standin_dir(source.name, source.digest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
