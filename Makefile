# Two commands do all set-up on a fresh machine with only Python 3.11:
#   make demo   # create .venv, install (torch==2.13.0 CPU first), run the demo
#   make test   # same set-up, then the whole test suite (ruff + mypy included)
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast lint typecheck clean

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch (e.g. pulled in by pyro-ppl) would
# download a multi-GB CUDA build. constraints.txt keeps the pin for every later install.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tiltsample demo
	$(PY) -m tiltsample verify --profile quick

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
