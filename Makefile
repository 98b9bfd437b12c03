# The two commands of the README: `make run` (the main job) and `make test`.
# Both create .venv on first use; torch is pinned so that a CPU machine takes the local
# CPU wheel instead of a multi-GB CUDA build.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: setup run test test-full test-recbole lint offline-compile gpu-check bench clean

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# make run [DATA=path/to/interactions] [RUN=name] [ARGS="--loss full_softmax ..."]
run: setup
	$(PY) -m seqrec_kernels train $(if $(DATA),--data $(DATA)) --out runs/$(or $(RUN),default) $(ARGS)

# make test: the main tier (every test not marked `full`: tests/tiers.py), then the RecBole tests
# and the linters; make test-full: the fuller tier (the slowest offline-compile and fuzz grids).
# CI (.ci/run) runs both. Tests run in parallel, one process per core (pytest-xdist; TEST_WORKERS=0
# runs them in this process), each file on one worker so that its module fixtures are built once.
# The extension is part of the build: its tests must run, not skip.
TEST_WORKERS ?= auto
PYTEST = SEQREC_REQUIRE_EXTENSION=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
test: setup
	$(PYTEST) -m "not full"
	$(MAKE) --no-print-directory test-recbole
	$(MAKE) --no-print-directory lint
test-full: setup
	$(PYTEST) -m full

# The RecBole integration against RecBole itself, in its own venv: RecBole 1.2.1 needs numpy < 2
# and setuptools < 81, which the main environment does not pin. It reuses the extension that
# `make setup` built in the tree (SEQREC_SKIP_EXTENSION: no second build).
RECBOLE_VENV = .venv-recbole
$(RECBOLE_VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(RECBOLE_VENV)
	$(RECBOLE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(RECBOLE_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	SEQREC_SKIP_EXTENSION=1 $(RECBOLE_VENV)/bin/python -m pip install --quiet -e ".[dev,recbole]"
	touch $@
test-recbole: setup $(RECBOLE_VENV)/.installed
	SEQREC_REQUIRE_EXTENSION=1 SEQREC_REQUIRE_RECBOLE=1 $(RECBOLE_VENV)/bin/python -m pytest -q tests/test_nn_recbole.py

# make offline-compile [TRITON=3.6.0] [GRID=ci]: compile every Triton kernel the public API
# launches for sm_80 and sm_90 without a GPU, check it (tests/offline_compile.py) and write the
# resource table to benchmarks/results/offline-compile[-triton-<version>][-ci].md. TRITON=<version>
# runs the same check under that Triton release in its own venv (3.6.0 is the GPU machine's);
# GRID=ci compiles the grid `make test-full` compiles instead of the full product (~9 minutes on 2 cores).
TRITON ?=
GRID ?= full
COMPILE_VENV = $(if $(TRITON),.venv-triton-$(TRITON),$(VENV))
$(COMPILE_VENV)/.installed-triton:
	$(PYTHON) -m venv $(COMPILE_VENV)
	$(COMPILE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPILE_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION) triton==$(TRITON) numpy tqdm
	touch $@
offline-compile: setup $(if $(TRITON),$(COMPILE_VENV)/.installed-triton)
	PYTHONPATH=$(CURDIR) $(COMPILE_VENV)/bin/python tests/offline_compile.py --grid $(GRID) \
		--markdown benchmarks/results/offline-compile$(if $(TRITON),-triton-$(TRITON))$(if $(filter-out full,$(GRID)),-$(GRID)).md

# ruff over the Python, clang-format (.clang-format; the dev extra pins its version) over the
# C++/CUDA sources and the host test programs.
PY_SOURCES = seqrec_kernels tests benchmarks csrc/nvcc_check.py
CLANG_FORMAT_FILES = $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h tests/cuda_host/*.cpp tests/cuda_host/*.h)
lint: setup
	$(PY) -m ruff check $(PY_SOURCES)
	$(PY) -m ruff format --check $(PY_SOURCES)
	$(VENV)/bin/clang-format --dry-run --Werror $(CLANG_FORMAT_FILES)

# make gpu-check [PYTHON=python3] [GPU_RESULTS=dir] [BUDGET=530] [DRY=1]: the whole GPU lease as one
# prioritized script (benchmarks/gpu_check.py; docs/gpu-check.md): build for this GPU, the
# correctness sweep, compute-sanitizer, the tuning sweep (-> seqrec_kernels/tuning/<gpu>.json),
# the key benchmarks, a profile, then the `gpu` tests with what time is left; at most 8 result
# files in GPU_RESULTS (default benchmarks/results/). On a GPU machine run it with that machine's
# own python3 (torch + triton preinstalled, no network). DRY=1 runs every phase on the CPU on
# tiny shapes (part of `make test`, through tests/test_gpu_check.py).
GPU_RESULTS ?= benchmarks/results
BUDGET ?= 530
gpu-check: $(if $(DRY),setup)
	$(if $(DRY),$(PY),$(PYTHON)) -m benchmarks.gpu_check --results $(GPU_RESULTS) --budget $(BUDGET) $(if $(DRY),--dry-run)

# make bench [BENCH=attention|softmax_loss|sasrec|retrieval|all|plot] [ARGS="--quick"]: the benchmarks (README,
# "Benchmarks"; e.g. BENCH=attention ARGS="--shapes SASRec"), run by .venv's python when `make setup`
# made one, else by $(PYTHON) (a GPU machine's own); rows go to benchmarks/results/results.csv.
BENCH_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
bench:
	PYTHONPATH=$(CURDIR) $(BENCH_PY) -m benchmarks $(or $(BENCH),all) $(ARGS)

clean:
	rm -rf $(VENV) .venv-triton-* build *.egg-info .hypothesis .pytest_cache
