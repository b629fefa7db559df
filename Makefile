# Two commands do all set-up on a fresh clone:
#   make demo   install loratool (core, no torch) in .venv and run it on the shipped fixtures
#   make test   install the dev extra (CPU torch first), lint, and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LORATOOL := $(VENV)/bin/loratool
# The CPU build of torch lies in the local wheel cache; any other torch pulls GBs of CUDA.
TORCH_PIN ?= torch==2.13.0
PIP_FLAGS ?= -q

.PHONY: demo test lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) --upgrade pip

$(VENV)/.core: pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.dev: pyproject.toml | $(PY)
	$(PY) -m pip install $(PIP_FLAGS) $(TORCH_PIN)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[dev]'
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	@bash scripts/demo.sh $(LORATOOL)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
