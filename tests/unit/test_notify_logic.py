"""The pure half of the notification channel (catalog/notify.py): whose lists changed, filters, URI matching."""

from __future__ import annotations

from collections.abc import Sequence

from catalog.notify import Watch, changed_kinds, digest, honored_filter, listen_filter, uri_matches


def digests(tools: Sequence[str], prompts: Sequence[str] = (), resources: Sequence[str] = ()) -> dict[str, bytes]:
    return {"tools": digest({"name": t} for t in tools), "prompts": digest({"name": p} for p in prompts),
            "resources": digest({"uri": r} for r in resources)}


def test_a_list_that_moved_is_told_once_and_only_if_asked_for() -> None:
    watch = Watch(frozenset({"tools", "prompts"}), digests=digests(["a"], ["p"], ["r"]))
    assert changed_kinds(watch, digests(["a", "b"], ["p"], ["r2"]), {}, {}) == ["tools"]  # resources: not asked
    assert changed_kinds(watch, digests(["a", "b"], ["p"], ["r2"]), {}, {}) == []  # nothing moved since


def test_an_upstream_announcement_reaches_only_callers_who_see_that_upstream() -> None:
    now = digests(["a"])
    sees_it = Watch(frozenset({"tools"}), digests=dict(now))
    blind = Watch(frozenset({"tools"}), digests=dict(now))
    announced = {"tools": ["vendor"]}
    assert changed_kinds(sees_it, now, announced, {"tools": frozenset({"vendor"})}) == ["tools"]
    assert changed_kinds(blind, now, announced, {"tools": frozenset()}) == []


def test_digest_follows_order_and_content() -> None:
    assert digest([{"name": "a"}, {"name": "b"}]) != digest([{"name": "b"}, {"name": "a"}])
    assert digest([{"name": "a", "x": 1}]) == digest([{"x": 1, "name": "a"}])


def test_listen_filter_and_acknowledgement_shape() -> None:
    assert listen_filter({"toolsListChanged": True, "promptsListChanged": False}) == (frozenset({"tools"}), [])
    assert listen_filter({"resourceSubscriptions": ["u", "u"]}) == (frozenset(), ["u"])
    assert listen_filter({"resourceSubscriptions": "u"}) is None
    assert listen_filter(None) is None
    assert honored_filter({"tools", "resources"}, []) == {"toolsListChanged": True, "resourcesListChanged": True}
    assert honored_filter((), ["x+a+u://1"]) == {"resourceSubscriptions": ["x+a+u://1"]}


def test_resource_updates_match_the_uri_or_a_part_of_it() -> None:
    assert uri_matches({"x+v+vendor://docs/readme"}, "x+v+vendor://docs/readme")
    assert uri_matches({"x+v+vendor://docs"}, "x+v+vendor://docs/readme")
    assert not uri_matches({"x+v+vendor://doc"}, "x+v+vendor://docs/readme")
    assert not uri_matches(set(), "x+v+vendor://docs/readme")
