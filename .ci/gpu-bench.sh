#!/usr/bin/env bash
# The GPU bench on a bare GPU machine (the lent device, or a nightly self-hosted runner): installs carried wheels
# when diffusers is missing, prints what the machine is, then runs the scenario suite. Extra args go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
source .ci/carried-env.sh  # carried wheels and SGLang releases
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv
df -h . | tail -1; free -g | head -2
python3 -m pytest scenarios -p no:cacheprovider -rA --bench-results "${RESULTS:-results}" "$@"
