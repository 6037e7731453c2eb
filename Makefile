# The front door: `make demo` and `make test` each set up what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ROWS ?= 300000
RUNS ?= runs

.PHONY: setup demo test train-demo bench clean

setup: $(VENV)/.installed

# Re-run the install whenever the pinned dependencies change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# Train DLRM, Wide & Deep and the logistic baseline on synthetic data and compare them.
demo: setup
	$(PY) -m training.demo --rows $(ROWS) --runs $(RUNS)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m training.bench_reading --out results/reading
	$(PY) -m training.bench_training --out results/training

clean:
	rm -rf $(RUNS) results .pytest_cache
