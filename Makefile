# The two commands of the README. Each creates .venv when missing and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel

$(VENV)/.installed-test: $(PY) pyproject.toml setup.py
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.installed: $(PY) pyproject.toml setup.py
	$(PY) -m pip install --quiet -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) -m adaptsr demo

# Tests, then every benchmark run once as a smoke test (timings live in `make bench`).
test: $(VENV)/.installed-test
	$(PY) -m pytest tests -q
	$(PY) -m pytest benchmarks -q --benchmark-disable

bench: $(VENV)/.installed-test
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/cpu-latest.json
	$(PY) benchmarks/to_markdown.py benchmarks/results/cpu-latest.json
