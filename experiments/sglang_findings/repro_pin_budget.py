"""Finding 2 (issue 31): SGLang's HostPinBudget pins fewer layers when the DiT it is handed is an anonymous copy.

SGLang 0.5.23 asks a `HostPinBudget` per layer which layers of a streamed DiT may be pinned
(layerwise_offload.py:1279-1395, `_plan_layer_hosting`). The budget is read once, when the manager is built
(layerwise_offload.py:1030: `HostPinBudget()` with no argument), as the host's *available* memory
(host_memory_budget.py:157-188: psutil's MemAvailable, under any cgroup cap) minus max(5 %, 2 GiB)
(host_memory_budget.py:45-46, 260-277). A layer over the budget is copied to pageable memory and its H2D copy is
synchronous (staged by the driver): it stops the host thread and with it the overlap of copy and compute.

MemAvailable counts clean page cache (a checkpoint mapped from disk) but not anonymous memory. SGLang's own loader
hands the manager tensors that are views of the mmapped safetensors file (weight_utils.py:247-255: "A host-bound
load keeps the checkpoint mapping ... everything downstream that budgets host memory (layerwise offload, pinning
...) assumes them"; weight_readers/safetensors_mmap.py:61-65 `safe_open(...).get_tensor`). The harness handed it
an anonymous pageable copy (harness/cell/offload/loader.py `_read_to_host`), 40.8 GB for Qwen-Image, which
lowers MemAvailable by that much at the moment the budget is read: 49 of 60 layers pinned on the H200 host.

This script shows it three ways:

1. (CPU) SGLang's own `_plan_layer_hosting` on Qwen-Image's 60 real-size layers (meta tensors), for hosts of
   40-160 GiB available before the hand-over, with the DiT handed over as an anonymous copy (available drops by
   the DiT's 38 GiB) or as the checkpoint mapping (it does not): the pinned count of each and the host size at
   which the budget stops biting.
2. (CPU) MemAvailable before and after an anonymous copy of --probe-mib MiB and after mapping (and reading) a
   safetensors file of the same size: what the budget would see of each.
3. (CUDA) SGLang's manager on --layers Qwen-Image blocks (real width, 1024x1024 tokens), built twice with its
   default budget under the same host size (SGLANG_DIFFUSION_TEST_FORCE_HOST_AVAILABLE_GIB, chosen so the
   anonymous hand-over pins about 49/60 of the layers as on the H200): once from an anonymous copy, once from a
   safetensors mapping. Per case: layers pinned / pageable / mapped, ms per forward (prefetch 1, median of
   --reps uses), and the pinned and pageable H2D probes of one layer.

Why few layers survive: the budget is linear in bytes, so the fraction pinned is set by (available - reserve) /
streamed bytes, which the forced host size reproduces; each pageable layer costs a synchronous copy of its own
bytes whatever the depth, and the step is transfer-bound at any depth (a Qwen block computes in ~2 ms at 1024^2
on an H100, its 0.68 GB copy takes ~12 ms at 55 GB/s).

    python experiments/sglang_findings/repro_pin_budget.py --layers 8 --out /tmp/pin_budget.json
    python experiments/sglang_findings/repro_pin_budget.py --dry-run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _engine

GIB = 1 << 30
DTYPE = torch.bfloat16
QWEN = {"dim": 3072, "heads": 24, "head_dim": 128, "joint": 3584, "layers": 60}


def qwen_block(device: str | torch.device) -> torch.nn.Module:
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

    with torch.device(device):
        return QwenImageTransformerBlock(dim=QWEN["dim"], num_attention_heads=QWEN["heads"],
                                         attention_head_dim=QWEN["head_dim"]).to(DTYPE)


def meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":")
            out[k] = int(v.split()[0]) * 1024
    return out


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class _NoMappings:
    def holds(self, tensor: torch.Tensor) -> bool:
        return False


def plan_table(layerwise: Any, budget_cls: Any) -> dict[str, Any]:
    """SGLang's own per-layer hosting plan for Qwen-Image's 60 layers, against host sizes."""
    block = qwen_block("meta")
    params = [(n, p) for n, p in block.named_parameters()]
    groups = {i: {} for i in range(QWEN["layers"])}
    for i in groups:
        for name, p in params:
            groups[i].setdefault(p.dtype, []).append((f"transformer_blocks.{i}.{name}", p))
    manager = object.__new__(layerwise.LayerwiseOffloadManager)
    manager.pin_cpu_memory = True
    manager._streamed_order = tuple(range(QWEN["layers"]))
    manager._pin_component_name = "transformer.transformer_blocks"
    manager._mapped_regions = _NoMappings()
    totals, _ = manager._layer_byte_totals(groups)
    dit_bytes = sum(totals.values())
    saved = layerwise.host_copies_are_redundant
    layerwise.host_copies_are_redundant = lambda: False  # a discrete GPU (the CPU platform reports a shared pool)
    rows = []
    try:
        for host_gib in range(40, 161, 10):
            row = {"available_before_handover_gib": host_gib}
            for handover, available in (("anonymous_copy", host_gib * GIB - dit_bytes),
                                        ("checkpoint_mapping", host_gib * GIB)):
                manager._pin_budget = budget_cls(available_bytes=max(0, available))
                hosting, _ = manager._plan_layer_hosting(groups)
                row[handover] = sum(1 for w in hosting.values() if w == "pinned")
            rows.append(row)
        # what available at the budget's reading gives exactly the H200 cell's 49 of 60
        hits = []
        for avail_mib in range(20 * 1024, 50 * 1024, 64):
            manager._pin_budget = budget_cls(available_bytes=avail_mib << 20)
            hosting, _ = manager._plan_layer_hosting(groups)
            if sum(1 for w in hosting.values() if w == "pinned") == 49:
                hits.append(avail_mib)
    finally:
        layerwise.host_copies_are_redundant = saved
    need = dit_bytes / 0.95
    return {"layer_bytes": totals[0], "dit_layer_bytes": dit_bytes, "rows": rows,
            "all_pinned_needs_available_gib": round(max(need, dit_bytes + 2 * GIB) / GIB, 2),
            "available_at_reading_for_49_of_60_gib":
                [round(hits[0] / 1024, 2), round(hits[-1] / 1024, 2)] if hits else None}


def available_probe(mib: int, folder: str) -> dict[str, Any]:
    """MemAvailable as the budget reads it, around an anonymous copy and around a mapped safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    n = mib << 20
    path = os.path.join(folder, "probe.safetensors")
    save_file({"w": torch.ones(n // 2, dtype=DTYPE)}, path)
    os.sync()
    before = meminfo()["MemAvailable"]
    anon = torch.ones(n // 2, dtype=DTYPE)  # touched: every page committed
    with_anon = meminfo()["MemAvailable"]
    del anon
    time.sleep(0.2)
    base = meminfo()["MemAvailable"]
    with safe_open(path, "pt", device="cpu") as f:
        mapped = f.get_tensor("w")
        float(mapped[:: 4096 // 2].float().sum())  # fault every page in
        with_map = meminfo()["MemAvailable"]
    del mapped
    os.remove(path)
    return {"probe_mib": mib,
            "available_drop_anonymous_mib": round((before - with_anon) / 2**20),
            "available_drop_mapping_mib": round((base - with_map) / 2**20)}


def device_cases(layerwise: Any, args: argparse.Namespace, folder: str) -> dict[str, Any]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    dev = torch.device("cuda")
    torch.manual_seed(args.seed)
    stack = torch.nn.Module()
    stack.transformer_blocks = torch.nn.ModuleList([qwen_block(dev) for _ in range(args.layers)])
    with torch.no_grad():
        for p in stack.parameters():
            p.normal_(0.0, 0.02)
    stack.eval().requires_grad_(False)
    state = {k: v.cpu() for k, v in stack.state_dict().items()}  # the anonymous hand-over (as the harness did)
    stack.to("cpu")
    torch.cuda.empty_cache()
    path = os.path.join(folder, "qwen_blocks.safetensors")
    t0 = time.perf_counter()
    save_file(state, path)
    os.sync()
    write_s = time.perf_counter() - t0
    total = sum(t.numel() * t.element_size() for t in state.values())

    side, text = 64, 94
    gen = torch.Generator("cpu").manual_seed(args.seed)
    img = torch.randn(1, side * side, QWEN["dim"], generator=gen).to(dev, DTYPE)
    txt = torch.randn(1, text, QWEN["dim"], generator=gen).to(dev, DTYPE)
    temb = torch.randn(1, QWEN["dim"], generator=gen).to(dev, DTYPE)
    from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

    rope = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
    image_rotary_emb = rope([(1, side, side)], device=dev, max_txt_seq_len=text)

    def forward() -> None:
        h, e = img, txt
        with torch.inference_mode():
            for block in stack.transformer_blocks:
                e, h = block(hidden_states=h, encoder_hidden_states=e, encoder_hidden_states_mask=None, temb=temb,
                             image_rotary_emb=image_rotary_emb)

    # The host size: what the anonymous case's own RssAnon plus an available of 49/60 of the streamed bytes plus
    # the 2 GiB minimum reserve. The mapped case reads the same pretend host without the anonymous copy.
    target = 49 / 60
    host_gib = (rss_anon() + target * total + 2 * GIB + 64 * 2**20) / GIB
    os.environ["SGLANG_DIFFUSION_TEST_FORCE_HOST_AVAILABLE_GIB"] = f"{host_gib:.3f}"
    cases = {"forced_host_gib": round(host_gib, 3), "streamed_bytes": total, "checkpoint_write_s": round(write_s, 1)}
    for handover in ("anonymous_copy", "checkpoint_mapping"):
        if handover == "anonymous_copy":
            source = state
            handle = None
        else:
            del state
            handle = safe_open(path, "pt", device="cpu")
            source = {k: handle.get_tensor(k) for k in handle.keys()}
        stack.load_state_dict(source, assign=True)
        del source
        counts: dict[str, int] = {}
        plan = layerwise.LayerwiseOffloadManager._plan_layer_hosting

        def recorded(self: Any, groups: Any, plan: Any = plan, counts: dict[str, int] = counts) -> Any:
            hosting, untracked = plan(self, groups)
            for where in hosting.values():
                counts[where] = counts.get(where, 0) + 1
            return hosting, untracked

        layerwise.LayerwiseOffloadManager._plan_layer_hosting = recorded
        anon_at_init = rss_anon()
        t0 = time.perf_counter()
        try:
            manager = layerwise.LayerwiseOffloadManager(stack, layers_attr_str="transformer_blocks",
                                                        num_layers=args.layers, enabled=True, pin_cpu_memory=True,
                                                        prefetch_size=1)
        finally:
            layerwise.LayerwiseOffloadManager._plan_layer_hosting = plan
        init_s = time.perf_counter() - t0
        times = []
        for _ in range(args.reps + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            manager.prepare_for_next_req(non_blocking=True)
            forward()
            manager.release_after_use()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        layer0 = next(iter(manager._consolidated_cpu_weights.values()))
        buf = next(iter(layer0.values()))
        cases[handover] = {"hosting": counts, "rss_anon_at_init_gib": round(anon_at_init / GIB, 2),
                           "budget_spendable_gib": round(manager._pin_budget.spendable_bytes / GIB, 2),
                           "init_s": round(init_s, 1), "ms_per_forward": round(statistics.median(times[1:]), 1),
                           "ms_first_forward": round(times[0], 1)}
        if handover == "checkpoint_mapping" or "pinned_h2d_gbps" not in cases:
            cases.update(h2d_probe(buf))
        manager.remove_forward_hooks()
        manager.release_all()
        del manager, layer0, buf
        stack.to("meta")
        if handle is not None:
            del handle
        torch.cuda.empty_cache()
    os.remove(path)
    a, m = cases["anonymous_copy"]["ms_per_forward"], cases["checkpoint_mapping"]["ms_per_forward"]
    cases["anonymous_over_mapping"] = round(a / m, 3)
    return cases


def h2d_probe(host: torch.Tensor) -> dict[str, float]:
    dev = torch.empty_like(host, device="cuda")
    pageable = torch.empty_like(host, pin_memory=False).copy_(host)
    out = {}
    pinned = host if host.is_pinned() else host.pin_memory()
    for name, src in (("pinned_h2d_gbps", pinned), ("pageable_h2d_gbps", pageable)):
        dev.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            dev.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out[name] = round(3 * host.numel() * host.element_size() / (time.perf_counter() - t0) / 1e9, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-mib", type=int, default=None, help="size of the MemAvailable probe (CPU part 2)")
    ap.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp"), help="a disk folder (not tmpfs)")
    ap.add_argument("--sglang-site", default=os.environ.get("SGLANG_SITE"))
    ap.add_argument("--dry-run", action="store_true", help="CPU parts only")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda:
        os.environ.setdefault("SGLANG_DIFFUSION_PLATFORM_OVERRIDE", "cuda")
    layerwise, stood_in = _engine.import_manager(args.sglang_site)
    import importlib

    budget = importlib.import_module(_engine.BUDGET_MODULE)
    result: dict[str, Any] = {"experiment": "pin_budget", "stood_in": stood_in,
                              "device": torch.cuda.get_device_name() if cuda else "cpu",
                              "host_mem_total_gib": round(meminfo()["MemTotal"] / GIB, 1),
                              "plan": plan_table(layerwise, budget.HostPinBudget)}
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        result["available_probe"] = available_probe(args.probe_mib or (2048 if cuda else 256), folder)
        if cuda:
            result["device_cases"] = device_cases(layerwise, args, folder)
    _engine.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
