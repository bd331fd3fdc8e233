# Two entry points for a fresh machine: `make demo` and `make test` (both set up .venv first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

# torch first, pinned: an unpinned torch (asked for by mergekit) would pull a multi-GB CUDA
# build; 2.13.0 installs a local CPU build here.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fapm-merge demo out/demo

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
