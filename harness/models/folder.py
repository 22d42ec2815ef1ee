"""Bring your own checkpoint: a diffusers pipeline folder on disk as a model (issue 29).

A folder is what `DiffusionPipeline.save_pretrained` writes (a `model_index.json` and one folder per component, each
with its `config.json` and safetensors weights: one file, or shards with a `*.safetensors.index.json`), or a
Hugging Face cache snapshot of one (`models--org--name/snapshots/<commit>/`, or the `models--org--name` folder,
whose `refs/main` names the snapshot).

`folder_spec(path)` reads it as a `ModelSpec` the planner and the child both speak: the pipeline class picks the
family (the zoo's pipeline code), each component's class and `config.json` its module (the zoo's factories), and
the safetensors headers the dtype as stored and every tensor's bytes. The DiT's streamed blocks are the zoo's for
the transformer classes it knows, else the generic rule: the transformer's `nn.ModuleList` children, read from
the tensor names (`<name>.<index>.` at the top level); none is an error naming the class.

`folder_weights(spec)` is the planner's weight table (`harness.models.sizes`'s format) computed from the headers,
no module built; `checkpoint_manifest` tells the child's loader which file holds which of a role's tensors, under
the name its module gives it.

This module imports no torch.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from harness.models import VAE_DECODER_LAYERS, ComponentSpec, ModelSpec, UnknownModelError

SLICE_ALIGN = 256  # as harness.models.sizes: each parameter of a layer region starts on this boundary
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1, "F8_E4M3": 1,
               "F8_E5M2": 1, "I8": 1, "I16": 2}
DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}

# pipeline class -> (family, edit)
PIPELINES: dict[str, tuple[str, bool]] = {
    "FluxPipeline": ("flux", False),
    "QwenImagePipeline": ("qwen-image", False),
    "QwenImageEditPipeline": ("qwen-image", True),
    "WanPipeline": ("wan", False),
}
# the zoo's transformer classes and the ModuleLists SGLang streams
DIT_BLOCKS: dict[str, tuple[str, ...]] = {
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "QwenImageTransformer2DModel": ("transformer_blocks",),
    "WanTransformer3DModel": ("blocks",),
}
# the zoo model whose pipeline code, factories and token counts a folder of each family uses
ZOO_OF_FAMILY = {("flux", False): "flux-dev", ("qwen-image", False): "qwen-image",
                 ("qwen-image", True): "qwen-image-edit", ("wan", False): "wan2.1-t2v-14b"}


class FolderError(UnknownModelError):
    """A folder that is not a usable diffusers pipeline; the message names the folder and what is wrong."""


def snapshot_of(path: str | Path) -> Path | None:
    """The pipeline folder `path` names (itself, or a HF cache repo folder's refs/main snapshot), or None."""
    p = Path(path).expanduser()
    if (p / "model_index.json").is_file():
        return p.resolve()
    ref = p / "refs" / "main"
    if ref.is_file():
        snap = p / "snapshots" / ref.read_text().strip()
        if (snap / "model_index.json").is_file():
            return snap.resolve()
    return None


def is_folder_model(name: Any) -> bool:
    return isinstance(name, str) and ("/" in name or name.startswith(".")) and snapshot_of(name) is not None


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """A safetensors file's tensors: {name: {"dtype", "shape", "nbytes"}}, from its JSON header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = {"dtype": info["dtype"], "shape": list(info["shape"]), "nbytes": end - begin}
    return out


def component_tensors(folder: Path, sub: str) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Every tensor of component folder `sub`: {name: (file, header entry)}, through a sharded index if there is
    one (its weight_map), else every safetensors file of the folder."""
    d = folder / sub
    indexes = sorted(d.glob("*.safetensors.index.json"))
    if indexes:
        weight_map: Mapping[str, str] = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted({d / f for f in weight_map.values()})
    else:
        files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FolderError(f"{d}: no safetensors weights (the harness reads safetensors only)")
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    for f in files:
        for name, entry in read_header(f).items():
            out[name] = (f.resolve(), entry)
    return out


def _config(folder: Path, sub: str) -> dict[str, Any]:
    path = folder / sub / "config.json"
    if not path.is_file():
        raise FolderError(f"{folder}: component {sub!r} has no config.json")
    return json.loads(path.read_text())


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def module_lists(names: list[str], prefix: str = "") -> dict[str, int]:
    """The generic rule: the top-level ModuleLists a module's tensor names show (`blocks.0.x` -> blocks: n)."""
    counts: dict[str, int] = {}
    pattern = re.compile(rf"^{re.escape(prefix)}([A-Za-z_][\w]*)\.(\d+)\.")
    for n in names:
        m = pattern.match(n)
        if m:
            counts[prefix + m.group(1)] = max(counts.get(prefix + m.group(1), 0), int(m.group(2)) + 1)
    return {g: c for g, c in counts.items() if c > 1}


# ------------------------------------------------------------------------------------------- name mapping


def _qwen_text_name(n: str) -> str | None:
    """A Qwen2.5-VL checkpoint name as the zoo's text model (Qwen2_5_VLTextModel) names it; None: not used."""
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if n.startswith(prefix):
            rest = n[len(prefix):]
            return None if rest.startswith("visual.") else rest
    return None  # lm_head, visual


def _t5_name(n: str) -> str | None:
    return "encoder.embed_tokens.weight" if n == "shared.weight" else n


def role_tensors(spec_folder: Path, family: str) -> dict[str, dict[str, tuple[Path, str, dict[str, Any]]]]:
    """Per role, {module name: (file, name in the file, header entry)}: the folder's tensors under the names the
    zoo's modules give them (FLUX's two text encoders in one module as clip.* and t5.*; T5's tied embedding under
    the name the encoder reads; Qwen2.5-VL's language model without its vision tower and LM head)."""
    out: dict[str, dict[str, tuple[Path, str, dict[str, Any]]]] = {}

    def add(role: str, sub: str, rename: Any = lambda n: n, prefix: str = "") -> None:
        table = out.setdefault(role, {})
        for n, (f, e) in component_tensors(spec_folder, sub).items():
            m = rename(n)
            if m is not None and (prefix + m) not in table:
                table[prefix + m] = (f, n, e)

    add("dit", "transformer")
    add("vae", "vae")
    if family == "flux":
        add("text_encoder", "text_encoder", prefix="clip.")
        add("text_encoder", "text_encoder_2", _t5_name, prefix="t5.")
    elif family == "wan":
        add("text_encoder", "text_encoder", _t5_name)
    else:
        add("text_encoder", "text_encoder", _qwen_text_name)
    return out


# ------------------------------------------------------------------------------------------------ the spec


@cache
def folder_spec(path: str) -> ModelSpec:
    """The ModelSpec of the pipeline folder `path` (its name: the resolved folder).

    Raises:
        FolderError: no model_index.json, a pipeline class the zoo has no code for, a component without config or
            safetensors, or a transformer without repeated blocks.
    """
    from harness.models import get_model

    folder = snapshot_of(path)
    if folder is None:
        raise FolderError(f"model: {path!r} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads((folder / "model_index.json").read_text())
    pipeline = index.get("_class_name", "?")
    if pipeline not in PIPELINES:
        raise FolderError(f"{folder}: pipeline class {pipeline} is not one the harness can run; it runs "
                          f"{', '.join(PIPELINES)}")
    family, edit = PIPELINES[pipeline]
    zoo = get_model(ZOO_OF_FAMILY[(family, edit)])
    tensors = role_tensors(folder, family)
    dit_cfg = _config(folder, "transformer")
    dit_class = dit_cfg.get("_class_name", "?")
    groups = DIT_BLOCKS.get(dit_class) or tuple(module_lists(list(tensors["dit"])))
    if not groups:
        raise FolderError(f"{folder}: found no repeated blocks (an nn.ModuleList of layers) in the transformer "
                          f"class {dit_class}: layerwise offload has nothing to stream")
    counts = module_lists(list(tensors["dit"]))
    missing = [g for g in groups if g not in counts]
    if missing:
        raise FolderError(f"{folder}: transformer class {dit_class} should have blocks {', '.join(missing)}; the "
                          "weights have none")
    te_cfg = _text_encoder_config(folder, family)
    components = {
        "text_encoder": ComponentSpec("text_encoder", zoo.components["text_encoder"].factory, te_cfg,
                                      dtype=_dtype(tensors["text_encoder"]),
                                      layer_groups=zoo.components["text_encoder"].layer_groups),
        "dit": ComponentSpec("dit", zoo.components["dit"].factory if dit_class in DIT_BLOCKS else "", _plain(dit_cfg),
                             dtype=_dtype(tensors["dit"]), layer_groups=groups,
                             layer_counts=tuple((g, counts[g]) for g in groups)),
        "vae": ComponentSpec("vae", zoo.components["vae"].factory, _plain(_config(folder, "vae")),
                             dtype=_dtype(tensors["vae"]), layer_groups=VAE_DECODER_LAYERS),
    }
    extra = dict(zoo.extra)
    if family == "flux":
        extra["clip_tokens"] = int(te_cfg["clip"].get("max_position_embeddings", 77))
    return ModelSpec(name=str(folder), family=zoo.family, components=components,
                     prompt_tokens=zoo.prompt_tokens, drop_tokens=zoo.drop_tokens, edit=edit,
                     vae_scale=zoo.vae_scale, patch=zoo.patch,
                     description=f"{pipeline} from {folder}", extra={**extra, "folder": str(folder),
                                                                     "counts": counts})


def _text_encoder_config(folder: Path, family: str) -> dict[str, Any]:
    """The text encoder's config as the zoo's factory takes it: FLUX's two encoders by name, Qwen-Image's language
    model from its text config."""
    if family == "flux":
        return {"clip": _plain(_config(folder, "text_encoder")), "t5": _plain(_config(folder, "text_encoder_2"))}
    te_cfg = _plain(_config(folder, "text_encoder"))
    if family == "qwen-image":
        te_cfg = _plain(te_cfg.get("text_config") or te_cfg)
    return te_cfg


def _dtype(tensors: Mapping[str, tuple[Path, str, dict[str, Any]]]) -> str:
    """The dtype most of a component's bytes are stored in (the module is cast to it)."""
    by: dict[str, int] = {}
    for _, _, e in tensors.values():
        by[e["dtype"]] = by.get(e["dtype"], 0) + e["nbytes"]
    name = max(by, key=lambda k: by[k]) if by else "BF16"
    return DTYPE_NAMES.get(name, "bfloat16")


# --------------------------------------------------------------------------------------- the weight table


def _aligned(nbytes: list[int]) -> int:
    offset = 0
    for n in nbytes:
        offset += -offset % SLICE_ALIGN
        offset += n
    return offset


def folder_weights(spec: ModelSpec) -> dict[str, Any]:
    """The planner's weight table (`harness.models.sizes.model_weights`'s format) from the safetensors headers:
    bytes as stored, per component and per streamed layer. A layer's host region is its tensors back to back,
    each aligned as `memory.Layout.plan` packs them (in the file's name order: the padding may differ from the
    module's order by under SLICE_ALIGN bytes a tensor)."""
    folder = Path(spec.extra["folder"])
    tensors = role_tensors(folder, spec.family)
    out: dict[str, Any] = {}
    for role, comp in spec.components.items():
        entries = tensors[role]
        numel = {n: _numel(e["shape"]) for n, (_, _, e) in entries.items()}
        nbytes = {n: numel[n] * DTYPE_BYTES.get(e["dtype"], 2) for n, (_, _, e) in entries.items()}
        w: dict[str, Any] = {"dtype": comp.dtype, "weight_bytes": sum(nbytes.values()), "params": sum(numel.values())}
        if comp.layer_groups:
            groups, in_layers = {}, 0
            for g in comp.layer_groups:
                layers: dict[int, list[str]] = {}
                for n in entries:
                    if n.startswith(g + "."):
                        idx = n[len(g) + 1:].split(".", 1)[0]
                        if idx.isdigit():
                            layers.setdefault(int(idx), []).append(n)
                if not layers:
                    continue
                region = [_aligned([nbytes[n] for n in sorted(names)]) for _, names in sorted(layers.items())]
                in_layers += sum(nbytes[n] for names in layers.values() for n in names)
                groups[g] = {"layers": len(layers), "layer_bytes": max(region),
                             "layer_params": max(sum(numel[n] for n in names) for names in layers.values()),
                             "host_bytes": sum(region)}
            w["groups"] = groups
            w["non_layer_bytes"] = w["weight_bytes"] - in_layers
        if role == "dit":
            cfg = comp.config
            w["hidden"] = int(cfg.get("num_attention_heads", 0)) * int(cfg.get("attention_head_dim", 0))
        out[role] = w
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def checkpoint_manifest(spec: ModelSpec, role: str) -> dict[str, Any]:
    """What the child's loader reads for `role`: {"tensors": {module name: [file, name in the file]}}."""
    tensors = role_tensors(Path(spec.extra["folder"]), spec.family)[role]
    return {"folder": spec.extra["folder"], "role": role,
            "tensors": {n: [str(f), name] for n, (f, name, _) in sorted(tensors.items())}}


def plan_data_with(name: str, data: Mapping[str, Any]) -> Mapping[str, Any]:
    """The planner's data with a folder model's weights (from its files) and the fits of the zoo model whose DiT
    has the same config, if one has (activations and compute of the same architecture); a zoo name: `data`."""
    if not is_folder_model(name) or name in data.get("weights", {}):
        return data
    from harness.models import ZOO, get_model

    spec = get_model(name)
    weights = folder_weights(spec)
    fits = dict(data.get("fits", {}))
    for zoo_name in sorted(ZOO):
        zoo = ZOO[zoo_name]
        if zoo.family == spec.family and zoo.edit == spec.edit and zoo_name in fits \
                and dict(zoo.components["dit"].config) == {k: v for k, v in spec.components["dit"].config.items()
                                                           if k in zoo.components["dit"].config}:
            fits[spec.name] = fits[zoo_name]
            break
    if spec.name in fits:
        fits[name] = fits[spec.name]
    return {**data, "weights": {**data.get("weights", {}), spec.name: weights, name: weights}, "fits": fits}
