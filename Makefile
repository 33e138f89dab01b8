# On a bare machine (Python 3.11, Java 17, gcc): `make demo` and `make test` set everything up.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
HOROVOD_VERSION := 0.28.1
DEMO := data/demo
DEMO_CONF := catalog.warehouse=$(DEMO)/warehouse catalog.metastore=$(DEMO)/warehouse/metastore_db
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test lint bench bench-quality clean help

help:
	@echo "make demo   - set up, then the whole pipeline on a small synthetic catalog: synth, ingest,"
	@echo "              train (level 1, flat, branches), predict (submission + table), evaluate"
	@echo "make test   - set up and run the test suite"
	@echo "make bench  - ingest, input-pipeline, training and scoring throughput against baselines"
	@echo "make bench-quality - every strategy at equal image-epochs on the hard preset, 3 training seeds (~30 min)"
	@echo "make lint   - ruff"
	@echo "make setup  - only create $(VENV)/ with the pinned stack and horovod (idempotent)"

setup: $(STAMP)

# Re-runs only when the pins change. Horovod has no wheel: it is built from source with Gloo
# against the TensorFlow installed just before (no MPI, no PyTorch/MXNet; see README).
$(STAMP): requirements/base.txt requirements/dev.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 not found"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==24.3.1 wheel==0.45.1 setuptools==69.5.1
	$(PY) -m pip install -q -r requirements/base.txt -r requirements/dev.txt -r requirements/build.txt
	@if $(PY) -c "import horovod, horovod.tensorflow.keras; assert horovod.__version__ == '$(HOROVOD_VERSION)'" 2>/dev/null; then \
		echo "horovod $(HOROVOD_VERSION) already built"; \
	else \
		echo "building horovod $(HOROVOD_VERSION) with Gloo (about 5 minutes)"; \
		PATH=$(abspath $(VENV))/bin:$$PATH HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 \
		HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j2 \
		$(PY) -m pip install -q --no-build-isolation --no-cache-dir horovod==$(HOROVOD_VERSION) || exit 1; \
	fi
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import horovod.tensorflow.keras as h; assert h.gloo_built(), 'horovod built without Gloo'"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/hierarchy synth --output $(DEMO)/synth
	$(VENV)/bin/hierarchy ingest --input $(DEMO)/synth/train.bson \
		--categories $(DEMO)/synth/category_names.csv --output $(DEMO)/dataset ingest.split_mb=1 $(DEMO_CONF)
	$(VENV)/bin/hierarchy ingest --input $(DEMO)/synth/test.bson --kind test \
		--categories $(DEMO)/synth/category_names.csv --output $(DEMO)/dataset ingest.split_mb=1 $(DEMO_CONF)
	@echo "manifest: $(DEMO)/dataset/manifest.json"
	$(VENV)/bin/hierarchy train --data $(DEMO)/dataset --models $(DEMO)/models --run-id demo \
		--level 1 $(DEMO_CONF)
	$(VENV)/bin/hierarchy train --data $(DEMO)/dataset --models $(DEMO)/models --run-id demo \
		--level 3 --mode flat $(DEMO_CONF)
	$(VENV)/bin/hierarchy train --data $(DEMO)/dataset --models $(DEMO)/models --run-id demo \
		--level 3 --mode branch $(DEMO_CONF)
	$(VENV)/bin/hierarchy train --data $(DEMO)/dataset --models $(DEMO)/models --run-id demo \
		--level 3 --mode multi $(DEMO_CONF)
	$(VENV)/bin/hierarchy train --data $(DEMO)/dataset --models $(DEMO)/models --run-id demo \
		--level 3 --mode experts $(DEMO_CONF)
	$(VENV)/bin/hierarchy evaluate --data $(DEMO)/dataset --models $(DEMO)/models --run-id demo \
		--output $(DEMO)/output $(DEMO_CONF)
	$(VENV)/bin/hierarchy predict --data $(DEMO)/dataset --models $(DEMO)/models --run-id demo \
		--split test --output $(DEMO)/output $(DEMO_CONF)
	@echo
	@echo "demo done:"
	@echo "  submission   $(DEMO)/output/submission.csv"
	@echo "  table        predictions (Parquet at $(DEMO)/output/predictions; metastore $(DEMO)/warehouse)"
	@echo "  report       $(DEMO)/output/evaluation/demo/report.md"
	@echo "  notebook     notebooks/analyst.ipynb (overrides: $(DEMO_CONF))"
	@echo "  serve        $(VENV)/bin/hierarchy serve --models $(DEMO)/models --run-id demo  (then http://127.0.0.1:8000/)"

# The page of `hierarchy serve` is tested in Debian's headless Chromium (driven by the
# playwright package, pinned in requirements/dev.txt, with executable_path; no browser download).
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no $(CHROMIUM) and not root: the browser test will skip (apt-get install chromium)"; fi

# pytest exits 5 when it collects nothing (e.g. a -k that matches no test): not a failure.
test: setup $(CHROMIUM)
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check hierarchy jobs tests bench

bench: setup
	$(PY) bench/ingest_throughput.py
	$(PY) bench/input_pipeline.py
	$(PY) bench/train_throughput.py
	$(PY) bench/predict_throughput.py

# every strategy trained at the same image-epochs on the hard preset, scored on its test dump
bench-quality: setup
	$(PY) bench/quality.py

clean:
	rm -rf data/demo .pytest_cache bench/results
