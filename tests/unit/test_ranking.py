"""filter_tools ranking (Muster's BM25F). Expected scores come from the §4.2 formula written out here with
hand-counted term frequencies and field lengths, not from the code under test."""

from __future__ import annotations

import math

import pytest

from catalog.ranking import Doc, first_line, glob_regex, rank, round_score, tokenize

DOCS = [
    Doc("x_kubernetes_get_pods", "Get pods in a namespace"),            # name 4 tokens, description 5
    Doc("x_kubernetes_list", "List objects of a kind"),                 # 3, 5
    Doc("x_prometheus_query", "Run a PromQL query"),                    # 3, 5 (run a prom ql query)
    Doc("x_prometheus_list_alerts", "List firing alerts"),              # 4, 3
]
AVG_NAME = (4 + 3 + 3 + 4) / 4
AVG_DESC = (5 + 5 + 5 + 3) / 4
N = 4


def idf(df: int) -> float:
    return math.log(1 + (N - df + 0.5) / (df + 0.5))


def norm(tf: int, length: int, avg: float) -> float:
    return 0.0 if tf == 0 else tf / (1 - 0.75 + 0.75 * length / avg)


def term(df: int, name: tuple[int, int], desc: tuple[int, int], stop: bool = False) -> float:
    """One query term's contribution: (tf, field length) for the name (weight 3) and the description (weight 1)."""
    weighted = 3.0 * norm(name[0], name[1], AVG_NAME) + 1.0 * norm(desc[0], desc[1], AVG_DESC)
    value = idf(df) * weighted * (1.5 + 1) / (weighted + 1.5)
    return value * 0.25 if stop else value


def scores(query: str) -> list[tuple[str, float]]:
    return [(DOCS[i].name, round_score(s)) for i, s in rank(query, DOCS)]


def test_tokenizer_splits_snake_kebab_and_camel_case() -> None:
    assert tokenize("x_kubernetes_get_pods") == ["x", "kubernetes", "get", "pods"]
    assert tokenize("ListPods") == ["list", "pods"]
    assert tokenize("Run a PromQL query") == ["run", "a", "prom", "ql", "query"]
    assert tokenize("cluster-a-k8s v2") == ["cluster", "a", "k8s", "v2"]


def test_a_discriminating_noun_beats_the_stop_verb() -> None:
    pods = term(1, (1, 4), (1, 5))
    list_1 = term(2, (1, 3), (1, 5), stop=True)
    list_3 = term(2, (1, 4), (1, 3), stop=True)
    assert list_1 > list_3  # the shorter fields of x_kubernetes_list weigh more
    assert scores("list pods") == [("x_kubernetes_get_pods", round(pods, 4)),
                                   ("x_kubernetes_list", round(list_1, 4)),
                                   ("x_prometheus_list_alerts", round(list_3, 4))]


def test_name_matches_weigh_three_times_description_matches() -> None:
    # "prometheus" is in two names; "query" in doc 2's name and description; "alerts" in doc 3's name and description
    query = term(1, (1, 3), (1, 5))
    alerts = term(1, (1, 4), (1, 3))
    prometheus_2 = term(2, (1, 3), (0, 5))
    prometheus_3 = term(2, (1, 4), (0, 3))
    expected = sorted([("x_prometheus_query", round(query + prometheus_2, 4)),
                       ("x_prometheus_list_alerts", round(alerts + prometheus_3, 4))], key=lambda e: -e[1])
    assert scores("prometheus query alerts") == expected


def test_only_matching_documents_are_kept_in_stable_order() -> None:
    # "kubernetes" scores both kubernetes tools; the shorter name (x_kubernetes_list) ranks first
    assert [n for n, _ in scores("kubernetes")] == ["x_kubernetes_list", "x_kubernetes_get_pods"]
    assert scores("nothing-matches") == []
    assert scores("   ") == []
    equal = [Doc("a_same", "d"), Doc("b_same", "d")]
    assert [i for i, _ in rank("same", equal)] == [0, 1]


def test_scores_round_to_four_decimals_and_never_to_zero() -> None:
    assert round_score(1.23456) == 1.2346
    assert round_score(0.00001) == 0.0001
    assert round_score(0.0) == 0.0


def test_summary_is_the_first_line_capped_at_120_runes() -> None:
    assert first_line("  one line  \nsecond") == "one line"
    assert first_line("é" * 130, 120) == "é" * 120 + "..."


@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("core*", "core_events", True), ("*pods", "x_kubernetes_get_pods", True), ("x_?_list", "x_k_list", True),
    ("[a-c]*", "b_tool", True), ("[^a-c]*", "b_tool", False), ("CORE*", "core_events", True),
    ("*", "a/b", False),
])
def test_globs_follow_go_filepath_match(pattern: str, name: str, matches: bool) -> None:
    assert bool(glob_regex(pattern).match(name)) == matches


@pytest.mark.parametrize("pattern", ["[", "a[b", "[]", "\\"])
def test_bad_globs_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="syntax error in pattern"):
        glob_regex(pattern)
