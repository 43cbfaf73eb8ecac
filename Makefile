# Two entry points (see README): `make demo` runs the main job, `make test` the test suite.
# Both create .venv on first use and install what they need from the package registries.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-slow lint bench docs clean

# torch first, pinned to the CPU wheel: the package accepts any recent torch, and an unpinned
# resolution would pull a multi-GB CUDA build.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0

$(VENV)/.base: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[digits,features,plots,fast,serve]"
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.base

demo: $(VENV)/.base
	$(BIN)/dpcert run --output runs/digits

data/.fetched:
	@scripts/fetch_data.sh data && touch $@ || echo "datasets could not be fetched; their tests will skip"

test: $(VENV)/.test data/.fetched
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy
	$(BIN)/python -m pytest

docs: $(VENV)/.test
	$(BIN)/mkdocs build --strict -d site

test-slow: $(VENV)/.test
	$(BIN)/python -m pytest -m slow

bench: $(VENV)/.test
	$(BIN)/python benchmarks/bench_certify.py
	$(BIN)/python benchmarks/radius_table.py
	$(BIN)/python benchmarks/bench_train.py --processes 2
	$(BIN)/python benchmarks/bench_conv_grads.py
	$(BIN)/python benchmarks/bench_memory.py
	$(BIN)/python benchmarks/bench_engine.py --threads 1

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
