# Two entry points on a fresh clone (README): `make quickstart` and `make test`.
# Each creates .venv with the CPU build of PyTorch first, so no multi-GB CUDA wheel is pulled.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Development copies of the datasets sit beside the clone; GENREC_DATA overrides.
export GENREC_DATA ?= $(abspath ../shared/datasets)
export GENREC_CACHE ?= $(abspath .cache)

.PHONY: venv quickstart test lint clean

$(BIN)/genrec: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/genrec

quickstart: venv
	$(BIN)/python benchmarks/quickstart.py

test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .cache runs
