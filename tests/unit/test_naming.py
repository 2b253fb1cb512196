"""Exposed names and URIs: Muster's prefix rule, URI slugs, and RFC 6570 template matchers."""

from __future__ import annotations

import pytest

from catalog.naming import expose_uri, exposed_name, split_exposed_uri, template_regex, uri_slug


@pytest.mark.parametrize(("server_prefix", "name", "expected"), [
    ("kubernetes-mock", "get_pods", "x_kubernetes-mock_get_pods"),
    ("kubernetes", "kubernetes_get", "x_kubernetes_get"),
    ("kubernetes", "kubernetes_get_kubernetes_pods", "x_kubernetes_get_kubernetes_pods"),
    ("kubernetes", "kubernetesget", "x_kubernetes_kubernetesget"),
    ("kubernetes", "kubernetes", "x_kubernetes_kubernetes"),
    ("kubernetes", "Kubernetes_get", "x_kubernetes_Kubernetes_get"),
    ("k8s", "x_k8s_get", "x_k8s_x_k8s_get"),
])
def test_exposed_name_follows_musters_rule(server_prefix: str, name: str, expected: str) -> None:
    assert exposed_name("x", server_prefix, name) == expected


def test_tool_named_exactly_the_server_prefix_and_underscore_keeps_its_name() -> None:
    # Stripping would leave an empty remainder ("x_kubernetes_"); the name is kept whole instead.
    assert exposed_name("x", "kubernetes", "kubernetes_") == "x_kubernetes_kubernetes_"


def test_exposed_name_uses_the_given_gateway_prefix() -> None:
    assert exposed_name("muster", "k8s", "get") == "muster_k8s_get"


@pytest.mark.parametrize(("server_prefix", "slug"), [
    ("k8s", "k8s"),
    ("Kube_Prod", "kube-prod"),
    ("a.b-c", "a.b-c"),
    ("a+b c", "a-b-c"),
])
def test_uri_slug_keeps_only_lowercase_letters_digits_dot_and_dash(server_prefix: str, slug: str) -> None:
    assert uri_slug(server_prefix) == slug


def test_expose_uri_puts_prefix_and_slug_in_front() -> None:
    assert expose_uri("x", "k8s", "file:///etc/hosts") == "x+k8s+file:///etc/hosts"


@pytest.mark.parametrize("uri", ["file:///etc/hosts", "db://users/{id}", "plain", "a+b+c://x", "x+other+y://z",
                                 "ünïcode://ä"])
def test_split_exposed_uri_inverts_expose_uri(uri: str) -> None:
    assert split_exposed_uri("x", expose_uri("x", "my-srv.1", uri)) == ("my-srv.1", uri)


@pytest.mark.parametrize("uri", ["file:///x", "y+k8s+file:///x", "x+k8s", "x+k8s+", "x++file:///x", "x+", "xk8s+a"])
def test_split_exposed_uri_refuses_what_was_not_prefixed(uri: str) -> None:
    assert split_exposed_uri("x", uri) is None


@pytest.mark.parametrize(("template", "uri", "matches"), [
    ("db://tables/{table}", "db://tables/users", True),
    ("db://tables/{table}", "db://tables/", True),
    ("db://tables/{table}", "db://tables/users/rows", False),
    ("db://tables/{table}", "db://tables/users?x=1", False),
    ("db://tables/{table}", "db://other/users", False),
    ("file://{+path}", "file:///etc/hosts", True),
    ("file://{+path}", "file://a/b?c#d", True),
    ("search://q{?a,b}", "search://q", True),
    ("search://q{?a,b}", "search://q?a=1&b=2", True),
    ("search://q{?a,b}", "search://q/extra", False),
    ("search://q{?a}{&b}", "search://q?a=1&b=2", True),
    ("fs://root{/path}", "fs://root", True),
    ("fs://root{/path}", "fs://root/a/b", True),
    ("fs://root{/path}", "fs://rootx", False),
    ("fs://root{/path}", "fs://root/a?q", False),
    ("a.b://x/{id}.json", "a.b://x/7.json", True),
    ("a.b://x/{id}.json", "aXb://x/7.json", False),
    ("a.b://x/{id}.json", "a.b://x/7Xjson", False),
    ("res://{a}/{b}", "res://1/2", True),
    ("res://{a}/{b}", "res://1/2/3", False),
    ("static://no-vars", "static://no-vars", True),
    ("static://no-vars", "static://no-vars/", False),
])
def test_template_regex_matches_uris_the_template_can_produce(template: str, uri: str, matches: bool) -> None:
    assert (template_regex(template).match(uri) is not None) is matches


def test_template_regex_is_anchored_at_the_very_end() -> None:
    assert template_regex("static://no-vars").match("static://no-vars\n") is None
    assert template_regex("db://t/{id}/x").match("db://t/1/x\n") is None
