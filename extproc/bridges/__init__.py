"""Bridges: stdio and sse MCP servers served over streamable HTTP on loopback, so Envoy reaches them as clusters.

One bridge process (`host.py`) serves every such server of a replica: its memory is shared, so each stdio
upstream costs little beyond its own process. `children.py` starts and supervises the stdio processes,
`relay.py` carries JSON-RPC messages between HTTP requests and one MCP peer, `sse.py` holds the
2024-11-05 HTTP+SSE connections.
"""
