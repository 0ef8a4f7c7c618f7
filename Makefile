# The blueprint's front door. `make` alone lists the targets.
# Every target creates the virtual environment it needs from the lock files.

SHELL := bash
.SHELLFLAGS := -o errexit -o pipefail -o nounset -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Servers the local stack and the tests run as real processes.
SYSTEM_PACKAGES := redis-server nginx-light
export PYTHONPATH := $(CURDIR)/app:$(CURDIR)

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/.installed: requirements/app.lock requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/app.lock
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/dev.lock
	touch $@

.PHONY: venv
venv: $(BIN)/.installed ## create .venv from the lock files

.PHONY: system-packages
system-packages: ## install redis-server and nginx with apt (as root), or name what is missing
	@deploy/system-packages.sh $(SYSTEM_PACKAGES)

.PHONY: lock
lock: ## re-resolve requirements/*.in into the hashed lock files (needs uv)
	cd requirements && for name in app dev; do \
	  uv pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes $$name.in -o $$name.lock; \
	done

.PHONY: test
test: venv system-packages ## run the whole test suite
	$(BIN)/pytest $(PYTEST_ARGS)

.PHONY: clean
clean: ## remove the virtual environment and build output
	rm -rf $(VENV) build
