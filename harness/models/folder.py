"""Bring your own checkpoint: a diffusers pipeline folder on disk as a model (issue 29).

A folder is what `DiffusionPipeline.save_pretrained` writes (a `model_index.json` and one folder per component, each
with its `config.json` and safetensors weights: one file, or shards with a `*.safetensors.index.json`), or a
Hugging Face cache snapshot of one (`models--org--name/snapshots/<commit>/`, or the `models--org--name` folder,
whose `refs/main` names the snapshot).

`folder_spec(path)` reads it as a `ModelSpec` the planner and the child both speak: the pipeline class picks the
family (the zoo's pipeline code), each component's class and `config.json` its module (the zoo's factories), and
the safetensors headers the dtype as stored and every tensor's bytes. The DiT's streamed blocks are the zoo's for
the transformer classes it knows, else the generic rule: the transformer's `nn.ModuleList` children, read from
the tensor names (`<name>.<index>.` at the top level); none is an error naming the class. A transformer class the
zoo does not know is built from diffusers' class of that name (`build_diffusers_dit`) and driven by its pipeline's
code when its forward takes what that code passes (`DIT_KWARGS`); `unrunnable(spec)` says, in one line, why a
folder plans but cannot run (a class diffusers does not have).

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
# the keyword arguments each family's pipeline code (harness.cell.pipeline) passes to the DiT: what a transformer
# class the zoo does not know must take for the harness to drive it
DIT_KWARGS: dict[str, tuple[str, ...]] = {
    "flux": ("hidden_states", "timestep", "guidance", "pooled_projections", "encoder_hidden_states", "txt_ids",
             "img_ids", "return_dict"),
    "qwen-image": ("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_mask", "img_shapes",
                   "return_dict"),
    "wan": ("hidden_states", "timestep", "encoder_hidden_states", "return_dict"),
}
GENERIC_DIT_FACTORY = "harness.models.folder:build_diffusers_dit"
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
        "dit": _dit_component(zoo, pipeline, dit_cfg, _dtype(tensors["dit"]), {g: counts[g] for g in groups}),
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


# ------------------------------------------------------------------------- transformers the zoo does not know


@cache
def _diffusers_exports() -> frozenset[str]:
    """The names diffusers exports, read from its `__init__.py` without importing it (that imports torch)."""
    import importlib.util

    found = importlib.util.find_spec("diffusers")
    if found is None or found.origin is None:
        return frozenset()
    return frozenset(re.findall(r'"([A-Za-z_]\w*)"', Path(found.origin).read_text(encoding="utf-8")))


def unrunnable(spec: ModelSpec) -> str | None:
    """Why the harness cannot run model `spec` (one line naming the class and what is missing), or None.

    A pipeline folder whose transformer class the zoo does not know runs when diffusers has that class (the harness
    builds it from the folder's config and streams the ModuleLists the generic rule found); a class that diffusers
    does not export (the folder's own code) cannot be built. Whether the class takes the keywords its pipeline
    passes is checked where it is built (`build_diffusers_dit`), in the cell's child."""
    dit = spec.components["dit"]
    if dit.factory != GENERIC_DIT_FACTORY:
        return None
    name = str(dit.config["_class_name"])
    if name in _diffusers_exports():
        return None
    return (f"{spec.extra.get('folder', spec.name)}: transformer class {name} is not a diffusers class: the harness "
            "builds a DiT from diffusers' own classes (a folder's own modeling code is not run), so this folder "
            "plans (plan, advise) but cannot run")


def build_diffusers_dit(config: Mapping[str, Any]) -> Any:
    """The factory of a pipeline folder's DiT whose class the zoo does not know: diffusers' class of that name,
    from the folder's config (`from_config`: keys the class does not take are dropped, as from_pretrained does).

    Raises:
        FolderError: diffusers has no such class, or its forward does not take a keyword the pipeline passes
            (one line naming the class, the pipeline and the missing keywords).
    """
    import inspect

    import diffusers

    config = dict(config)
    name, pipeline = str(config.pop("_class_name")), str(config.pop("_pipeline"))
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise FolderError(f"transformer class {name} is not a diffusers class: the harness cannot build it")
    params = inspect.signature(cls.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [k for k in DIT_KWARGS[PIPELINES[pipeline][0]] if k not in params and not takes_any]
    if missing:
        raise FolderError(f"transformer class {name}: its forward takes no {', '.join(missing)}, which the "
                          f"harness's {pipeline} passes: the harness cannot drive it")
    return cls.from_config(config)


def _dit_component(zoo: ModelSpec, pipeline: str, config: Mapping[str, Any], dtype: str,
                   groups: Mapping[str, int]) -> ComponentSpec:
    """The folder's DiT: the zoo's factory for a transformer class it knows, else diffusers' class of that name
    (`build_diffusers_dit`, told the class and the pipeline in the config's `_class_name` and `_pipeline`)."""
    name = config.get("_class_name", "?")
    if name in DIT_BLOCKS:
        factory, plain = zoo.components["dit"].factory, _plain(config)
    else:
        factory, plain = GENERIC_DIT_FACTORY, {**_plain(config), "_class_name": name, "_pipeline": pipeline}
    return ComponentSpec("dit", factory, plain, dtype=dtype, layer_groups=tuple(groups),
                         layer_counts=tuple(groups.items()))


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
