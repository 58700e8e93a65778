# Two commands for a newcomer: `make book` and `make test`. Everything else here serves them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

# Kernels started from notebooks/ must import the package from this checkout.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH),)
# The MovieLens archives shipped beside the repository (tests and CI); readers download from GroupLens.
ifneq ($(wildcard ../shared/data/ml-100k.zip),)
export MFUTILS_DATA_MIRROR ?= $(abspath ../shared/data)
endif
# Stored notebook outputs are bit-reproducible at a fixed thread count: one per process, everywhere
# outputs are produced or checked (the test run uses two processes on two cores).
REPRO_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TQDM_DISABLE=1 PYDEVD_DISABLE_FILE_VALIDATION=1


.PHONY: help setup book test execute bench bench-devices bench-phases bench-spark clean

help:
	@echo "make book     set up .venv and build the HTML book into _build/html (offline, seconds after setup)"
	@echo "make test     set up .venv and run every test: mfutils, nbval over all notebooks, the book in a browser"
	@echo "make execute  (authors) re-execute every notebook [NB=...], rewrite its outputs, record its run time"
	@echo "make bench    (on demand) benchmark the CLI default against Surprise, LensKit and the article on the ml-100k folds"
	@echo "make bench-devices [DEVICE=cuda]  (on demand) time an epoch per method, size and rank on one device"
	@echo "make bench-phases  (on demand) where an ML-20M fused SGD epoch and ALS sweep spend their time, CPU"
	@echo "make bench-spark  (on demand; needs Java 17) Spark MLlib's ALS beside mfutils's on the same data"
	@echo "make clean    remove _build"

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# PyPI's Linux torch is a multi-GB CUDA build; without an NVIDIA GPU, PyTorch's CPU index has the same
	@# version (2.13.0+cpu, which pip prefers and which satisfies torch==2.13.0) at a fraction of the size.
	if [ "$$(uname -s)" = Linux ] && ! command -v nvidia-smi >/dev/null; then \
	  $(BIN)/python -m pip install --quiet --retries 1 --extra-index-url $(TORCH_CPU_INDEX) \
	    "$$(grep -E '^torch==' requirements.txt)"; fi
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt -e .
	$(BIN)/python -c 'import shutil, sys, torch; sys.exit(0 if torch.version.cuda is None or shutil.which("nvidia-smi") else "a CUDA build of torch was installed on a machine without an NVIDIA GPU: remove .venv and run make again, which installs the CPU wheel from $(TORCH_CPU_INDEX)")'
	touch $@

book: $(STAMP)
	$(BIN)/jupyter-book build . --builder html -W -n --keep-going
	@echo "Open _build/html/index.html in a browser."

NBVAL := --nbval --nbval-current-env --nbval-cell-timeout=300 --nbval-sanitize-with tests/nbval_sanitize.cfg

test: $(STAMP)
	$(REPRO_ENV) $(BIN)/python -m pytest notebooks tests -n 2 --dist loadfile $(NBVAL) -p no:cacheprovider -ra \
	  $(PYTEST_ARGS)
	@# Readers' processors round float32 differently from this one (other vector units, other BLAS kernels),
	@# so stored outputs show only digits that survive that. On x86-64 the notebooks are checked again with
	@# PyTorch and MKL held to AVX2 (as on many laptops) and to scalar code (as a stand-in for other processors),
	@# skipping the one this machine runs natively.
	native=$$($(BIN)/python -c 'import torch; print(torch.backends.cpu.get_cpu_capability())'); \
	if [ "$$(uname -m)" != x86_64 ]; then echo "not x86-64: notebooks checked with this processor's code only"; \
	else for caps in "avx2 AVX2" "default SSE4_2"; do set -- $$caps; \
	  if [ "$$native" = "$$(echo $$1 | tr a-z A-Z)" ]; then continue; fi; \
	  echo "nbval again with PyTorch held to $$1 and MKL to $$2"; \
	  ATEN_CPU_CAPABILITY=$$1 MKL_ENABLE_INSTRUCTIONS=$$2 $(REPRO_ENV) $(BIN)/python -m pytest notebooks \
	    -n 2 --dist loadfile $(NBVAL) -p no:cacheprovider -q || exit 1; \
	done; fi

# Writes each notebook's wall time to book/results/execution.json (see book/_ext/execute_notebooks.py).
execute: $(STAMP)
	$(REPRO_ENV) $(BIN)/python book/_ext/execute_notebooks.py $(NB)

# LensKit needs pandas 2 while requirements.txt pins pandas 3, so it gets its own environment under .venv;
# if it cannot be installed, the benchmark still runs and its JSON says why LensKit is missing.
PEER_VENV := $(VENV)/peers/lenskit

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -r requirements-bench.txt
	test -x $(PEER_VENV)/bin/python || $(BIN)/python -m venv $(PEER_VENV)
	-PYTHONPATH= $(PEER_VENV)/bin/python -m pip install --quiet -r requirements-bench-lenskit.txt
	-$(PEER_VENV)/bin/python -c 'import torch; print("LensKit environment: torch", torch.__version__, "CUDA", torch.version.cuda)'
	$(BIN)/python -m mfutils.bench folds --out book/results/folds.json --lenskit-python $(PEER_VENV)/bin/python

# The device sweep of chapter 6: writes book/results/devices_$(DEVICE).json, which the chapter plots.
DEVICE ?= cpu

bench-devices: $(STAMP)
	$(BIN)/python -m mfutils.bench devices --device $(DEVICE) --out book/results/devices_$(DEVICE).json

# Where chapter 6's ML-20M epochs spend their time on the CPU: writes book/results/phases_cpu.json.
bench-phases: $(STAMP)
	$(BIN)/python -m mfutils.bench phases --out book/results/phases_cpu.json

# The chapter beyond one machine: Spark MLlib's ALS in local mode, fit_als and mfutils.distributed on the same
# synthetic ML-1M-size ratings; writes book/results/spark_als.json. pyspark is installed here only (not by setup).
bench-spark: $(STAMP)
	$(BIN)/python -m pip install --quiet -r requirements-bench-spark.txt
	$(BIN)/python -m mfutils.bench spark --out book/results/spark_als.json

clean:
	rm -rf _build
