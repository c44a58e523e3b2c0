# Every target builds its own environment from nothing; .venv is reused once it is complete.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-thorough demo bench bench-speed bench-sparse gpu-check lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-thorough: $(STAMP)
	ROBUST_ATTN_PROFILE=thorough $(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/robust-attn doctor --builtin --out demo-output

# Every benchmark, under 15 minutes on 2 CPU cores; results in benchmarks/results/. The probe's
# figure comes first: the speed table reads it. The sparse one stops at N = 8192 here (the
# README's sparse table and the issue's targets at N = 8192).
bench: $(STAMP)
	$(BIN)/python benchmarks/probe_overhead.py
	$(BIN)/python benchmarks/monitor_overhead.py
	$(BIN)/python benchmarks/claims_table.py
	$(BIN)/python benchmarks/sparse.py --max-tokens 8192
	$(BIN)/python benchmarks/block_topk.py
	$(BIN)/python benchmarks/setup_costs.py
	$(BIN)/python benchmarks/dense_overhead.py
	$(BIN)/python benchmarks/long_context.py
	$(BIN)/python -m benchmarks.speed

# The speed and memory suite alone (speed-<device>.json/.md).
bench-speed: $(STAMP)
	$(BIN)/python -m benchmarks.speed

# The full sparse benchmark, N = 1024..16384 (sparse-cpu.json/.md).
bench-sparse: $(STAMP)
	$(BIN)/python benchmarks/sparse.py

# Every CUDA path once (benchmarks/gpu_check.py), under 10 minutes on one GPU; results and a
# summary in benchmarks/results/gpu/. Without CUDA it runs its CPU-safe parts and says what it skipped.
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check

lint: $(STAMP)
	$(BIN)/ruff check robust_attn tests benchmarks recipes

clean:
	rm -rf $(VENV) demo-output .pytest_cache .hypothesis
