# h3pretrain — see README.md. Every target sets up .venv first if it is missing or stale.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export MLFLOW_DISABLE_TELEMETRY := true
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: help setup test test-fast clean-venv

help:
	@echo "make pretrain      set up, build a small corpus, train a tiny hybrid H3 model on CPU"
	@echo "make test          set up and run the whole test suite"
	@echo "make setup         only create/update $(VENV)"

setup: $(STAMP)

$(STAMP): pyproject.toml launch/constraints.txt launch/setup_env.sh
	@VENV=$(VENV) bash launch/setup_env.sh 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
	@touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
