#!/usr/bin/env bash
# Issue 31: every device experiment of the four SGLang findings, in sequence, from the repository root of a bare
# GPU machine (the lent H100/H200: Python 3.12, torch CUDA, no diffusers). Carried: .whl/*.whl (diffusers and the
# harness's pure-Python deps, as .ci/gpu-bench.sh installs them) and .engine/sglang-0.5.23-py3.12.tar.xz (made by
# `python experiments/sglang_findings/make_carry.py`, which also fetches the wheels; pass carry [".whl", ".engine"]).
# JSON results go to "$OUT" (at most 8 files come back: 6 are written). Budget ~6.5 min; each step has its own
# timeout, so a slow step costs its own result only.
#
#   bash experiments/sglang_findings/device_batch.sh
#   SKIP_NUMERICS=1 BUDGET_S=0 bash ...   # the reproducers only (~4 min): no harness numerics, no scenario
set -x
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/sglang-findings-out}"
mkdir -p "$OUT"
source .ci/carried-env.sh  # carried wheels and SGLang releases
PYV=$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
export SGLANG_SITE="$OFFLOAD_BENCH_CACHE/sglang/0.5.23-py$PYV/site"
test -d "$SGLANG_SITE" || { echo "no SGLang 0.5.23 engine folder at $SGLANG_SITE" >&2; exit 3; }
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv \
  | tee "$OUT/machine.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())' | tee -a "$OUT/machine.txt"
free -g | head -2 | tee -a "$OUT/machine.txt"
D=experiments/sglang_findings
T0=$SECONDS

# Findings 1 and 3: the import switches cuDNN attention off. Wan at its real 32,760-token sequence (2 blocks, ~40 s),
# then Qwen-Image's shape (2 blocks, ~20 s).
timeout 120 python3 $D/repro_import_state.py --model wan --layers 2 --reps 3 --out "$OUT/import_state_wan.json"
timeout 90 python3 $D/repro_import_state.py --model qwen --layers 2 --reps 3 --out "$OUT/import_state_qwen.json"
# The harness's own numerics experiment, whose before/after-import step never ran (issue 13's last step):
# zoo DiTs, 2 layers, the harness's SGLang backend (~40 s).
[ "${SKIP_NUMERICS:-0}" = 1 ] || timeout 120 python3 -m experiments.sglang_numerics --version 0.5.23 --models wan2.1-t2v-14b qwen-image --layers 2 \
  --out "$OUT/sglang_numerics.jsonl"
echo "findings 1+3: $((SECONDS - T0)) s"

# Finding 2: the pin budget against the hand-over (8 Qwen blocks, 5.4 GB written to local disk, pinned twice; ~70 s).
timeout 150 python3 $D/repro_pin_budget.py --layers 8 --reps 3 --workdir "$PWD/.cache" --out "$OUT/pin_budget.json"
echo "finding 2: $((SECONDS - T0)) s"

# Finding 4: per-resident-layer cost and allocator pools (12 Qwen blocks, 8 uncapped cells + 2 capped; ~50 s).
timeout 120 python3 $D/repro_resident_layers.py --layers 12 --auto-cap --out "$OUT/resident_layers.json"
echo "finding 4 reproducer: $((SECONDS - T0)) s"

# Finding 4 in the harness, only if time is left (the 40 GB synthetic checkpoint is generated first): the SGLang
# cells of the 5090-cap scenario; our cells are in results/h200/qwen-image-resident-5090.records.jsonl.
LEFT=$((${BUDGET_S:-430} - (SECONDS - T0)))
if [ "$LEFT" -gt 150 ]; then
  timeout "$LEFT" python3 -m pytest scenarios -p no:cacheprovider -rA -x --bench-results "$OUT/bench" \
    --bench-scenario qwen-image-resident-5090-sglang -k "0.5.23" 2>&1 | tail -40
  find "$OUT/bench" -name '*.records.jsonl' -exec cp {} "$OUT/resident_5090_sglang.records.jsonl" \; 2>/dev/null
  rm -rf "$OUT/bench"
else
  echo "skipped the harness scenario: $LEFT s left"
fi
echo "total: $((SECONDS - T0)) s"
ls -la "$OUT"
