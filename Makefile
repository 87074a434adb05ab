# The README's commands. Each sets itself up: a fresh machine needs nothing but python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
# The CPU build of torch lies on local disk; install it before anything that depends on torch,
# so that no multi-GB CUDA build is downloaded.
TORCH  := torch==2.13.0
export NO_MKDOCS_2_WARNING := 1

.PHONY: tour test lint docs serve bench gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)

$(VENV)/.tour-deps: pyproject.toml | $(PY)
	$(PIP) -e '.[cli,numba,torch,lab]'
	touch $@

$(VENV)/.test-deps: pyproject.toml $(VENV)/.tour-deps
	$(PIP) -e '.[test]'
	touch $@

tour: $(VENV)/.tour-deps  ## run every implemented mechanism on real data through every backend
	$(VENV)/bin/qkv tour

test: $(VENV)/.test-deps  ## lint, then the whole suite (tutorials and the docs build included)
	$(PY) -m ruff check qkv tests tutorials benchmarks docs
	$(PY) -m pytest

lint: $(VENV)/.test-deps
	$(PY) -m ruff check qkv tests tutorials benchmarks docs
	$(PY) -m ruff format --check qkv tests tutorials benchmarks docs

docs: $(VENV)/.test-deps  ## build the site into site/ (executes the tutorials)
	$(PY) -m mkdocs build --strict

serve: $(VENV)/.test-deps
	$(PY) -m mkdocs serve

bench: $(VENV)/.tour-deps  ## CPU benchmarks; results to benchmarks/results/ and the docs
	$(VENV)/bin/qkv bench

gpu-check:  ## on a machine with an NVIDIA GPU: GPU tests + GPU benchmarks, one table
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) build site .pytest_cache .hypothesis docs/tutorials docs/generated
