# Two entry points: `make serve` and `make test`. Both set up a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= u2net u2netp

# What the integration tests start for real: nginx, a Docker engine, docker-compose, promtool,
# the browser the page's test drives, openssl for the URL fetcher's TLS test's certificate, and
# Redis for the shared map cache.
SYSTEM_PACKAGES := nginx-light docker.io docker-compose debootstrap prometheus chromium openssl \
	redis-server
SYSTEM_TOOLS := nginx dockerd docker-compose debootstrap promtool chromium openssl redis-server \
	redis-cli

# A host installs what it runs: the CPU set (the service and the weights' converters, no
# PyTorch), and the gpu extra's PyTorch only where an NVIDIA GPU is present (its driver's files),
# so that a laptop's `make serve` downloads no CUDA.
GPU := $(shell test -e /proc/driver/nvidia/version -o -e /dev/nvidiactl && echo gpu)
RUNTIME := -r requirements.txt -r requirements-convert.txt $(if $(GPU),-r requirements-gpu.txt)

.PHONY: runtime install weights serve test lint bench system-deps docs
runtime: $(VENV)/.runtime
# The project itself is installed editable, for the `u2serve` command; its dependencies are the
# pinned ones installed just before.
$(VENV)/.runtime: requirements.txt requirements-convert.txt requirements-gpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(RUNTIME)
	$(PY) -m pip install --quiet --no-deps --editable .
	touch $@

# The suite's tools on top, and PyTorch for the torch engine's tests and the references the
# CPU's numpy stages are held to.
install: $(VENV)/.installed
$(VENV)/.installed: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

weights: install
	$(PY) -m weights fetch $(MODELS)

system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do \
	    PATH="$$PATH:/usr/sbin:/sbin" command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then echo "system tools present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "missing:$$missing (tests that need them are skipped)"; fi

# The served models' weights are fetched, verified and converted first, in the service's own
# process (U2SERVE_MODEL/U2SERVE_MODELS say which; u2net by default).
serve: runtime
	$(PY) -m service --fetch

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

test: lint weights system-deps
	$(PY) -m pytest

# The manual (docs/, mkdocs.yml) as a folder of static files, offline; the suite builds it with
# --strict too (tests/test_docs.py). The OpenAPI reference is made from the app's schema: no
# weights needed.
docs: install
	$(PY) -m mkdocs build --strict --site-dir build/site

bench: weights
	$(PY) -m bench.model
