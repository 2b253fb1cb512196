# muster-edge: `make run` starts the gateway with its demo fleet, `make test` runs the suite.
# Both install what they need on a fresh clone: a virtualenv in .venv, Node 22 and npm tools in .tools.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NODE_DIR := .tools/node
GEN := extproc/gen
PROTOS := $(wildcard proto/muster_edge/v1/*.proto)

.PHONY: run test venv node proto lint bench clean envoy-demo redis

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	# xds-protos ships an older copy of opentelemetry/proto (no InstrumentationScope); whichever wheel pip unpacks
	# last wins, so put OpenTelemetry's own back over it (the tracing exporter needs it; xds reads a subset of it)
	$(PIP) install -q --no-deps --force-reinstall \
	  "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $@

proto: $(GEN)/.built
$(GEN)/.built: $(PROTOS) $(VENV)/.installed
	mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$(GEN) --pyi_out=$(GEN) $(PROTOS)
	touch $(GEN)/__init__.py $(GEN)/muster_edge/__init__.py $(GEN)/muster_edge/v1/__init__.py
	touch $@

# Node 22 (from the npm registry) for the MCP conformance suite and the reference servers.
node: $(NODE_DIR)/.installed
$(NODE_DIR)/.installed: deploy/node-tools.json
	mkdir -p $(NODE_DIR)
	cp deploy/node-tools.json $(NODE_DIR)/package.json
	cd $(NODE_DIR) && npm install --no-audit --no-fund --loglevel=error
	touch $@

# Redis for the shared-state tests (Debian's package; the tests start their own server on a free port).
redis: .tools/redis-server
.tools/redis-server:
	mkdir -p .tools
	command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null)
	ln -sf "$$(command -v redis-server)" .tools/redis-server

run: venv proto node
	$(VENV)/bin/muster-edge demo

test: venv proto node redis
	$(VENV)/bin/ruff check catalog extproc tests bench deploy
	$(VENV)/bin/mypy catalog extproc
	$(PY) -m pytest -q tests

lint: venv proto
	$(VENV)/bin/ruff check catalog extproc tests bench deploy
	$(VENV)/bin/mypy catalog extproc

bench: venv proto
	$(PY) bench/run.py

# The committed reference rendering of the demo's Envoy configuration (kept current by a test).
envoy-demo: venv proto
	$(VENV)/bin/muster-edge envoy render -c deploy/demo/gateway.yaml --out envoy/demo
	sed -i "s|$$(pwd)|.|g" envoy/demo/bootstrap.yaml envoy/demo/mesh.yaml envoy/demo/cds/cds.yaml

clean:
	rm -rf $(VENV) .tools $(GEN) .state
