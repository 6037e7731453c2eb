# The front door: `make demo` and `make test` each set up what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
ROWS ?= 600000
RUNS ?= runs
MODELS := dlrm widedeep

.PHONY: setup demo train export archive serve stop score test bench clean

setup: $(VENV)/.installed

# Re-run the install whenever the pinned dependencies change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The whole path on synthetic data: train -> export -> archive -> serve -> score over REST -> stop.
demo: setup
	$(MAKE) --no-print-directory train export archive
	$(MAKE) --no-print-directory serve || { $(MAKE) --no-print-directory stop; exit 1; }
	$(MAKE) --no-print-directory score; status=$$?; $(MAKE) --no-print-directory stop; exit $$status

# DLRM, Wide & Deep and the logistic baseline, compared with the oracle AUC.
train: setup
	$(PY) -m training.demo --rows $(ROWS) --runs $(RUNS)

# TorchScript + ONNX (+ INT8 for DLRM), each parity-checked against the trained model.
export: setup
	$(PY) -m export $(RUNS)/dlrm --out $(RUNS)/dlrm/export --quantize int8
	$(PY) -m export $(RUNS)/widedeep --out $(RUNS)/widedeep/export

# DLRM served by TorchScript, Wide & Deep by ONNX Runtime.
archive: setup
	$(PY) -m export.archive $(RUNS)/dlrm/export --name dlrm --backend torchscript --force
	$(PY) -m export.archive $(RUNS)/widedeep/export --name widedeep --backend onnx --force

# Start TorchServe with config.properties (its console output goes to logs/torchserve.out)
# and wait until the models' workers are ready.
serve: setup
	@mkdir -p logs
	$(BIN)/torchserve --start --ncs --ts-config config.properties --model-store model_store > logs/torchserve.out 2>&1
	$(PY) -m loadtest.torchserve wait --config config.properties --models $(MODELS) --timeout 180

stop:
	-$(BIN)/torchserve --stop

# Score sample records and a ranking request over REST; compare with in-process scores.
score: setup
	$(PY) -m loadtest.client $(foreach m,$(MODELS),--model $(m)=$(RUNS)/$(m)/export)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m training.bench_reading --out results/reading
	$(PY) -m training.bench_training --out results/training
	$(PY) -m export.presets results/kaggle
	$(PY) -m export results/kaggle --quantize int8
	$(PY) -m export.benchmark results/kaggle/export --threads 2 --out results/export_benchmark

clean:
	rm -rf $(RUNS) results .pytest_cache logs
