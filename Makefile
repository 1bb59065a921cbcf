# Each target is self-sufficient on a fresh machine: it creates .venv and installs from pyproject.toml.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/samplerbench run bench/suites/quick.toml --out results/ --report reports/quick.html

test: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/pytest -q -m "slow or not slow" --benchmark-only --benchmark-json=results/benchmarks.json tests/benchmarks
	$(BIN)/pytest -q -m slow

clean:
	rm -rf $(VENV) build *.egg-info
