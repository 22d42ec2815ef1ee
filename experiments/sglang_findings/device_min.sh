#!/usr/bin/env bash
# The smallest device call for issue 31 (~2.5 min): findings 1 and 3 only, the forward before and after SGLang's
# import at Wan's and Qwen-Image's shapes (repro_import_state.py). Carry [".whl", ".engine"]; JSON under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/sglang-min-out}"
mkdir -p "$OUT"
source .ci/carried-env.sh
PYV=$(python3 -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")')
export SGLANG_SITE="$OFFLOAD_BENCH_CACHE/sglang/0.5.23-py$PYV/site"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c 'import torch; print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version())' | tee -a "$OUT/machine.txt"
D=experiments/sglang_findings
timeout 100 python3 $D/repro_import_state.py --model wan --layers 2 --reps 3 --out "$OUT/import_state_wan.json" \
  > "$OUT/import_state_wan.log" 2>&1; echo "wan exit $?"
timeout 70 python3 $D/repro_import_state.py --model qwen --layers 2 --reps 3 --out "$OUT/import_state_qwen.json" \
  > "$OUT/import_state_qwen.log" 2>&1; echo "qwen exit $?"
tail -30 "$OUT/import_state_wan.log"; tail -15 "$OUT/import_state_qwen.log"
