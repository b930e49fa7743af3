# One entry point for people and CI. `make install train` on a fresh machine, `make test` after.
PYTHON ?= python3
# The CPU build of torch lies on disk here and installs in seconds; on a GPU machine use
# `make install TORCH=torch` (or your CUDA wheel) instead.
TORCH ?= torch==2.13.0
ARGS ?=

.PHONY: install train test lint bench bench-overhead bench-convergence clean

install:
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[dev]"

# A small Llama on the embedded corpus (the Python standard library), SNOO around AdamW, on CPU.
train:
	$(PYTHON) -m snoo_train.train $(ARGS)

test:
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check snoo_train tests bench

# Figures for the README (each prints a table and writes JSON to bench/results/).
bench:
	$(PYTHON) bench/throughput.py

bench-overhead:
	$(PYTHON) bench/overhead.py

bench-convergence:
	$(PYTHON) bench/convergence.py

clean:
	rm -rf runs outputs multirun .pytest_cache
