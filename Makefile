# Quick start: `make demo` (install + DOT-MoE vs random split on the bundled model), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: install demo test bench clean

$(BIN)/dotmoe: pyproject.toml devtools/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	# the package with its test extra, and the repository's development tooling (devtools/: not in the wheel)
	$(BIN)/python -m pip install --quiet -e ".[test]" -e ./devtools
	touch $@

install: $(BIN)/dotmoe

demo: install
	$(BIN)/dotmoe demo --overwrite  # a rerun replaces the earlier demo results (only those)

test: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/bench_assignment.py --threads 1

clean:
	rm -rf $(VENV) out
