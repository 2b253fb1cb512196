"""The merged capability view: what one caller sees of the fleet, and how each exposed name routes.

Built from the admitted servers and each upstream's cached lists; routing is read from the same object that
listing was built from, so a name is callable exactly when it is listed (Muster's #764/#1204 cannot happen:
nothing here is filled as a side effect of listing). Pure: no I/O.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from catalog.manifests import MCPServer
from catalog.naming import expose_uri, exposed_name, split_exposed_uri, template_regex, uri_slug
from catalog.task_support import reachable_tools

Json = dict[str, Any]
_TCHAR = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TRAILER = re.compile(r" \(available on servers: [^)]*\)$")


@dataclass(frozen=True)
class UpstreamSnapshot:
    """What the gateway last learned from one upstream (filled by the processor's fan-out)."""

    server: str
    ok: bool
    error: str = ""
    era: str = ""
    protocol_version: str = ""
    capabilities: Mapping[str, Any] = field(default_factory=dict)
    instructions: str = ""
    tools: Sequence[Json] = ()
    prompts: Sequence[Json] = ()
    resources: Sequence[Json] = ()
    templates: Sequence[Json] = ()
    ttl_ms: int | None = None
    generation: int = 0


@dataclass(frozen=True)
class Target:
    """One upstream's side of an exposed name."""

    server: str
    original: str
    definition: Json
    header_map: Mapping[tuple[str, ...], str] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """An exposed tool or prompt. `instance_arg` is set for a family name (several targets)."""

    exposed: str
    targets: Mapping[str, Target]
    instance_arg: str | None = None
    header_map: Mapping[tuple[str, ...], str] = field(default_factory=dict)
    family: str = ""

    @property
    def single(self) -> Target | None:
        if self.instance_arg is None and len(self.targets) == 1:
            return next(iter(self.targets.values()))
        return None


@dataclass(frozen=True)
class View:
    tools: tuple[Json, ...]
    legacy_tools: tuple[Json, ...]
    prompts: tuple[Json, ...]
    resources: tuple[Json, ...]
    templates: tuple[Json, ...]
    tool_routes: Mapping[str, Route]
    prompt_routes: Mapping[str, Route]
    prefix: str
    uri_slug_of: Mapping[str, str]
    server_of_slug: Mapping[str, str]
    exact_uris: Mapping[str, str]
    template_matchers: tuple[tuple[re.Pattern[str], str], ...]
    servers: tuple[str, ...]
    capabilities: Json
    problems: tuple[str, ...]
    fingerprint: int
    ttl_ms: int

    def resolve_uri(self, uri: str) -> tuple[str, str] | None:
        """(server, upstream uri) for a URI a client sent, or None when no server in the view has it."""
        split = split_exposed_uri(self.prefix, uri)
        if split is not None and split[0] in self.server_of_slug:
            return self.server_of_slug[split[0]], split[1]
        server = self.exact_uris.get(uri)
        if server is not None:
            return server, uri
        matches = {srv for rx, srv in self.template_matchers if rx.match(uri)}
        if len(matches) == 1:
            return matches.pop(), uri
        return None

    def client_uri(self, server: str, uri: str) -> str:
        """The URI a client uses for an upstream's URI (mapping results back)."""
        slug = self.uri_slug_of.get(server)
        return expose_uri(self.prefix, slug, uri) if slug else uri


_DATA_KEYWORDS = frozenset({"default", "examples", "example", "const", "enum"})
MAX_SCHEMA_DEPTH = 64


def x_mcp_header_problem(schema: Any) -> str | None:
    """Why a tool's x-mcp-header annotations are invalid (clients MUST drop such tools), else None.

    Only schema keywords are walked (instance data such as `default` may hold anything), and a schema nested
    deeper than MAX_SCHEMA_DEPTH is refused rather than walked.
    """
    seen: set[str] = set()

    def walk(node: Any, reachable: bool, path: str, depth: int) -> str | None:
        if depth > MAX_SCHEMA_DEPTH:
            return f"schema nested deeper than {MAX_SCHEMA_DEPTH} levels"
        if isinstance(node, list):
            for item in node:
                if (why := walk(item, False, path, depth + 1)) is not None:
                    return why
            return None
        if not isinstance(node, dict):
            return None
        if "x-mcp-header" in node:
            token = node["x-mcp-header"]
            if not reachable:
                return f"x-mcp-header at {path or '/'} is not reachable through properties alone"
            if not isinstance(token, str) or not _TCHAR.fullmatch(token):
                return f"x-mcp-header {token!r} is not an HTTP token"
            if token.lower() in seen:
                return f"x-mcp-header {token!r} is used twice"
            if node.get("type") not in ("string", "integer", "boolean"):
                return f"x-mcp-header {token!r} is on a property that is not string, integer or boolean"
            seen.add(token.lower())
        for key, child in node.items():
            if key in _DATA_KEYWORDS or key == "x-mcp-header":
                continue
            if key == "properties" and isinstance(child, dict):
                for name, prop in child.items():
                    if (why := walk(prop, reachable, f"{path}/{name}", depth + 1)) is not None:
                        return why
            elif (why := walk(child, False, f"{path}/{key}", depth + 1)) is not None:
                return why
        return None

    if not _mentions_header(schema):
        return None
    return walk(schema, True, "", 0)


def _mentions_header(schema: Any) -> bool:
    """Whether any schema keyword anywhere is x-mcp-header (iterative: no depth limit to hit)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "x-mcp-header" in node:
                return True
            stack.extend(v for k, v in node.items() if k not in _DATA_KEYWORDS)
        elif isinstance(node, list):
            stack.extend(node)
    return False


def header_map(schema: Any) -> dict[tuple[str, ...], str]:
    """Property path -> Mcp-Param token for a schema whose annotations are valid."""
    out: dict[tuple[str, ...], str] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if not isinstance(node, dict) or len(path) > MAX_SCHEMA_DEPTH:
            return
        token = node.get("x-mcp-header")
        if isinstance(token, str) and path:
            out[path] = token
        props = node.get("properties")
        if isinstance(props, dict):
            for name, prop in props.items():
                walk(prop, (*path, name))

    walk(schema, ())
    return out


@dataclass
class _Unit:
    """A naming unit: one server, or one family collapsed into a single set of names."""

    key: str
    name_prefix: str
    servers: list[str]
    instance_arg: str | None = None


@dataclass
class _Candidate:
    unit: _Unit
    original: str
    definition: Json
    targets: dict[str, Target]
    order: tuple[str, int]


def _fingerprint(parts: Iterable[Any]) -> int:
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def short_alias(member: str, members: Sequence[str]) -> str | None:
    """The shortest leading part of `member`, cut at a '-', that names no other member ("cluster-a")."""
    parts = member.split("-")
    for end in range(1, len(parts)):
        alias = "-".join(parts[:end])
        if sum(m.startswith(alias + "-") for m in members) == 1:
            return alias
    return None


def instance_description(members: Sequence[str]) -> str:
    """Muster's text, then the forms beyond Muster that the gateway also accepts."""
    text = f"Target instance to execute this tool on. Available: {', '.join(members)}"
    alias = next((a for m in members if (a := short_alias(m, members)) is not None), None)
    if alias is not None:
        example = next(m for m in members if m.startswith(alias + "-"))
        text += (f". The leading part of a name also works when it names exactly one server "
                 f"({alias} for {example})")
    return text


def instance_header(instance_arg: str, schema: Json) -> str | None:
    """The Mcp-Param-* token for the injected property, unless the schema already uses it."""
    token = instance_arg.replace("_", "-")
    taken = {t.lower() for t in header_map(schema).values()}
    return None if token.lower() in taken else token


def _family_definition(first: Json, instance_arg: str, members: list[str], kind: str) -> Json:
    out = dict(first)
    description = _TRAILER.sub("", str(first.get("description") or ""))
    out["description"] = f"{description} (available on servers: {', '.join(members)})".lstrip()
    if kind == "tool":
        schema = copy.deepcopy(first.get("inputSchema") or {"type": "object"})
        props = schema.setdefault("properties", {})
        token = instance_header(instance_arg, schema)
        injected: Json = {"type": "string", "description": instance_description(members), "enum": list(members)}
        if token is not None:
            injected["x-mcp-header"] = token
        props[instance_arg] = injected
        required = [r for r in schema.get("required", []) if r != instance_arg]
        schema["required"] = [*required, instance_arg]
        out["inputSchema"] = schema
    else:
        arguments = [a for a in first.get("arguments") or [] if a.get("name") != instance_arg]
        arguments.append({"name": instance_arg, "description": instance_description(members), "required": True})
        out["arguments"] = arguments
    return out


def _has_property(definition: Json, arg: str, kind: str) -> bool:
    if kind == "tool":
        props = (definition.get("inputSchema") or {}).get("properties") or {}
        return arg in props
    return any(a.get("name") == arg for a in definition.get("arguments") or [])


def _units(servers: Sequence[MCPServer], problems: list[str]) -> list[_Unit]:
    units: list[_Unit] = []
    families: dict[str, list[MCPServer]] = {}
    for server in servers:
        if server.family is None:
            units.append(_Unit(server.name, server.server_prefix, [server.name]))
        else:
            families.setdefault(server.family.name, []).append(server)
    for family, members in sorted(families.items()):
        args = {m.family.instance_arg for m in members if m.family}
        if len(args) > 1:
            problems.append(f"family {family!r}: members disagree on instanceArg ({', '.join(sorted(args))}); "
                            "falling back to per-server names")
            units.extend(_Unit(m.name, m.server_prefix, [m.name]) for m in members)
        else:
            units.append(_Unit(f"family:{family}", family, [m.name for m in members], args.pop()))
    return units


def _candidates(kind: str, units: list[_Unit], by_name: Mapping[str, MCPServer],
                snapshots: Mapping[str, UpstreamSnapshot], problems: list[str]) -> list[_Candidate]:
    field_name = "tools" if kind == "tool" else "prompts"
    out: list[_Candidate] = []

    def solo(unit: _Unit, server: str, index: int, definition: Json) -> _Candidate:
        original = definition["name"]
        hmap = header_map(definition.get("inputSchema")) if kind == "tool" else {}
        target = Target(server, original, definition, hmap)
        return _Candidate(unit, original, definition, {server: target}, (unit.key, index))

    for unit in units:
        if unit.instance_arg is None:
            server = unit.servers[0]
            for index, definition in enumerate(getattr(snapshots[server], field_name)):
                out.append(solo(unit, server, index, definition))
            continue
        buckets: dict[str, list[tuple[str, int, Json]]] = {}
        for server in unit.servers:
            for index, definition in enumerate(getattr(snapshots[server], field_name)):
                buckets.setdefault(definition["name"], []).append((server, index, definition))
        for original, members in sorted(buckets.items()):
            descriptions = {_TRAILER.sub("", str(d.get("description") or "")) for _, _, d in members}
            clash = any(_has_property(d, unit.instance_arg, kind) for _, _, d in members)
            if len(descriptions) > 1 or clash:
                why = "descriptions differ between members" if len(descriptions) > 1 else \
                    f"it already has a property named {unit.instance_arg!r}"
                problems.append(f"family {unit.name_prefix!r}: {kind} {original!r} falls back to per-server names: "
                                f"{why}")
                for server, index, definition in members:
                    own = _Unit(server, by_name[server].server_prefix, [server])
                    out.append(solo(own, server, index, definition))
                continue
            names = [s for s, _, _ in members]
            targets = {
                s: Target(s, original, d, header_map(d.get("inputSchema")) if kind == "tool" else {})
                for s, _, d in members
            }
            definition = _family_definition(members[0][2], unit.instance_arg, names, kind)
            out.append(_Candidate(unit, original, definition, targets, (unit.key, 0)))
    return out


def _name_candidates(kind: str, candidates: list[_Candidate], prefix: str, mode: str,
                     problems: list[str]) -> tuple[tuple[Json, ...], dict[str, Route]]:
    owners: dict[str, set[str]] = {}
    for cand in candidates:
        owners.setdefault(cand.original, set()).add(cand.unit.key)
    named: dict[str, list[_Candidate]] = {}
    for cand in candidates:
        if mode == "never" or (mode == "conditional" and len(owners[cand.original]) == 1):
            exposed = cand.original
        else:
            exposed = exposed_name(prefix, cand.unit.name_prefix, cand.original)
        named.setdefault(exposed, []).append(cand)
    definitions: list[tuple[tuple[str, int], Json]] = []
    routes: dict[str, Route] = {}
    for exposed, cands in named.items():
        if len(cands) > 1:
            who = ", ".join(sorted({s for c in cands for s in c.targets}))
            problems.append(f"{kind} name {exposed!r} is offered by more than one server ({who}); "
                            f"it is left out until the names differ (prefixMode: {mode})")
            continue
        cand = cands[0]
        definition = dict(cand.definition)
        definition["name"] = exposed
        hmap = header_map(definition.get("inputSchema")) if kind == "tool" else {}
        family = cand.unit.name_prefix if cand.unit.instance_arg else ""
        routes[exposed] = Route(exposed, cand.targets, cand.unit.instance_arg, hmap, family)
        definitions.append((cand.order, definition))
    definitions.sort(key=lambda item: item[0])
    return tuple(d for _, d in definitions), routes


def _uris(servers: Sequence[MCPServer], snapshots: Mapping[str, UpstreamSnapshot], prefix: str, mode: str,
          problems: list[str]) -> tuple[dict[str, str], dict[str, str], dict[str, str],
                                       list[tuple[re.Pattern[str], str]], list[Json], list[Json]]:
    """Decide per server whether its URIs are prefixed; returns the lookup tables and the exposed lists."""
    keys: dict[str, set[str]] = {}
    for server in servers:
        snap = snapshots[server.name]
        for res in snap.resources:
            keys.setdefault(str(res.get("uri")), set()).add(server.name)
        for tpl in snap.templates:
            keys.setdefault(str(tpl.get("uriTemplate")), set()).add(server.name)
    slug_of: dict[str, str] = {}
    server_of: dict[str, str] = {}
    exact: dict[str, str] = {}
    matchers: list[tuple[re.Pattern[str], str]] = []
    resources: list[Json] = []
    templates: list[Json] = []
    for server in servers:
        snap = snapshots[server.name]
        own = [str(r.get("uri")) for r in snap.resources] + [str(t.get("uriTemplate")) for t in snap.templates]
        shared = [k for k in own if len(keys[k]) > 1]
        prefixed = mode == "always" or (mode == "conditional" and bool(shared))
        if prefixed:
            slug = uri_slug(server.server_prefix)
            if slug in server_of:
                problems.append(f"servers {server_of[slug]!r} and {server.name!r} share the URI prefix {slug!r}; "
                                f"the resources of {server.name!r} are left out")
                continue
            slug_of[server.name] = slug
            server_of[slug] = server.name
        elif shared:
            problems.append(f"resources of {server.name!r} collide with another server's "
                            f"({', '.join(sorted(shared))}); they are left out (prefixMode: {mode})")
            continue
        for res in snap.resources:
            item = dict(res)
            if prefixed:
                item["uri"] = expose_uri(prefix, slug_of[server.name], str(res.get("uri")))
            else:
                exact[str(res.get("uri"))] = server.name
            resources.append(item)
        for tpl in snap.templates:
            item = dict(tpl)
            if prefixed:
                item["uriTemplate"] = expose_uri(prefix, slug_of[server.name], str(tpl.get("uriTemplate")))
            else:
                exact[str(tpl.get("uriTemplate"))] = server.name
                matchers.append((template_regex(str(tpl.get("uriTemplate"))), server.name))
            templates.append(item)
    return slug_of, server_of, exact, matchers, resources, templates


def restrict(view: View, allowed: Callable[[Route, Target], bool], salt: Hashable) -> View:
    """The part of a view one caller may use: tools whose every target is refused are gone, and a family
    tool keeps only its allowed members (the enum and the description shrink with them)."""
    tools: list[Json] = []
    routes: dict[str, Route] = {}
    for tool in view.tools:
        route = view.tool_routes[tool["name"]]
        keep = {server: target for server, target in route.targets.items() if allowed(route, target)}
        if not keep:
            continue
        if len(keep) < len(route.targets) and route.instance_arg is not None:
            tool = _family_definition(next(iter(keep.values())).definition, route.instance_arg, list(keep), "tool")
            tool["name"] = route.exposed
            route = Route(route.exposed, keep, route.instance_arg, header_map(tool.get("inputSchema")), route.family)
        tools.append(tool)
        routes[route.exposed] = route
    return replace(view, tools=tuple(tools), legacy_tools=tuple(_without_injected_headers(t, routes) for t in tools),
                   tool_routes=routes, fingerprint=_fingerprint((view.fingerprint, salt)))


def _without_injected_headers(tool: Json, routes: Mapping[str, Route]) -> Json:
    """Handshake-era clients get the injected property without the x-mcp-header annotation (a 2026-07-28
    feature); the description keeps the accepted-forms hint, which Muster's text begins."""
    arg = routes[tool["name"]].instance_arg
    props = (tool.get("inputSchema") or {}).get("properties") or {}
    if arg is None or "x-mcp-header" not in props.get(arg, {}):
        return tool
    schema = dict(tool["inputSchema"])
    schema["properties"] = {**props, arg: {k: v for k, v in props[arg].items() if k != "x-mcp-header"}}
    return {**tool, "inputSchema": schema}


def _task_reachable(snap: UpstreamSnapshot, problems: list[str]) -> UpstreamSnapshot:
    """The snapshot without task-required tools its server cannot run as tasks (named in `problems`)."""
    tools = reachable_tools(snap.server, snap.era == "modern", snap.capabilities, snap.tools, problems)
    return snap if tools is snap.tools else replace(snap, tools=tuple(tools))


def build_view(servers: Sequence[MCPServer], snapshots: Mapping[str, UpstreamSnapshot], *, prefix: str = "x",
               mode: str = "always", default_ttl_ms: int = 60_000) -> View:
    """Merge the lists of every reachable upstream in `snapshots` under conflict-free names."""
    live = [s for s in sorted(servers, key=lambda s: s.name) if s.name in snapshots and snapshots[s.name].ok]
    by_name = {s.name: s for s in live}
    problems: list[str] = []
    snapshots = {**snapshots, **{s.name: _task_reachable(snapshots[s.name], problems) for s in live}}
    units = _units(live, problems)
    tools, tool_routes = _name_candidates("tool", _candidates("tool", units, by_name, snapshots, problems),
                                          prefix, mode, problems)
    prompts, prompt_routes = _name_candidates("prompt", _candidates("prompt", units, by_name, snapshots, problems),
                                              prefix, mode, problems)
    slug_of, server_of, exact, matchers, resources, templates = _uris(live, snapshots, prefix, mode, problems)
    ttls = [snapshots[s.name].ttl_ms for s in live if snapshots[s.name].ttl_ms is not None]
    ttl = min([default_ttl_ms, *[t for t in ttls if t is not None]])
    completions = any("completions" in (snapshots[s.name].capabilities or {}) for s in live)
    capabilities: Json = {"tools": {}, "prompts": {}, "resources": {}}
    if completions:
        capabilities["completions"] = {}
    fingerprint = _fingerprint((prefix, mode, *[(s.name, snapshots[s.name].generation) for s in live]))
    return View(
        tools=tools, legacy_tools=tuple(_without_injected_headers(t, tool_routes) for t in tools),
        prompts=prompts, resources=tuple(resources), templates=tuple(templates),
        tool_routes=tool_routes, prompt_routes=prompt_routes, prefix=prefix,
        uri_slug_of=slug_of, server_of_slug=server_of, exact_uris=exact, template_matchers=tuple(matchers),
        servers=tuple(by_name), capabilities=capabilities, problems=tuple(problems), fingerprint=fingerprint,
        ttl_ms=max(0, ttl),
    )
