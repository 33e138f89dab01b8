# On a bare machine (Python 3.11, Java 17, gcc): `make demo` and `make test` set everything up.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
HOROVOD_VERSION := 0.28.1
DEMO := data/demo
DEMO_CONF := paths.root=$(abspath $(DEMO))
# level 3 in the demo: the recipe (flat, then its refit head and the fusion head, tuned in two
# trials) beside the per-branch models of the two-stage strategy. The multi-level trunk and its
# branch experts do not buy leaf accuracy at equal compute (bench/README.md) and cost the demo
# about a minute: `make demo DEMO_MODES="flat branch multi experts refit fusion"` adds them.
DEMO_MODES ?= flat branch refit fusion
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: setup demo test lint audit bench bench-quality bench-taxonomy clean help dist metastore metastore-stop os-packages \
	setup-gpu check-gpu-deps

# Horovod is built once into a wheel (with Gloo, against the pinned TensorFlow): `make setup`
# installs it, `make dist` packs it into the cluster environment.
WHEELHOUSE := $(VENV)/wheelhouse
HOROVOD_WHEEL := $(WHEELHOUSE)/.horovod-$(HOROVOD_VERSION)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
WHEEL := dist/hierarchy-$(VERSION)-py3-none-any.whl
DIST_ENV := .dist-env

help:
	@echo "make demo   - set up, then the whole pipeline on a small synthetic catalog: synth, ingest,"
	@echo "              train (level 1, flat, branches), predict (submission + table), evaluate"
	@echo "make test   - set up and run the test suite"
	@echo "make bench  - ingest, input-pipeline, training and scoring throughput against baselines"
	@echo "make bench-quality - every strategy at equal image-epochs on the hard preset, 3 training seeds (~30 min)"
	@echo "make bench-taxonomy - a taxonomy change: refit --from-run against a full retrain, 3 training seeds (~15 min)"
	@echo "make lint   - ruff, lint-imports (the layers), and make audit: the installed stack against the local advisories"
	@echo "make setup  - only create $(VENV)/ with the pinned stack and horovod (idempotent)"
	@echo "make setup-gpu - on a GPU node instead of setup: CUDA TensorFlow, horovod with NCCL (README: GPU cluster)"
	@echo "make check-gpu-deps - resolve the GPU pins against the others (pip --dry-run: no GPU, nothing installed)"
	@echo "make dist   - dist/: the wheel, a --py-files zip and a packed environment for spark-submit"
	@echo "make metastore - start PostgreSQL (a shared Hive metastore) and the Spark Thrift server"

# The driver JVM's class-data-sharing archive (hierarchy/spark_cds.py): every local Spark
# session starts ~1 s sooner (~3 s with the Hive catalog). Dumped once (~30 s), then a check.
setup: $(STAMP)
	@$(PY) -m hierarchy.spark_cds

# Re-runs only when the pins change. Horovod has no wheel: it is built from source with Gloo
# against the TensorFlow installed just before (no MPI, no PyTorch/MXNet; see README).
$(STAMP): requirements/base.txt requirements/dev.txt requirements/dist.txt pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11 not found"; exit 1; }
	@if [ -e $(GPU_STAMP) ]; then echo "$(VENV) holds the GPU stack: after a change of the pins run make setup-gpu" \
		"(make setup would add tensorflow-cpu over it)"; exit 1; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==24.3.1 wheel==0.45.1 setuptools==69.5.1
	$(PY) -m pip install -q -r requirements/base.txt -r requirements/dev.txt -r requirements/build.txt \
		-r requirements/dist.txt
	@if $(PY) -c "import horovod, horovod.tensorflow.keras; assert horovod.__version__ == '$(HOROVOD_VERSION)'" 2>/dev/null; then \
		echo "horovod $(HOROVOD_VERSION) already built"; \
	else \
		$(MAKE) --no-print-directory $(HOROVOD_WHEEL) && \
		$(PY) -m pip install -q --no-deps $(WHEELHOUSE)/horovod-$(HOROVOD_VERSION)-*.whl || exit 1; \
	fi
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import horovod.tensorflow.keras as h; assert h.gloo_built(), 'horovod built without Gloo'"
	@touch $(STAMP)

$(HOROVOD_WHEEL):
	@echo "building horovod $(HOROVOD_VERSION) with Gloo (about 5 minutes)"
	@mkdir -p $(WHEELHOUSE)
	PATH=$(abspath $(VENV))/bin:$$PATH HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 \
	HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j2 \
	$(PY) -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w $(WHEELHOUSE) \
		horovod==$(HOROVOD_VERSION)
	@touch $@

# GPU nodes (README "GPU cluster"), instead of `make setup`: the same venv and pins with the
# CUDA build of TensorFlow (requirements/gpu.txt replaces base.txt's tensorflow-cpu: both ship
# the same files) and horovod built with NCCL for GPU allreduce, Gloo to start the workers.
# Needs the NVIDIA driver, the CUDA 12.2 toolkit (nvcc) in CUDA_HOME and NCCL's headers and
# library (NCCL_HOME, or where CUDA_HOME has them). CI never runs it; `make check-gpu-deps`
# checks on any machine that the GPU pins resolve against the others.
CUDA_HOME ?= /usr/local/cuda
NCCL_HOME ?=
GPU_STAMP := $(VENV)/.setup-gpu-stamp
GPU_BASE := $(VENV)/requirements-base-gpu.txt
GPU_WHEELHOUSE := $(VENV)/wheelhouse-gpu
GPU_REPORT := $(VENV)/gpu-deps-report.json
PIP_TOOLS := pip==24.3.1 wheel==0.45.1 setuptools==69.5.1

setup-gpu: $(GPU_STAMP)
	@$(PY) -m hierarchy.spark_cds

$(GPU_BASE): requirements/base.txt
	@test -n "$(PYTHON)" || { echo "Python 3.11 not found"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	sed '/^tensorflow-cpu==/d' requirements/base.txt > $@

$(GPU_STAMP): $(GPU_BASE) requirements/gpu.txt requirements/dev.txt requirements/build.txt \
		requirements/dist.txt pyproject.toml
	@test -x $(CUDA_HOME)/bin/nvcc || { echo "setup-gpu: no $(CUDA_HOME)/bin/nvcc: install the" \
		"CUDA 12.2 toolkit (horovod compiles its GPU ops with it) or set CUDA_HOME=..."; exit 1; }
	$(PY) -m pip install -q --upgrade $(PIP_TOOLS)
	$(PY) -m pip uninstall -q -y tensorflow-cpu
	$(PY) -m pip install -q -r $(GPU_BASE) -r requirements/gpu.txt -r requirements/dev.txt \
		-r requirements/build.txt -r requirements/dist.txt
	@echo "building horovod $(HOROVOD_VERSION) with NCCL and Gloo (5-15 minutes)"
	@rm -rf $(GPU_WHEELHOUSE) && mkdir -p $(GPU_WHEELHOUSE)
	PATH=$(abspath $(VENV))/bin:$(CUDA_HOME)/bin:$$PATH HOROVOD_CUDA_HOME=$(CUDA_HOME) \
	$(if $(NCCL_HOME),HOROVOD_NCCL_HOME=$(NCCL_HOME)) HOROVOD_GPU_OPERATIONS=NCCL \
	HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
	HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 MAKEFLAGS=-j$$(nproc) \
	$(PY) -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir -w $(GPU_WHEELHOUSE) \
		horovod==$(HOROVOD_VERSION)
	$(PY) -m pip install -q --no-deps --force-reinstall $(GPU_WHEELHOUSE)/horovod-$(HOROVOD_VERSION)-*.whl
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import tensorflow as tf, horovod.tensorflow.keras as h; \
		assert tf.test.is_built_with_cuda(), 'TensorFlow without CUDA'; \
		assert h.nccl_built() and h.gloo_built(), 'horovod without NCCL or Gloo'; \
		gpus = tf.config.list_physical_devices('GPU'); \
		print('GPUs:', len(gpus), gpus or '(none visible: check nvidia-smi, driver >= 525)')"
	@touch $@ $(STAMP)

# No GPU and nothing installed: pip resolves the GPU stack (PyPI serves the metadata) and the
# report must keep every other package at the version this venv has.
check-gpu-deps: $(GPU_BASE)
	$(PY) -m pip install -q --dry-run --ignore-installed --report $(GPU_REPORT) \
		-r $(GPU_BASE) -r requirements/gpu.txt -r requirements/dev.txt -r requirements/build.txt \
		-r requirements/dist.txt $(PIP_TOOLS)
	$(PY) ops/gpu_deps.py $(GPU_REPORT)

# What a cluster runs (README "Run on a cluster"): the package as a wheel, a --py-files zip of
# it for nodes that already have the stack, and a packed virtualenv (a non-editable install of
# the wheel, the pinned stack and horovod) for `spark-submit --archives ...#environment`.
dist: $(WHEEL) dist/hierarchy-pyfiles.zip dist/hierarchy-env.tar.gz dist/jobs

dist/jobs: $(wildcard jobs/*.py)
	@mkdir -p $@ && cp jobs/*.py $@/ && touch $@

PACKAGE_FILES := $(shell find hierarchy -name '*.py' -o -name '*.yaml' -o -name '*.html')
$(WHEEL): $(STAMP) $(PACKAGE_FILES) pyproject.toml
	@mkdir -p dist && rm -f dist/hierarchy-*.whl
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .
	@rm -rf build/lib build/bdist.*

# a wheel is a zip with the package at its root: zipimport reads it as it is
dist/hierarchy-pyfiles.zip: $(WHEEL)
	cp $(WHEEL) $@

# the stack is installed once per change of the pins; a code change only reinstalls the wheel
$(DIST_ENV)/.stamp: $(HOROVOD_WHEEL) requirements/base.txt requirements/dist.txt
	rm -rf $(DIST_ENV) && $(PYTHON) -m venv $(DIST_ENV)
	$(DIST_ENV)/bin/python -m pip install -q --upgrade pip==24.3.1
	$(DIST_ENV)/bin/python -m pip install -q -r requirements/base.txt
	$(DIST_ENV)/bin/python -m pip install -q --no-deps $(WHEELHOUSE)/horovod-$(HOROVOD_VERSION)-*.whl
	@touch $@

dist/hierarchy-env.tar.gz: $(DIST_ENV)/.stamp $(WHEEL)
	$(DIST_ENV)/bin/python -m pip install -q --no-deps --force-reinstall $(WHEEL)
	cd /tmp && $(abspath $(DIST_ENV))/bin/python -c "import hierarchy.contracts.config as c, horovod.tensorflow.keras as h; \
		assert h.gloo_built() and 'site-packages' in c.__file__, c.__file__"
	$(VENV)/bin/venv-pack -q -p $(DIST_ENV) -o dist/.partial-env.tar.gz --force && mv dist/.partial-env.tar.gz $@ && chmod 644 $@
	@ls -lh dist/

demo: setup
	$(VENV)/bin/hierarchy synth --output $(DEMO)/synth
	$(VENV)/bin/hierarchy ingest --input $(DEMO)/synth/train.bson \
		--categories $(DEMO)/synth/category_names.csv --output $(DEMO)/dataset ingest.split_mb=1 \
		ingest.val_fraction=0.3 $(DEMO_CONF)
	$(VENV)/bin/hierarchy ingest --input $(DEMO)/synth/test.bson --kind test \
		--categories $(DEMO)/synth/category_names.csv --output $(DEMO)/dataset ingest.split_mb=1 $(DEMO_CONF)
	@echo "manifest: $(DEMO)/dataset/manifest.json"
	$(VENV)/bin/hierarchy train --data $(DEMO)/dataset --models $(DEMO)/models --run-id demo \
		--level 1 $(DEMO_CONF)
	$(foreach mode,$(DEMO_MODES),$(VENV)/bin/hierarchy train --data $(DEMO)/dataset \
		--models $(DEMO)/models --run-id demo --level 3 --mode $(mode) \
		$(if $(filter fusion,$(mode)),tune.trials=2) $(DEMO_CONF) && ) true
	$(VENV)/bin/hierarchy evaluate --data $(DEMO)/dataset --models $(DEMO)/models --run-id demo \
		--output $(DEMO)/output $(DEMO_CONF)
	$(VENV)/bin/hierarchy predict --data $(DEMO)/dataset --models $(DEMO)/models --run-id demo \
		--split test --output $(DEMO)/output $(DEMO_CONF)
	$(VENV)/bin/hierarchy curate --data $(DEMO)/dataset $(DEMO_CONF)
	@echo
	@echo "demo done:"
	@echo "  submission   $(DEMO)/output/submission.csv"
	@echo "  table        predictions (Parquet in $(DEMO)/warehouse/predictions; metastore $(DEMO)/warehouse)"
	@echo "  runs         $(VENV)/bin/hierarchy runs list $(DEMO_CONF)"
	@echo "  report       $(DEMO)/output/evaluation/demo/report.md"
	@echo "  notebook     notebooks/analyst.ipynb (overrides: $(DEMO_CONF))"
	@echo "  serve        $(VENV)/bin/hierarchy serve --models $(DEMO)/models --run-id demo  (then http://127.0.0.1:8000/)"
	@echo "  curation     $(DEMO)/dataset/curation_report/report.md; review page: $(VENV)/bin/hierarchy review --data $(DEMO)/dataset"

# Debian packages the tests start for real: chromium (the page of `hierarchy serve`, driven by
# the playwright package pinned in requirements/dev.txt with executable_path: no browser
# download), postgresql and libpostgresql-jdbc-java (the shared Hive metastore).
OS_PACKAGES := chromium postgresql libpostgresql-jdbc-java
os-packages:
	@missing=""; for p in $(OS_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "missing Debian packages:$$missing (not root: apt-get install them)"; fi

# A shared metastore for local use (README "Query the predictions"): PostgreSQL on
# METASTORE_PORT with Hive's tables created once, then Spark's Thrift server on THRIFT_PORT.
# Jobs use it with `catalog.metastore=jdbc:postgresql://127.0.0.1:$(METASTORE_PORT)/metastore`.
METASTORE_DIR ?= data/metastore
METASTORE_PORT ?= 55432
THRIFT_PORT ?= 10000
METASTORE_CONF = catalog.metastore=jdbc:postgresql://127.0.0.1:$(METASTORE_PORT)/metastore
export HIERARCHY_METASTORE_PASSWORD ?= hive
metastore: setup os-packages
	ops/postgres.sh start $(METASTORE_DIR) $(METASTORE_PORT)
	$(VENV)/bin/hierarchy metastore init -q $(METASTORE_CONF)
	@if [ -s $(METASTORE_DIR)/thriftserver.pid ] && kill -0 $$(cat $(METASTORE_DIR)/thriftserver.pid) 2>/dev/null; then \
		echo "thrift server already running (pid $$(cat $(METASTORE_DIR)/thriftserver.pid))"; \
	else \
		nohup $(VENV)/bin/hierarchy thriftserver --port $(THRIFT_PORT) $(METASTORE_CONF) \
			> $(METASTORE_DIR)/thriftserver.log 2>&1 & echo $$! > $(METASTORE_DIR)/thriftserver.pid; \
		for i in $$(seq 120); do (echo > /dev/tcp/127.0.0.1/$(THRIFT_PORT)) 2>/dev/null && break; sleep 1; done; \
	fi
	@echo "metastore  $(METASTORE_CONF)"
	@echo "sql        $(VENV)/lib/python3.11/site-packages/pyspark/bin/beeline -u 'jdbc:hive2://127.0.0.1:$(THRIFT_PORT)/default;auth=noSasl' -n $$USER"

metastore-stop:
	-@[ -s $(METASTORE_DIR)/thriftserver.pid ] && kill $$(cat $(METASTORE_DIR)/thriftserver.pid) 2>/dev/null; rm -f $(METASTORE_DIR)/thriftserver.pid
	ops/postgres.sh stop $(METASTORE_DIR)

# pytest exits 5 when it collects nothing (e.g. a -k that matches no test): not a failure.
test: setup os-packages dist
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

lint: setup audit
	$(VENV)/bin/ruff check hierarchy jobs tests bench tools
	$(VENV)/bin/lint-imports --no-cache

# The installed stack against the local copy of advisories (requirements/advisories.json;
# pip-audit's services are not reachable from these machines: see tools/audit.py)
audit: setup
	$(PY) tools/audit.py

bench: setup
	$(PY) bench/ingest_throughput.py
	$(PY) bench/input_pipeline.py
	$(PY) bench/train_throughput.py
	$(PY) bench/gpu_train.py
	$(PY) bench/predict_throughput.py
	$(PY) bench/shared_trunk.py
	$(PY) bench/evaluate_cost.py
	$(PY) bench/curate_cost.py
	$(PY) bench/taxonomy_scale.py
	$(PY) bench/summary.py

# every strategy trained at the same image-epochs on the hard preset, scored on its test dump
bench-quality: setup
	$(PY) bench/quality.py

bench-taxonomy: setup
	$(PY) bench/taxonomy_versions.py

clean:
	rm -rf data/demo .pytest_cache bench/results dist $(DIST_ENV)
