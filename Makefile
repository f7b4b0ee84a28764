# Baton — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PROTO_SRC := $(wildcard protos/baton/v1/*.proto)
ARGS ?=

.PHONY: setup run test test-fast lint protos clean

$(VENV)/.baton-setup: pyproject.toml requirements.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

setup: $(VENV)/.baton-setup

run: setup
	$(VENV)/bin/baton up $(ARGS)

test: setup
	$(PY) -m pytest tests -v --timeout=900 $(ARGS)

test-fast: setup
	$(PY) -m pytest tests/unit -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# Generated stubs are committed; tests/unit/test_protos_current.py fails when
# they drift from protos/.
protos: setup
	$(PY) -m baton.protogen

clean:
	rm -rf $(VENV)

# Benchmarks write bench/results/<name>.json and .png.
.PHONY: bench-kv
bench-kv: setup
	$(PY) -m bench.kv_transfer $(ARGS)

.PHONY: bench-serve
bench-serve: setup
	$(PY) -m bench.serve $(ARGS)

.PHONY: bench-handoff
bench-handoff: setup
	$(PY) -m bench.handoff $(ARGS)

.PHONY: bench-routing
bench-routing: setup
	$(PY) -m bench.routing $(ARGS)

.PHONY: bench-drain
bench-drain: setup
	$(PY) -m bench.drain $(ARGS)

.PHONY: soak
soak: setup
	$(PY) -m bench.soak $(ARGS)

.PHONY: bench-overhead
bench-overhead: setup
	$(PY) -m bench.overhead $(ARGS)
