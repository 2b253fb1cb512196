"""Workflow manifests (muster.giantswarm.io/v1alpha1, kind Workflow): Muster's schema and admission rules.

Pure: takes already-read YAML text. A bad Workflow is refused alone, with file, field and reason, like a bad
MCPServer; its templates are parsed at admission so one using anything outside Muster's subset is refused
naming it. Each admitted Workflow is the tool `workflow_<name>`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from catalog import templates
from catalog.manifests import API_VERSION, AdmissionError, _documents, _Refused, metadata_name

KIND = "Workflow"
PREFIX = "workflow_"
ARG_TYPES = ("string", "integer", "boolean", "number", "object", "array")

_STEP_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
# Muster's structured path also accepts these snake_case spellings.
_ALIASES = {"allow_failure": "allowFailure", "from_step": "fromStep", "expect_not": "expectNot",
            "json_path": "jsonPath", "for_each": "forEach", "on_failure": "onFailure"}


@dataclass(frozen=True)
class Arg:
    name: str
    type: str
    required: bool = False
    default: Any = None
    has_default: bool = False
    description: str = ""


@dataclass(frozen=True)
class Expect:
    success: bool | None = None
    json_path: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Condition:
    template: str = ""
    tool: str = ""
    args: Any = None
    from_step: str = ""
    expect: Expect | None = None
    expect_not: Expect | None = None

    @property
    def kind(self) -> str:
        return "template" if self.template else "tool" if self.tool else "fromStep"


@dataclass(frozen=True)
class ForEach:
    items: str
    steps: tuple[Step, ...]
    as_: str = "item"


@dataclass(frozen=True)
class Step:
    id: str
    tool: str = ""
    args: Any = None
    condition: Condition | None = None
    output: bool | None = None
    store: bool = False
    allow_failure: bool = False
    description: str = ""
    for_each: ForEach | None = None
    parallel: tuple[Step, ...] = ()

    @property
    def keeps_result(self) -> bool:
        return bool(self.output) or self.store


@dataclass(frozen=True)
class Workflow:
    name: str
    namespace: str
    source: str
    description: str = ""
    args: tuple[Arg, ...] = ()
    steps: tuple[Step, ...] = ()
    on_failure: tuple[Step, ...] = ()
    output: Any = None
    labels: Mapping[str, str] = field(default_factory=dict)
    spec: Mapping[str, Any] = field(default_factory=dict)  # as written, for core_workflow_get

    @property
    def tool_name(self) -> str:
        return PREFIX + self.name


def _norm(raw: Any, path: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _Refused(path, "must be an object")
    return {_ALIASES.get(str(k), str(k)): v for k, v in raw.items()}


def _unknown(spec: Mapping[str, Any], known: Iterable[str], path: str) -> None:
    extra = sorted(set(spec) - set(known), key=str)
    if extra:
        raise _Refused(f"{path}.{extra[0]}", "unknown field")


def _str(spec: Mapping[str, Any], key: str, path: str, limit: int = 0) -> str:
    value = spec.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Refused(f"{path}.{key}", "must be a string")
    if limit and len(value) > limit:
        raise _Refused(f"{path}.{key}", f"must be at most {limit} characters")
    return value


def _bool(spec: Mapping[str, Any], key: str, path: str) -> bool | None:
    value = spec.get(key)
    if value is not None and not isinstance(value, bool):
        raise _Refused(f"{path}.{key}", "must be true or false")
    return value


def _templates(value: Any, path: str) -> None:
    problems = templates.check(value)
    if problems:
        raise _Refused(path, f"invalid template: {problems[0]}")


def _expect(raw: Any, path: str) -> Expect | None:
    if raw is None:
        return None
    spec = _norm(raw, path)
    _unknown(spec, ("success", "jsonPath"), path)
    paths = spec.get("jsonPath") or {}
    if not isinstance(paths, dict):
        raise _Refused(f"{path}.jsonPath", "must map paths to expected values")
    _templates(list(paths), f"{path}.jsonPath")
    return Expect(success=_bool(spec, "success", path), json_path=dict(paths))


def _condition(raw: Any, path: str) -> Condition | None:
    if raw is None:
        return None
    spec = _norm(raw, path)
    _unknown(spec, ("template", "tool", "args", "fromStep", "expect", "expectNot"), path)
    kinds = [k for k in ("template", "tool", "fromStep") if spec.get(k)]
    if len(kinds) != 1:
        raise _Refused(path, "exactly one of template, tool or fromStep must be set")
    if kinds[0] != "template" and spec.get("expect") is None and spec.get("expectNot") is None:
        raise _Refused(path, f"{kinds[0]} condition requires expect or expectNot")
    if kinds[0] != "tool" and spec.get("args") is not None:
        raise _Refused(f"{path}.args", "args are only allowed with a tool condition")
    template = _str(spec, "template", path)
    _templates(template, f"{path}.template")
    _templates(spec.get("args"), f"{path}.args")
    return Condition(template=template, tool=_str(spec, "tool", path), args=spec.get("args"),
                     from_step=_str(spec, "fromStep", path),
                     expect=_expect(spec.get("expect"), f"{path}.expect"),
                     expect_not=_expect(spec.get("expectNot"), f"{path}.expectNot"))


_STEP_FIELDS = ("id", "tool", "args", "condition", "output", "store", "allowFailure", "description")


def _step(raw: Any, path: str, sub: bool) -> Step:
    spec = _norm(raw, path)
    _unknown(spec, _STEP_FIELDS if sub else (*_STEP_FIELDS, "forEach", "parallel"), path)
    sid = spec.get("id")
    if not isinstance(sid, str) or not sid:
        raise _Refused(f"{path}.id", "step id is required")
    if len(sid) > 63 or not _STEP_ID.fullmatch(sid):
        raise _Refused(f"{path}.id", f"step id {sid!r} must match ^[a-zA-Z0-9_-]+$ and be at most 63 characters")
    tool = _str(spec, "tool", path)
    if sub and not tool:
        raise _Refused(f"{path}.tool", "tool is required")
    kinds = [k for k in ("tool", "forEach", "parallel") if spec.get(k)]
    if len(kinds) != 1:
        raise _Refused(path, "exactly one of tool, forEach or parallel must be set")
    _templates(spec.get("args"), f"{path}.args")
    for_each = None
    parallel: tuple[Step, ...] = ()
    if "forEach" in kinds:
        fp = f"{path}.forEach"
        fe = _norm(spec["forEach"], fp)
        _unknown(fe, ("items", "as", "steps"), fp)
        items = _str(fe, "items", fp)
        if not items:
            raise _Refused(f"{fp}.items", "items is required")
        _templates(items, f"{fp}.items")
        as_ = _str(fe, "as", fp) or "item"
        for_each = ForEach(items=items, steps=_sub_steps(fe.get("steps"), f"{fp}.steps"), as_=as_)
    if "parallel" in kinds:
        parallel = _sub_steps(spec["parallel"], f"{path}.parallel")
    if spec.get("args") is not None and not tool:
        raise _Refused(f"{path}.args", "args are only allowed on a tool step")
    return Step(id=sid, tool=tool, args=spec.get("args"), condition=_condition(spec.get("condition"),
                f"{path}.condition"), output=_bool(spec, "output", path), store=bool(_bool(spec, "store", path)),
                allow_failure=bool(_bool(spec, "allowFailure", path)),
                description=_str(spec, "description", path, 500), for_each=for_each, parallel=parallel)


def _sub_steps(raw: Any, path: str) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not raw:
        raise _Refused(path, "at least one step is required")
    return tuple(_step(s, f"{path}[{i}]", sub=True) for i, s in enumerate(raw))


def _all_steps(steps: Iterable[Step]) -> Iterable[Step]:
    for s in steps:
        yield s
        if s.for_each:
            yield from _all_steps(s.for_each.steps)
        yield from _all_steps(s.parallel)


def _unique_ids(steps: tuple[Step, ...], path: str) -> None:
    seen: set[str] = set()
    for s in _all_steps(steps):
        if s.id in seen:
            raise _Refused(path, f"duplicate step id {s.id!r}")
        seen.add(s.id)


def _args(raw: Any) -> tuple[Arg, ...]:
    spec = _norm(raw, "spec.args")
    out = []
    for name, val in spec.items():
        p = f"spec.args.{name}"
        a = _norm(val, p)
        _unknown(a, ("type", "required", "default", "description"), p)
        kind = _str(a, "type", p)
        if not kind:
            raise _Refused(f"{p}.type", "type is required")
        if kind not in ARG_TYPES:
            raise _Refused(f"{p}.type", f"unsupported value {kind!r} (supported: {', '.join(ARG_TYPES)})")
        out.append(Arg(name=str(name), type=kind, required=bool(_bool(a, "required", p)), default=a.get("default"),
                       has_default="default" in a, description=_str(a, "description", p, 500)))
    return tuple(out)


def parse_workflow(doc: Mapping[str, Any], source: str) -> Workflow:
    meta = _norm(doc.get("metadata"), "metadata")
    name = metadata_name(meta)
    namespace = meta.get("namespace") or "default"
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise _Refused("metadata.labels", "must map strings to strings")
    spec = _norm(doc.get("spec"), "spec")
    _unknown(spec, ("description", "args", "steps", "onFailure", "output"), "spec")
    raw_steps = spec.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise _Refused("spec.steps", "at least one step is required")
    steps = tuple(_step(s, f"spec.steps[{i}]", sub=False) for i, s in enumerate(raw_steps))
    _unique_ids(steps, "spec.steps")
    on_failure: tuple[Step, ...] = ()
    if spec.get("onFailure") is not None:
        on_failure = _sub_steps(spec["onFailure"], "spec.onFailure")
        _unique_ids(on_failure, "spec.onFailure")
    output = spec.get("output")
    if output is not None and not isinstance(output, dict):
        raise _Refused("spec.output", "must be an object")
    _templates(output, "spec.output")
    return Workflow(name=name, namespace=str(namespace), source=source,
                    description=_str(spec, "description", "spec", 1000), args=_args(spec.get("args")),
                    steps=steps, on_failure=on_failure, output=output,
                    labels={str(k): str(v) for k, v in labels.items()}, spec=spec)


@dataclass(frozen=True)
class WorkflowLoad:
    workflows: tuple[Workflow, ...]
    errors: tuple[AdmissionError, ...]


def is_workflow(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("kind") == KIND


def load_workflows(files: Iterable[tuple[str, str]]) -> WorkflowLoad:
    """Admit the Workflow documents of every (source, text) pair; other kinds are left to their own loaders."""
    found: dict[str, Workflow] = {}
    errors: list[AdmissionError] = []
    for source, text in sorted(files):
        docs, broken = _documents(text)
        several = len([d for d in docs if d is not None]) > 1 or bool(broken)
        for index, doc in enumerate(docs):
            if not is_workflow(doc):
                continue
            where = f"{source}[{index}]" if several else source
            name = ""
            meta = doc.get("metadata")
            if isinstance(meta, dict) and isinstance(meta.get("name"), str):
                name = meta["name"]
            try:
                if doc.get("apiVersion") != API_VERSION:
                    raise _Refused("apiVersion", f"must be {API_VERSION!r}, got {doc.get('apiVersion')!r}")
                wf = parse_workflow(doc, where)
            except _Refused as refused:
                errors.append(AdmissionError(where, refused.field, refused.message, name, KIND))
                continue
            if wf.name in found:
                errors.append(AdmissionError(where, "metadata.name",
                                             f"duplicate Workflow name (first defined in {found[wf.name].source})",
                                             wf.name, KIND))
                continue
            found[wf.name] = wf
    return WorkflowLoad(tuple(found[n] for n in sorted(found)), tuple(errors))


# ---- as tools -----------------------------------------------------------------------------------------

def step_tools(wf: Workflow) -> list[str]:
    """Every tool the workflow's availability depends on (§5.3): steps, sub-steps and condition tools."""
    out: list[str] = []
    for s in _all_steps(wf.steps):
        if s.tool:
            out.append(s.tool)
        if s.condition and s.condition.tool:
            out.append(s.condition.tool)
    return list(dict.fromkeys(out))


def input_schema(wf: Workflow) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required: list[str] = []
    for a in wf.args:
        p: dict[str, Any] = {"type": a.type}
        if a.description:
            p["description"] = a.description
        if a.has_default:
            p["default"] = a.default
        props[a.name] = p
        if a.required:
            required.append(a.name)
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema


def tool_definition(wf: Workflow, read_only: bool) -> dict[str, Any]:
    """The MCP tool a client lists; readOnlyHint only when every step tool is read-only."""
    tool: dict[str, Any] = {"name": wf.tool_name, "description": wf.description or f"Execute workflow {wf.name}",
                            "inputSchema": input_schema(wf),
                            "annotations": {"title": wf.name, "readOnlyHint": read_only,
                                            "destructiveHint": not read_only, "openWorldHint": True}}
    if wf.labels:
        tool["_meta"] = {"labels": dict(wf.labels)}
    return tool


def available(name: str, workflows: Mapping[str, Workflow], tool_ok: Callable[[str], bool],
              _seen: frozenset[str] = frozenset()) -> bool:
    """§5.3: every step tool reachable for this caller; nested workflows recursively, a cycle is unavailable."""
    wf = workflows.get(name)
    if wf is None or name in _seen:
        return False
    seen = _seen | {name}
    for tool in step_tools(wf):
        if tool.startswith(PREFIX):
            # the nested workflow's own tool must be reachable too (the policy may hide it), and it available
            if not tool_ok(tool) or not available(tool[len(PREFIX):], workflows, tool_ok, seen):
                return False
        elif not tool_ok(tool):
            return False
    return True


def missing_tools(name: str, workflows: Mapping[str, Workflow], tool_ok: Callable[[str], bool]) -> list[str]:
    wf = workflows.get(name)
    if wf is None:
        return []
    return [t for t in step_tools(wf)
            if not (tool_ok(t) and (not t.startswith(PREFIX)
                                    or available(t[len(PREFIX):], workflows, tool_ok, frozenset({name}))))]
