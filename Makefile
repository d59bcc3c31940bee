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

.PHONY: install weights serve test lint bench system-deps docs
install: $(VENV)/.installed
# The project itself is installed editable, for the `u2serve` command; its dependencies are the
# pinned ones installed just before.
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --editable .
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

serve: install
	$(PY) -m weights fetch u2net
	$(PY) -m service

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
