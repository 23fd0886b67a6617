# The targets CI runs: `make test` is the whole gate (lint + types + import layers + every test).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
JOBS   ?= 2
DEMO_DIR ?= $(CURDIR)/.demo

.PHONY: help venv install lint test test-pg demo bench golden clean

help:
	@echo "make demo   - create the venv, install, run a whole migration on an embedded PostgreSQL"
	@echo "make test   - install and run lint, types, import layers and every test"
	@echo "make bench  - benchmarks against cp/sync, dcmtk storescu, pydicom loops (slow)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

venv install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check xnatmigrate tests bench
	$(BIN)/ruff format --check xnatmigrate tests bench
	$(BIN)/mypy --strict
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -n $(JOBS) -q

# The database tests alone, against the server named by XNATMIGRATE_TEST_DSN.
test-pg: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -q -m pg

demo: $(STAMP)
	$(BIN)/python -m xnatmigrate.demo --dir $(DEMO_DIR)

bench: $(STAMP)
	$(BIN)/python -m bench.run --out docs/benchmarks.md
	$(BIN)/python -m bench.fleet_memory --embedded --out docs/fleet-memory.md

# Rewrite tests/golden/ from the current planner (the golden test only compares); review the diff.
golden: $(STAMP)
	$(BIN)/python -m tests.golden_regen

clean:
	rm -rf $(VENV) .demo build dist .pytest_cache .mypy_cache .ruff_cache
