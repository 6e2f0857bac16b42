# The three commands of the README. Each depends on setup, which is quick when already done.
.PHONY: setup test demo bench lint gpu-check

setup:
	./setup.sh

test: setup
	.venv/bin/ruff check src tests train.py tools bench scripts
	.venv/bin/python -m pytest -q

demo: setup
	.venv/bin/lora-scripts demo

lint: setup
	.venv/bin/ruff check src tests train.py tools bench scripts

bench: setup
	.venv/bin/python bench/run.py

# On a machine with an NVIDIA GPU: tests, demos, SD fp16/bf16 runs and the GPU bench, one JSON + log
gpu-check: setup
	scripts/gpu_check.sh
