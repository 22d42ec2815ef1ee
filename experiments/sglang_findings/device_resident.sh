#!/usr/bin/env bash
# Issue 31, finding 4 in the harness: the SGLang 0.5.23 cells of scenarios/gpu/qwen_image_resident_5090_sglang.toml
# (resident 38 / 42 on the RTX 5090 cap; our runtime's cells are in results/h200/qwen-image-resident-5090.records.jsonl).
# `-k "0.5.23"`, not `-k sglang`: the scenario's name holds "sglang", so that would select our cells too.
# The Qwen-Image checkpoints (~57 GB) need most of the 64 GiB disk: other synthetic checkpoints are removed first.
# Carry [".whl", ".engine"]; the records and the pytest log come back under $OUT. About 6 min.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/resident-out}"
mkdir -p "$OUT"
source .ci/carried-env.sh
rm -rf "$OFFLOAD_BENCH_CACHE/checkpoints" "$OFFLOAD_BENCH_CACHE/folders" /tmp/resident-bench  # one run's records
df -h . | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
timeout "${LIMIT_S:-520}" python3 -m pytest scenarios -p no:cacheprovider -rA --bench-results /tmp/resident-bench \
  --bench-scenario qwen-image-resident-5090-sglang -k "0.5.23" > "$OUT/pytest.log" 2>&1
echo "pytest exit $?"
find /tmp/resident-bench -name '*.records.jsonl' -exec cp {} "$OUT/resident_5090_sglang.records.jsonl" \;
tail -30 "$OUT/pytest.log"
