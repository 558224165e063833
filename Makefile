# h3pretrain — see README.md. Every target sets up .venv first if it is missing or stale.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
SLURM_PRESETS := 125m 355m 1.3b 2.7b
SLURM_TARGETS := $(addprefix pretrain-,$(SLURM_PRESETS))

export MLFLOW_DISABLE_TELEMETRY := true
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: help setup test test-fast test-compat corpus pretrain bench-prep bench-generate bench-kernels bench-checkpoint bench-context gpu-check gpu-bundle clean-venv resume status $(SLURM_TARGETS)

help:
	@echo "make pretrain      set up, build a small corpus, train a tiny hybrid H3 model on CPU (SET='k=v ...')"
	@echo "make pretrain-2.7b submit a SLURM job for H3-2.7B (also -125m -355m -1.3b); DRY_RUN=1 prints it"
	@echo "                   NODES= GPUS_PER_NODE= TIME= PARTITION= ACCOUNT= (or the environment), SET='k=v ...'"
	@echo "make resume RUN=d  submit a new job that resumes run directory d (TIME=... etc. apply)"
	@echo "make status RUN=d  job state, last step and loss, latest checkpoint of run directory d"
	@echo "make test          set up and run the whole test suite"
	@echo "make corpus        build data/corpus (Pile-format jsonl.zst from Debian's Python docs)"
	@echo "make bench-prep    tokenization throughput -> bench/results/prep.md"
	@echo "make bench-generate  generation tokens/s, hybrid H3 vs transformer (GPU) -> bench/results/"
	@echo "make bench-kernels   FlashConv vs torch.fft vs SDPA, model tokens/s vs GPT-2 (GPU) -> bench/results/"
	@echo "make gpu-bundle    the wheels the lent GPU machine lacks for training (DeepSpeed, megatron-core, ...) -> .whl/"
	@echo "make gpu-check     the first command on a GPU: correctness, kernels, models, generation, train in <= 9 min"
	@echo "                   -> bench/results/gpu-check-<gpu>-<date>.{json,md} (CPU: a toy-size smoke check)"
	@echo "make bench-recompute peak memory per train.recompute mode (125m, L=2048, CPU) -> bench/results/"
	@echo "make bench-context   peak memory and step time per context-parallel rank, L=8K/32K, cp=1/2/4 (CPU)"
	@echo "make bench-checkpoint checkpoint bytes per rank, extra RSS, blocked time (125m, 4 CPU ranks) -> bench/results/"
	@echo "make test-compat   the fast tests on torch 2.11.0 (the lent GPU machine's) in .venv-compat"
	@echo "make setup         only create/update $(VENV)"

setup: $(STAMP)

$(STAMP): pyproject.toml launch/constraints.txt launch/setup_env.sh
	@VENV=$(VENV) bash launch/setup_env.sh 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
	@touch $@

# Debian's python3.11-doc gives a few MB of real English reST; without it (no apt, not root) the
# corpus falls back to the standard library's docstrings.
DOC_SOURCES := $(firstword $(wildcard /usr/share/doc/python3.*/html/_sources))
corpus: $(STAMP)
	@test -f data/corpus/corpus-00.jsonl.zst || { \
	if [ -z "$(DOC_SOURCES)" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing python3.11-doc (text for the local corpus)"; \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3.11-doc >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3.11-doc >/dev/null 2>&1)) \
		|| echo "python3.11-doc unavailable: the corpus will use stdlib docstrings"; \
	fi; \
	$(PY) -m data_prep.corpus --out data/corpus; }

# A tiny hybrid H3 (4 layers, one attention) on the local corpus, on CPU. Re-running resumes.
# SET='train.steps=20 ...' overrides the config; the summary names the run, its checkpoint and what to run next.
TINY_DATA := data/shards-tiny
TINY_RUN = $(or $(patsubst train.run_dir=%,%,$(filter train.run_dir=%,$(SET))),checkpoints/tiny)
pretrain: corpus
	$(PY) -m h3pretrain.cli prep data/corpus --out $(TINY_DATA) --seq-len 256 --vocab-size 4096 \
		--samples-per-shard 512 --tokenizer-sample-mb 20
	$(PY) -m h3pretrain.cli train --config launch/configs/tiny.yaml $(foreach kv,$(SET),--set $(kv))
	@$(PY) -m h3pretrain.cli summary $(TINY_RUN)

# SLURM (docs/slurm.md): the sbatch script is rendered from launch/configs/<preset>.yaml;
# these variables (from the command line or the environment) override its slurm section.
SLURM_SETS = $(if $(NODES),--set slurm.nodes=$(NODES)) \
	$(if $(GPUS_PER_NODE),--set slurm.gpus_per_node=$(GPUS_PER_NODE)) \
	$(if $(TIME),--set slurm.time=$(TIME)) \
	$(if $(PARTITION),--set slurm.partition=$(PARTITION)) \
	$(if $(ACCOUNT),--set slurm.account=$(ACCOUNT)) \
	$(foreach kv,$(SET),--set $(kv))

$(SLURM_TARGETS): pretrain-%: $(STAMP)
	@$(PY) -m h3pretrain.cli slurm $(if $(filter-out 0,$(DRY_RUN)),render,submit) \
		--config launch/configs/$*.yaml $(SLURM_SETS)

resume: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make resume RUN=<run dir> [TIME=... PARTITION=... ACCOUNT=...]" >&2; exit 2; }
	@$(PY) -m h3pretrain.cli slurm resume $(RUN) $(SLURM_SETS)

status: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make status RUN=<run dir>" >&2; exit 2; }
	@$(PY) -m h3pretrain.cli slurm status $(RUN)

bench-prep: corpus
	$(PY) bench/prep_throughput.py

# GPU: 1.3B hybrid vs same-size transformer, batch 64, 128 new tokens. Without a GPU it runs a toy
# size so that the script can be smoke-checked (the results file names the device).
BENCH_GENERATE_ARGS ?= $(if $(filter cuda,$(DS_ACCELERATOR)),,--preset tiny --batch 2 --prompts 64 128 --new-tokens 8)
bench-generate: $(STAMP)
	$(PY) bench/bench_generate.py $(BENCH_GENERATE_ARGS)

# GPU: the sizes in the script's docstring; without CUDA it runs toy sizes (smoke check, results file says CPU).
bench-kernels: $(STAMP)
	$(PY) bench/bench_kernels.py $(BENCH_KERNELS_ARGS)

# Needs only a CUDA torch with Triton: no set-up, so it uses .venv when there is one, else python3.
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_CHECK_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# Wheels for CPython 3.12 of what the trainer needs and the lent GPU machine lacks (carry: [".whl"]).
gpu-bundle: $(STAMP)
	$(PY) launch/gpu_bundle.py

# Peak memory of a 125m forward+backward at L=2048 on CPU per train.recompute mode.
bench-recompute: $(STAMP)
	$(PY) bench/bench_recompute.py $(BENCH_RECOMPUTE_ARGS)

bench-context: $(STAMP)
	$(PY) bench/bench_context.py $(BENCH_CONTEXT_ARGS)

bench-checkpoint: $(STAMP)
	$(PY) bench/bench_checkpoint.py

test: $(STAMP) corpus
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The fast tests on the lent GPU machine's torch (2.11.0) in a venv of its own, the rest pinned as
# usual. PyPI has no CPU build of torch 2.11.0 for Linux: its CUDA build is installed (about 6 GB
# with its CUDA libraries), which runs on a CPU machine as the CPU build does. NumPy stays below
# 2.4 there: the Triton 3.6 that torch 2.11 brings reads a kernel's scalar arguments, in its CPU
# interpreter only, with int() of a one-element array, which NumPy 2.4 refuses.
COMPAT_VENV ?= .venv-compat
COMPAT_TORCH ?= torch==2.11.0
COMPAT_PINS ?= numpy<2.4
test-compat:
	TORCH_SPEC=$(COMPAT_TORCH) EXTRA_PINS="$(COMPAT_PINS)" $(MAKE) --no-print-directory test-fast VENV=$(COMPAT_VENV)

clean-venv:
	rm -rf $(VENV)
