# Two entry points on a fresh clone (README): `make quickstart` and `make test`.
# Each creates .venv with PyTorch first: the CPU build where the pip index serves it (this machine, CI).
# From plain PyPI on Linux torch is the multi-GB CUDA build; there pass the CPU wheel index:
#   make test TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
# Development copies of the datasets sit beside the clone; GENREC_DATA overrides.
export GENREC_DATA ?= $(abspath ../shared/datasets)
export GENREC_CACHE ?= $(abspath .cache)

TORCHREC_VERSION ?= 1.8.0

.PHONY: venv quickstart test test-torchrec lint clean

$(BIN)/genrec: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION) $(TORCH_INDEX)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/genrec

# The TorchRec extra without the trap: `pip install torchrec` would pull the multi-GB CUDA fbgemm-gpu,
# so the extra brings fbgemm-gpu-cpu and torchrec's other dependencies, then torchrec comes --no-deps.
# A failed install is not fatal: the sharded-table test then skips and says why.
$(VENV)/.torchrec: $(BIN)/genrec
	-$(BIN)/pip install -q -e '.[dev,torchrec]' && $(BIN)/pip install -q --no-deps torchrec==$(TORCHREC_VERSION)
	touch $@

# writes only under runs/ and .cache/ (both ignored): a fresh clone stays clean
quickstart: venv
	$(BIN)/python benchmarks/quickstart.py

test: venv $(VENV)/.torchrec
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q --durations=15

test-torchrec: $(VENV)/.torchrec
	$(BIN)/pytest -q -rs tests/distributed/test_sharded_tables.py

lint: venv
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .cache runs
