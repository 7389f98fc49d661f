# Two commands a new user needs: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-all lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this machine's pip takes the local CPU build of 2.13.0.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# llama.cpp's HF->GGUF converter is in llama-cpp-python's sdist, not its wheel: unpack it into ~/.cache/slimline.
	$(PY) -m slimline.quantize.gguf_converter fetch
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/slimline run pipelines/quickstart.yaml

test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m ''

LINTED := slimline tests scripts benchmarks

lint: install
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

clean:
	rm -rf runs .pytest_cache
