#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU (~6-8 minutes on a modern GPU): the test suite on
# CUDA, the LLM demo with mixed_precision auto and fp16, SD1.5-architecture runs in fp16 and bf16 (random
# weights, 512 px, batch 4, 30 steps) whose exported files must load in diffusers, and `make bench`'s gpu
# profile. Writes gpu_check.json and gpu_check.log into the folder given (default: $OUT, else ./gpu-check).
#
#   ./setup.sh                  # with TORCH_SPEC set to a CUDA build of torch, once
#   scripts/gpu_check.sh        # or: make gpu-check
#
# Without .venv (a machine whose own python3 holds a CUDA torch and the libraries) it runs with python3 and
# src/ on PYTHONPATH; the parts that need the embedded model are reported as skipped where it is not prepared.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-${OUT:-gpu-check}}
mkdir -p "$out_dir"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" scripts/gpu_check.py "$out_dir" 2>&1 | tee "$out_dir/gpu_check.log"
