"""x-mcp-header annotations (MCP 2026-07-28, SEP-2243): validity, the header map, and routes that carry it.

The mcp SDK's own `find_invalid_x_mcp_header` / `x_mcp_header_map` serve as a second opinion where the two agree.
"""

from __future__ import annotations

from typing import Any

import pytest
from mcp.shared.inbound import find_invalid_x_mcp_header, x_mcp_header_map

from catalog.view import header_map, x_mcp_header_problem
from tests.unit.factories import server, snap, tool, view_of


def obj(**properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties}


def annotated(token: Any, kind: Any = "string") -> dict[str, Any]:
    return {"type": kind, "x-mcp-header": token}


VALID = {
    "no annotations": obj(a={"type": "string"}),
    "string": obj(region=annotated("Region")),
    "integer": obj(n=annotated("N", "integer")),
    "boolean": obj(dry=annotated("Dry-Run", "boolean")),
    "nested properties chain": obj(outer=obj(inner=annotated("Inner"))),
    "all tchar symbols": obj(a=annotated("!#$%&'*+-.^_`|~09azAZ")),
    "distinct tokens": obj(a=annotated("A"), b=annotated("B")),
    "property named x-mcp-header": obj(**{"x-mcp-header": {"type": "string"}}),
    "no schema": None,
    "not a mapping": "string",
}

INVALID = {
    "space in token": (obj(a=annotated("Re gion")), "not an HTTP token"),
    "empty token": (obj(a=annotated("")), "not an HTTP token"),
    "non-ascii token": (obj(a=annotated("Régión")), "not an HTTP token"),
    "colon in token": (obj(a=annotated("A:B")), "not an HTTP token"),
    "token not a string": (obj(a=annotated(5)), "not an HTTP token"),
    "duplicate, different case": (obj(a=annotated("Region"), b=obj(c=annotated("REGION"))), "used twice"),
    "number type": (obj(a=annotated("A", "number")), "not string, integer or boolean"),
    "object type": (obj(a={"type": "object", "x-mcp-header": "A", "properties": {}}), "not string, integer"),
    "missing type": (obj(a={"x-mcp-header": "A"}), "not string, integer or boolean"),
    "type list": (obj(a=annotated("A", ["string", "null"])), "not string, integer or boolean"),
    "under items": (obj(a={"type": "array", "items": annotated("A")}), "not reachable"),
    "under anyOf": (obj(a={"anyOf": [annotated("A"), {"type": "integer"}]}), "not reachable"),
    "under additionalProperties": ({"type": "object", "additionalProperties": annotated("A")}, "not reachable"),
    "under $defs": ({"type": "object", "$defs": {"d": annotated("A")}, "properties": {}}, "not reachable"),
    "properties under items": (obj(a={"type": "array", "items": obj(b=annotated("B"))}), "not reachable"),
    "under not": (obj(a={"not": annotated("A")}), "not reachable"),
}


@pytest.mark.parametrize("schema", list(VALID.values()), ids=list(VALID))
def test_valid_annotations_have_no_problem(schema: Any) -> None:
    assert x_mcp_header_problem(schema) is None
    assert find_invalid_x_mcp_header(schema) is None


@pytest.mark.parametrize(("schema", "why"), list(INVALID.values()), ids=list(INVALID))
def test_invalid_annotations_are_reported(schema: Any, why: str) -> None:
    problem = x_mcp_header_problem(schema)
    assert problem is not None and why in problem
    assert find_invalid_x_mcp_header(schema) is not None


def test_root_object_cannot_carry_an_annotation() -> None:
    assert x_mcp_header_problem({"type": "object", "x-mcp-header": "Root", "properties": {}}) is not None


def test_token_with_trailing_newline_is_invalid() -> None:
    assert x_mcp_header_problem(obj(a=annotated("A\n"))) is not None


def test_annotation_like_key_inside_instance_data_is_not_an_annotation() -> None:
    schema = obj(h={"type": "object", "default": {"x-mcp-header": "X"}, "examples": [{"x-mcp-header": "Y"}]})
    assert find_invalid_x_mcp_header(schema) is None
    assert x_mcp_header_problem(schema) is None


def test_deeply_nested_schema_does_not_crash() -> None:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(2000):
        node = {"type": "array", "items": node}
    assert x_mcp_header_problem(obj(deep=node)) is None


def test_header_map_collects_paths_to_tokens() -> None:
    schema = obj(region=annotated("Region"), plain={"type": "string"}, outer=obj(inner=annotated("Inner", "integer")))
    expected = {("region",): "Region", ("outer", "inner"): "Inner"}
    assert header_map(schema) == expected
    assert x_mcp_header_map(schema) == expected


@pytest.mark.parametrize("schema", [None, "x", obj(), {"type": "object", "x-mcp-header": "Root"}])
def test_header_map_is_empty_without_property_annotations(schema: Any) -> None:
    assert header_map(schema) == {}


def test_routes_carry_the_header_map_of_upstream_and_exposed_schemas() -> None:
    upstream = tool("query", "Query", properties={"region": annotated("Region"), "q": {"type": "string"}})
    solo = view_of([(server("a"), snap("a", tools=[upstream]))])
    route = solo.tool_routes["x_a_query"]
    assert dict(route.header_map) == {("region",): "Region"}
    assert route.single is not None and dict(route.single.header_map) == {("region",): "Region"}


def test_family_route_maps_the_selector_header_but_targets_do_not() -> None:
    upstream = tool("query", "Query", properties={"region": annotated("Region")})
    members = [server(n, family="prom", instance_arg="prom_instance") for n in ("p1", "p2")]
    view = view_of([(m, snap(m.name, tools=[upstream])) for m in members])
    route = view.tool_routes["x_prom_query"]
    assert dict(route.header_map) == {("region",): "Region", ("prom_instance",): "prom-instance"}
    assert {s: dict(t.header_map) for s, t in route.targets.items()} == {
        "p1": {("region",): "Region"}, "p2": {("region",): "Region"}}
    assert x_mcp_header_problem(view.tools[0]["inputSchema"]) is None
