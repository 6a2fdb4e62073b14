# Build, test and run the metering engine. Everything runs from the virtualenv in .venv.
#
#   make run    [ARGS=...]         the whole engine on an embedded SQLite db (needs only Python)
#   make test   [PYTEST_ARGS=...]  the test suite against real Postgres and Redis
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

.PHONY: help run test lint bench clean stop-services

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

# --- targets ----------------------------------------------------------------------------------

run: $(VENV)/.installed-run
	@echo "==> $(BIN)/metering run $(ARGS)"
	exec $(BIN)/metering run $(ARGS)

# scripts/ensure-services prints `export METERING_TEST_DATABASE_URL=... METERING_TEST_REDIS_URL=...`
# lines; they are eval'd in this same shell (.ONESHELL), so pytest sees them.
test: $(VENV)/.installed-dev
	@echo "==> finding Postgres and Redis for the tests (scripts/ensure-services)"
	exports=$$(bash scripts/ensure-services)
	eval "$$exports"
	echo "==> pytest $(PYTEST_ARGS)"
	rc=0
	$(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?
	if [[ $$rc -eq 5 ]]; then
	    echo "error: pytest collected no tests (exit code 5); treating that as a failure." >&2
	    echo "       Check PYTEST_ARGS and that tests/ holds test_*.py files." >&2
	elif [[ $$rc -ne 0 ]]; then
	    echo "error: pytest failed (exit code $$rc)" >&2
	fi
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

clean:
	@echo "==> removing $(VENV), metering.db*, caches and build output"
	rm -rf $(VENV) metering.db* .pytest_cache .mypy_cache .ruff_cache test-artifacts build dist *.egg-info
	find . -name .git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

stop-services:
	@bash scripts/ensure-services --stop
