PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test lint format test-dist bench bench-faults gpu-check scaling-demo install clean

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found; install Python 3.11 or run 'make PY=python3 ...'"; exit 1; }
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/kiln train --preset tiny

# Style and types: ruff (lint and format, configured in pyproject.toml) and mypy over src/kiln.
LINT_PATHS := src tests bench examples
lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

# Rewrite the tree in the project's format and apply ruff's safe fixes.
format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

# Two workers: most tests wait on process start-up and one core, so two at once take ~70% of the
# serial time on 2 cores (BENCHMARKS.md, "The test suite"). TEST_WORKERS=0 runs them in one process.
# One intra-op thread a worker: two workers of two threads each on two cores spin on each other
# (12m31s against 11m21s for the same suite, BENCHMARKS.md). TEST_THREADS=2 for the other setting.
TEST_WORKERS ?= 2
TEST_THREADS ?= 1
test: lint
	OMP_NUM_THREADS=$(TEST_THREADS) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=20

# Every distributed test, including the 4-process layouts (dp x tp x pp, HSDP, interleaved, gpipe).
test-dist: $(STAMP)
	$(BIN)/python -m pytest -q -o addopts="" tests/distributed

bench: $(STAMP)
	$(BIN)/python bench/throughput.py --preset tiny --steps 30

bench-faults: $(STAMP)
	$(BIN)/python bench/faults.py

# Kiln on one H100 / H200 in about five minutes, each phase in its own process under a 90 s limit;
# records appended to gpu-check.json (docs/gpu-check.md). GPU_CHECK_ARGS="--only gpt2" reruns a
# phase, "--dry-run" rehearses them all on the CPU.
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(BIN)/python bench/gpu_check.py $(GPU_CHECK_ARGS)

# An IsoFLOP sweep of tiny decoders, a fit, and a larger held-out run it predicts (BENCHMARKS.md);
# 40-60 minutes on 2 cores (the sweep about 7 minutes, the 16M-token held-out run the rest).
scaling-demo: $(STAMP)
	$(BIN)/python bench/scaling_demo.py

clean:
	rm -rf $(VENV) runs .kiln-cache
