"""Exposed names: how an upstream's tool, prompt or resource URI is named at the gateway, and back.

Muster's rule: `{prefix}_{serverPrefix}_{name}`, without repeating a `serverPrefix_` the name already has.
URIs get a scheme prefix `{prefix}+{slug}+` so two servers' URIs never collide and the original URI is the
exact remainder; a URI is resolved back by table lookup of the slug, never by guessing.
"""

from __future__ import annotations

import re

_SLUG_BAD = re.compile(r"[^a-z0-9.-]")


def exposed_name(prefix: str, server_prefix: str, name: str) -> str:
    head = server_prefix + "_"
    rest = name[len(head):] if name.startswith(head) and len(name) > len(head) else name
    return f"{prefix}_{server_prefix}_{rest}"


def uri_slug(server_prefix: str) -> str:
    """A server prefix as it may stand in a URI scheme (letters, digits, '-', '.')."""
    return _SLUG_BAD.sub("-", server_prefix.lower())


def expose_uri(prefix: str, slug: str, uri: str) -> str:
    return f"{prefix}+{slug}+{uri}"


def split_exposed_uri(prefix: str, uri: str) -> tuple[str, str] | None:
    """(slug, original uri) for a URI this gateway prefixed, else None."""
    head = prefix + "+"
    if not uri.startswith(head):
        return None
    slug, sep, rest = uri[len(head):].partition("+")
    if not sep or not slug or not rest:
        return None
    return slug, rest


_TEMPLATE_VAR = re.compile(r"\{([+#./;?&]?)([^}]*)\}")


def template_regex(template: str) -> re.Pattern[str]:
    """A matcher for URIs produced from an RFC 6570 template (levels 1-3, as MCP servers use them)."""
    out: list[str] = []
    pos = 0
    for match in _TEMPLATE_VAR.finditer(template):
        out.append(re.escape(template[pos:match.start()]))
        op = match.group(1)
        if op in ("+", "#"):
            out.append(".*")
        elif op in ("?", "&"):
            out.append(r"(?:[?&][^#]*)?")
        elif op == "/":
            out.append(r"(?:/[^?#]*)?")
        else:
            out.append(r"[^/?#]*")
        pos = match.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z")
