# ditlab: `make demo` trains the embedded default on this machine; `make test` runs the test suite.
# Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data demo test test-all lint format report bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Fashion-MNIST from Debian's package where apt-get is available; elsewhere the datamodule downloads it.
data:
	@if [ ! -d $(FASHION_MNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; fi

demo: install data
	$(PY) src/train.py

test: install data
	$(PY) -m pytest -q -m "not slow"

test-all: install data
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/ruff format --check src tests experiments

format: install
	$(VENV)/bin/ruff check --fix src tests experiments
	$(VENV)/bin/ruff format src tests experiments

# Tables and figures of a sweep: make report RUNS=multirun/<time>
report: install
	$(PY) src/report.py runs=$(RUNS)

# Training and sampling throughput, reference recipe vs ditlab, side by side (see experiments/bench.py)
bench: install
	$(PY) experiments/bench.py
