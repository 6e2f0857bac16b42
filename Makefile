# The three commands of the README. Each depends on setup, which is quick when already done.
.PHONY: setup test demo bench lint

setup:
	./setup.sh

test: setup
	.venv/bin/ruff check src tests train.py tools bench
	.venv/bin/python -m pytest -q

demo: setup
	.venv/bin/lora-scripts demo

lint: setup
	.venv/bin/ruff check src tests train.py tools bench

bench: setup
	.venv/bin/python bench/run.py
