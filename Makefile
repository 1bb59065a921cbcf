# Each target is self-sufficient on a fresh machine: it creates .venv and installs exactly requirements.lock
# (every package pinned, with hashes), then samplerbench itself without resolving anything.
PYTHON ?= python3
# pipefail: a figure script that fails fails its target, even when its output goes through tee
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV := .venv
BIN := $(VENV)/bin
# the stamp lives inside bin/: a venv whose programs are gone is reinstalled
STAMP := $(BIN)/.installed
LOCK := requirements.lock
PEERS := requirements-peers.txt
# the peers the parity tests read as source (requirements-peers.txt is made from this by `make lock`)
PEER_PINS := k-diffusion==0.1.1.post1
PIP_VERSION := 26.3
PIP_TOOLS_VERSION := 7.6.2

.PHONY: run test bench gpu lock clean

$(STAMP): $(LOCK) $(PEERS) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==$(PIP_VERSION)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	# metadata an older setuptools left in the source tree would shadow the installed entry points for anything
	# run from here (pytest puts the root on sys.path): plugins added since would go missing
	rm -rf samplerbench.egg-info
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	$(BIN)/pip download --quiet --require-hashes --no-deps -r $(PEERS) -d $(VENV)/peers
	touch $(STAMP)

# Refresh the lock on purpose: resolve pyproject.toml's ranges (with the test extra) under constraints.txt, pin
# every package with its hashes, keeping the existing pins (UPGRADE=1: the newest releases the ranges allow).
# pip-tools runs in its own venv so that it never changes the project's.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet pip==$(PIP_VERSION) pip-tools==$(PIP_TOOLS_VERSION)
	.venv-lock/bin/pip-compile --quiet --extra test --generate-hashes --strip-extras --allow-unsafe \
	    --no-emit-index-url --no-emit-find-links --constraint constraints.txt $(if $(UPGRADE),--upgrade) \
	    --output-file $(LOCK) pyproject.toml
	rm -rf .venv-lock/peers
	.venv-lock/bin/pip download --quiet --no-deps --only-binary=:all: -d .venv-lock/peers $(PEER_PINS)
	{ sed -n '/^#/p' $(PEERS); for pin in $(PEER_PINS); do \
	    wheel=$$(ls .venv-lock/peers/$$(echo $${pin%%==*} | tr - _)-*.whl); \
	    printf '%s \\\n    --hash=sha256:%s\n' "$$pin" "$$(sha256sum $$wheel | cut -d' ' -f1)"; done; } > $(PEERS).new
	mv $(PEERS).new $(PEERS)

run: $(STAMP)
	$(BIN)/samplerbench run bench/suites/quick.toml --out results/ --report reports/quick.html

test: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

# On any machine: the micro-benchmarks (results/benchmarks.json), the figures of bench/tools/overhead.py,
# bench/tools/efficiency.py, bench/tools/metrics_at_scale.py, bench/tools/ray_scaling.py and bench/tools/crash_trials.py
# (results/bench-figures.txt), the slow tests.
bench: $(STAMP)
	mkdir -p results
	$(BIN)/pytest -q --benchmark-only --benchmark-json=results/benchmarks.json tests/benchmarks
	( $(BIN)/python -m bench.tools.overhead --device cpu && \
	  $(BIN)/python -m bench.tools.efficiency --device cpu && \
	  $(BIN)/python -m bench.tools.metrics_at_scale --device cpu --n 10000 && \
	  $(BIN)/python -m bench.tools.ray_scaling && \
	  $(BIN)/python -m bench.tools.crash_trials --trials 20 ) 2>&1 | tee results/bench-figures.txt
	$(BIN)/pytest -q -m slow

# On a CUDA machine, one command for every GPU figure (results/gpu-figures.txt): the GPU tests, overhead with and
# without CUDA graphs, whole-cell efficiency in fp32 / tf32 / bf16 with a 50,000-sample cell each, precision/recall
# and FID at 50,000 next to torch-fidelity, the CUDA micro-benchmarks, then the GPU suite and its report.
gpu: $(STAMP)
	mkdir -p results
	$(BIN)/pytest -q -m gpu tests/test_gpu.py
	( nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv && \
	  $(BIN)/python -m bench.tools.overhead --device cuda --batch 64 1024 && \
	  $(BIN)/python -m bench.tools.efficiency --device cuda --full-n 50000 && \
	  $(BIN)/python -m bench.tools.metrics_at_scale --device cuda --n 50000 ) 2>&1 | tee results/gpu-figures.txt
	$(BIN)/pytest -q --benchmark-only --benchmark-json=results/benchmarks-cuda.json tests/benchmarks
	$(BIN)/samplerbench run bench/suites/gpu.toml --device cuda --report reports/gpu.html

clean:
	rm -rf $(VENV) .venv-lock build *.egg-info
