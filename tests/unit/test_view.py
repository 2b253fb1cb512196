"""The merged view: prefix modes, deterministic order, failed upstreams, URIs, TTL and fingerprint."""

from __future__ import annotations

import copy
import itertools

import pytest

from catalog.manifests import MCPServer
from catalog.view import UpstreamSnapshot, View, build_view
from tests.unit.factories import names, prompt, server, snap, tool, view_of

A, B, C = server("a"), server("b"), server("c")


# ---- prefix modes ------------------------------------------------------------------------------------------

def test_always_prefixes_every_tool_with_the_server_prefix() -> None:
    view = view_of([(A, snap("a", tools=[tool("get")])), (B, snap("b", tools=[tool("get"), tool("put")]))])
    assert names(view.tools) == ["x_a_get", "x_b_get", "x_b_put"]
    assert view.problems == ()


def test_always_uses_the_tool_prefix_instead_of_the_server_name() -> None:
    view = view_of([(server("kubernetes-prod", tool_prefix="k8s"), snap("kubernetes-prod", tools=[tool("get")]))])
    assert names(view.tools) == ["x_k8s_get"]
    route = view.tool_routes["x_k8s_get"]
    assert route.single is not None
    assert (route.single.server, route.single.original) == ("kubernetes-prod", "get")


def test_always_does_not_repeat_a_prefix_the_tool_already_has() -> None:
    view = view_of([(server("kubernetes"), snap("kubernetes", tools=[tool("kubernetes_get"), tool("list")]))])
    assert names(view.tools) == ["x_kubernetes_get", "x_kubernetes_list"]
    single = view.tool_routes["x_kubernetes_get"].single
    assert single is not None and single.original == "kubernetes_get"


def test_the_gateway_prefix_is_configurable() -> None:
    view = view_of([(A, snap("a", tools=[tool("get")]))], prefix="muster")
    assert names(view.tools) == ["muster_a_get"]


def test_conditional_prefixes_only_colliding_names() -> None:
    view = view_of([(A, snap("a", tools=[tool("get"), tool("only_a")])),
                    (B, snap("b", tools=[tool("get"), tool("only_b")]))], mode="conditional")
    assert sorted(names(view.tools)) == ["only_a", "only_b", "x_a_get", "x_b_get"]
    only_a = view.tool_routes["only_a"].single
    assert only_a is not None and (only_a.server, only_a.original) == ("a", "only_a")
    get_b = view.tool_routes["x_b_get"].single
    assert get_b is not None and (get_b.server, get_b.original) == ("b", "get")


def test_conditional_applies_to_prompts_too() -> None:
    view = view_of([(A, snap("a", prompts=[prompt("summarise"), prompt("solo")])),
                    (B, snap("b", prompts=[prompt("summarise")]))], mode="conditional")
    assert sorted(names(view.prompts)) == ["solo", "x_a_summarise", "x_b_summarise"]
    assert set(view.prompt_routes) == {"solo", "x_a_summarise", "x_b_summarise"}


def test_never_keeps_unique_names_as_they_are() -> None:
    view = view_of([(A, snap("a", tools=[tool("get")])), (B, snap("b", tools=[tool("put")]))], mode="never")
    assert names(view.tools) == ["get", "put"]
    assert view.problems == ()


def test_never_refuses_a_collision_naming_both_servers() -> None:
    view = view_of([(A, snap("a", tools=[tool("get"), tool("mine")])), (B, snap("b", tools=[tool("get")]))],
                   mode="never")
    assert names(view.tools) == ["mine"]
    assert "get" not in view.tool_routes
    assert len(view.problems) == 1
    problem = view.problems[0]
    assert "'get'" in problem and "(a, b)" in problem and "never" in problem


def test_never_refuses_a_prompt_collision_too() -> None:
    view = view_of([(A, snap("a", prompts=[prompt("p")])), (B, snap("b", prompts=[prompt("p")]))], mode="never")
    assert view.prompts == () and view.prompt_routes == {}
    assert any("prompt name 'p'" in p and "(a, b)" in p for p in view.problems)


def test_always_refuses_two_servers_with_the_same_tool_prefix() -> None:
    view = view_of([(server("a", tool_prefix="k8s"), snap("a", tools=[tool("get")])),
                    (server("b", tool_prefix="k8s"), snap("b", tools=[tool("get"), tool("other")]))])
    assert names(view.tools) == ["x_k8s_other"]
    assert any("'x_k8s_get'" in p and "(a, b)" in p for p in view.problems)


def test_conditional_refuses_an_unprefixed_name_equal_to_a_prefixed_one() -> None:
    view = view_of([(A, snap("a", tools=[tool("get")])), (B, snap("b", tools=[tool("get")])),
                    (C, snap("c", tools=[tool("x_a_get")]))], mode="conditional")
    assert names(view.tools) == ["x_b_get"]
    assert any("'x_a_get'" in p and "(a, c)" in p for p in view.problems)


def test_tool_definition_keeps_upstream_fields_under_the_exposed_name() -> None:
    upstream = tool("get", "Get a thing", properties={"id": {"type": "string"}}, required=["id"])
    upstream["annotations"] = {"readOnlyHint": True}
    view = view_of([(A, snap("a", tools=[upstream]))])
    exposed = view.tools[0]
    assert exposed == {**upstream, "name": "x_a_get"}
    single = view.tool_routes["x_a_get"].single
    assert single is not None and single.definition == upstream


# ---- order and determinism ----------------------------------------------------------------------------------

def test_tools_are_ordered_by_server_name_then_upstream_order() -> None:
    view = view_of([(B, snap("b", tools=[tool("zz"), tool("aa")])), (A, snap("a", tools=[tool("m"), tool("b")]))])
    assert names(view.tools) == ["x_a_m", "x_a_b", "x_b_zz", "x_b_aa"]
    assert view.servers == ("a", "b")


def _fleet() -> list[tuple[MCPServer, UpstreamSnapshot]]:
    fam_a = server("k8s-a", family="kubernetes")
    fam_b = server("k8s-b", family="kubernetes")
    return [
        (A, snap("a", tools=[tool("get"), tool("put")], prompts=[prompt("p")],
                 resources=[{"uri": "file:///a", "name": "a"}], templates=[{"uriTemplate": "db://{t}", "name": "t"}])),
        (B, snap("b", tools=[tool("get")], prompts=[prompt("p")], resources=[{"uri": "file:///a", "name": "b"}])),
        (C, snap("c", tools=[tool("solo")], templates=[{"uriTemplate": "mem://{k}", "name": "k"}])),
        (fam_a, snap("k8s-a", tools=[tool("list_pods", "List"), tool("odd", "A")], prompts=[prompt("p")])),
        (fam_b, snap("k8s-b", tools=[tool("list_pods", "List"), tool("odd", "B")])),
        (server("down"), snap("down", ok=False)),
    ]


@pytest.mark.parametrize("mode", ["always", "conditional", "never"])
def test_view_is_the_same_whatever_the_input_order(mode: str) -> None:
    fleet = _fleet()
    reference: View | None = None
    for perm in itertools.islice(itertools.permutations(fleet), 0, None, 37):
        servers = [s for s, _ in perm]
        for snap_order in (perm, tuple(reversed(perm))):
            snapshots = {s.name: sn for s, sn in snap_order}
            view = build_view(servers, snapshots, mode=mode)
            if reference is None:
                reference = view
                continue
            assert view.tools == reference.tools
            assert view.prompts == reference.prompts
            assert view.resources == reference.resources
            assert view.templates == reference.templates
            assert list(view.tool_routes) == list(reference.tool_routes)
            assert view.problems == reference.problems
            assert view.fingerprint == reference.fingerprint
            assert view.servers == reference.servers


# ---- failed and missing upstreams ---------------------------------------------------------------------------

def test_failed_snapshot_is_left_out() -> None:
    failed = UpstreamSnapshot(server="b", ok=False, error="boom", tools=({"name": "get"},), ttl_ms=5,
                              resources=({"uri": "file:///b"},), generation=3)
    view = build_view([A, B], {"a": snap("a", tools=[tool("get")]), "b": failed}, mode="conditional")
    assert names(view.tools) == ["get"]
    assert view.servers == ("a",)
    assert view.resources == ()
    assert view.ttl_ms == 60_000


def test_server_without_a_snapshot_is_left_out() -> None:
    view = build_view([A, B], {"a": snap("a", tools=[tool("get")])})
    assert names(view.tools) == ["x_a_get"] and view.servers == ("a",)


def test_snapshot_of_a_server_not_in_the_catalog_is_ignored() -> None:
    view = build_view([A], {"a": snap("a", tools=[tool("get")]), "ghost": snap("ghost", tools=[tool("boo")])})
    assert names(view.tools) == ["x_a_get"] and view.servers == ("a",)


def test_empty_fleet_gives_an_empty_view() -> None:
    view = build_view([], {})
    assert (view.tools, view.prompts, view.resources, view.templates, view.servers) == ((), (), (), (), ())
    assert set(view.capabilities) == {"tools", "prompts", "resources"}


def test_build_view_does_not_mutate_the_snapshots() -> None:
    fleet = _fleet()
    before = copy.deepcopy([sn for _, sn in fleet])
    for mode in ("always", "conditional", "never"):
        build_view([s for s, _ in fleet], {s.name: sn for s, sn in fleet}, mode=mode)
    assert [sn for _, sn in fleet] == before


# ---- resources and templates ---------------------------------------------------------------------------------

def _uri_view(mode: str) -> View:
    return view_of([
        (A, snap("a", resources=[{"uri": "file:///etc/hosts", "name": "hosts"}],
                 templates=[{"uriTemplate": "db://tables/{table}", "name": "table"}])),
        (server("b", tool_prefix="B_Prod"), snap("b", resources=[{"uri": "mem://notes", "name": "notes"}])),
    ], mode=mode)


def test_always_prefixes_resource_uris_and_templates() -> None:
    view = _uri_view("always")
    assert [r["uri"] for r in view.resources] == ["x+a+file:///etc/hosts", "x+b-prod+mem://notes"]
    assert [t["uriTemplate"] for t in view.templates] == ["x+a+db://tables/{table}"]
    assert view.resources[0]["name"] == "hosts"
    assert dict(view.uri_slug_of) == {"a": "a", "b": "b-prod"}


def test_resolve_uri_of_a_prefixed_uri() -> None:
    view = _uri_view("always")
    assert view.resolve_uri("x+a+file:///etc/hosts") == ("a", "file:///etc/hosts")
    assert view.resolve_uri("x+b-prod+mem://notes") == ("b", "mem://notes")
    assert view.resolve_uri("x+a+db://tables/users") == ("a", "db://tables/users")


def test_resolve_uri_of_a_prefixed_uri_with_an_unknown_slug_is_none() -> None:
    assert _uri_view("always").resolve_uri("x+nobody+file:///etc/hosts") is None


def test_resolve_uri_does_not_accept_the_bare_uri_when_prefixed() -> None:
    assert _uri_view("always").resolve_uri("file:///etc/hosts") is None


@pytest.mark.parametrize("uri", ["file:///etc/hosts", "mem://notes", "db://tables/x", "a b c", "ünï://x"])
def test_client_uri_and_resolve_uri_round_trip_when_prefixed(uri: str) -> None:
    view = _uri_view("always")
    for srv in ("a", "b"):
        assert view.resolve_uri(view.client_uri(srv, uri)) == (srv, uri)


def test_conditional_keeps_unique_uris_unprefixed() -> None:
    view = _uri_view("conditional")
    assert [r["uri"] for r in view.resources] == ["file:///etc/hosts", "mem://notes"]
    assert [t["uriTemplate"] for t in view.templates] == ["db://tables/{table}"]
    assert dict(view.uri_slug_of) == {}


def test_resolve_uri_of_an_unprefixed_exact_uri() -> None:
    view = _uri_view("conditional")
    assert view.resolve_uri("file:///etc/hosts") == ("a", "file:///etc/hosts")
    assert view.resolve_uri("mem://notes") == ("b", "mem://notes")


def test_resolve_uri_of_an_unprefixed_template_match() -> None:
    view = _uri_view("never")
    assert view.resolve_uri("db://tables/users") == ("a", "db://tables/users")


def test_resolve_uri_of_an_unknown_uri_is_none() -> None:
    view = _uri_view("conditional")
    assert view.resolve_uri("file:///etc/passwd") is None
    assert view.resolve_uri("db://tables/users/rows") is None


def test_client_uri_of_an_unprefixed_server_is_the_upstream_uri() -> None:
    view = _uri_view("conditional")
    assert view.client_uri("a", "file:///etc/hosts") == "file:///etc/hosts"
    assert view.client_uri("unknown", "file:///x") == "file:///x"


def test_conditional_prefixes_every_uri_of_servers_that_share_one() -> None:
    view = view_of([
        (A, snap("a", resources=[{"uri": "file:///shared"}, {"uri": "file:///a-only"}])),
        (B, snap("b", resources=[{"uri": "file:///shared"}])),
        (C, snap("c", resources=[{"uri": "file:///c-only"}])),
    ], mode="conditional")
    assert [r["uri"] for r in view.resources] == [
        "x+a+file:///shared", "x+a+file:///a-only", "x+b+file:///shared", "file:///c-only"]
    assert view.resolve_uri("x+b+file:///shared") == ("b", "file:///shared")
    assert view.resolve_uri("file:///shared") is None
    assert view.problems == ()


def test_conditional_counts_a_template_equal_to_another_servers_template_as_shared() -> None:
    view = view_of([(A, snap("a", templates=[{"uriTemplate": "db://{t}"}])),
                    (B, snap("b", templates=[{"uriTemplate": "db://{t}"}]))], mode="conditional")
    assert [t["uriTemplate"] for t in view.templates] == ["x+a+db://{t}", "x+b+db://{t}"]


def test_never_leaves_out_the_resources_of_servers_that_collide() -> None:
    view = view_of([
        (A, snap("a", resources=[{"uri": "file:///shared"}, {"uri": "file:///a-only"}])),
        (B, snap("b", resources=[{"uri": "file:///shared"}])),
        (C, snap("c", resources=[{"uri": "file:///c-only"}])),
    ], mode="never")
    assert [r["uri"] for r in view.resources] == ["file:///c-only"]
    assert view.resolve_uri("file:///a-only") is None
    assert len(view.problems) == 2
    assert all("file:///shared" in p for p in view.problems)


def test_servers_with_the_same_uri_slug_keep_only_the_first() -> None:
    view = view_of([(server("a-b"), snap("a-b", resources=[{"uri": "file:///1"}])),
                    (server("c", tool_prefix="A_B"), snap("c", resources=[{"uri": "file:///2"}]))])
    assert [r["uri"] for r in view.resources] == ["x+a-b+file:///1"]
    assert view.resolve_uri("x+a-b+file:///1") == ("a-b", "file:///1")
    assert any("'a-b'" in p and "'c'" in p for p in view.problems)


def test_ambiguous_unprefixed_template_match_resolves_to_none() -> None:
    view = view_of([(A, snap("a", templates=[{"uriTemplate": "db://{table}"}])),
                    (B, snap("b", templates=[{"uriTemplate": "db://{+path}"}]))], mode="never")
    assert view.resolve_uri("db://users") is None
    assert view.resolve_uri("db://users/rows") == ("b", "db://users/rows")


def test_literal_template_text_resolves_to_its_server_when_unprefixed() -> None:
    view = _uri_view("conditional")
    assert view.resolve_uri("db://tables/{table}") == ("a", "db://tables/{table}")


# ---- ttl, capabilities, fingerprint ---------------------------------------------------------------------------

def test_ttl_is_the_smallest_of_the_default_and_every_live_snapshot() -> None:
    view = view_of([(A, snap("a", ttl_ms=30_000)), (B, snap("b", ttl_ms=12_000)), (C, snap("c"))])
    assert view.ttl_ms == 12_000


def test_ttl_is_the_default_when_no_upstream_gives_one() -> None:
    assert view_of([(A, snap("a"))], default_ttl_ms=7_000).ttl_ms == 7_000


def test_ttl_is_capped_by_the_default() -> None:
    assert view_of([(A, snap("a", ttl_ms=120_000))], default_ttl_ms=60_000).ttl_ms == 60_000


def test_zero_ttl_from_an_upstream_wins() -> None:
    assert view_of([(A, snap("a", ttl_ms=0)), (B, snap("b", ttl_ms=500))]).ttl_ms == 0


def test_negative_ttl_is_clamped_to_zero() -> None:
    assert view_of([(A, snap("a", ttl_ms=-5))]).ttl_ms == 0


def test_completions_capability_only_when_an_upstream_has_it() -> None:
    without = view_of([(A, snap("a")), (B, snap("b", capabilities={"tools": {}}))])
    with_it = view_of([(A, snap("a")), (B, snap("b", capabilities={"completions": {}}))])
    assert "completions" not in without.capabilities
    assert with_it.capabilities["completions"] == {}
    assert {"tools", "prompts", "resources"} <= set(with_it.capabilities)


def test_completions_of_a_failed_upstream_do_not_count() -> None:
    view = build_view([A], {"a": UpstreamSnapshot(server="a", ok=False, capabilities={"completions": {}})})
    assert "completions" not in view.capabilities


def _fp(gen_a: int = 1, gen_b: int = 1, *, tools_b: tuple[str, ...] = ("get",), b_ok: bool = True,
        prefix: str = "x", mode: str = "always") -> int:
    return view_of([(A, snap("a", tools=[tool("get")], generation=gen_a)),
                    (B, snap("b", tools=[tool(n) for n in tools_b], generation=gen_b, ok=b_ok))],
                   prefix=prefix, mode=mode).fingerprint


def test_fingerprint_is_stable_for_the_same_inputs() -> None:
    assert _fp() == _fp()


def test_fingerprint_changes_when_a_generation_changes() -> None:
    assert _fp(gen_a=2) != _fp()
    assert _fp(gen_b=2) != _fp()
    assert _fp(gen_a=2, gen_b=1) != _fp(gen_a=1, gen_b=2)


def test_fingerprint_does_not_change_with_content_under_the_same_generation() -> None:
    assert _fp(tools_b=("other", "more")) == _fp()


def test_fingerprint_changes_when_a_server_fails() -> None:
    assert _fp(b_ok=False) != _fp()


def test_fingerprint_changes_with_prefix_or_mode() -> None:
    assert _fp(prefix="y") != _fp()
    assert _fp(mode="never") != _fp()
