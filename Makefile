# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Both create .venv on first use and install what they need from the package registries.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.base

demo: $(VENV)/.base
	$(BIN)/python examples/make_example.py examples/synthetic
	$(BIN)/dpcert certify examples/synthetic/votes.npy --mechanism examples/synthetic/mechanism.json \
		--labels examples/synthetic/labels.npy --output examples/synthetic/certificates.csv

test: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/python -m pytest

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -m slow

bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench_certify.py
	$(BIN)/python benchmarks/radius_table.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
