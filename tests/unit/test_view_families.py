"""Family collapse (Muster §2.2): one name per tool across members, the instance argument, and the fallbacks."""

from __future__ import annotations

import copy
from typing import Any

from catalog.view import build_view, x_mcp_header_problem
from tests.unit.factories import names, prompt, server, snap, tool, view_of

ARG = "management_cluster"
K8S_A = server("k8s-a", family="kubernetes", instance_arg=ARG)
K8S_B = server("k8s-b", family="kubernetes", instance_arg=ARG)


def injected(*members: str) -> dict[str, Any]:
    """Muster's injected property, to the byte."""
    return {"type": "string",
            "description": f"Target instance to execute this tool on. Available: {', '.join(members)}",
            "enum": list(members)}


def prop(tools: tuple[dict[str, Any], ...], name: str, arg: str = ARG) -> dict[str, Any]:
    found = {t["name"]: t for t in tools}[name]
    result: dict[str, Any] = found["inputSchema"]["properties"][arg]
    return result


def list_pods(description: str = "List pods") -> dict[str, Any]:
    return tool("list_pods", description, properties={"namespace": {"type": "string"}}, required=["namespace"])


def test_family_collapses_to_one_name_per_tool() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[list_pods()])), (K8S_B, snap("k8s-b", tools=[list_pods()]))])
    assert names(view.tools) == ["x_kubernetes_list_pods"]
    route = view.tool_routes["x_kubernetes_list_pods"]
    assert route.instance_arg == ARG
    assert route.single is None
    assert {s: (t.server, t.original) for s, t in route.targets.items()} == {
        "k8s-a": ("k8s-a", "list_pods"), "k8s-b": ("k8s-b", "list_pods")}


def test_handshake_era_tool_gets_musters_injected_property_exactly() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[list_pods()])), (K8S_B, snap("k8s-b", tools=[list_pods()]))])
    schema = view.legacy_tools[0]["inputSchema"]
    assert schema["properties"][ARG] == injected("k8s-a", "k8s-b")
    assert schema["properties"]["namespace"] == {"type": "string"}
    assert schema["required"] == ["namespace", ARG]
    assert schema["type"] == "object"


def test_modern_tool_gets_the_injected_property_mirrored_into_a_header() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[list_pods()])), (K8S_B, snap("k8s-b", tools=[list_pods()]))])
    schema = view.tools[0]["inputSchema"]
    assert schema["properties"][ARG] == {**injected("k8s-a", "k8s-b"), "x-mcp-header": "management-cluster"}
    assert schema["required"] == ["namespace", ARG]
    assert x_mcp_header_problem(schema) is None


def test_legacy_and_modern_lists_differ_only_in_the_injected_header() -> None:
    upstream = tool("q", "Q", properties={"region": {"type": "string", "x-mcp-header": "Region"}})
    view = view_of([(K8S_A, snap("k8s-a", tools=[upstream])), (K8S_B, snap("k8s-b", tools=[upstream])),
                    (server("solo"), snap("solo", tools=[upstream]))])
    assert names(view.legacy_tools) == names(view.tools) == ["x_kubernetes_q", "x_solo_q"]
    family_modern, solo_modern = view.tools
    family_legacy, solo_legacy = view.legacy_tools
    assert solo_legacy == solo_modern
    modern_props = family_modern["inputSchema"]["properties"]
    legacy_props = family_legacy["inputSchema"]["properties"]
    assert legacy_props["region"] == modern_props["region"] == {"type": "string", "x-mcp-header": "Region"}
    assert legacy_props[ARG] == {k: v for k, v in modern_props[ARG].items() if k != "x-mcp-header"}
    assert "x-mcp-header" in modern_props[ARG]


def test_injected_header_is_left_out_when_the_upstream_already_uses_the_token() -> None:
    upstream = tool("q", "Q", properties={"mc": {"type": "string", "x-mcp-header": "Management-Cluster"}})
    view = view_of([(K8S_A, snap("k8s-a", tools=[upstream])), (K8S_B, snap("k8s-b", tools=[upstream]))])
    assert prop(view.tools, "x_kubernetes_q") == injected("k8s-a", "k8s-b")
    assert x_mcp_header_problem(view.tools[0]["inputSchema"]) is None


def test_instance_description_names_a_unique_leading_part_as_an_accepted_form() -> None:
    members = [server(n, family="kubernetes", instance_arg=ARG) for n in ("prod-eu", "dev-us")]
    view = view_of([(m, snap(m.name, tools=[tool("get", "Get")])) for m in members])
    assert prop(view.tools, "x_kubernetes_get")["description"] == (
        "Target instance to execute this tool on. Available: dev-us, prod-eu. The leading part of a name also "
        "works when it names exactly one server (dev for dev-us)")
    assert prop(view.tools, "x_kubernetes_get")["enum"] == ["dev-us", "prod-eu"]


def test_handshake_era_family_of_one_keeps_musters_text_and_drops_only_the_header_annotation() -> None:
    """Muster's sentence starts the description; the accepted-forms hint follows (issue: bare names)."""
    view = view_of([(K8S_A, snap("k8s-a", tools=[tool("version", "Version")]))])
    legacy = prop(view.legacy_tools, "x_kubernetes_version")
    modern = prop(view.tools, "x_kubernetes_version")
    muster = injected("k8s-a")
    assert legacy["description"].startswith(muster["description"])
    assert "k8s for k8s-a" in legacy["description"]
    assert {k: v for k, v in legacy.items() if k != "description"} == {
        k: v for k, v in muster.items() if k != "description"}
    assert "x-mcp-header" not in legacy and modern["x-mcp-header"] == "management-cluster"


def test_family_tool_description_gets_the_trailer() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[list_pods()])), (K8S_B, snap("k8s-b", tools=[list_pods()]))])
    assert view.tools[0]["description"] == "List pods (available on servers: k8s-a, k8s-b)"


def test_existing_trailer_is_replaced_not_repeated() -> None:
    stale = list_pods("List pods (available on servers: old-1, old-2)")
    view = view_of([(K8S_A, snap("k8s-a", tools=[stale])), (K8S_B, snap("k8s-b", tools=[list_pods()]))])
    assert names(view.tools) == ["x_kubernetes_list_pods"]
    assert view.tools[0]["description"] == "List pods (available on servers: k8s-a, k8s-b)"


def test_family_of_one_still_requires_the_instance_argument() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[tool("version", "Version")]))])
    assert names(view.tools) == ["x_kubernetes_version"]
    for tools in (view.tools, view.legacy_tools):
        schema = tools[0]["inputSchema"]
        assert schema["properties"][ARG]["enum"] == ["k8s-a"]
        assert schema["properties"][ARG]["type"] == "string"
        assert schema["properties"][ARG]["description"].startswith(injected("k8s-a")["description"])
        assert schema["required"] == [ARG]
    assert view.tools[0]["description"] == "Version (available on servers: k8s-a)"
    assert view.tool_routes["x_kubernetes_version"].single is None


def test_family_tool_without_a_schema_gets_an_object_schema() -> None:
    bare = {"name": "ping", "description": "Ping"}
    view = view_of([(K8S_A, snap("k8s-a", tools=[bare])), (K8S_B, snap("k8s-b", tools=[bare]))])
    assert view.legacy_tools[0]["inputSchema"] == {"type": "object", "properties": {ARG: injected("k8s-a", "k8s-b")},
                                                   "required": [ARG]}


def test_family_tool_with_no_description_gets_only_the_trailer() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[tool("ping")]))])
    assert view.tools[0]["description"] == "(available on servers: k8s-a)"


def test_family_ignores_the_tool_prefix() -> None:
    a = server("k8s-a", tool_prefix="alpha", family="kubernetes", instance_arg=ARG)
    view = view_of([(a, snap("k8s-a", tools=[list_pods()]))])
    assert names(view.tools) == ["x_kubernetes_list_pods"]


def test_family_name_is_not_repeated_in_a_tool_that_already_has_it() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[tool("kubernetes_get")])),
                    (K8S_B, snap("k8s-b", tools=[tool("kubernetes_get")]))])
    assert names(view.tools) == ["x_kubernetes_get"]
    assert view.tool_routes["x_kubernetes_get"].targets["k8s-b"].original == "kubernetes_get"


def test_enum_and_schema_follow_server_name_order_not_input_order() -> None:
    first = tool("get", "Get", properties={"from_a": {"type": "string"}})
    second = tool("get", "Get", properties={"from_b": {"type": "integer"}})
    a, b = server("zeta-a", family="kubernetes", instance_arg=ARG), server("alpha-b", family="kubernetes",
                                                                          instance_arg=ARG)
    view = build_view([a, b], {"zeta-a": snap("zeta-a", tools=[first]), "alpha-b": snap("alpha-b", tools=[second])})
    schema = view.tools[0]["inputSchema"]
    assert schema["properties"][ARG]["enum"] == ["alpha-b", "zeta-a"]
    assert "from_b" in schema["properties"] and "from_a" not in schema["properties"]


def test_family_collapse_does_not_mutate_the_upstream_definitions() -> None:
    tools_a, tools_b = [list_pods()], [list_pods()]
    before = copy.deepcopy((tools_a, tools_b))
    view = view_of([(K8S_A, snap("k8s-a", tools=tools_a)), (K8S_B, snap("k8s-b", tools=tools_b))])
    assert (tools_a, tools_b) == before
    target = view.tool_routes["x_kubernetes_list_pods"].targets["k8s-a"]
    assert ARG not in target.definition["inputSchema"]["properties"]


def test_families_and_solo_servers_share_the_list_in_a_stable_order() -> None:
    view = view_of([(server("z"), snap("z", tools=[tool("get")])),
                    (K8S_A, snap("k8s-a", tools=[tool("b_tool"), tool("a_tool")])),
                    (server("a"), snap("a", tools=[tool("get")]))])
    assert names(view.tools) == ["x_a_get", "x_kubernetes_a_tool", "x_kubernetes_b_tool", "x_z_get"]


# ---- fallbacks ------------------------------------------------------------------------------------------------

def test_disagreeing_instance_arg_makes_the_whole_family_fall_back() -> None:
    a = server("k8s-a", family="kubernetes", instance_arg="cluster")
    b = server("k8s-b", family="kubernetes", instance_arg="mc")
    view = view_of([(a, snap("k8s-a", tools=[list_pods(), tool("logs")])), (b, snap("k8s-b", tools=[list_pods()]))])
    assert names(view.tools) == ["x_k8s-a_list_pods", "x_k8s-a_logs", "x_k8s-b_list_pods"]
    assert "x_kubernetes_list_pods" not in view.tool_routes
    assert all(r.instance_arg is None for r in view.tool_routes.values())
    assert "cluster" not in view.tools[0]["inputSchema"]["properties"]
    assert any("'kubernetes'" in p and "cluster, mc" in p for p in view.problems)


def test_fallback_of_a_whole_family_uses_each_members_tool_prefix() -> None:
    a = server("k8s-a", tool_prefix="alpha", family="kubernetes", instance_arg="cluster")
    b = server("k8s-b", family="kubernetes", instance_arg="mc")
    view = view_of([(a, snap("k8s-a", tools=[tool("get")])), (b, snap("k8s-b", tools=[tool("get")]))])
    assert names(view.tools) == ["x_alpha_get", "x_k8s-b_get"]


def test_tool_whose_description_differs_falls_back_alone() -> None:
    view = view_of([
        (K8S_A, snap("k8s-a", tools=[list_pods(), tool("logs", "Logs of a pod")])),
        (K8S_B, snap("k8s-b", tools=[list_pods(), tool("logs", "Logs of a container")])),
    ])
    assert sorted(names(view.tools)) == ["x_k8s-a_logs", "x_k8s-b_logs", "x_kubernetes_list_pods"]
    assert view.tool_routes["x_kubernetes_list_pods"].instance_arg == ARG
    solo = view.tool_routes["x_k8s-b_logs"].single
    assert solo is not None and (solo.server, solo.original) == ("k8s-b", "logs")
    assert ARG not in view.tool_routes["x_k8s-a_logs"].targets["k8s-a"].definition["inputSchema"]["properties"]
    assert any("'logs'" in p and "descriptions differ" in p for p in view.problems)


def test_tool_that_already_has_the_instance_property_falls_back_alone() -> None:
    clash = tool("exec", "Exec", properties={ARG: {"type": "integer"}})
    view = view_of([
        (K8S_A, snap("k8s-a", tools=[list_pods(), clash])),
        (K8S_B, snap("k8s-b", tools=[list_pods(), tool("exec", "Exec")])),
    ])
    assert sorted(names(view.tools)) == ["x_k8s-a_exec", "x_k8s-b_exec", "x_kubernetes_list_pods"]
    exposed = {t["name"]: t for t in view.tools}
    assert exposed["x_k8s-a_exec"]["inputSchema"]["properties"][ARG] == {"type": "integer"}
    assert any("'exec'" in p and ARG in p for p in view.problems)


def test_fallback_tools_are_prefixed_even_in_conditional_mode() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[tool("logs", "A")])),
                    (K8S_B, snap("k8s-b", tools=[tool("logs", "B")]))], mode="conditional")
    assert sorted(names(view.tools)) == ["x_k8s-a_logs", "x_k8s-b_logs"]


def test_conditional_mode_keeps_a_unique_family_tool_unprefixed() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[list_pods()])), (K8S_B, snap("k8s-b", tools=[list_pods()]))],
                   mode="conditional")
    assert names(view.tools) == ["list_pods"]
    assert view.tool_routes["list_pods"].instance_arg == ARG


def test_conditional_mode_prefixes_a_family_tool_that_a_solo_server_also_offers() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[list_pods()])), (server("ops"), snap("ops", tools=[list_pods()]))],
                   mode="conditional")
    assert sorted(names(view.tools)) == ["x_kubernetes_list_pods", "x_ops_list_pods"]


# ---- membership follows the snapshots --------------------------------------------------------------------------

def test_member_that_stops_offering_a_tool_shrinks_the_enum() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[list_pods(), tool("logs")])),
                    (K8S_B, snap("k8s-b", tools=[list_pods()]))])
    exposed = {t["name"]: t for t in view.tools}
    assert exposed["x_kubernetes_logs"]["inputSchema"]["properties"][ARG]["enum"] == ["k8s-a"]
    assert exposed["x_kubernetes_list_pods"]["inputSchema"]["properties"][ARG]["enum"] == ["k8s-a", "k8s-b"]
    assert set(view.tool_routes["x_kubernetes_logs"].targets) == {"k8s-a"}


def test_failed_member_leaves_the_family() -> None:
    view = view_of([(K8S_A, snap("k8s-a", tools=[list_pods()])), (K8S_B, snap("k8s-b", ok=False))])
    assert prop(view.tools, "x_kubernetes_list_pods")["enum"] == ["k8s-a"]
    assert "k8s-b" not in prop(view.tools, "x_kubernetes_list_pods")["description"]
    assert view.tools[0]["description"] == "List pods (available on servers: k8s-a)"
    assert set(view.tool_routes["x_kubernetes_list_pods"].targets) == {"k8s-a"}


def test_two_families_stay_apart() -> None:
    p1 = server("prom-1", family="prometheus", instance_arg="instance")
    view = view_of([(K8S_A, snap("k8s-a", tools=[tool("query")])), (p1, snap("prom-1", tools=[tool("query")]))])
    assert sorted(names(view.tools)) == ["x_kubernetes_query", "x_prometheus_query"]
    assert view.tool_routes["x_prometheus_query"].instance_arg == "instance"


# ---- prompts ---------------------------------------------------------------------------------------------------

def test_family_prompt_gets_an_extra_required_argument() -> None:
    upstream = prompt("triage", "Triage", [{"name": "pod", "required": True}])
    view = view_of([(K8S_A, snap("k8s-a", prompts=[upstream])), (K8S_B, snap("k8s-b", prompts=[upstream]))])
    assert names(view.prompts) == ["x_kubernetes_triage"]
    exposed = view.prompts[0]
    assert exposed["arguments"] == [
        {"name": "pod", "required": True},
        {"name": ARG, "description": "Target instance to execute this tool on. Available: k8s-a, k8s-b",
         "required": True},
    ]
    assert exposed["description"] == "Triage (available on servers: k8s-a, k8s-b)"
    assert view.prompt_routes["x_kubernetes_triage"].instance_arg == ARG
    assert upstream["arguments"] == [{"name": "pod", "required": True}]


def test_family_prompt_with_the_instance_argument_falls_back() -> None:
    clash = prompt("triage", "Triage", [{"name": ARG}])
    view = view_of([(K8S_A, snap("k8s-a", prompts=[clash])), (K8S_B, snap("k8s-b", prompts=[prompt("triage",
                                                                                                     "Triage")]))])
    assert sorted(names(view.prompts)) == ["x_k8s-a_triage", "x_k8s-b_triage"]
