# Every target builds what it needs: a fresh clone runs `make serve` or `make test` and nothing else.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
REPOSITORY ?= models
PYTEST_ARGS ?=

.PHONY: help serve test test-fast system-tools lint models install install-dev clean

help:
	@echo "make serve   install the serving stack in $(VENV) and serve $(REPOSITORY)/ at http://$(HOST):$(PORT) (the page at /, Swagger UI at /docs)"
	@echo "make test    install everything (training, export, tests) in $(VENV) and run the whole test suite"
	@echo "make test-fast  the fast tier of the tests (about a minute): what needs no containers, browser, training or several processes"
	@echo "make lint    ruff (lint and format check), mypy (strict on kos_core and service) and the package layer contracts"
	@echo "make models  retrain and re-export the bundled digits model from its fixed seed"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps: reinstall only when pyproject.toml changes.
$(VENV)/.installed-serve: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[train,dev]'
	touch $@ $(VENV)/.installed-serve

install: $(VENV)/.installed-serve
install-dev: $(VENV)/.installed-dev

serve: $(VENV)/.installed-serve
	$(BIN)/python -m service --host $(HOST) --port $(PORT) --repository $(REPOSITORY)

test: system-tools lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The system programs some tests drive and no Python package brings: podman, runc and debootstrap
# (containers), Debian's Chromium (the page), kustomize (the manifests), HAProxy (rolling restarts).
# Each script is quick when its program is there; without root or apt-get it says so, and the tests
# that need the program skip, saying why.
system-tools:
	PATH="$$PATH:/usr/sbin:/sbin" bash scripts/install-container-tools.sh
	bash scripts/install-browser.sh
	sh scripts/install-kustomize.sh
	sh scripts/install-haproxy.sh

# The fast tier while developing: no containers, browser, load balancer, training or multi-process tests.
test-fast: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Lint and format check, types (strict on the core and the service), and the package layers (the core
# imports no framework, the service no TensorFlow).
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

models: $(VENV)/.installed-dev
	$(BIN)/python -m training train --recipe digits --run-dir runs/digits --overwrite
	$(BIN)/python -m export runs/digits --name digits --version 1 --overwrite --repository models

clean:
	rm -rf $(VENV) runs .pytest_cache
