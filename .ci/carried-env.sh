# Sourced (not run) by the scripts that run on a bare GPU machine (.ci/gpu-bench.sh,
# experiments/sglang_findings/device_batch.sh), from the repository root: installs carried wheels (.whl/) when
# diffusers is missing and unpacks carried SGLang releases (.engine/*.tar.xz, made by
# experiments/sglang_findings/make_carry.py or `python -m harness.engine.install V --python 3.12 --archive ...`) into
# the engine root, where harness.engine.install.installed() finds them. Exits the calling script with 3 on failure.
if ! python3 -c "import diffusers" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export OFFLOAD_BENCH_CACHE="${OFFLOAD_BENCH_CACHE:-$PWD/.cache/offload-bench}"
for a in .engine/*.tar.xz; do
  [ -f "$a" ] || continue
  mkdir -p "$OFFLOAD_BENCH_CACHE/sglang" && tar -xJf "$a" -C "$OFFLOAD_BENCH_CACHE/sglang" || exit 3
done
