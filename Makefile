# odise-pl: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA ?= data/synthetic

.DEFAULT_GOAL := help

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/constraints.txt requirements/reference.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Exact versions seen working together (torch + torchvision from the registry: CUDA builds that also run on CPU).
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	# The COCO panoptic API, the reference of the PQ tests and benchmarks (see the file for --no-deps).
	$(PY) -m pip install --quiet --no-deps -r requirements/reference.txt
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install everything (idempotent)

data: setup ## write the synthetic COCO-panoptic dataset to $(DATA)
	$(PY) -m odise_pl.data.synthetic --out $(DATA)

train: setup ## train the default experiment (tiny models, synthetic data, CPU) end to end
	$(PY) -m odise_pl.train $(ARGS)

test: setup browser ## run the default (fast) test suite
	$(PY) -m pytest -q $(ARGS)

# Debian's chromium + its driver, for the web demo's browser test (tests/test_app.py); best effort:
# without them (no root, no apt) that one test is skipped and says how to get them.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
browser: ## install chromium + chromium-driver (apt) for the web demo's browser test
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "warning: could not install chromium + chromium-driver; tests/test_app.py's browser test will be skipped"

app: setup ## the web demo (Gradio) on http://127.0.0.1:7860
	$(PY) -m odise_pl.app $(ARGS)

test-slow: setup ## run the slow tests too (full-size random-weight models; minutes, lots of RAM)
	$(PY) -m pytest -q -m "slow" $(ARGS)

smoke-full: setup ## full-size caption_512 with random weights, 2 training steps on CPU
	$(PY) -m pytest -q -m slow tests/test_smoke_full.py $(ARGS)

# BENCH_ARGS=--tiny: every benchmark's seconds-long smoke run (what the test suite runs).
BENCH_ARGS ?=
BENCH_OUT ?= benchmarks/out/last_run.txt
bench: setup ## benchmarks: ours vs a baseline measured in the same run (prints five ratios; 15-20 min on 2 cores)
	@mkdir -p $(dir $(BENCH_OUT))
	@set -o pipefail; { \
	  echo "# make bench, $$(date -u +%F) on $$($(PY) -c 'import platform, os; print(platform.processor() or platform.machine(), os.cpu_count(), "cores")')"; \
	  $(PY) benchmarks/bench_pq.py $(BENCH_ARGS) && \
	  $(PY) benchmarks/bench_decoder.py $(BENCH_ARGS) && \
	  $(PY) benchmarks/bench_data.py $(BENCH_ARGS) && \
	  $(PY) benchmarks/bench_inference.py $(BENCH_ARGS) && \
	  $(PY) benchmarks/bench_predict.py $(BENCH_ARGS); \
	} 2>&1 | grep --line-buffered -v -i "warn\|Seed set\|available:\|Tip:" | tee $(BENCH_OUT)

device-kit: setup ## wheels of what the GPU machine lacks, for its Python 3.12, into .device-kit/ (for benchmarks/gpu/run.sh)
	PY=$(PY) bash scripts/device_kit.sh .device-kit

gpu-rehearsal: setup ## benchmarks/gpu/run.sh on CPU at tiny sizes (what the GPU machine runs), into benchmarks/out/gpu-rehearsal
	SKIP_KIT=1 PY=$(PY) bash benchmarks/gpu/run.sh benchmarks/out/gpu-rehearsal --device cpu --tiny

lint: setup ## ruff lint + format check
	$(VENV)/bin/ruff check src tests scripts benchmarks
	$(VENV)/bin/ruff format --check src tests scripts benchmarks

format: setup ## apply ruff formatting and fixes
	$(VENV)/bin/ruff check --fix src tests scripts benchmarks
	$(VENV)/bin/ruff format src tests scripts benchmarks

clean: ## remove run outputs (keeps .venv)
	rm -rf outputs multirun logs lightning_logs .pytest_cache

.PHONY: help setup data train test test-slow smoke-full bench lint format clean browser app device-kit gpu-rehearsal
