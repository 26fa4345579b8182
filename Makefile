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
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[dev]"
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
