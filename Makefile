# Everything runs in ./.venv, created on first use. `make help` lists the targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Lint rules change between ruff releases: pinned, so a push fails only for its own code.
TOOL_PINS := ruff==0.17.6 mypy==2.4.1 build
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu)

.PHONY: help install test lint typecheck sdist-check compare regimes bench gpu-data gpu-check gpu-profile gpu-compare clean

help:
	@echo "make compare      CE / CS-KD / IPS / CutMix on Fashion-MNIST (CPU budget, ~12 min), table + runs/fashion-mnist-compare/"
	@echo "make test         build the extension and run the test suite"
	@echo "make lint         ruff check"
	@echo "make typecheck    mypy over the library (the reference loop excluded), against the installed torch"
	@echo "make sdist-check  sdist -> wheel (CPU kernel) -> fresh venv outside the checkout -> kernel swap (~2-5 min)"
	@echo "make regimes      the regime study: 50 / 100 / 500 images per class, 10 methods, 3 seeds (resumable)"
	@echo "make bench        CPU benchmarks: kernel vs fallback vs timm / torchvision / kornia"
	@echo "make gpu-data     copy Fashion-MNIST into .data/ (git-ignored) for a GPU machine without network"
	@echo "make gpu-check    on a GPU machine: build, CUDA tests, compute-sanitizer, CUDA benchmarks (< 6 min)"
	@echo "make gpu-profile  on a GPU machine, after gpu-check: Nsight Compute over the swap's kernels (runs/gpu-profile/)"
	@echo "make gpu-compare  on a GPU machine: full Fashion-MNIST, ResNet-18, CE / CS-KD / IPS (~7 min on an H200); python3, no venv;"
	@echo "                  PART=2: CutMix, IPS with alpha 0.5, one epoch under torchrun (~5.5 min, estimated)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS) setuptools wheel ninja numpy tqdm matplotlib pytest pytest-benchmark hypothesis
	touch $@

# Editable, so that `python -m ipsd_cuda...` from this folder and the installed
# package are the same files, compiled extension included.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Remade when the Makefile (and so TOOL_PINS) changes.
$(VENV)/.tools: Makefile | $(BIN)/python
	$(BIN)/pip install -q $(TOOL_PINS)
	touch $@

install: $(VENV)/.built

test: install
	$(BIN)/python -c "import ipsd_cuda; print('ipsd_cuda kernels built:', ipsd_cuda.backends())"
	$(BIN)/python -m pytest

lint: $(VENV)/.tools
	$(BIN)/ruff check .

# The package ships py.typed, so its annotations are part of its API.
typecheck: $(VENV)/.deps $(VENV)/.tools
	$(BIN)/mypy

# How an index or a cluster installs the package: see scripts/check_sdist.sh.
sdist-check: $(VENV)/.deps $(VENV)/.tools
	PYTHON=$(BIN)/python bash scripts/check_sdist.sh

$(FASHION_MNIST):
	@command -v apt-get >/dev/null || { echo "Fashion-MNIST is missing: put its four idx .gz files in $@"; exit 1; }
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y dataset-fashion-mnist

# The CPU budget of the README table, with one seed; add seeds with
# COMPARE_ARGS="--seeds 0 1 2" (three times as long).
COMPARE_ARGS ?= --seeds 0
compare: install $(FASHION_MNIST)
	$(BIN)/python -m ipsd_cuda.reference.train --data fashion-mnist --method compare --train-size 10000 --epochs 15 --eval-every 5 --out runs/fashion-mnist-compare $(COMPARE_ARGS)

# Resumable: a finished run is saved under runs/regimes/runs/ and not redone.
# REGIMES_ARGS="--report" summarises what has finished so far.
regimes: install $(FASHION_MNIST)
	$(BIN)/python -m ipsd_cuda.reference.regimes --out runs/regimes $(REGIMES_ARGS)

# A few minutes; on a machine shared with other jobs add BENCH_ARGS="--bench-threads 1".
bench: install
	$(BIN)/pip install -q timm kornia $(TORCH_PINS)
	$(BIN)/python -m pytest bench -m cpu --benchmark-max-time=0.5 --benchmark-min-rounds=5 --benchmark-json=runs/bench-cpu.json $(BENCH_ARGS)
	$(BIN)/python bench/report.py runs/bench-cpu.json --png runs/bench-cpu.png

gpu-check:
	bash scripts/gpu_check.sh

gpu-profile:
	bash scripts/gpu_profile.sh

# The GPU machine has no network: the data travels with the checkout, in a
# git-ignored folder. Copies where the system package is installed, and
# does nothing elsewhere (on the GPU machine itself).
GPU_DATA := .data/fashion-mnist
gpu-data:
	@if [ -d $(FASHION_MNIST) ]; then mkdir -p $(GPU_DATA) && cp -u $(FASHION_MNIST)/*-ubyte.gz $(GPU_DATA)/; fi

# Plain python3, no venv (the GPU image's torch). EPOCHS=2 times the methods.
gpu-compare: gpu-data
	bash scripts/gpu_compare.sh

clean:
	rm -rf build $(VENV) ipsd_cuda/*.so *.egg-info
