"""Findings 1 and 3 (issue 31): importing SGLang's layerwise manager turns off cuDNN attention for the whole process.

SGLang 0.5.23's `LayerwiseOffloadManager` module imports `current_platform`; on a CUDA machine that imports
`sglang/multimodal_gen/runtime/platforms/cuda.py`, whose line 45 runs `torch.backends.cuda.enable_cudnn_sdp(False)`
at import time. From then on every `torch.nn.functional.scaled_dot_product_attention` in the process -- diffusers'
and anyone else's, not only SGLang's own DiTs -- loses the cuDNN backend. On sm90/sm100 (H100, H200, B200) with a
recent cuDNN, PyTorch puts cuDNN attention first (sdp_utils.cpp `check_prefer_cudnn_attention`), so the forward
falls back to FlashAttention-2: slower on long sequences (Wan2.1-14B at 480x832x81 attends over 32,760 tokens), and
numerically different (another kernel, another rounding). On an RTX 5090 (sm120) flash is first anyway.

What this script does, in one process, on one DiT of the published width with few layers (diffusers' own classes,
seeded random bf16 weights, real sequence length):

  A  the forward before SGLang is imported (the reference),
  B  the same forward after `import ...layerwise_offload` (nothing else done),
  C  after the import, with `torch.backends.cuda.enable_cudnn_sdp(True)` restored,
  D  under SGLang's LayerwiseOffloadManager (prefetch 1, every block streamed from pinned host memory), cuDNN off
     as the import left it: what the harness's sglang cells ran,
  E  D with cuDNN attention restored,

and reports per variant: ms per forward (median of --reps, CUDA events), the SDPA backend PyTorch picks for the
self-attention shape (`torch._fused_sdp_choice`), the attention kernels a profiled forward launched, and the
relative L2 distance / bit equality of the output against A. The import's other global changes (backend switches,
matmul precision, environment variables) are listed too.

Why few layers survive: the import changes which attention kernel every block runs, so the per-block cost and the
per-block numerical difference are the same at 2 layers as at 40; the layerwise copy (0.7 GB a Wan block) hides
behind one block's compute either way. The full-depth, full-denoise distance (0.0333 in the cell) is for the harness
run (experiments/sglang_findings/harness_checks.py import-state, and the peer scenarios).

    python experiments/sglang_findings/repro_import_state.py --model wan --layers 2 --out /tmp/import_state.json
    python experiments/sglang_findings/repro_import_state.py --dry-run   # CPU: import diff + a tiny forward
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _engine

DTYPE = torch.bfloat16
SDPA_NAMES = ("sdpa", "flash", "fmha", "attention", "cudnn")


def build(model: str, layers: int, tiny: bool, device: str, seed: int) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """diffusers' DiT at the published width (or a tiny twin), `layers` blocks, seeded N(0, 0.02) bf16 weights."""
    torch.manual_seed(seed)
    gen = torch.Generator("cpu").manual_seed(seed)
    if model == "wan":
        from diffusers import WanTransformer3DModel

        heads, head_dim, ffn, text_dim = (40, 128, 13824, 4096) if not tiny else (2, 16, 64, 32)
        with torch.device(device):
            dit = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                        in_channels=16, out_channels=16, text_dim=text_dim, freq_dim=256,
                                        ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", eps=1e-6)
        f, h, w = (21, 60, 104) if not tiny else (2, 8, 8)  # 480x832x81 -> latent 21x60x104: 32,760 tokens
        text = 512 if not tiny else 8
        inputs = {"hidden_states": torch.randn(1, 16, f, h, w, generator=gen),
                  "timestep": torch.tensor([500.0]),
                  "encoder_hidden_states": torch.randn(1, text, text_dim, generator=gen), "return_dict": False}
        attn_shape = (1, heads, f * h * w // 4, head_dim)
        group = "blocks"
    elif model == "qwen":
        from diffusers import QwenImageTransformer2DModel

        heads, head_dim, joint = (24, 128, 3584) if not tiny else (2, 16, 32)
        rope = (16, 56, 56) if not tiny else (4, 6, 6)
        with torch.device(device):
            dit = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=layers,
                                              attention_head_dim=head_dim, num_attention_heads=heads,
                                              joint_attention_dim=joint, axes_dims_rope=rope)
        side = 64 if not tiny else 8  # 1024x1024 -> 64x64 packed latent tokens
        text = 94 if not tiny else 8
        inputs = {"hidden_states": torch.randn(1, side * side, 64, generator=gen),
                  "timestep": torch.tensor([0.5]),
                  "encoder_hidden_states": torch.randn(1, text, joint, generator=gen),
                  "encoder_hidden_states_mask": None, "img_shapes": [[(1, side, side)]], "return_dict": False}
        attn_shape = (1, heads, side * side + text, head_dim)
        group = "transformer_blocks"
    else:
        raise SystemExit(f"unknown model {model!r}")
    dit = dit.to(DTYPE).eval().requires_grad_(False)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, 0.02, generator=None)
    inputs = {k: (v.to(device, DTYPE if v.is_floating_point() and k != "timestep" else v.dtype)
                  if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    if model == "qwen":
        inputs["timestep"] = inputs["timestep"].to(DTYPE)
    return dit, {"inputs": inputs, "attn_shape": attn_shape}, group


def sdp_choice(shape: tuple[int, ...], device: str) -> str:
    if device != "cuda":
        return "n/a (CPU)"
    from torch.nn.attention import SDPBackend

    q = torch.empty(shape, device=device, dtype=DTYPE)
    names = {int(m.value): name for name, m in SDPBackend.__members__.items()}
    return names.get(int(torch._fused_sdp_choice(q, q, q)), "?")


def attention_kernels(run: Any, device: str) -> list[str]:
    if device != "cuda":
        return []
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages() if any(s in e.key.lower() for s in SDPA_NAMES)}
    return sorted(names)[:8]


def timed(run: Any, reps: int, device: str) -> tuple[torch.Tensor, float | None]:
    out = run()  # warm-up (kernel selection, cuDNN graph build)
    if device != "cuda":
        return out, None
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return out, round(statistics.median(times), 2)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["wan", "qwen"], default="wan")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sglang-site", default=os.environ.get("SGLANG_SITE"))
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny model, the import diff, no timing")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu":
        # Which platform module SGLang imports is decided by NVML; on a CPU box ask for the CUDA one, as a GPU
        # machine gets it, so the import's global side effects are the ones the GPU cells saw.
        os.environ.setdefault("SGLANG_DIFFUSION_PLATFORM_OVERRIDE", "cuda")
    tiny = device == "cpu"
    result: dict[str, Any] = {"experiment": "import_state", "model": args.model, "layers": args.layers,
                              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version()}

    dit, spec, group = build(args.model, args.layers, tiny, device, args.seed)
    inputs = spec["inputs"]

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return dit(**inputs)[0]

    variants: dict[str, dict[str, Any]] = {}

    def measure(name: str) -> torch.Tensor:
        out, ms = timed(forward, args.reps, device)
        variants[name] = {"ms_per_forward": ms, "sdp_choice": sdp_choice(spec["attn_shape"], device),
                          "cudnn_sdp_enabled": torch.backends.cuda.cudnn_sdp_enabled(),
                          "attention_kernels": attention_kernels(forward, device)}
        return out.detach().float().cpu()

    state0, env0 = _engine.global_state(), dict(os.environ)
    ref = measure("A_before_import")

    layerwise, stood_in = _engine.import_manager(args.sglang_site)
    state1, env1 = _engine.global_state(), dict(os.environ)
    result["import"] = {"module": layerwise.__name__, "file": layerwise.__file__, "stood_in": stood_in,
                        "global_state_changed": _engine.state_diff(state0, state1),
                        "environment_changed": _engine.env_diff(env0, env1)}
    outs = {"B_after_import": measure("B_after_import")}
    torch.backends.cuda.enable_cudnn_sdp(True)
    outs["C_after_import_cudnn_restored"] = measure("C_after_import_cudnn_restored")

    if device == "cuda":
        from sglang.multimodal_gen.runtime.managers.memory_managers.host_memory_budget import HostPinBudget

        dit.to("cpu")
        torch.cuda.empty_cache()
        manager = layerwise.LayerwiseOffloadManager(
            dit, layers_attr_str=group, num_layers=args.layers, enabled=True, pin_cpu_memory=True,
            prefetch_size=1, pin_budget=HostPinBudget(available_bytes=1 << 50))
        for plain in dit.modules():  # RoPE tables kept as plain attributes follow the module
            for attr, value in list(vars(plain).items()):
                if isinstance(value, torch.Tensor) and not attr.startswith("_"):
                    setattr(plain, attr, value.to(device))

        def streamed() -> torch.Tensor:
            manager.prepare_for_next_req(non_blocking=True)  # one use, as LayerwiseOffloadStrategy runs it
            with torch.inference_mode():
                out = dit(**inputs)[0]
            manager.release_after_use()
            return out

        forward = streamed
        for name, cudnn in (("D_sglang_manager_cudnn_off", False), ("E_sglang_manager_cudnn_restored", True)):
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
            outs[name] = measure(name)
        result["manager"] = {"layers_pinned": len(manager._consolidated_cpu_weights), "prefetch": manager.prefetch_size}

    for name, out in outs.items():
        variants[name].update(rel_l2_vs_A=rel_l2(out, ref), bit_identical_to_A=bool(torch.equal(out, ref)))
    if "D_sglang_manager_cudnn_off" in outs:
        variants["D_sglang_manager_cudnn_off"]["bit_identical_to_B"] = bool(
            torch.equal(outs["D_sglang_manager_cudnn_off"], outs["B_after_import"]))
    a_ms, b_ms = variants["A_before_import"]["ms_per_forward"], variants["B_after_import"]["ms_per_forward"]
    if a_ms and b_ms:
        result["slowdown_B_over_A"] = round(b_ms / a_ms - 1, 4)
    result["variants"] = variants
    _engine.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
