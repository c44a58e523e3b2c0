# Every target builds its own environment from nothing; .venv is reused once it is complete.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/robust-attn doctor --builtin --out demo-output

bench: $(STAMP)
	$(BIN)/python benchmarks/probe_overhead.py
	$(BIN)/python benchmarks/monitor_overhead.py
	$(BIN)/python benchmarks/claims_table.py
	$(BIN)/python benchmarks/sparse.py

lint: $(STAMP)
	$(BIN)/ruff check robust_attn tests benchmarks recipes

clean:
	rm -rf $(VENV) demo-output .pytest_cache .hypothesis
