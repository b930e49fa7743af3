# One entry point for people and CI. `make install train` on a fresh machine, `make test` after.
#
# `make install` builds a virtualenv (.venv) from the lock file, so every run of the tests sees
# exactly the versions CI saw, and nothing installed by hand elsewhere on the machine can hide a
# missing dependency. Every target below runs inside that virtualenv.

# The interpreter that creates the virtualenv (the lock is for CPython 3.11 on x86_64 Linux).
PYTHON ?= python3
VENV ?= .venv
# The interpreter the targets run; `make test PY=python` uses an environment you built yourself.
PY ?= $(VENV)/bin/python
# Every dependency, direct and transitive, at one exact version (CPU build of torch included).
LOCK ?= requirements/lock-cpu.txt
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" on a
# machine whose pip cannot otherwise find torch's +cpu wheels.
PIP_ARGS ?=
# `make install-gpu`: the torch you bring (a CUDA build); everything else comes from the lock.
TORCH ?= torch==2.13.0
# `make lock` resolves with this uv release (a maintainer tool, in its own throwaway venv).
UV_VERSION ?= 0.13.9
LOCK_VENV ?= .venv-lock
# `make test-latest`: the newest release of every dependency, in a throwaway virtualenv.
LATEST_VENV ?= .venv-latest
TORCH_LATEST ?= torch
ARGS ?=

.PHONY: install install-gpu lock test-latest train test lint bench bench-overhead \
	bench-convergence clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# --no-deps: install exactly the lock, nothing resolved afresh; `pip check` then proves the locked
# set is complete and consistent. --no-build-isolation builds our package with the locked
# setuptools instead of whatever setuptools is newest today.
install: $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet --no-deps $(PIP_ARGS) -r $(LOCK)
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(VENV)/bin/python -m pip check

# A GPU machine: every locked package except torch, then the CUDA torch you name (with its own
# CUDA libraries), e.g. `make install-gpu TORCH=torch==2.13.0`.
install-gpu: $(VENV)/bin/python
	grep -v '^torch==' $(LOCK) > $(VENV)/lock-without-torch.txt
	$(VENV)/bin/python -m pip install --quiet --no-deps $(PIP_ARGS) -r $(VENV)/lock-without-torch.txt
	$(VENV)/bin/python -m pip install --quiet $(PIP_ARGS) "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(VENV)/bin/python -m pip check

# Re-resolve the lock from pyproject.toml's ranges (newest versions that satisfy them). Run
# `make test-latest` first; commit the new lock only with a green `make install test`.
# torch is held at its CPU build (requirements/torch-cpu.txt): uv finds it in pip's find-links
# directory when the machine has one, else on PyTorch's CPU wheel index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
LOCK_TORCH_SOURCE ?= $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url $(TORCH_CPU_INDEX) --index-strategy unsafe-best-match)
# LOCK_UPGRADE= (empty) keeps every pin that still satisfies pyproject.toml and resolves only what
# changed (a new dependency); the default moves everything to its newest release.
LOCK_UPGRADE ?= --upgrade
lock:
	test -x $(LOCK_VENV)/bin/uv || ($(PYTHON) -m venv $(LOCK_VENV) && \
		$(LOCK_VENV)/bin/python -m pip install --quiet uv==$(UV_VERSION))
	$(LOCK_VENV)/bin/uv pip compile pyproject.toml --extra dev --extra eval \
		--constraint requirements/torch-cpu.txt $(LOCK_TORCH_SOURCE) \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make lock" $(LOCK_UPGRADE) --output-file $(LOCK)

# The suite against the newest releases of everything (not the lock): what a `make lock` would
# bring. For maintainers before they refresh the lock; not part of CI.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade $(PIP_ARGS) "$(TORCH_LATEST)" -e ".[dev,eval]"
	$(LATEST_VENV)/bin/python -m pip list --format=freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider

# A small Llama on the embedded corpus (the Python standard library), SNOO around AdamW, on CPU.
train:
	$(PY) -m snoo_train.train $(ARGS)

# Two workers (pytest-xdist): most tests keep one core busy (a one-process run, an entry point's
# start-up), so two at a time fill the two cores CI has. loadscope keeps a module's tests on one
# worker, so a module's shared runs (module fixtures) are made once. TEST_WORKERS=0: no workers.
TEST_WORKERS ?= 2
test:
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope)

lint:
	$(PY) -m ruff check snoo_train tests bench

# Figures for the README (each prints a table and writes JSON to bench/results/).
bench:
	$(PY) bench/throughput.py

bench-overhead:
	$(PY) bench/overhead.py

bench-convergence:
	$(PY) bench/convergence.py

clean:
	rm -rf runs outputs multirun .pytest_cache
