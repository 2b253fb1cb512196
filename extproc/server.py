"""The processor: one grpc.aio ext_proc server per process, with its fleet, sessions and status endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import grpc
import httpx2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg

from catalog.config import GatewayConfig
from catalog.manifests import MCPServer
from extproc import logs
from extproc.catalog_files import read_catalog, watch
from extproc.credentials import Broker, Exchanger, MemoryStore, RedisStore, SecretFiles, TokenStore
from extproc.fleet import Fleet
from extproc.gateway import Gateway
from extproc.oauth import UserTokens
from extproc.sessions import Cursors, Sealer, Sessions, load_key
from extproc.status import serve_status
from extproc.stream import Stream
from extproc.upstream import UpstreamClient

log = logging.getLogger(__name__)

SESSION_KEY_ENV = "MUSTER_EDGE_SESSION_KEY"

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 80 << 20),
    ("grpc.max_send_message_length", 80 << 20),
    # Envoy pings its gRPC clusters; a default gRPC-Python server answers GOAWAY too_many_pings.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


class Processor(epg.ExternalProcessorServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        stream = Stream(self.gateway, context.write)
        logs.tag_request(stream.log_facts)
        try:
            async for msg in request_iterator:
                reply = await stream.handle(msg)
                if reply is not None:
                    await context.write(reply)
        except asyncio.CancelledError:
            pass  # Envoy resets every stream when its HTTP request ends
        except Exception:
            # Fail closed: Envoy answers status_on_error (503) for a stream that errors.
            log.exception("processing a request failed")
            raise


def build_gateway(config: GatewayConfig) -> Gateway:
    if config.session_key_file:
        key = load_key(file=config.session_key_file)
    elif config.session_key_env:
        key = load_key(env=config.session_key_env)
    else:
        key = load_key(env=SESSION_KEY_ENV) if os.environ.get(SESSION_KEY_ENV) else load_key()
    sealer = Sealer(key)
    client = UpstreamClient(str(config.internal_listen))
    secrets = SecretFiles(config.secrets_dir)
    store: TokenStore = RedisStore(config.redis_url, sealer) if config.redis_url else MemoryStore()
    idp_http = httpx2.AsyncClient(timeout=10.0, limits=httpx2.Limits(max_connections=64))
    user_tokens = None
    if config.upstream_oauth is not None:
        oauth = config.upstream_oauth
        secret = secrets.read_file(oauth.client_secret_file) if oauth.client_secret_file else \
            os.environ.get(oauth.client_secret_env, "") if oauth.client_secret_env else ""
        internal = httpx2.AsyncClient(base_url=f"http://{config.internal_listen}", timeout=10.0)
        user_tokens = UserTokens(oauth, secret, config.callback_url, store, sealer, idp_http, internal)
    broker = Broker(Exchanger(idp_http, store, secrets), secrets, user_tokens)

    async def own_calls(server: MCPServer, owner: str, bearer: str) -> Mapping[str, str]:
        return (await broker.credential(server, owner, bearer)).headers

    fleet = Fleet(client, prefix=config.prefix, mode=config.prefix_mode, default_ttl_ms=config.list_ttl_ms,
                  ttl_floor_ms=config.list_ttl_floor_ms, list_wait_s=config.list_wait_ms / 1000,
                  auth=own_calls, per_user=Broker.per_user, renew=broker.evict)
    return Gateway(config, fleet, Sessions(sealer), Cursors(sealer), broker)


async def serve(config: GatewayConfig, *, port: int, status_port: int | None) -> None:
    gateway = build_gateway(config)
    server = grpc.aio.server(options=GRPC_OPTIONS, maximum_concurrent_rpcs=20_000)
    epg.add_ExternalProcessorServicer_to_server(Processor(gateway), server)
    server.add_insecure_port(f"{config.processor_listen.host}:{port}")
    await server.start()
    fleet = gateway.fleet
    first = read_catalog(config.catalog_dir)
    fleet.set_catalog(first.servers, first.errors)
    maintainer = asyncio.get_running_loop().create_task(fleet.maintain())
    watcher = asyncio.get_running_loop().create_task(
        watch(config.catalog_dir, lambda result: fleet.set_catalog(result.servers, result.errors)))
    status_server = None
    if status_port is not None:
        status_server = await serve_status(config.status_listen.host, status_port, fleet.status,
                                           gateway.metrics.render)
    log.info("processor listening on %s:%d", config.processor_listen.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    watcher.cancel()
    maintainer.cancel()
    if status_server is not None:
        status_server.close()
    await server.stop(1.0)
    await fleet.aclose()
    await fleet.client.aclose()


def audit_to_file(path: str) -> None:
    """Audit lines also go to a file of their own (one JSON object per line), for a log shipper."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("muster_edge.audit").addHandler(handler)


def run_processor(config: GatewayConfig, *, port: int, status_port: int | None) -> None:
    if config.audit_log:
        audit_to_file(config.audit_log)
    try:
        import uvloop

        uvloop.run(serve(config, port=port, status_port=status_port))
    except ImportError:
        asyncio.run(serve(config, port=port, status_port=status_port))
