#!/usr/bin/env bash
# The GPU suite in one command: rollout images/s of full-size Janus-Pro-1B and Show-o (random weights, real
# geometry) against transformers' generate and Show-o's MaskGIT loop, one DSR step by phase, peak memory against
# the plan, and the distributed checks (benchmarks/distributed_gpu.sh, on 2 or more GPUs). Under 8 minutes on one
# H100; nothing is downloaded. Writes one JSON (default benchmarks/results/gpu-suite.json).
#   bash benchmarks/gpu_suite.sh [--out FILE]        # one or more GPUs
#   bash benchmarks/gpu_suite.sh --tiny [--out FILE] # CPU, the tests' tiny models: the CI check that it runs
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec python benchmarks/gpu_suite.py "$@"
