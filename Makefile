# Two commands do all set-up on a fresh machine with only Python 3.11:
#   make demo   # create .venv, install the locked set (requirements.lock), run the demo
#   make test   # same set-up, then the whole test suite (ruff + mypy included)
# make bench runs the throughput benchmark of the embedded model (not part of the tests).
# make lock refreshes requirements.lock; run make test-latest first (see README, "Dependencies").
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock

.PHONY: setup demo bench test test-fast test-latest lock lint typecheck clean docs docs-serve

setup: $(STAMP)

# Every package comes from the lock at its exact version (torch is the 2.13.0 CPU wheel: an
# unpinned torch would download a multi-GB CUDA build). The package itself goes in without
# dependencies and without build isolation (its build backend, setuptools, is locked too), so
# what CI tested is exactly what a user gets; pip check fails on a broken set.
$(STAMP): pyproject.toml $(LOCK) constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r $(LOCK)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PIP) check
	touch $(STAMP)

# Refresh the lock from pyproject.toml's ranges (+ lock-constraints.txt) with pip-tools, in a
# venv of its own. Plain pip-compile: uv would not see the local CPU torch wheel.
TOOLS := .venv-tools
lock:
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet pip-tools==7.7.0
	$(TOOLS)/bin/pip-compile --quiet --upgrade --allow-unsafe --strip-extras \
	    --extra dev --extra ray --extra arviz --extra docs \
	    -c lock-constraints.txt --no-emit-find-links --no-emit-index-url \
	    -o $(LOCK) pyproject.toml

# The whole suite against the newest release of every dependency (no lock; torch keeps its CPU
# pin). Not part of CI: an upstream release must not block a submission. Run it before make lock.
LATEST := .venv-latest
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet torch==2.13.0
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
	    -c constraints.txt -e '.[dev,ray,arviz,docs]'
	$(LATEST)/bin/python -m pip check
	$(LATEST)/bin/python -m pip freeze --exclude-editable > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider \
	    --deselect tests/project/test_lock.py::test_installed_versions_match_the_lock

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
	$(PY) -m pytest -q tests/project/test_static.py

# The documentation site (mkdocs.yml): --strict fails on a broken link or a missing API reference;
# tests/project/test_docs_site.py runs the same build in CI. docs-serve: http://127.0.0.1:8000
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	$(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) results .pytest_cache .mypy_cache .ruff_cache
