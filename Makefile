# Two entry points, both self-contained on a fresh machine: `make run` and `make test`.
# Exact tested versions come from constraints.txt (torch 2.13.0 resolves to the local CPU build).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: install install-dev run test test-e2e test-processes test-slurm lint slow mutants

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) -e ".[models]"

install-dev: $(BIN)/python
	$(PIP) -e ".[dev]"

## The default experiment: tiny_bert on the synthetic task, CPU, W&B offline (about a minute).
run: install
	$(BIN)/qatflash

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## Lint, then the default test run: one case per API (slow, e2e, multi-process and SLURM tests excluded).
test: lint
	$(BIN)/pytest

## The every-case end-to-end parametrizations (every recipe, both decoder families) (CI runs them too).
test-e2e: install-dev
	$(BIN)/pytest -m e2e

## The multi-process tests: parallel launchers, DDP workers, killed and resumed jobs (CI runs them too).
test-processes: install-dev
	$(BIN)/pytest -m processes

## Sweeps and DDP jobs on a SLURM cluster: start the one-node one first (scripts/slurm-local.sh start).
test-slurm: install-dev
	$(BIN)/pytest -m slurm

## The long end-to-end runs (default experiment accuracy, MiniLM on SST-2).
slow: install-dev
	$(BIN)/pytest -m slow

## Replay the recorded breaks (tests/mutations/*.patch): each must make its named test fail. MUTANTS=M04 picks some.
mutants: install-dev
	$(BIN)/python tests/mutations/run.py $(MUTANTS)
