#!/usr/bin/env bash
# Issue 31 in one device call (~6 min): the four reproducers (device_batch.sh without the harness numerics and the
# 40 GB scenario), what the harness counts of SGLang's pins (experiments/sglang_pin_count.py), and the tiny peer
# scenario's harness and sglang@0.5.23 cells with the import's torch switches put back (harness/engine/layerwise.py):
# their outputs must now agree within 0.02. Carry [".whl", ".engine"]; results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/sglang-round-out}"
mkdir -p "$OUT"
OUT="$OUT" BUDGET_S=0 SKIP_NUMERICS=1 bash experiments/sglang_findings/device_batch.sh > "$OUT/batch.log" 2>&1
echo "batch exit $?"
source .ci/carried-env.sh
export PYTHONUNBUFFERED=1
timeout 100 python3 -m experiments.sglang_pin_count --model qwen-image --layers 4 --out "$OUT/pin_count.json" \
  > "$OUT/pin_count.log" 2>&1
echo "pin count exit $?"
mkdir -p "$OUT/sc"
sed -e 's/^backends = .*/backends = ["harness", "sglang@0.5.23"]/' -e 's/^name = .*/name = "qwen-image-edit-tiny-peer-sglang-restored"/' \
  scenarios/gpu/qwen_image_edit_tiny_peer_cuda.toml > "$OUT/sc/peer.toml"
timeout 200 python3 -m harness.run.runner "$OUT/sc/peer.toml" --results "$OUT/res" --run-id peer --quiet > "$OUT/peer.log" 2>&1
echo "peer exit $?"
cp "$OUT/res/runs/peer/records.jsonl" "$OUT/tiny-peer-restored.records.jsonl" 2>/dev/null
python3 -m harness report "$OUT/tiny-peer-restored.records.jsonl" > "$OUT/tiny-peer-restored.report.txt" 2>&1
rm -rf "$OUT/res"
tail -5 "$OUT/peer.log"
