"""Benchmarks for muster-edge: `bench/run.py` measures the gateway beside plain Envoy and Envoy's own MCP filters."""
