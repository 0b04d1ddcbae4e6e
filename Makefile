# Two commands on a fresh machine: `make demo` and `make test`. Each installs first when .venv is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export WANDB_MODE ?= offline
export PYTHONHASHSEED ?= 0

.PHONY: install demo test lint format bench clean

$(BIN)/dgnetpp-train:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,sweep]"

install: $(BIN)/dgnetpp-train

demo: install
	$(BIN)/python -m dgnetpp_pl experiment=demo

test: install
	$(BIN)/ruff check src tests bench notebooks
	$(BIN)/ruff format --check src tests bench notebooks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

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
