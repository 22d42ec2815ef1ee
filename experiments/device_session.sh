#!/usr/bin/env bash
# One device call for the open GPU questions, in priority order, within ~530 s (run's limit is 600):
# 1. issue 31: experiments/sglang_findings/device_round.sh (reproducers, SGLang pin count, tiny peer cells);
# 2. issue 29: the fork server's fixed cost against spawn on the tiny CUDA FLUX scenario (experiments/cell_start);
# Everything is written under /tmp/session and packed into $OUT/session.tgz (a run returns at most 8 files).
# Carry [".whl", ".engine"].
set -uo pipefail
cd "$(dirname "$0")/.."
W=/tmp/session
mkdir -p "$W/cs"
T0=$SECONDS
BUDGET="${BUDGET_S:-530}"
pack() { tar czf "${OUT:-/tmp}/session.tgz.part" -C "$W" --exclude='*.safetensors' --exclude='checkpoints' . \
  && mv "${OUT:-/tmp}/session.tgz.part" "${OUT:-/tmp}/session.tgz"; }
(while sleep 30; do pack; done) &  # what ran comes back even if the call is stopped at its limit
PACKER=$!
OUT="$W" bash experiments/sglang_findings/device_round.sh > "$W/round.log" 2>&1
echo "issue 31 round: $((SECONDS - T0)) s"
pack
LEFT=$((BUDGET - (SECONDS - T0)))
if [ "$LEFT" -gt 100 ]; then
  OUT="$W/cs" SCENARIO=scenarios/gpu/flux_tiny_cuda.toml timeout "$LEFT" bash experiments/cell_start/measure.sh \
    > "$W/cell_start.log" 2>&1
  echo "cell start: exit $?, $((SECONDS - T0)) s"
else
  echo "cell start skipped: $LEFT s left"
fi
kill "$PACKER" 2>/dev/null
pack
tail -8 "$W/round.log"; grep -E "findings|finding|total|Error|error" "$W/batch.log" | tail -12; tail -6 "$W/cell_start.log" 2>/dev/null
