# Fleet developer entry points. `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint typecheck unit services venv demo demo-upgrade bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

services:
	@bash deploy/dev/ensure-services.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) services lint typecheck
	$(BIN)/pytest -q $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

demo: $(STAMP) services
	$(BIN)/python -m conductor.demo

demo-upgrade: $(STAMP) services
	$(BIN)/python -m conductor.demo_upgrade

bench: $(STAMP) services
	$(BIN)/python bench/rpc.py --quick
	$(BIN)/python bench/objects.py --quick

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache
