# The few commands people run. `make test` is what CI runs (.ci/run).
PY ?= python3
PORT ?= 8000
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-fuzz bench bench-compute bench-scale bench-accuracy gpu-check cpu-check lint clean

# What serving needs (the demo); the dev stamp adds the test toolchain on top of it.
$(RUNTIME): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(RUNTIME)  # PORT=8001 to serve on another port
	$(BIN)/python -m scripts.demo --port $(PORT)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m pytest -q -m slow

test-fuzz: $(STAMP)  # the API fuzzing suite with 500 cases per operation and mode (CI runs 25)
	PIGGYBACK_FUZZ_EXAMPLES=500 $(BIN)/python -m pytest -q tests/hardening/test_api_fuzz.py

bench: $(STAMP)  # the serving benchmarks (issue 6): about 5 minutes on 2 CPU cores
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.serving

bench-compute: $(STAMP)  # dtype/layout per backbone, JPEG decoding, packed vs OpenVINO, the server against plain loops (~25 min)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.layouts
	$(BIN)/python -m benchmarks.decode
	$(BIN)/python -m benchmarks.packed
	$(BIN)/python -m benchmarks.compute

bench-scale: $(STAMP)  # 1 to 1,000 tasks, uniform and Zipf traffic, against one-model-per-task baselines; start time (~55 min)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.mixed --arch resnet18
	$(BIN)/python -m benchmarks.scale --duration 8 --memory-tasks resnet18:10000
	$(BIN)/python -m benchmarks.mixed --arch resnet18 --network-only
	$(BIN)/python -m benchmarks.start

bench-accuracy: $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks.accuracy

gpu-check: $(STAMP)  # on a GPU machine: tests/cuda, then benchmarks/results/gpu.md (at most 8 minutes on an H100/H200)
	PY=$(BIN)/python bash scripts/gpu_check.sh

cpu-check: $(STAMP)  # the CPU targets (packed vs OpenVINO, mixed cost, HTTP with wrk), met or not (~20 min; CPUS=0,1 to pin)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	PY=$(BIN)/python bash scripts/cpu_check.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
