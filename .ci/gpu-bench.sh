#!/usr/bin/env bash
# The GPU bench on a bare GPU machine (the lent device, or a nightly self-hosted runner): installs carried wheels
# when diffusers is missing, prints what the machine is, then runs the scenario suite. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export OFFLOAD_BENCH_CACHE="${OFFLOAD_BENCH_CACHE:-$PWD/.cache/offload-bench}"
# Carried SGLang releases (`python -m harness.engine.install V --python 3.12 --archive .engine/X.tar.xz`): unpacked
# into the engine root, where harness.engine.install.installed() finds them.
for a in .engine/*.tar.xz; do
  [ -f "$a" ] || continue
  mkdir -p "$OFFLOAD_BENCH_CACHE/sglang" && tar -xJf "$a" -C "$OFFLOAD_BENCH_CACHE/sglang" || exit 3
done
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
df -h . | tail -1; free -g | head -2
python3 -m pytest scenarios -p no:cacheprovider -rA --bench-results "${RESULTS:-results}" "$@"
