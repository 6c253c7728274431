# Two commands do everything on a fresh clone: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test lint format clean

install: $(STAMP)

# Re-installs only when the project's dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,cluster]"
	touch $(STAMP)

# The built-in demo: synthetic data written to data/demo on first use, a small DETR on CPU.
train: install
	$(BIN)/python train.py experiment=demo

# The import layers (pyproject.toml, [tool.importlinter]) first: seconds, and a broken layer fails fast.
# Then the tests on two workers: a test module (or the tests of the demo sweep) is one unit of work, the
# slow ones first (tests/conftest.py). Run one by one, the tests keep about 1.2 of 2 cores busy.
test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

lint: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check src tests *.py
	$(BIN)/ruff format --check src tests *.py

format: install
	$(BIN)/ruff format src tests *.py
	$(BIN)/ruff check --fix src tests *.py

clean:
	rm -rf $(VENV) .pytest_cache
