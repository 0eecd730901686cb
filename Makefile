# One-command set-up: every target creates or reuses .venv and installs what it needs.
# GPU users: make test TORCH="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.growmem-installed

.PHONY: install demo test lint bench results clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m growmem.demo --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check growmem tests benchmarks experiments
	$(PY) -m pytest -n 2 -q

lint: $(STAMP)
	$(PY) -m ruff check growmem tests benchmarks experiments
	$(PY) -m ruff format --check growmem tests benchmarks experiments

bench: $(STAMP)
	$(PY) -m benchmarks.bench_linear_memory
	$(PY) -m benchmarks.bench_memory_caching
	$(PY) -m benchmarks.bench_deep_memory
	$(PY) -m benchmarks.bench_models
	$(PY) -m benchmarks.bench_train_throughput

# Every experiment of docs/results.md; cells and benchmarks whose JSON exists are skipped
# (delete a JSON to rerun it). Hours of CPU: run it in the background, across sittings.
results: $(STAMP) results/train_throughput.json results/models_decode.json \
		results/experiments/titans_probe.json
	$(PY) -m experiments.sweep
	$(PY) -m experiments.report

results/train_throughput.json: | $(STAMP)
	$(PY) -m benchmarks.bench_train_throughput

results/models_decode.json: | $(STAMP)
	$(PY) -m benchmarks.bench_models

results/experiments/titans_probe.json: | $(STAMP)
	$(PY) -m experiments.titans_probe

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
