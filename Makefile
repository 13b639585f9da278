# Thin targets over the `tide` CLI and pytest. Each sets up .venv itself on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= .cache/tiny-random
DEVICE ?= cpu

.PHONY: venv test bench lint loc clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/pytest -q

.cache/tiny-random/config.json: | venv
	$(BIN)/tide make-checkpoint --preset tiny --out .cache/tiny-random --seed 0

bench: venv .cache/tiny-random/config.json
	$(BIN)/tide generate --model $(MODEL) --device $(DEVICE) --prompt "def fibonacci(n):" --gen-length 128

lint: venv
	$(BIN)/ruff check tide baselines bench evals tests

loc:
	@wc -l tide/*.py tide/*/*.py baselines/*.py bench/*.py evals/*.py 2>/dev/null | sort -n

clean:
	rm -rf $(VENV) .cache
