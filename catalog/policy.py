"""The tool policy: which tools a caller may see and call, decided at the edge.

Rules are checked in order and the first that matches decides; then the default deny set of destructive tools
(Muster's 32 names, lifted by `yolo: true`); then `default`. A per-request toolset can only narrow the result.
Annotations are hints from the upstream and count with the spec's defaults (readOnlyHint false, destructiveHint
true), so an annotation rule fails closed. Pure: no I/O.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MUSTER_DESTRUCTIVE = (
    "apply_kubernetes_manifest", "delete_kubernetes_resource", "kubectl_apply", "kubectl_create", "kubectl_delete",
    "kubectl_patch", "kubectl_rollout", "kubectl_scale", "capi_create_cluster", "capi_create_machinedeployment",
    "capi_delete_cluster", "capi_delete_machine", "capi_move_cluster", "capi_pause_cluster",
    "capi_remediate_machine", "capi_resume_cluster", "capi_scale_cluster", "capi_scale_machinedeployment",
    "capi_update_cluster", "capi_upgrade_cluster", "install_helm_chart", "uninstall_helm_chart",
    "upgrade_helm_chart", "reconcile_flux_helmrelease", "reconcile_flux_kustomization", "reconcile_flux_resourceset",
    "reconcile_flux_source", "resume_flux_reconciliation", "suspend_flux_reconciliation", "cleanup",
    "create_incident", "update_dashboard",
)
TOOLSET_PRESETS = ("full", "read-only", "none")
_GLOB_FIELDS = ("tool", "original", "server", "family", "subject")
_CLAIM_LIST_FIELDS = ("groups", "scopes")
_BOOL_FIELDS = ("readOnly", "destructive", "idempotent", "openWorld")
_MATCH_FIELDS = (*_GLOB_FIELDS, *_CLAIM_LIST_FIELDS, *_BOOL_FIELDS)


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the field."""


@dataclass(frozen=True)
class ToolFacts:
    """What the policy may look at for one (exposed tool, upstream server) pair."""

    tool: str
    original: str
    server: str
    family: str = ""
    annotations: Mapping[str, Any] = field(default_factory=dict)

    def hint(self, name: str) -> bool:
        defaults = {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": False, "openWorldHint": True}
        value = self.annotations.get(name, defaults[name])
        return value if isinstance(value, bool) else defaults[name]

    @property
    def read_only(self) -> bool:
        return self.hint("readOnlyHint")

    @property
    def destructive(self) -> bool:
        """Destructive unless marked read-only or explicitly not destructive (the spec's defaults)."""
        return not self.read_only and self.hint("destructiveHint")


@dataclass(frozen=True)
class Claims:
    """The caller's verified identity (from Envoy's jwt_authn metadata)."""

    subject: str = ""
    groups: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any], groups_claim: str = "groups") -> Claims:
        groups = payload.get(groups_claim) or []
        scope = payload.get("scope") or payload.get("scp") or ""
        scopes = scope.split() if isinstance(scope, str) else [s for s in scope if isinstance(s, str)]
        return cls(subject=str(payload.get("sub", "")),
                   groups=frozenset(g for g in groups if isinstance(g, str)) if isinstance(groups, list)
                   else frozenset(),
                   scopes=frozenset(scopes))

    @property
    def key(self) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
        return self.subject, tuple(sorted(self.groups)), tuple(sorted(self.scopes))


def _globs(value: Any, where: str) -> tuple[re.Pattern[str], ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(i, str) and i for i in items):
        raise PolicyError(f"{where}: must be a glob or a list of globs")
    return tuple(re.compile(fnmatch.translate(i)) for i in items)


@dataclass(frozen=True)
class Match:
    globs: Mapping[str, tuple[re.Pattern[str], ...]] = field(default_factory=dict)
    claims: Mapping[str, frozenset[str]] = field(default_factory=dict)
    flags: Mapping[str, bool] = field(default_factory=dict)

    def __call__(self, facts: ToolFacts, claims: Claims) -> bool:
        values = {"tool": facts.tool, "original": facts.original, "server": facts.server, "family": facts.family,
                  "subject": claims.subject}
        for key, patterns in self.globs.items():
            if not any(p.match(values[key]) for p in patterns):
                return False
        if "groups" in self.claims and not self.claims["groups"] & claims.groups:
            return False
        if "scopes" in self.claims and not self.claims["scopes"] & claims.scopes:
            return False
        actual = {"readOnly": facts.read_only, "destructive": facts.destructive,
                  "idempotent": facts.hint("idempotentHint"), "openWorld": facts.hint("openWorldHint")}
        return all(actual[key] == want for key, want in self.flags.items())


def _match(raw: Any, where: str) -> Match:
    if not isinstance(raw, dict) or not raw:
        raise PolicyError(f"{where}: must be a non-empty mapping of conditions")
    unknown = sorted(set(raw) - set(_MATCH_FIELDS))
    if unknown:
        raise PolicyError(f"{where}.{unknown[0]}: unknown condition (known: {', '.join(_MATCH_FIELDS)})")
    globs = {k: _globs(raw[k], f"{where}.{k}") for k in _GLOB_FIELDS if k in raw}
    claims: dict[str, frozenset[str]] = {}
    for key in _CLAIM_LIST_FIELDS:
        if key in raw:
            items = raw[key] if isinstance(raw[key], list) else [raw[key]]
            if not items or not all(isinstance(i, str) for i in items):
                raise PolicyError(f"{where}.{key}: must be a name or a list of names")
            claims[key] = frozenset(items)
    flags = {}
    for key in _BOOL_FIELDS:
        if key in raw:
            if not isinstance(raw[key], bool):
                raise PolicyError(f"{where}.{key}: must be true or false")
            flags[key] = raw[key]
    return Match(globs, claims, flags)


@dataclass(frozen=True)
class Rule:
    name: str
    effect: str
    match: Match


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...] = ()
    destructive: frozenset[str] = frozenset(MUSTER_DESTRUCTIVE)
    yolo: bool = False
    default_allow: bool = True
    toolsets: Mapping[str, tuple[Match, ...]] = field(default_factory=dict)

    def decide(self, facts: ToolFacts, claims: Claims) -> Decision:
        for rule in self.rules:
            if rule.match(facts, claims):
                return Decision(rule.effect == "allow", rule.name)
        if not self.yolo and facts.original in self.destructive:
            return Decision(False, "default-deny")
        return Decision(self.default_allow, "default")

    def toolset_allows(self, toolset: str, facts: ToolFacts) -> bool:
        """A toolset only narrows: `full` keeps all, `read-only` keeps read-only tools, `none` keeps nothing."""
        if toolset in ("", "full"):
            return True
        if toolset == "none":
            return False
        if toolset == "read-only":
            return facts.read_only
        return any(m(facts, Claims()) for m in self.toolsets[toolset])

    def known_toolset(self, toolset: str) -> bool:
        return toolset in ("", *TOOLSET_PRESETS) or toolset in self.toolsets


def parse_policy(raw: Any, where: str = "policy") -> Policy:
    """The `policy:` section of the gateway config."""
    if raw is None:
        return Policy()
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: must be a mapping")
    unknown = sorted(set(raw) - {"yolo", "destructive", "default", "rules", "toolsets"})
    if unknown:
        raise PolicyError(f"{where}.{unknown[0]}: unknown field")
    yolo = raw.get("yolo", False)
    if not isinstance(yolo, bool):
        raise PolicyError(f"{where}.yolo: must be true or false")
    default = raw.get("default", "allow")
    if default not in ("allow", "deny"):
        raise PolicyError(f"{where}.default: must be allow or deny")
    destructive = raw.get("destructive", list(MUSTER_DESTRUCTIVE))
    if not isinstance(destructive, list) or not all(isinstance(d, str) for d in destructive):
        raise PolicyError(f"{where}.destructive: must be a list of tool names")
    rules = []
    for index, item in enumerate(raw.get("rules") or []):
        at = f"{where}.rules[{index}]"
        if not isinstance(item, dict) or item.get("effect") not in ("allow", "deny"):
            raise PolicyError(f"{at}.effect: must be allow or deny")
        extra = sorted(set(item) - {"name", "effect", "match"})
        if extra:
            raise PolicyError(f"{at}.{extra[0]}: unknown field")
        rules.append(Rule(str(item.get("name") or f"rules[{index}]"), item["effect"], _match(item.get("match"),
                                                                                             f"{at}.match")))
    toolsets: dict[str, tuple[Match, ...]] = {}
    raw_sets = raw.get("toolsets") or {}
    if not isinstance(raw_sets, dict):
        raise PolicyError(f"{where}.toolsets: must map toolset names to lists of conditions")
    for name, matches in raw_sets.items():
        if name in TOOLSET_PRESETS:
            raise PolicyError(f"{where}.toolsets.{name}: {name!r} is a preset and cannot be redefined")
        if not isinstance(matches, list) or not matches:
            raise PolicyError(f"{where}.toolsets.{name}: must be a non-empty list of conditions")
        toolsets[str(name)] = tuple(_match(m, f"{where}.toolsets.{name}[{i}]") for i, m in enumerate(matches))
    return Policy(tuple(rules), frozenset(destructive), yolo, default == "allow", toolsets)
