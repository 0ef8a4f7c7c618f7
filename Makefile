# The blueprint's front door. `make` alone lists the targets.
# Every target creates the virtual environment it needs from the lock files.

SHELL := bash
.SHELLFLAGS := -o errexit -o pipefail -o nounset -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Servers the local stack and the tests run as real processes, and the browser
# the browser tests drive (Debian's chromium: playwright never downloads one),
# mmdebstrap, which builds the container tests' base images with no registry,
# shellcheck, which `make lint` runs on the shell scripts, Prometheus (for
# promtool), which `make k8s-check` runs on the alerts, and iptables, with
# which the chaos suite cuts a replica from Redis inside its network namespace.
PROMTOOL_PACKAGE := prometheus
SYSTEM_PACKAGES := redis-server nginx-light chromium mmdebstrap shellcheck $(PROMTOOL_PACKAGE) iptables
export PYTHONPATH := $(CURDIR)/app:$(CURDIR)

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[1m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/.installed: requirements/app.lock requirements/loadtest.lock requirements/dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/app.lock
	$(BIN)/pip install --quiet --require-hashes --no-deps -r requirements/loadtest.lock -r requirements/dev.lock
	touch $@

.PHONY: venv
venv: $(BIN)/.installed ## create .venv from the lock files

.PHONY: system-packages
system-packages: ## install the Debian packages of the stack and the tests with apt (as root), or name what is missing
	@deploy/system-packages.sh $(SYSTEM_PACKAGES)

.PHONY: lock
lock: ## re-resolve requirements/*.in into the hashed lock files (needs uv)
	cd requirements && for name in app loadtest dev checkov; do \
	  uv pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes $$name.in -o $$name.lock; \
	done

.PHONY: test
test: venv system-packages lint ## run the whole test suite (after the linters)
	$(BIN)/pytest $(PYTEST_ARGS)

SHELL_SCRIPTS := .ci/run $(wildcard deploy/*.sh deploy/images/*.sh nginx/*.sh)

.PHONY: lint
lint: venv system-packages ## ruff (lint and format, pyproject.toml) and shellcheck on the shell scripts
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	shellcheck $(SHELL_SCRIPTS)

# make fuzz [FUZZ_EXAMPLES=2000]   the frame fuzzer (make test runs it with 150 examples) for longer
FUZZ_EXAMPLES ?= 2000

.PHONY: fuzz
fuzz: venv system-packages ## random and mutated WebSocket frames against a live replica, FUZZ_EXAMPLES (2000) of them
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -s -q -o timeout=0 tests/integration/test_frame_fuzz.py

.PHONY: clean
clean: ## remove the virtual environment and build output
	rm -rf $(VENV) $(CHECKOV_VENV) build

# --- load test ---
# make loadtest [USERS=60 SPAWN_RATE=10 DURATION=30s WORKERS=0 REPLICAS=3 SCENARIO=FanoutUser]
# make loadtest TARGET=http://127.0.0.1:8080 [TOKEN=...]   (a running stack: compose, a cluster's entry point)
USERS ?= 60
SPAWN_RATE ?= 10
DURATION ?= 30s
WORKERS ?= 0
REPLICAS ?= 3
SCENARIO ?= FanoutUser
TARGET ?=
LOADTEST_REPORTS := loadtest/reports
# Against the local stack every replica must deliver; an unknown target must show at least two.
MIN_REPLICAS ?= $(if $(TARGET),2,$(REPLICAS))

.PHONY: loadtest
loadtest: venv $(if $(TARGET),,system-packages) ## headless fan-out load test with a PASS/FAIL verdict (TARGET=url, WORKERS=n)
	@mkdir -p $(LOADTEST_REPORTS)
	@$(if $(TARGET),$(if $(TOKEN),BROADCAST_TOKEN='$(TOKEN)'),$(BIN)/python -m loadtest.with_stack --replicas $(REPLICAS) --log $(LOADTEST_REPORTS)/stack.log --) \
	  $(BIN)/locust -f loadtest/locustfile.py --headless --only-summary $(if $(TARGET),--host '$(TARGET)') \
	  --users $(USERS) --spawn-rate $(SPAWN_RATE) --run-time $(DURATION) \
	  $(if $(filter-out 0,$(WORKERS)),--processes $(WORKERS)) --min-replicas $(MIN_REPLICAS) \
	  --csv $(LOADTEST_REPORTS)/fanout --html $(LOADTEST_REPORTS)/fanout.html \
	  --summary-file $(LOADTEST_REPORTS)/fanout-summary.txt $(LOCUST_ARGS) $(SCENARIO)

# --- kubernetes ---
# checkov lives in its own virtual env: its dependency tree is large and must
# not constrain the app's. The manifest tests (make test) run it from there.
CHECKOV_VENV := .venv-checkov
K8S_RENDERED := build/k8s

$(CHECKOV_VENV)/.installed: requirements/checkov.lock
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --require-hashes -r requirements/checkov.lock
	touch $@

.PHONY: checkov-venv
checkov-venv: $(CHECKOV_VENV)/.installed ## create .venv-checkov (the manifest policy scanner) from its lock

.PHONY: k8s-check
k8s-check: venv checkov-venv ## render the k8s overlays and loadtest; schema, policy, promtool and consistency checks
	@deploy/system-packages.sh $(PROMTOOL_PACKAGE)
	@echo "kubectl kustomize:"
	@$(BIN)/python -m tests.manifests.render $(K8S_RENDERED)
	$(BIN)/pytest -q -m manifests tests/manifests

# The policy scan is part of the suite, so the suite needs its scanner.
test: checkov-venv

# --- containers ---
# make images-offline && make up      no registry needed: base images from Debian packages
# make up [REPLICAS=3] [LOCUST_WORKERS=2] | scale N=5 | logs | ps | down
# PROJECT and ENV_FILE pick another stack (the e2e tests run their own on a free NGINX_PORT).
# COMPOSE_FILES adds overlays: `docker-compose.yml docker-compose.sentinel.yml`
# runs Redis as a master, a replica and three Sentinels (the chaos suite's failover).
PROJECT ?= channels-blueprint
ENV_FILE ?= .env
COMPOSE_FILES ?= docker-compose.yml
WHEELHOUSE := build/wheelhouse
BASE_IMAGES_ENV := build/base-images.env
HEALTHY_TIMEOUT ?= 180
# make up LOCUST_WORKERS=2 also starts the loadtest profile: locust master (web UI) and workers.
LOCUST_WORKERS ?= 0
LOADTEST_PROFILE = $(if $(filter-out 0,$(LOCUST_WORKERS)),--profile loadtest)
COMPOSE_COMMAND := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
# The env file is optional for building, so it is passed only once it exists.
COMPOSE = $(COMPOSE_COMMAND) $(foreach file,$(COMPOSE_FILES),--file $(file)) --project-name $(PROJECT) $$([ ! -f $(ENV_FILE) ] || echo --env-file $(ENV_FILE))
# Image names recorded by images-offline, for those not set in the environment
# or on the command line. Read when a recipe runs, so `make images-offline up` works.
WITH_BASE_IMAGES = if [ -f $(BASE_IMAGES_ENV) ]; then \
	  while IFS== read -r name value; do [ -n "$${!name:-}" ] || export "$$name=$$value"; done < $(BASE_IMAGES_ENV); fi;
# pip 23 matches a manylinux_2_28 wheel only when told that tag exactly: list
# every glibc level up to Debian 12's 2.36.
WHEEL_ARCH := $(shell uname -m)
WHEEL_PLATFORMS := $(foreach level,$(shell seq 17 36),--platform manylinux_2_$(level)_$(WHEEL_ARCH)) \
	$(foreach tag,manylinux1 manylinux2010 manylinux2014,--platform $(tag)_$(WHEEL_ARCH))

build/wheelhouse.stamp: requirements/app.lock requirements/loadtest.lock | $(BIN)/.installed
	rm -rf $(WHEELHOUSE)
	$(BIN)/pip download --quiet --disable-pip-version-check --no-deps --require-hashes --only-binary=:all: \
	  --implementation cp --python-version 3.11 --abi cp311 $(WHEEL_PLATFORMS) \
	  --dest $(WHEELHOUSE) -r requirements/app.lock -r requirements/loadtest.lock
	touch $@

.PHONY: wheelhouse
wheelhouse: build/wheelhouse.stamp ## download the locked wheels (hash-checked) that the image build installs offline

.PHONY: images
images: wheelhouse ## build the app, load-test and nginx images (on PYTHON_IMAGE / NGINX_IMAGE)
	@$(WITH_BASE_IMAGES) started=$$SECONDS; \
	  echo "building on $${PYTHON_IMAGE:-the default python image} and $${NGINX_IMAGE:-the default nginx image}"; \
	  $(COMPOSE) build daphne nginx locust-master; \
	  echo "images built in $$((SECONDS - started)) s"

.PHONY: images-offline
images-offline: wheelhouse ## build python, redis and nginx base images from Debian packages, then the images on them
	@mkdir -p build
	deploy/images/build-base-images.sh $(if $(FORCE),--force) > $(BASE_IMAGES_ENV).tmp
	@mv $(BASE_IMAGES_ENV).tmp $(BASE_IMAGES_ENV)
	@$(MAKE) images

# Only when missing: an existing env file, secrets included, is never rewritten.
$(ENV_FILE):
	@umask 077 && cp .env.example $@.tmp && \
	  for name in DJANGO_SECRET_KEY REDIS_PASSWORD BROADCAST_TOKEN; do \
	    sed -i "s/^$$name=$$/$$name=$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(32))')/" $@.tmp; \
	  done && mv $@.tmp $@ && echo "wrote $@ with new random secrets"

.PHONY: up
up: images $(ENV_FILE) ## build and start redis, REPLICAS daphne (3), gunicorn, nginx [and LOCUST_WORKERS]; wait until healthy
	@$(WITH_BASE_IMAGES) $(COMPOSE) $(LOADTEST_PROFILE) up --detach --remove-orphans --scale daphne=$(REPLICAS) \
	  $(if $(LOADTEST_PROFILE),--scale locust-worker=$(LOCUST_WORKERS))
	@$(PYTHON) -m deploy.compose_health --timeout $(HEALTHY_TIMEOUT) $$($(COMPOSE) ps -q)
	@echo "up: http://$$($(COMPOSE) port nginx 8080)/ with $(REPLICAS) daphne replicas"
	@$(if $(LOADTEST_PROFILE),echo "locust: http://$$($(COMPOSE) $(LOADTEST_PROFILE) port locust-master 8089)/ with $(LOCUST_WORKERS) workers")

.PHONY: scale
scale: ## change the number of daphne replicas (N=5), then reload nginx (its old workers keep their sockets up to 40 s)
	@[ -n "$(N)" ] || { echo "usage: make scale N=5" >&2; exit 2; }
	@$(WITH_BASE_IMAGES) $(COMPOSE) up --detach --no-deps --no-recreate --scale daphne=$(N) daphne
	@$(PYTHON) -m deploy.compose_health --timeout $(HEALTHY_TIMEOUT) $$($(COMPOSE) ps -q daphne)
	@# nginx re-resolves `daphne` every 5 s by itself; the reload's new workers
	@# resolve at once. Kept because one fresh-clone CI run saw nginx miss a
	@# new replica for tens of seconds without it (cause not found yet).
	@$(COMPOSE) exec -T nginx /etc/nginx/blueprint/docker-entrypoint.sh reload
	@echo "scaled to $(N) daphne replicas; nginx reloaded"

.PHONY: down
down: ## stop the stack and remove its containers, network and volumes
	$(COMPOSE) --profile loadtest down --volumes --remove-orphans

.PHONY: logs
logs: ## follow the stack's logs
	@$(COMPOSE) logs --follow --tail=100

.PHONY: ps
ps: ## list the stack's containers and their health
	@$(COMPOSE) ps

# --- chaos ---
# make chaos [CHAOS_SCHEDULE=full|short|failover]   faults under load on compose stacks of the offline images
# (as root: a Redis cut runs iptables inside a replica's network namespace)
CHAOS_SCHEDULE ?= full

.PHONY: chaos
chaos: venv images-offline ## kill, drain, scale, cut, pause, restart, fail over under load; a checker over every message: loadtest/reports/chaos.*
	@$(BIN)/python -m loadtest.chaos --schedule $(CHAOS_SCHEDULE)

# --- local stack ---
# make demo [PORT=8080] [REPLICAS=3]   the scaled topology as local processes, checked, then served until Ctrl-C
# make check-fanout                    the same stack and check, exits with the verdict
# make check-fanout TARGET=http://127.0.0.1:8080 [TOKEN=...] [REPLICAS=3]   only the check, on a running stack
PORT ?=
TOKEN ?=

.PHONY: demo
demo: venv system-packages ## local stack (redis, REPLICAS daphne, gunicorn, nginx) + fan-out check, then serve until Ctrl-C (PORT=8080)
	@$(BIN)/python -m loadtest.demo --replicas $(REPLICAS) $(if $(PORT),--port $(PORT)) --check --serve

.PHONY: check-fanout
check-fanout: venv system-packages ## fan-out matrix and verdict on a fresh local stack, or on TARGET=url (TOKEN=, REPLICAS=)
	@$(if $(TARGET),$(if $(TOKEN),BROADCAST_TOKEN='$(TOKEN)') $(BIN)/python -m loadtest.fanout_check --target '$(TARGET)' --expect-replicas $(REPLICAS),$(BIN)/python -m loadtest.demo --replicas $(REPLICAS) $(if $(PORT),--port $(PORT)) --check)

# --- benchmark ---
# make bench [BENCH_CONFIGS=raw,daphne-pubsub]   every configuration on its own 3-replica local stack, measured in
#                                                interleaved rounds (A B C A B C ...), ≤ 20 min
# make bench-smoke                               the same code path with small numbers (also run by make test)
# make bench-profile [BENCH_CONFIGS=...]         where the replicas' CPU and idle-socket memory go, per library
BENCH_CONFIGS ?=

.PHONY: bench
bench: venv system-packages ## capacity benchmark against the raw baseline, python-socketio and picows: loadtest/reports/bench.{json,md,png}
	@$(BIN)/python -m loadtest.bench $(if $(BENCH_CONFIGS),--configs $(BENCH_CONFIGS))

.PHONY: bench-smoke
bench-smoke: venv system-packages ## the benchmark with small numbers, in under 2 minutes: loadtest/reports/bench-smoke.*
	@$(BIN)/python -m loadtest.bench --smoke $(if $(BENCH_CONFIGS),--configs $(BENCH_CONFIGS))

.PHONY: bench-profile
bench-profile: venv system-packages ## py-spy and tracemalloc profiles of the replicas, per library: loadtest/reports/bench-profile.{json,md}
	@$(BIN)/python -m loadtest.bench.profiling $(if $(BENCH_CONFIGS),--configs $(BENCH_CONFIGS))

# --- upgrade canary ---
# The fast path (app/realtime/compat.py) on the newest PyPI releases of the
# libraries whose internals it uses, in a virtual environment of its own, the
# rest as locked. It prints the versions tried and what changed since the
# lock, and fails when the fast path does not hold on them (a name it uses is
# gone, or a fast-path or fan-out test fails with FAST_PATH=force): bumping
# the lock to them needs the fast path ported first, or replicas on them would
# run stock (a name gone) or break where no check looks (a meaning changed).
CANARY_VENV := build/canary-venv
CANARY_PACKAGES := channels channels-redis daphne twisted autobahn redis
CANARY_TESTS := tests/unit/test_compat.py tests/unit/test_events.py tests/integration/test_compat_paths.py \
	tests/integration/test_fanout_layer.py tests/integration/test_shared_events.py tests/integration/test_replica_writes.py

.PHONY: canary
canary: system-packages ## the fast path on the newest channels, channels-redis, daphne, Twisted, autobahn and redis
	rm -rf $(CANARY_VENV)
	$(PYTHON) -m venv $(CANARY_VENV)
	$(CANARY_VENV)/bin/pip install --quiet --upgrade pip
	$(CANARY_VENV)/bin/pip install --quiet --require-hashes -r requirements/app.lock
	$(CANARY_VENV)/bin/pip install --quiet --require-hashes --no-deps -r requirements/loadtest.lock -r requirements/dev.lock
	$(CANARY_VENV)/bin/pip install --quiet --upgrade $(CANARY_PACKAGES)
	@export FAST_PATH=force; failed=; \
	  $(CANARY_VENV)/bin/python -m realtime.compat --lock requirements/app.lock || failed="a name the fast path uses is gone"; \
	  $(CANARY_VENV)/bin/pytest -q -p no:cacheprovider $(CANARY_TESTS) || failed="$${failed:+$$failed; }fast-path tests failed"; \
	  if [ -n "$$failed" ]; then echo "canary: FAIL ($$failed): port app/realtime/compat.py before the lock moves to these"; exit 1; fi; \
	  echo "canary: PASS: the fast path holds on these releases"
