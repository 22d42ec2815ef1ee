"""Does the harness count what SGLang's layerwise manager pins? One configure on a GPU, read back (needs CUDA).

The zoo's DiT with its published layer widths but few layers (Qwen-Image: about 0.68 GB a block, above SGLang
0.5.23's 64 MiB `_REGISTER_MIN_BYTES`, so its host stores are registered in place with cudaHostRegister) goes
through the "sglang" backend's setup (`harness.engine.layerwise.SGLangLayerwise`); then, one JSON line:

- `tally`: what the wrapped `_pin_in_place` / `_unpin_in_place` counted (`SGLANG_PINS`) after configure, and after the
  module and its managers are dropped (their finalizers unregister);
- `groups`: the `is_pinned()` walk per layer group (pinned / pageable / mapped bytes, layers by where they live)
  beside the release's own plan (`layer_hosting`) and its consolidated store bytes (`host_bytes`);
- `counters`: the phase counters a cell records (`host_counters`);
- `torch_host_allocator_bytes` and `kernel`: what the other counters see of the same pins (torch's caching host
  allocator; VmLck / VmPin).

    python -m experiments.sglang_pin_count --model qwen-image --layers 4 [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
from typing import Any

import torch

from experiments.sglang_numerics import build_dit
from harness.cell.measure import kernel_locked_bytes
from harness.common.flags import OffloadFlags
from harness.engine.layerwise import SGLANG_PINS, SGLangLayerwise


def _torch_host_bytes() -> int:
    stats = torch.cuda.host_memory_stats()
    return int(stats.get("allocated_bytes.current", 0))


def measure(model: str, layers: int, version: str) -> dict[str, Any]:
    module, groups = build_dit(model, layers, seed=0)
    flags = OffloadFlags(dit_cpu_offload=True, dit_layerwise_offload=True, dit_offload_prefetch_size=1.0,
                         pin_cpu_memory=True)
    before = _torch_host_bytes()
    engine = SGLangLayerwise(module, groups, flags, version)
    described = engine.describe()
    out: dict[str, Any] = {
        "model": model, "layers": layers, "version": version, "gpu": torch.cuda.get_device_name(),
        "pin_counter": described.get("pin_counter"),
        "tally": {"after_configure": SGLANG_PINS.snapshot()},
        "groups": {g: {"host": info.get("host"), "host_bytes": info.get("host_bytes"),
                       "plan": described["layer_hosting"].get(g)} for g, info in described["groups"].items()},
        "counters": engine.host_counters(),
        "torch_host_allocator_bytes": _torch_host_bytes() - before,
        "kernel": kernel_locked_bytes(),
        "store_is_pinned": [bool(t.is_pinned()) for m in engine.managers
                            for by_dtype in m._consolidated_cpu_weights.values() for t in by_dtype.values()],
    }
    del engine, module, described
    gc.collect()
    out["tally"]["after_drop"] = SGLANG_PINS.snapshot()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen-image")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--version", default="0.5.23")
    parser.add_argument("--out")
    args = parser.parse_args()
    line = json.dumps(measure(args.model, args.layers, args.version))
    print(line)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
