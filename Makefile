# Build, test and run the metering engine. Everything runs from the virtualenv in .venv.
#
#   make run    [ARGS=...]         the whole engine on an embedded SQLite db (needs only Python)
#   make test   [PYTEST_ARGS=...]  the test suite against real Postgres and Redis (and sdk/node's)
#   make lint                      ruff check, ruff format --check, mypy
#   make bench                     every bench/*.py
#   make clean                     remove .venv, metering.db*, caches and build output
#   make stop-services             stop throwaway Postgres/Redis that scripts/ensure-services started

SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.ONESHELL:
.DELETE_ON_ERROR:
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help run test lint bench clean stop-services node-tools bench-node

help:
	@sed -n '3,9s/^# \{0,1\}//p' $(firstword $(MAKEFILE_LIST))

# --- the virtualenv -------------------------------------------------------------------------
# Each stamp is rebuilt (pip runs) only when pyproject.toml is newer than it.

$(BIN)/python:
	@echo "==> creating the virtualenv $(VENV) ($$($(PYTHON) --version 2>&1))"
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	@echo "==> installing metering (editable) into $(VENV)"
	$(BIN)/pip install --disable-pip-version-check -e .
	touch $@

# The dev install includes everything the plain one does, so it refreshes both stamps.
$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	@echo "==> installing metering (editable) with the dev extras into $(VENV)"
	$(BIN)/pip install --disable-pip-version-check -e '.[dev]'
	touch $@ $(VENV)/.installed-run

# --- the Node.js SDK (sdk/node) -------------------------------------------------------------
# Its units and the conformance tests (tests/conformance, which start its example gateway) need
# Node.js >= 20 and npm: missing, they are an error of `make test`, never a skip. npm ci installs
# from the committed lock, again only when package.json or package-lock.json is newer than it.
NODE_SDK := sdk/node

node-tools:
	@if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
	    echo "error: make test needs Node.js >= 20 and npm (sdk/node, tests/conformance): not found on PATH." >&2
	    echo "       Install them (Debian: apt-get install nodejs npm) and run make test again." >&2
	    exit 1
	fi
	major=$$(node -p 'process.versions.node.split(".")[0]')
	if [[ $$major -lt 20 ]]; then
	    echo "error: sdk/node needs Node.js >= 20, found $$(node --version)" >&2
	    exit 1
	fi

$(NODE_SDK)/node_modules/.installed: $(NODE_SDK)/package.json $(NODE_SDK)/package-lock.json | node-tools
	@echo "==> npm ci in $(NODE_SDK) (node $$(node --version), npm $$(npm --version))"
	(cd $(NODE_SDK) && npm ci --no-audit --no-fund)
	touch $@

# --- targets ----------------------------------------------------------------------------------

run: $(VENV)/.installed-run
	@echo "==> $(BIN)/metering run $(ARGS)"
	exec $(BIN)/metering run $(ARGS)

# scripts/ensure-services prints `export METERING_TEST_DATABASE_URL=... METERING_TEST_REDIS_URL=...`
# lines; they are eval'd in this same shell (.ONESHELL), so pytest sees them.
test: $(VENV)/.installed-dev node-tools $(NODE_SDK)/node_modules/.installed
	@echo "==> finding Postgres and Redis for the tests (scripts/ensure-services)"
	exports=$$(bash scripts/ensure-services)
	eval "$$exports"
	echo "==> sdk/node: tsc (the declarations), then node --test"
	node_rc=0
	(cd $(NODE_SDK) && npm run --silent typecheck && node --test test/*.test.js) || node_rc=$$?
	if [[ $$node_rc -ne 0 ]]; then echo "error: the sdk/node tests failed (exit code $$node_rc)" >&2; fi
	echo "==> pytest $(PYTEST_ARGS)"
	rc=0
	$(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?
	if [[ $$rc -eq 5 ]]; then
	    echo "error: pytest collected no tests (exit code 5); treating that as a failure." >&2
	    echo "       Check PYTEST_ARGS and that tests/ holds test_*.py files." >&2
	elif [[ $$rc -ne 0 ]]; then
	    echo "error: pytest failed (exit code $$rc)" >&2
	fi
	if [[ $$rc -eq 0 && $$node_rc -ne 0 ]]; then rc=$$node_rc; fi
	exit $$rc

# All three run even when an earlier one fails; the target fails if any did.
lint: $(VENV)/.installed-dev
	@rc=0
	echo "==> ruff check"
	$(BIN)/ruff check . || rc=1
	echo "==> ruff format --check"
	$(BIN)/ruff format --check . || rc=1
	echo "==> mypy"
	$(BIN)/mypy || rc=1
	if [[ $$rc -ne 0 ]]; then echo "error: lint failed (see above)" >&2; fi
	exit $$rc

bench: $(VENV)/.installed-run
	@echo "==> finding Postgres and Redis for the benchmarks (scripts/ensure-services)"
	exports=$$(bash scripts/ensure-services)
	eval "$$exports"
	shopt -s nullglob
	scripts=(bench/[!_]*.py)
	if [[ $${#scripts[@]} -eq 0 ]]; then echo "error: no bench/*.py to run" >&2; exit 1; fi
	failed=()
	for script in "$${scripts[@]}"; do
	    echo "==> $(BIN)/python $$script"
	    $(BIN)/python "$$script" || failed+=("$$script (exit $$?)")
	done
	if [[ $${#failed[@]} -ne 0 ]]; then
	    printf 'error: benchmark failed: %s\n' "$${failed[@]}" >&2
	    exit 1
	fi
	echo "==> all $${#scripts[@]} benchmarks done"

# The Node.js SDK's benchmark: needs Node.js and Redis only, no Python.
bench-node: $(NODE_SDK)/node_modules/.installed
	@cd $(NODE_SDK) && node bench/meter.js

clean:
	@echo "==> removing $(VENV), metering.db*, caches and build output"
	rm -rf $(NODE_SDK)/node_modules
	rm -rf $(VENV) metering.db* .pytest_cache .mypy_cache .ruff_cache test-artifacts build dist *.egg-info
	find . -name .git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

stop-services:
	@bash scripts/ensure-services --stop
