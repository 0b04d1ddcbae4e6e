# Two commands on a fresh machine: `make demo` and `make test`. Each installs first when .venv is missing.
# `make test` is the fast lane (no test marked slow); `make test-full` runs every test, as CI does.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export WANDB_MODE ?= offline
export PYTHONHASHSEED ?= 0

.PHONY: install demo test test-full lint format bench clean

$(BIN)/dgnetpp-export:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,sweep,export]"

install: $(BIN)/dgnetpp-export

demo: install
	$(BIN)/python -m dgnetpp_pl experiment=demo

test: lint
	$(BIN)/python -m pytest -q -m "not slow" --durations=25 $(PYTEST_ARGS)

test-full: lint
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests bench notebooks
	$(BIN)/ruff format --check src tests bench notebooks

format: install
	$(BIN)/ruff format src tests bench notebooks
	$(BIN)/ruff check --fix src tests bench notebooks

bench: install
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/cluster.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
