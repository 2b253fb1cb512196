"""subscriptions/listen (2026-07-28) and resources/subscribe|unsubscribe (handshake era): the notification
channel's requests. Checked here like any request; the streams themselves are served by extproc/notify.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

from extproc import jsonrpc
from extproc.handlers.calls import _name, _not_found
from extproc.jsonrpc import MODERN, Message, RpcError
from extproc.replies import Forward, Local
from extproc.request import Request

if TYPE_CHECKING:
    from extproc.gateway import Gateway


async def listen(gw: Gateway, req: Request, msg: Message) -> Forward:
    await gw.current_view(req)
    return gw.notifier.open_listen(req, msg)


async def subscribe(gw: Gateway, req: Request, msg: Message) -> Local:
    """Answered by the gateway: the session's GET stream (whichever worker holds it) gets the resource's
    resources/updated, under the URI the client used; the worker holding the stream subscribes upstream."""
    if msg.era == MODERN:
        raise RpcError(jsonrpc.METHOD_NOT_FOUND, f"Method not found: {msg.method} (removed in 2026-07-28; "
                                                 "use subscriptions/listen)")
    uri = _name(msg.params, "uri")
    on = msg.method == "resources/subscribe"
    view = await gw.current_view(req)
    if on and view.resolve_uri(uri) is None:
        raise _not_found(msg, uri)
    gw.notifier.session_subscribe(req.session_nonce.hex(), uri, on)
    return Local.result(msg.id, {})
