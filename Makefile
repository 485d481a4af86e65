# hypeman-images — everyday commands. `make test` and `make demo` set up
# everything they need on a fresh Debian 12 machine (apt packages included).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup system venv test test-fast lint demo bench clean

setup: system venv

system:
	bash scripts/setup-system.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The suite runs on every core (pytest-xdist): each worker starts its own
# registry on a port it picks, so workers share nothing but the machine.
test: setup
	$(BIN)/pytest -q -n auto

test-fast: venv
	$(BIN)/pytest -q -n auto -m "not slow"

lint: venv
	$(BIN)/ruff check src tests bench scripts fuzz
	$(BIN)/ruff format --check src tests bench scripts fuzz
	$(BIN)/mypy

demo: setup
	$(BIN)/python scripts/demo.py

bench: setup
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV) build demo-data .pytest_cache .mypy_cache .ruff_cache
