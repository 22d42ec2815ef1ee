#!/usr/bin/env bash
# Issue #29: a tiny CUDA scenario's fixed cost per cell, forked from the fork server and spawned (one run each, on
# one machine), with harness.analyze.overhead's median for each and whether the two runs' outputs agree bit for bit.
# From the repository root of a bare GPU machine (Python 3.12, torch CUDA; carried .whl/ as .ci/gpu-bench.sh):
#   bash experiments/cell_start/measure.sh          # run's carry: [".whl"]; results under $OUT
# About 4 min on an H200 for the default scenario (12 cells: 190 s spawned, ~1 min forked); SCENARIO= another.
set -uo pipefail
cd "$(dirname "$0")/../.."
source .ci/carried-env.sh
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/cell-start-out}"
S="${SCENARIO:-scenarios/gpu/qwen_image_edit_tiny_cuda.toml}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)' | tee -a "$OUT/machine.txt"
for m in fork-server spawn; do
  t0=$SECONDS
  OFFLOAD_BENCH_CELL_START=$m timeout 330 python3 -m harness.run.runner "$S" --results "$OUT" --run-id "$m" --quiet \
    >"$OUT/$m.out" 2>&1
  echo "$m: exit $?, $((SECONDS - t0)) s wall"; tail -2 "$OUT/$m.out"
done
for m in fork-server spawn; do
  python3 -m harness.analyze.overhead "$OUT/runs/$m" >"$OUT/$m.overhead.md" 2>&1
  echo "$m:"; grep -E "^(fixed cost|fork server start)" "$OUT/$m.overhead.md"
done
python3 - "$OUT" <<'PY'
import json, sys
runs = {m: {r["cell_id"]: r for r in map(json.loads, open(f"{sys.argv[1]}/runs/{m}/records.jsonl"))}
        for m in ("fork-server", "spawn")}
a, b = runs.values()
same = [c for c in b if c in a and a[c]["status"] == b[c]["status"]]
ok = [c for c in same if b[c]["status"] == "ok"]
bits = [c for c in ok if a[c]["outputs"]["latents_sha256"] == b[c]["outputs"]["latents_sha256"]]
print(f"same status under both starts: {len(same)}/{len(b)} cells; same latents: {len(bits)}/{len(ok)} ok cells")
PY
