"""Finding 4 (issue 31): what SGLang's manager holds on the device per resident layer, and in which allocator pool.

SGLang #31538 ran Qwen-Image on an RTX 5090 with 30 and 34 resident layers and ran out of memory at 38; our
runtime under the harness's 5090 cap fits 38 and 42 (26,894 / 29,494 MiB reserved). Suspected cause, to be
confirmed on the device: SGLang allocates every device copy of a layer -- streamed and resident alike -- inside
`torch.cuda.stream(self.copy_stream)` (layerwise_offload.py:2056-2057 and 2091-2104, `prefetch_layer`), so the
caching allocator files those blocks under the copy stream, and a cached block is only reused by allocations on
its own stream. What the compute stream has cached (the text encoder's use, the VAE, activations) cannot hold the
resident set, and what the copy stream has cached cannot hold activations: the reserved footprint is the sum of
two pools, where a one-stream runtime (ours: every block on stream 0, `reserved_by_stream_bytes` {"0": ...} in
results/h200/qwen-image-resident-5090.records.jsonl) reuses one pool for both. Under a cap the allocator frees
unused cached segments and retries before it gives up, so the question is whether the sum survives that.

This script runs SGLang's manager on --layers Qwen-Image blocks (real width, 1024x1024 tokens, every layer pinned,
prefetch 1) after a stand-in "encode phase" that leaves --encoder-gib cached on the compute stream, for resident
counts 0, n/4, n/2, 3n/4 (leading), in two variants:

  two-stream: the manager as shipped (copies and their buffers on its copy stream),
  one-stream: the same manager with `copy_stream` set to the compute stream (no overlap, one allocator pool),

and reports per cell the allocated and reserved peaks, reserved bytes by stream (torch.cuda.memory_snapshot), and
the slope per resident layer. With --auto-cap it then caps the process (set_per_process_memory_fraction) at the
one-stream variant's reserved peak at the largest resident count plus 512 MiB and runs both variants there: does
the shipped manager run out where one pool fits?

Why fewer layers survive: the per-resident-layer cost and the pool split do not depend on depth; the 5090's
boundary (38 of 60) is a sum of the same terms at other counts (plan: fixed + resident x layer + window).

    python experiments/sglang_findings/repro_resident_layers.py --layers 12 --auto-cap --out /tmp/resident.json
    python experiments/sglang_findings/repro_resident_layers.py --dry-run   # CPU: the residency split only
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _engine

GIB, MIB = 1 << 30, 1 << 20
DTYPE = torch.bfloat16


def by_stream() -> dict[str, int]:
    """Reserved MiB per stream, from the allocator's segments."""
    out: dict[str, int] = {}
    for seg in torch.cuda.memory_snapshot():
        key = str(seg.get("stream", "?"))
        out[key] = out.get(key, 0) + int(seg["total_size"])
    return {k: round(v / MIB) for k, v in out.items()}


def set_resident(layerwise: Any, manager: Any, resident: int) -> None:
    """What the manager's __init__ derives from resident_layers (layerwise_offload.py:1040-1052), re-derived."""
    manager.resident_layers = resident
    manager._streamed_order = layerwise.compute_streamed_layers(
        num_layers=manager.num_layers, resident_layers=resident, policy=manager.residency_policy)
    manager._resident_set = frozenset(range(manager.num_layers)) - set(manager._streamed_order)
    manager._residency_active = False  # armed again by the first denoise forward's layer-0 pre-hook


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--encoder-gib", type=float, default=4.0, help="cached on the compute stream before the DiT runs")
    ap.add_argument("--forwards", type=int, default=2, help="DiT forwards per use (a step's two CFG passes)")
    ap.add_argument("--auto-cap", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sglang-site", default=os.environ.get("SGLANG_SITE"))
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda:
        os.environ.setdefault("SGLANG_DIFFUSION_PLATFORM_OVERRIDE", "cuda")
    layerwise, stood_in = _engine.import_manager(args.sglang_site)
    n = args.layers
    counts = sorted({0, n // 4, n // 2, 3 * n // 4})
    result: dict[str, Any] = {"experiment": "resident_layers", "stood_in": stood_in, "layers": n,
                              "resident_counts": counts,
                              "streamed_leading": {r: list(layerwise.compute_streamed_layers(
                                  num_layers=n, resident_layers=r, policy="leading")) for r in counts}}
    if not cuda:
        result["device"] = "cpu (dry run: no manager is enabled without a device)"
        _engine.write_json(args.out, result)
        return 0

    import importlib

    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope, QwenImageTransformerBlock

    budget = importlib.import_module(_engine.BUDGET_MODULE)
    dev = torch.device("cuda")
    torch.manual_seed(args.seed)
    stack = torch.nn.Module()
    with torch.device(dev):
        stack.transformer_blocks = torch.nn.ModuleList(
            [QwenImageTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(DTYPE)
             for _ in range(n)])
    with torch.no_grad():
        for p in stack.parameters():
            p.normal_(0.0, 0.02)
    stack.eval().requires_grad_(False).to("cpu")
    torch.cuda.empty_cache()
    layer_bytes = sum(p.numel() * p.element_size() for p in stack.transformer_blocks[0].parameters())
    manager = layerwise.LayerwiseOffloadManager(stack, layers_attr_str="transformer_blocks", num_layers=n,
                                                enabled=True, pin_cpu_memory=True, prefetch_size=1,
                                                pin_budget=budget.HostPinBudget(available_bytes=1 << 50))
    shipped_stream = manager.copy_stream
    side, text = 64, 94
    gen = torch.Generator("cpu").manual_seed(args.seed)
    img = torch.randn(1, side * side, 3072, generator=gen).to(dev, DTYPE)
    txt = torch.randn(1, text, 3072, generator=gen).to(dev, DTYPE)
    temb = torch.randn(1, 3072, generator=gen).to(dev, DTYPE)
    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    image_rotary_emb = rope([(1, side, side)], device=dev, max_txt_seq_len=text)

    def use(resident: int, variant: str) -> dict[str, Any]:
        manager.release_all()
        set_resident(layerwise, manager, resident)
        manager.copy_stream = shipped_stream if variant == "two-stream" else torch.cuda.current_stream()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        encoder = torch.empty(int(args.encoder_gib * GIB), dtype=torch.uint8, device=dev)  # the encode phase
        del encoder  # freed into the compute stream's pool, as an offloaded text encoder leaves it
        torch.cuda.reset_peak_memory_stats()
        row: dict[str, Any] = {"variant": variant, "resident": resident}
        try:
            manager.prepare_for_next_req(non_blocking=True)
            with torch.inference_mode():
                for _ in range(args.forwards):
                    h, e = img, txt
                    for block in stack.transformer_blocks:
                        e, h = block(hidden_states=h, encoder_hidden_states=e, encoder_hidden_states_mask=None,
                                     temb=temb, image_rotary_emb=image_rotary_emb)
            torch.cuda.synchronize()
            row["status"] = "ok"
            row["reserved_by_stream_mib_in_use"] = by_stream()
            manager.release_after_use()
            torch.cuda.synchronize()
            row["reserved_by_stream_mib_after_release"] = by_stream()
        except torch.OutOfMemoryError as e:
            row["status"] = "oom"
            row["error"] = str(e).splitlines()[0][:300]
            manager.release_all()
        row["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB)
        row["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / MIB)
        return row

    rows = [use(r, v) for v in ("two-stream", "one-stream") for r in counts]
    result.update(device=torch.cuda.get_device_name(), layer_mib=round(layer_bytes / MIB), encoder_gib=args.encoder_gib,
                  cells=rows, copy_stream=str(shipped_stream))
    for v in ("two-stream", "one-stream"):
        mine = [x for x in rows if x["variant"] == v and x["status"] == "ok"]
        if len(mine) >= 2:
            rise = mine[-1]["peak_reserved_mib"] - mine[0]["peak_reserved_mib"]
            result[f"slope_reserved_mib_per_resident_layer_{v}"] = round(
                rise / (mine[-1]["resident"] - mine[0]["resident"]), 1)
    if args.auto_cap:
        top = counts[-1]
        one = next(x for x in rows if x["variant"] == "one-stream" and x["resident"] == top)
        cap = one["peak_reserved_mib"] * MIB + 512 * MIB
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total)
        result["cap_mib"] = round(cap / MIB)
        result["capped_cells"] = [use(top, v) for v in ("one-stream", "two-stream")]
        torch.cuda.set_per_process_memory_fraction(1.0)
    _engine.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
