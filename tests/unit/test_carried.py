"""The processor's side of the headers carried in metadata (extproc/carried.py)."""

from __future__ import annotations

from extproc.carried import headers_in_lua, unpack, upstream_fields
from extproc.request import Request


def test_unpack_keeps_order_duplicates_and_pseudo_headers() -> None:
    pairs = unpack(":method\nPOST\n:path\n/mcp\nmcp-name\na\nmcp-name\nb\nx-empty\n")
    assert pairs == [(":method", "POST"), (":path", "/mcp"), ("mcp-name", "a"), ("mcp-name", "b"), ("x-empty", "")]
    req = Request.from_headers(pairs, Request().caller)
    assert (req.http_method, req.path, req.duplicated) == ("POST", "/mcp", ("mcp-name",))


def test_unpack_of_nothing_is_no_headers() -> None:
    assert unpack("") == []


def test_upstream_fields_set_wins_over_remove() -> None:
    fields = upstream_fields({":path": "/up", "authorization": "Bearer u"}, ["authorization", "mcp-name"])
    assert fields == {"+::path": "/up", "+:authorization": "Bearer u", "-:mcp-name": ""}


def test_headers_in_strips_what_only_the_processor_sets() -> None:
    lua = headers_in_lua(("x-muster-edge-cluster", "x-muster-edge-retry"))
    assert 'local strip = {"x-muster-edge-cluster", "x-muster-edge-retry"}' in lua
