# One-command set-up: every target creates or reuses .venv and installs what it needs, at the
# exact versions CI tested (constraints.txt; regenerate it with tools/constraints.sh).
# GPU users: make test TORCH="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
CONSTRAINTS ?= constraints.txt
LATEST_VENV ?= .venv-latest
PY := $(VENV)/bin/python
STAMP := $(VENV)/.growmem-installed
TEST_STAMP := $(VENV)/.growmem-test-installed
LINT_PATHS := growmem tests benchmarks experiments tools

.PHONY: install demo train test test-latest lint bench bench-gpu results clean

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

# the tests also exercise the lm-eval adapter and the Triton kernels (in the interpreter, on
# CPU): install those extras too
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -c $(CONSTRAINTS) -e ".[dev,lm-eval,triton]"
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(PY) -m growmem.demo --out runs/demo

# One training run: a task base and a model spec (growmem configs lists both), e.g.
# make train TASK=niah MODEL=titans+ssc
TASK ?= mqar
MODEL ?= gated_delta+grm
train: $(STAMP)
	$(PY) -m growmem.cli train $(TASK) --model $(MODEL)

test: $(TEST_STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	GROWMEM_STRICT_SKIPS=1 $(PY) -m pytest -n 2 -q

# The newest releases of every dependency (upper bounds and constraints ignored; torch as TORCH
# says: TORCH=torch floats it too), in a venv of its own, then the whole suite: drift shows
# here before users meet it.
test-latest:
	test -x $(LATEST_VENV)/bin/python || $(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -c "import torch" 2>/dev/null || \
		$(LATEST_VENV)/bin/python -m pip install $(TORCH_INDEX) "$(TORCH)"
	$(LATEST_VENV)/bin/python -m pip install --no-deps -e .
	echo "$(TORCH)" > $(LATEST_VENV)/torch-constraint.txt
	$(LATEST_VENV)/bin/python -m pip install --upgrade --upgrade-strategy eager \
		-c $(LATEST_VENV)/torch-constraint.txt $$($(PYTHON) tools/latest_requirements.py dev lm-eval triton)
	$(LATEST_VENV)/bin/python -m pip list --format=freeze | grep -i -E "^(torch|transformers|tokenizers|lm.eval|triton)=="
	GROWMEM_STRICT_SKIPS=1 $(LATEST_VENV)/bin/python -m pytest -n 2 -q

lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

bench: $(STAMP)
	$(PY) -m benchmarks.bench_linear_memory
	$(PY) -m benchmarks.bench_memory_caching
	$(PY) -m benchmarks.bench_deep_memory
	$(PY) -m benchmarks.bench_models
	$(PY) -m benchmarks.bench_train_throughput
	$(PY) -m benchmarks.bench_denormals

# The GPU benchmark (one CUDA GPU, <= 8 minutes; docs/api.md "GPU benchmark"). With fla's
# kernels: $(PY) -m pip install -e ".[fla]" first.
bench-gpu: $(STAMP)
	$(PY) -m benchmarks.bench_gpu --out results/gpu_bench.json

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
	rm -rf $(VENV) $(LATEST_VENV) build *.egg-info .pytest_cache .ruff_cache
