"""Muster's template subset: Go text/template actions, the allowed functions, Go's printing, typed references."""

from __future__ import annotations

from typing import Any

import pytest

from catalog.templates import TemplateError, check, go_float, parse, render_arg, render_args, render_output

DATA: dict[str, Any] = {
    "input": {"name": "web", "n": 3, "items": ["a", "b"], "flag": True, "m": {"k": 1}, "empty": "", "none": []},
    "results": {"s1": {"pods": [{"name": "p1"}, {"name": "p2"}], "ok": True, "count": 1000000}},
    "vars": {"item": "x", "item_index": 0},
}
DATA["context"] = DATA["results"]


@pytest.mark.parametrize(("src", "want"), [
    ("plain text", "plain text"),
    ("{{ .input.name }}-{{ .input.n }}", "web-3"),
    ('{{ if eq .input.name "web" }}yes{{ else }}no{{ end }}', "yes"),
    ('{{ if eq .input.name "x" }}a{{ else if eq .input.n 3 }}b{{ else }}c{{ end }}', "b"),
    ("{{ range $i, $e := .input.items }}{{ $i }}={{ $e }};{{ end }}", "0=a;1=b;"),
    ("{{ range .input.items }}[{{ . }}]{{ else }}none{{ end }}", "[a][b]"),
    ("{{ range .input.none }}x{{ else }}none{{ end }}", "none"),
    ("{{ with .results.s1 }}{{ len .pods }}{{ end }}", "2"),
    ('{{ .input.items | join "," }}', "a,b"),
    ("{{ toJson .input.m }}", '{"k":1}'),
    ('{{ printf "%s has %d" .input.name .input.n }}', "web has 3"),
    ("{{ .results.s1.count }}", "1e+06"),
    ('{{ default "dflt" .input.empty }}', "dflt"),
    ('{{ .input.empty | default "dflt" }}', "dflt"),
    ('{{ (split "," "a,b")._1 }}', "b"),
    ("{{ quote .input.name }}", '"web"'),
    ("{{ upper .input.name }} {{ lower \"AB\" }} {{ trim \"  x \" }}", "WEB ab x"),
    ('{{ if and (gt .input.n 2) (not false) }}big{{ end }}', "big"),
    ('{{ if or (lt .input.n 2) (ge .input.n 3) }}ok{{ end }}', "ok"),
    ('{{ if ne .input.n 4 }}ok{{ end }}{{ if le 1 2 }}!{{ end }}', "ok!"),
    ("{{ index .input.items 1 }}", "b"),
    ('{{ index .results.s1.pods 0 "name" }}', "p1"),
    ('{{ dict "a" 1 "b" (list 1 2) | toJson }}', '{"a":1,"b":[1,2]}'),
    ('{{ (fromJson "{\\"a\\": 2}").a }}', "2"),
    ('{{ if contains "e" .input.name }}c{{ end }}{{ if hasPrefix "w" .input.name }}p{{ end }}'
     '{{ if hasSuffix "b" .input.name }}s{{ end }}', "cps"),
    ("{{- .input.name -}}  \n x", "webx"),
    ("{{/* a comment */}}ok", "ok"),
    ("m={{ .input.m }}", "m=map[k:1]"),
    ("i={{ .input.items }}", "i=[a b]"),
    ("{{ .vars.item }}-{{ .vars.item_index }}", "x-0"),
])
def test_renders_like_go(src: str, want: str) -> None:
    assert render_output(src, DATA) == want or render_arg(src, DATA) == want


def test_single_references_keep_their_type() -> None:
    assert render_arg("{{ .input.n }}", DATA) == 3
    assert render_arg("{{.input.items}}", DATA) == ["a", "b"]
    assert render_arg("{{ .input.m }}", DATA) == {"k": 1}
    assert render_arg("{{ .results.s1 }}", DATA) is DATA["results"]["s1"]
    assert render_arg("{{ .vars.item_index }}", DATA) == 0
    # deeper paths are rendered text in arguments, except true/false which become booleans
    assert render_arg("{{ .results.s1.count }}", DATA) == "1e+06"
    assert render_arg("{{ .results.s1.ok }}", DATA) is True
    assert render_arg("n={{ .input.n }}", DATA) == "n=3"


def test_output_keeps_types_at_any_depth_and_for_one_action() -> None:
    out = render_output({"pods": "{{ .results.s1.pods }}", "n": "{{ len .results.s1.pods }}",
                         "text": "{{ .input.name }} has {{ len .results.s1.pods }}", "lit": 5,
                         "nested": ["{{ .results.s1.ok }}"]}, DATA)
    assert out == {"pods": DATA["results"]["s1"]["pods"], "n": 2, "text": "web has 2", "lit": 5, "nested": [True]}


def test_render_args_walks_maps_and_lists() -> None:
    assert render_args({"a": ["{{ .input.n }}", {"b": "{{ .input.name }}!"}], "c": 1}, DATA) == \
        {"a": [3, {"b": "web!"}], "c": 1}


def test_missing_key_is_an_error() -> None:
    with pytest.raises(TemplateError, match='map has no entry for key "nope"'):
        render_arg("x {{ .input.nope }}", DATA)
    with pytest.raises(TemplateError, match='map has no entry for key "nope"'):
        render_arg("{{ .input.nope }}", DATA)


@pytest.mark.parametrize(("src", "named"), [
    ("{{ now }}", 'function "now" not allowed'),
    ("{{ .input.x | b64enc }}", 'function "b64enc" not allowed'),
    ('{{ define "x" }}{{ end }}', 'action "define" not allowed'),
    ('{{ template "x" }}', 'action "template" not allowed'),
    ("{{ if .input.x }}", "without {{end}}"),
    ("{{ end }}", "unexpected {{end}}"),
])
def test_outside_the_subset_is_refused_naming_it(src: str, named: str) -> None:
    with pytest.raises(TemplateError, match=named.replace("{", r"\{").replace("}", r"\}")):
        parse(src)
    assert check({"a": [src]}) != []


def test_go_float_printing() -> None:
    assert [go_float(x) for x in (3.0, 0.5, 123456.0, 1e6, 1234567.0, 1e-5, -2.5)] == \
        ["3", "0.5", "123456", "1e+06", "1.234567e+06", "1e-05", "-2.5"]


def test_strings_without_both_braces_are_not_templates() -> None:
    assert render_arg("{{ not closed", DATA) == "{{ not closed"
    assert render_arg("closed }}", DATA) == "closed }}"
