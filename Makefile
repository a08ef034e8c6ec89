# Two commands do all the set-up: `make run` and `make test`. Both create .venv on first use.
# `make e2e` runs tests/e2e against real SGLang servers in its own environment (.e2e/venv).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
HOST   ?= 127.0.0.1
PORT   ?= 30000
BACKENDS ?=

.PHONY: run test lint typecheck bench clean install e2e

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or set PYTHON=...)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/prefix-router serve --explain --host $(HOST) --port $(PORT) $(if $(BACKENDS),--backends $(BACKENDS),--embedded 4)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/sim_compare.py
	$(PY) benchmarks/tables.py

e2e:
	bash e2e/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
