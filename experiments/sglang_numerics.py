"""Why do SGLang's layerwise cells compute other latents than ours? One DiT forward, taken apart (needs CUDA).

Measured in session 3 on the H200: the final latents of SGLang 0.5.23's layerwise backend were 0.017 (tiny
Qwen-Image-Edit) and 0.0333 (Wan2.1-14B) relative L2 from our runtime's, while its whole-model cells (no
streaming) and diffusers' group offload were bit-identical to ours. This script builds the zoo's DiT with the
published layer widths but few layers (seeded random weights, bf16), runs one forward

- resident on the device (the reference, twice: is the reference itself deterministic?),
- under SGLang's LayerwiseOffloadManager as the "sglang" backend sets it up, checking in a pre-forward hook of
  each layer (after SGLang's own) that every streamed weight equals the reference bit for bit, and recording the
  alignment of each weight's device address (SGLang packs a layer into one flat buffer with 32-byte slices; our
  runtime uses 256 because cuBLAS chooses kernels by pointer alignment, harness/cell/offload/memory.py),
- under SGLang again with its slice alignment patched to 512 bytes,
- again under SGLang, three uses of four forwards each (a denoise loop's lifecycle),
- resident before SGLang is imported at all (the harness cells never import it), against the same after,

and prints, per model, the relative L2 of the output and the first block whose output differs. One JSON line per
model and variant goes to stdout and to --out.

Measured on the H200 (session 4, results/h200/sglang-numerics.jsonl): with the first five steps, every model and
variant was bit-identical to the resident forward, every forward of every use, and the full cells' difference is
deterministic (the same latents digest with CUDA_LAUNCH_BLOCKING=1). The last step was added after that run.

    python -m experiments.sglang_numerics --version 0.5.23 --out results/h200/sglang-numerics.jsonl
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
from collections.abc import Callable
from typing import Any

import torch

from harness.common.flags import OffloadFlags
from harness.engine.layerwise import SGLangLayerwise, load_engine
from harness.models import get_model

DTYPE = torch.bfloat16


def build_dit(model: str, layers: int, seed: int) -> tuple[torch.nn.Module, tuple[str, ...]]:
    spec = get_model(model).components["dit"]
    module_name, fn_name = spec.factory.split(":")
    factory = getattr(importlib.import_module(module_name), fn_name)
    config = copy.deepcopy(dict(spec.config))
    config["num_layers"] = layers
    torch.manual_seed(seed)
    dit = factory(config).to(DTYPE).eval().requires_grad_(False)
    for p in dit.parameters():  # diffusers' default init leaves some tensors zero: fill all, seeded
        p.normal_(0.0, 0.02)
    return dit, spec.layer_groups


def move_plain_tensors(module: torch.nn.Module, device: torch.device) -> None:
    """RoPE tables held as plain attributes (harness.models.wan, diffusers' QwenEmbedRope) follow the module."""
    for owner in module.modules():
        for attr, value in list(vars(owner).items()):
            if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                setattr(owner, attr, value.to(device))


def inputs_for(model: str, device: torch.device, seed: int) -> dict[str, Any]:
    gen = torch.Generator("cpu").manual_seed(seed)
    cfg = get_model(model).components["dit"].config
    if model.startswith("wan"):
        text_dim = int(cfg.get("text_dim", 4096))
        return {
            "hidden_states": torch.randn(1, 16, 5, 32, 32, generator=gen).to(device, DTYPE),
            "timestep": torch.tensor([500.0], device=device),
            "encoder_hidden_states": torch.randn(1, 64, text_dim, generator=gen).to(device, DTYPE),
            "return_dict": False,
        }
    h = w = 16  # tokens of the 2x2-packed latent
    return {
        "hidden_states": torch.randn(1, h * w, int(cfg["in_channels"]), generator=gen).to(device, DTYPE),
        "timestep": torch.tensor([0.5], device=device, dtype=DTYPE),
        "encoder_hidden_states": torch.randn(1, 32, int(cfg["joint_attention_dim"]), generator=gen).to(device, DTYPE),
        "encoder_hidden_states_mask": None,
        "img_shapes": [[(1, h, w)]],
        "return_dict": False,
    }


def block_outputs(module: torch.nn.Module, group: str, out: list[torch.Tensor]) -> list[Any]:
    """Forward hooks that keep each block's first output (a copy: the next block may reuse the storage)."""

    def keep(_m: torch.nn.Module, _args: Any, output: Any) -> None:
        first = output[-1] if isinstance(output, tuple) else output  # Qwen blocks return (text, image)
        out.append(first.detach().clone())

    return [block.register_forward_hook(keep) for block in getattr(module, group)]


def weight_checks(module: torch.nn.Module, group: str, reference: dict[str, torch.Tensor],
                  report: dict[str, Any]) -> list[Any]:
    """Pre-forward hooks (registered after SGLang's, so they run after its prefetch and wait) comparing each
    streamed weight with the reference bit for bit, and recording the alignment classes of their addresses."""
    handles = []
    for i, block in enumerate(getattr(module, group)):
        def check(_m: torch.nn.Module, _args: Any, i: int = i, block: torch.nn.Module = block) -> None:
            torch.cuda.current_stream().synchronize()
            for name, p in block.named_parameters():
                ref = reference[f"{group}.{i}.{name}"]
                if p.shape != ref.shape or not torch.equal(p, ref):
                    report["weight_mismatch"].append(f"{group}.{i}.{name}")
                align = 512
                while p.data_ptr() % align:
                    align //= 2
                report["align_counts"][str(align)] = report["align_counts"].get(str(align), 0) + 1
        handles.append(block.register_forward_pre_hook(check))
    return handles


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def run_variant(name: str, dit_cpu: torch.nn.Module, groups: tuple[str, ...], version: str, inputs: dict[str, Any],
                ref_out: torch.Tensor, ref_blocks: list[torch.Tensor], reference: dict[str, torch.Tensor],
                patch: Callable[[], Callable[[], None]] | None) -> dict[str, Any]:
    undo = patch() if patch else None
    try:
        module = copy.deepcopy(dit_cpu)
        flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, dit_offload_prefetch_size=1.0,
                             pin_cpu_memory=True)
        engine = SGLangLayerwise(module, groups, flags, version)
        move_plain_tensors(module, torch.device("cuda"))
        report: dict[str, Any] = {"variant": name, "weight_mismatch": [], "align_counts": {}}
        blocks: list[torch.Tensor] = []
        handles = weight_checks(module, groups[0], reference, report) + block_outputs(module, groups[0], blocks)
        with torch.inference_mode():
            engine.before_use()
            out = module(**inputs)[0]
            engine.after_use()
        torch.cuda.synchronize()
        for h in handles:
            h.remove()
        report["later_forwards_rel_l2"] = later_forwards(module, engine, inputs, ref_out)
        first = next((i for i, (a, b) in enumerate(zip(blocks, ref_blocks, strict=True)) if not torch.equal(a, b)),
                     None)
        report.update(bit_identical=bool(torch.equal(out, ref_out)), output_rel_l2=rel_l2(out, ref_out),
                      first_differing_block=first,
                      block_rel_l2=[round(rel_l2(a, b), 6) for a, b in zip(blocks, ref_blocks, strict=True)],
                      weight_mismatch=report["weight_mismatch"][:10])
        return report
    finally:
        if undo:
            undo()


def later_forwards(module: torch.nn.Module, engine: SGLangLayerwise, inputs: dict[str, Any],
                   ref_out: torch.Tensor, uses: int = 3, forwards_per_use: int = 4) -> list[list[float]]:
    """The same input again, as a denoise loop calls it: several uses (before_use/after_use), several forwards
    each (steps x CFG passes). A fresh forward matching says nothing about the second one."""
    rows = []
    with torch.inference_mode():
        for _ in range(uses):
            engine.before_use()
            rows.append([rel_l2(module(**inputs)[0], ref_out) for _ in range(forwards_per_use)])
            engine.after_use()
    return rows


def align_slices_to(nbytes: int, manager_cls: Any) -> Callable[[], Callable[[], None]]:
    def patch() -> Callable[[], None]:
        original = manager_cls.__dict__["_get_alignment_numel"]

        def aligned(dtype: torch.dtype, alignment_bytes: int = 32) -> int:
            return max(1, nbytes // torch.empty((), dtype=dtype).element_size())

        manager_cls._get_alignment_numel = staticmethod(aligned)
        return lambda: setattr(manager_cls, "_get_alignment_numel", original)
    return patch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--version", default="0.5.23")
    ap.add_argument("--models", nargs="+", default=["qwen-image-edit-tiny", "wan-tiny", "qwen-image", "wan2.1-t2v-14b"])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sglang_numerics: needs CUDA (SGLang's layerwise manager enables itself only on CUDA); not run")
        return 0
    # As the worker does: transformers' generation stack (sklearn -> scipy.stats) is imported before the engine's
    # site joins sys.path; imported after, scipy's docscrape found a partial `sphinx` there and failed (H200 run).
    import scipy.stats  # noqa: F401
    import transformers.generation  # noqa: F401
    from transformers import AutoProcessor  # noqa: F401

    dev = torch.device("cuda")
    # The harness cells never import SGLang; the sglang cells do. A global setting changed by that import would
    # change every kernel of the sglang cell, not just the DiT's streaming: so one resident forward per model is
    # taken before the import and compared with the same forward after it.
    before_import = {}
    for model in args.models:
        dit, _ = build_dit(model, args.layers, args.seed)
        resident = dit.to(dev)
        move_plain_tensors(resident, dev)
        with torch.inference_mode():
            before_import[model] = resident(**inputs_for(model, dev, args.seed))[0].cpu()
        del dit, resident
        torch.cuda.empty_cache()
    layerwise, _, _ = load_engine(args.version)
    lines = []
    for model in args.models:
        dit, groups = build_dit(model, args.layers, args.seed)
        inputs = inputs_for(model, dev, args.seed)
        ref = copy.deepcopy(dit).to(dev)
        move_plain_tensors(ref, dev)
        reference = {n: p for n, p in ref.named_parameters()}
        ref_blocks: list[torch.Tensor] = []
        handles = block_outputs(ref, groups[0], ref_blocks)
        with torch.inference_mode():
            ref_out = ref(**inputs)[0]
            for h in handles:
                h.remove()
            again = ref(**inputs)[0]
        base = {"model": model, "layers": args.layers, "version": args.version,
                "reference_deterministic": bool(torch.equal(ref_out, again)),
                "reference_unchanged_by_engine_import": bool(torch.equal(ref_out.cpu(), before_import[model]))}
        for name, patch in (("sglang-default", None),
                            ("sglang-slices-512B", align_slices_to(512, layerwise.LayerwiseOffloadManager))):
            row = {**base, **run_variant(name, dit, groups, args.version, inputs, ref_out, ref_blocks, reference,
                                         patch)}
            print(json.dumps(row), flush=True)
            lines.append(row)
        del ref, reference, ref_blocks
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
