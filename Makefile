# Each target is self-sufficient on a fresh machine: it creates .venv and installs from pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the stamp lives inside bin/: a venv whose programs are gone is reinstalled
STAMP := $(BIN)/.installed

.PHONY: run test bench gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/samplerbench run bench/suites/quick.toml --out results/ --report reports/quick.html

test: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

# The micro-benchmarks (JSON in results/benchmarks.json), the overhead table, and the slow tests.
bench: $(STAMP)
	mkdir -p results
	$(BIN)/pytest -q --benchmark-only --benchmark-json=results/benchmarks.json tests/benchmarks
	$(BIN)/python -m bench.overhead
	$(BIN)/pytest -q -m slow

# On a CUDA machine: the GPU tests, the overhead table with CUDA graphs, and the GPU suite.
gpu: $(STAMP)
	$(BIN)/pytest -q -m gpu tests/test_gpu.py
	$(BIN)/python -m bench.overhead --device cuda --batch 64 1024
	$(BIN)/samplerbench run bench/suites/gpu.toml --device cuda --report reports/gpu.html

clean:
	rm -rf $(VENV) build *.egg-info
