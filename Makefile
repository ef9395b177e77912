# Two commands do all set-up on a fresh machine with Python 3.11 and make:
#   make demo   creates .venv, installs tbptt, runs the main job
#   make test   creates .venv, installs tbptt with its test extras, runs the whole suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test lint bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[all]'
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e '.[all,test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed-test
	$(PIP) -e '.[all,test,bench]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/tbptt train

test: $(VENV)/.installed-test
	$(BIN)/python -m ruff check src tests benchmarks examples
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check src tests benchmarks examples
	$(BIN)/python -m ruff format --check src tests benchmarks examples

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/run.py --out docs/performance.md

bench-quick: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
