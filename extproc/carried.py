"""Headers carried in dynamic metadata, so a routed call costs the processor one ext_proc message (the body).

The request filter skips the request headers message (SKIP) and sends only the buffered body. With headers
SKIPped, Envoy 1.40 lets the headers run ahead to the next filter and drops header mutations in the body reply
(measured: "Response had header mutations but headers aren't available"), and the `request.headers` attribute
reaches the processor as the string "CelMap value". So two small Lua filters carry the headers across:

- `muster_edge.headers_in`, before the request filter: packs every request header (pseudo-headers, duplicates and
  all, in order) into one string in REQUEST_NAMESPACE (bytes over 127 as Latin-1 in UTF-8: metadata strings
  must be UTF-8, or the processor cannot parse the message), forwarded to the request filter with the jwt_authn
  payload; and strips the routing headers a client could forge (the processor cannot strip them any more).
- `muster_edge.headers_out`, after it: holds the headers until the whole body has passed the request filter
  (`body()`), then applies what the processor decided for the upstream (UPSTREAM_NAMESPACE: set and remove),
  the content length of the rewritten body, and clears the route cache. It also holds back the answer filters,
  whose matchers read the flags the processor wrote with its reply to the body.

This module is the processor's side of both: pure, no gRPC.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

REQUEST_NAMESPACE = "muster_edge.request"
REQUEST_KEY = "headers"
UPSTREAM_NAMESPACE = "muster_edge.upstream"
_SET = "+:"
_REMOVE = "-:"


def unpack(packed: str) -> list[tuple[str, str]]:
    """The (name, value) pairs headers_in packed: name and value on alternate lines (neither can hold a line
    break: Envoy refuses such headers)."""
    if not packed:
        return []
    parts = packed.split("\n")
    return list(zip(parts[0::2], parts[1::2], strict=False))


def upstream_fields(set_headers: Mapping[str, str], remove_headers: Iterable[str]) -> dict[str, str]:
    """The fields of UPSTREAM_NAMESPACE for headers_out: one per header to set ("+:name") or remove ("-:name")."""
    out = {f"{_REMOVE}{name}": "" for name in remove_headers if name not in set_headers}
    out.update({f"{_SET}{name}": value for name, value in set_headers.items()})
    return out


def headers_in_lua(strip: Iterable[str]) -> str:
    """The Lua of headers_in: `strip` are the headers only the processor may set (routing, retry)."""
    names = ", ".join(f'"{h}"' for h in strip)
    return f"""
local strip = {{{names}}}
-- metadata strings must be UTF-8: a byte over 127 is read as Latin-1 (as the processor reads a headers message)
local function latin1(c)
  local b = string.byte(c)
  return string.char(192 + math.floor(b / 64), 128 + b % 64)
end
function envoy_on_request(h)
  local headers = h:headers()
  local forged = false
  for _, name in ipairs(strip) do
    if headers:get(name) ~= nil then headers:remove(name); forged = true end
  end
  local parts, n = {{}}, 0
  for name, value in pairs(headers) do
    parts[n + 1] = name; parts[n + 2] = value; n = n + 2
  end
  local packed = table.concat(parts, "\\n")
  if string.find(packed, "[\\128-\\255]") then packed = string.gsub(packed, "[\\128-\\255]", latin1) end
  h:streamInfo():dynamicMetadata():set("{REQUEST_NAMESPACE}", "{REQUEST_KEY}", packed)
  if forged then h:clearRouteCache() end
end
"""


HEADERS_OUT_LUA = f"""
function envoy_on_request(h)
  local body = h:body()
  local up = h:streamInfo():dynamicMetadata():get("{UPSTREAM_NAMESPACE}")
  if up == nil then return end
  local headers = h:headers()
  for key, value in pairs(up) do
    local op, name = string.sub(key, 1, 2), string.sub(key, 3)
    if op == "{_REMOVE}" then headers:remove(name) elseif op == "{_SET}" then headers:replace(name, value) end
  end
  if body ~= nil then headers:replace("content-length", tostring(body:length())) end
  h:clearRouteCache()
end
"""
