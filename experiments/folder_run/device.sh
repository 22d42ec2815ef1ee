#!/usr/bin/env bash
# Issue 29 on a GPU machine: Wan2.1-T2V-14B (real size, synthetic weights) run once from the zoo and once from a
# diffusers pipeline folder whose weight files are links to the same synthetic checkpoints (export_zoo.py), so
# only the loading path differs; compare.py prints both cells' peaks and step, and fails beyond 2 %.
# One cell each (dit_cpu_offload + layerwise, prefetch 2, text encoder offloaded), 480x832, 21 frames, 2 steps,
# a warm-up and 3 measured rounds. ~40 GB of checkpoints are generated on the GPU first (about 1-2 minutes).
#   OUT=/tmp/out bash experiments/folder_run/device.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/folder-run-out}"
mkdir -p "$OUT"
source .ci/carried-env.sh
FOLDER="$OFFLOAD_BENCH_CACHE/folders/wan2.1-t2v-14b"
T0=$SECONDS
python3 -m experiments.folder_run.export_zoo wan2.1-t2v-14b "$FOLDER"
echo "checkpoints + folder: $((SECONDS - T0)) s"
SC="$OUT/scenarios"
mkdir -p "$SC"
cat > "$SC/zoo.toml" <<TOML
name = "wan21-14b-zoo"
description = "Wan2.1-T2V-14B from the zoo (synthetic checkpoints)"
model = "wan2.1-t2v-14b"
profile = "gpu"
cards = ["native"]
height = 480
width = 832
frames = 21
steps = 2
warmup = 1
rounds = 3
true_cfg_scale = 5.0
seed = 0
policy = "sglang"
timeout_s = 400

[flags]
dit_cpu_offload = true
dit_layerwise_offload = true
dit_offload_prefetch_size = 2
pin_cpu_memory = true
text_encoder_cpu_offload = true
vae_cpu_offload = false
TOML
sed -e "s#^model = .*#model = \"$FOLDER\"#" -e 's/wan21-14b-zoo/wan21-14b-folder/' \
    -e 's/from the zoo (synthetic checkpoints)/from a diffusers folder/' "$SC/zoo.toml" > "$SC/folder.toml"
python3 -m harness.run.runner "$SC/zoo.toml" "$SC/folder.toml" --results "$OUT/res" --run-id folder-run --quiet
cp "$OUT/res/runs/folder-run/records.jsonl" "$OUT/folder-run.records.jsonl"
rm -rf "$OUT/res"
python3 -m experiments.folder_run.compare "$OUT/folder-run.records.jsonl" | tee "$OUT/folder-run.compare.txt"
echo "total: $((SECONDS - T0)) s"
