# Each target creates .venv when missing and (re)installs the project only when
# pyproject.toml changed since the last install (the stamp file), so a second run starts in seconds.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
BIN := $(VENV)/bin

.PHONY: test lint demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-run .pytest_cache

# The main job: generates a small three-domain data mix, builds a cache with three small
# random-init teachers, trains a student from it and prints where everything is (CPU, minutes).
demo: $(STAMP)
	$(BIN)/python -m train.demo
