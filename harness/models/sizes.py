"""Weight bytes of every zoo model, per component and per streamed layer, read from its module built on meta.

The planner (`harness.plan.planner`) must run without torch, so these numbers are computed here once and committed as
data (`harness/models/plan_data.json`, section "weights"); `tests/test_plan.py` rebuilds them on meta and checks the
file still says the same, so a zoo change cannot leave the planner on stale sizes.

    python -m harness.models.sizes --write     # refresh the "weights" section of plan_data.json, and
                                               # standin_sizes.json (what SGLang reads from each sized stand-in)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from harness.models import PLAN_DATA_PATH, ModelSpec, get_model, model_names

SLICE_ALIGN = 256  # harness.cell.offload.memory.SLICE_ALIGN: each parameter of a layer region starts on this boundary


def _aligned_bytes(params: list[Any]) -> int:
    """Bytes of one layer's host region as `memory.Layout.plan` packs it: parameters back to back, each aligned."""
    offset = 0
    for p in params:
        offset += -offset % SLICE_ALIGN
        offset += p.numel() * p.element_size()
    return offset


def component_weights(spec: ModelSpec, role: str) -> dict[str, Any]:
    """One component's bytes: all parameters, and for a component with layer groups (what layerwise offload
    streams: the DiT's blocks, a text encoder's layers, the VAE decoder's up blocks) each group's layer count and
    layer bytes and the bytes outside them."""
    comp = spec.components[role]
    module = comp.build_on_meta()
    out: dict[str, Any] = {
        "dtype": comp.dtype,
        "weight_bytes": sum(p.numel() * p.element_size() for p in module.parameters()),
        "params": sum(p.numel() for p in module.parameters()),
    }
    if comp.layer_groups:
        groups = {}
        layer_param_bytes = 0
        for name in comp.layer_groups:
            layers = list(module.get_submodule(name))
            region = [_aligned_bytes(list(layer.parameters())) for layer in layers]
            layer_param_bytes += sum(p.numel() * p.element_size() for layer in layers for p in layer.parameters())
            groups[name] = {
                "layers": len(layers),
                "layer_bytes": max(region),  # host region (aligned) = device buffer of one layer
                "layer_params": max(sum(p.numel() for p in layer.parameters()) for layer in layers),
                "host_bytes": sum(region),
            }
        out["groups"] = groups
        out["non_layer_bytes"] = out["weight_bytes"] - layer_param_bytes
    if role == "dit":
        cfg = comp.config
        out["hidden"] = int(cfg.get("num_attention_heads", 0)) * int(cfg.get("attention_head_dim", 0))
    return out


def model_weights(name: str) -> dict[str, Any]:
    spec = get_model(name)
    return {role: component_weights(spec, role) for role in ("text_encoder", "dit", "vae")}


def all_weights() -> dict[str, Any]:
    return {name: model_weights(name) for name in model_names()}


def standin_sizes(name: str) -> dict[str, Any] | None:
    """What SGLang reads from zoo model `name`'s sized stand-in (`harness.models.standin`): per published component
    folder, parameters by dtype, from the modules built on meta; with the spec digest they hold for. None for a
    family without a published layout."""
    from harness.models.standin import layout_of, spec_digest, table_counts, tensor_table

    spec = get_model(name)
    if layout_of(spec) is None:
        return None
    return {"spec": spec_digest(spec), "components": table_counts(tensor_table(spec))}


def all_standin_sizes() -> dict[str, Any]:
    return {name: sizes for name in model_names() if (sizes := standin_sizes(name)) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.models.sizes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"update the weights section of {PLAN_DATA_PATH}")
    args = parser.parse_args(argv)
    weights = all_weights()
    if not args.write:
        json.dump(weights, sys.stdout, indent=1)
        print()
        return 0
    data = json.loads(PLAN_DATA_PATH.read_text()) if PLAN_DATA_PATH.exists() else {}
    data["weights"] = weights
    PLAN_DATA_PATH.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote the weights of {len(weights)} models to {PLAN_DATA_PATH}", file=sys.stderr)
    from harness.models.standin import SIZES_PATH

    standins = all_standin_sizes()
    SIZES_PATH.write_text(json.dumps(standins, indent=1, sort_keys=True) + "\n")
    print(f"wrote the stand-in sizes of {len(standins)} models to {SIZES_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
