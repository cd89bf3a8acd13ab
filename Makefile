# Two commands do all set-up on a fresh machine with only Python 3.11:
#   make demo   # create .venv, install (torch==2.13.0 CPU first), run the demo (a few minutes)
#   make test   # same set-up, then the whole test suite (ruff + mypy included)
# make bench runs the throughput benchmark of the embedded model (not part of the tests).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo bench test test-fast lint typecheck clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch (e.g. pulled in by pyro-ppl) would
# download a multi-GB CUDA build. constraints.txt keeps the pin for every later install.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# 1. exact ground truth on the toy target (~20 s); 2. the samplers on the embedded reasoning
# model, small comparison (resumable: rerunning continues where it stopped); 3. bounds check.
demo: $(STAMP)
	$(PY) -m tiltsample demo
	$(PY) -m tiltsample compare --profile demo --out results/compare-demo
	$(PY) -m tiltsample verify --profile quick

# throughput of plain decoding and of every sampler on the embedded model (ratios within one run)
bench: $(STAMP)
	$(PY) benchmarks/bench_hf.py --repeats 5 --batch 64 --out results/bench

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m pytest -q tests/test_static.py

clean:
	rm -rf $(VENV) results .pytest_cache .mypy_cache .ruff_cache
