# The three commands of the README. Each depends on setup, which is quick when already done.
.PHONY: setup test demo bench lint gpu-check ui

setup:
	./setup.sh

test: setup
	.venv/bin/ruff check src tests train.py tools bench scripts
	.venv/bin/python -m pytest -q

demo: setup
	.venv/bin/lora-scripts demo

# the web UI on http://127.0.0.1:7860 over this folder (README "Web UI")
ui: setup
	.venv/bin/lora-scripts ui

lint: setup
	.venv/bin/ruff check src tests train.py tools bench scripts

# the bench's baselines need TRL, installed on first use (not by setup: nothing else needs it)
bench: setup
	@.venv/bin/python -c "import trl" 2>/dev/null || .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt "trl==1.16.0"
	.venv/bin/python bench/run.py

# On a machine with an NVIDIA GPU: tests, demos, SD fp16/bf16 runs and the GPU bench, one JSON + log
gpu-check: setup
	scripts/gpu_check.sh
