# Two entry points: `make serve` and `make test`. Both set up a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= u2net u2netp

.PHONY: install weights serve test lint bench
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

weights: install
	$(PY) -m weights fetch $(MODELS)

serve: install
	$(PY) -m weights fetch u2net
	$(PY) -m service

test: weights
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest

bench: weights
	$(PY) -m bench.model
