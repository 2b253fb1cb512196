"""tools/list, prompts/list, resources/list, resources/templates/list: merged pages from the cached view.

A page is serialised once per (view, method, page, era) and reused: a warm list is a cache lookup and an id
splice, with no upstream traffic.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from extproc import jsonrpc
from extproc.handlers import auth, meta, tasks
from extproc.jsonrpc import INVALID_PARAMS, MODERN, Message, RpcError
from extproc.replies import Local
from extproc.request import Request

if TYPE_CHECKING:
    from catalog.view import View
    from extproc.gateway import Gateway

Items = tuple[dict[str, Any], ...]

LISTS = {
    "tools/list": ("tools", "tools"),
    "prompts/list": ("prompts", "prompts"),
    "resources/list": ("resources", "resources"),
    "resources/templates/list": ("templates", "resourceTemplates"),
}


async def list_items(gw: Gateway, req: Request, msg: Message) -> Local:
    started = time.perf_counter()
    attr, key = LISTS[msg.method]
    view = await gw.current_view(req)
    cursor = msg.params.get("cursor")
    offset = 0
    if cursor is not None and cursor != "":
        if not isinstance(cursor, str):
            raise RpcError(INVALID_PARAMS, "Invalid params: cursor must be a string")
        parsed = gw.cursors.read(msg.method, cursor)
        if parsed is None or parsed.view != view.fingerprint:
            raise RpcError(INVALID_PARAMS, "Invalid cursor: the list changed or the cursor is not ours; list again")
        offset = parsed.offset
    scope = gw.cache_scope(req)
    mode = gw.tool_mode(req)
    extra, native = listing(gw, req, view, attr, msg.era)
    cache_key = (view.fingerprint, msg.method, offset, msg.era, scope, mode, gw.edge_tools.generation,
                 attr == "tools" and tasks.client_drives_tasks(msg),
                 tuple(t.get("name") for t in extra))
    page = gw.pages.get(cache_key)
    hit = page is not None
    if page is None:
        items = (*extra, *(tasks.listed_tools(native, msg) if attr == "tools" else native))
        size = gw.config.list_page_size or max(len(items), 1)
        result: dict[str, Any] = {key: list(items[offset:offset + size])}
        if offset + size < len(items):
            result["nextCursor"] = gw.cursors.make(msg.method, view.fingerprint, offset + size)
        if msg.era == MODERN:
            result.update(ttlMs=view.ttl_ms, cacheScope=scope, resultType="complete",
                          _meta={jsonrpc.META_SERVER_INFO: gw.server_info})
        page = gw.pages[cache_key] = jsonrpc.dumps(result)
    gw.metrics.listed(msg.method, hit, time.perf_counter() - started)
    return Local.raw_result(msg.id, page)


def listing(gw: Gateway, req: Request, view: View, attr: str, era: str) -> tuple[Items, Items]:
    """(the gateway's own items, the upstreams' items) of one list for this caller: what a client reads (also
    what the notification channel compares, so a client is told exactly when this changes)."""
    mode = gw.tool_mode(req)
    extra: Items = ()
    native: Items = ()
    if attr == "tools":
        if mode != "native":
            extra = meta.META_TOOLS
        if mode != "meta":
            extra = (*extra, *gw.edge_listing(req, era))
            native = view.legacy_tools if era != MODERN else view.tools
    elif mode == "meta":
        extra = (auth.AUTH_STATUS_RESOURCE,) if attr == "resources" else ()
    else:
        if attr == "resources" and gw.offers_auth_status:
            extra = (auth.AUTH_STATUS_RESOURCE,)
        native = getattr(view, attr)
    return extra, native
