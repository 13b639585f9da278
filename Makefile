# Thin targets over the `tide` CLI and pytest. Each sets up .venv itself on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?=
DEVICE ?= cpu
# Threads: empty = the CLI's defaults from the usable cores (README, "Threads"); THREADS=N sets --threads N.
THREADS ?=
# float32 on the CPU (the built-in model is stored in bf16 and the upcast is exact); bfloat16 on a GPU.
DTYPE ?= $(if $(filter cuda%,$(DEVICE)),bfloat16,float32)

# make bench: the main job, every policy at one budget in one regime (README: its measured wall time);
# make bench FULL=1: the full sweep, two budgets x both regimes x two interleaved repeats.
FULL ?=
comma := ,
BUDGETS ?= $(if $(FULL),25%$(comma)50%,25%)
REGIMES ?= $(if $(FULL),block-kv$(comma)full,block-kv)
REPEAT ?= $(if $(FULL),2,1)
POLICIES ?= reference,full-offload,lru,cpu-fallback,accelerate,tide
BENCH_ARGS ?=

EVAL_LIMIT ?= 50
EVAL_ARGS ?=
# make reproduce: the paper's MBPP experiment (MODEL=DIR, a local LLaDA2.0 checkpoint); without MODEL, the
# same pipeline on the built-in model and task. REPRODUCE_ARGS e.g. "--data sanitized-mbpp.json --limit 50".
REPRODUCE_ARGS ?=
# NPROC=N: eval and reproduce data parallel, N processes on this machine (one per GPU; README, "Many GPUs").
NPROC ?=

.PHONY: venv test bench bench-check microbench eval reproduce gpu-check soak lint loc clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: venv lint  # lint first: a style slip fails in seconds here, not after CI's full run
	$(BIN)/pytest -q

bench: venv
	$(BIN)/tide $(if $(THREADS),--threads $(THREADS)) bench $(if $(MODEL),--model $(MODEL)) --device $(DEVICE) --dtype $(DTYPE) --budgets $(BUDGETS) --regime $(REGIMES) --repeat $(REPEAT) --policies $(POLICIES) $(BENCH_ARGS)

bench-check: venv
	rm -rf .cache/bench-check
	$(BIN)/tide --threads 1 bench --model preset:tiny --budgets 25% --repeat 1 --gen-length 64 --batch-sizes 1,4 --projections "" --check --out .cache/bench-check

eval: venv
	$(BIN)/tide $(if $(THREADS),--threads $(THREADS)) eval $(if $(MODEL),--model $(MODEL)) --device $(DEVICE) --dtype $(DTYPE) --limit $(EVAL_LIMIT) --check-lossless $(if $(NPROC),--nproc $(NPROC)) $(EVAL_ARGS)

reproduce: venv
	$(BIN)/tide $(if $(THREADS),--threads $(THREADS)) reproduce $(if $(MODEL),--model $(MODEL)) --device $(DEVICE) --dtype $(DTYPE) $(if $(NPROC),--nproc $(NPROC)) $(REPRODUCE_ARGS)

# The CUDA checks on a bare GPU machine, with its own Python (no venv, no network): see bench/gpu_check.py.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	PYTHONPATH=. $(GPU_PYTHON) -m tide.bench.gpu_check

# Many requests through one engine across policies and budgets: flat memory, threads and files, identical tokens.
SOAK_ARGS ?=
soak: venv
	$(BIN)/python -m tide.bench.soak $(if $(MODEL),--model $(MODEL)) --device $(DEVICE) $(SOAK_ARGS)

microbench: venv
	$(BIN)/pytest -q -s bench/micro --benchmark-only

lint: venv
	$(BIN)/ruff check tide baselines bench evals tests

loc:
	@wc -l tide/*.py tide/experts/*.py baselines/*.py bench/*.py evals/*.py evals/tasks/*.py 2>/dev/null | sort -n

clean:
	rm -rf $(VENV) .cache
