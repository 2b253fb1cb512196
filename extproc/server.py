"""The processor: one grpc.aio ext_proc server per process, with its fleet, sessions and status endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
import httpx2
from envoy.service.accesslog.v3 import als_pb2_grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as epg
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from catalog.config import GatewayConfig
from catalog.manifests import LoadResult, MCPServer
from extproc import logs, tracing
from extproc.access_log import AccessLogs
from extproc.bridges.state import with_bridges
from extproc.catalog_files import CatalogWatch, read_catalog
from extproc.credentials import Broker, Exchanger, MemoryStore, RedisStore, SecretFiles, TokenStore
from extproc.executions import Executions
from extproc.fleet import Fleet
from extproc.gateway import KNOWN_METHODS, Gateway
from extproc.handlers import workflows
from extproc.metrics import Metrics
from extproc.oauth import EdgeLogin, UserTokens
from extproc.peers import Peers
from extproc.sessions import Cursors, Sealer, Sessions, load_key
from extproc.status import serve_status, status_token, workers_metrics
from extproc.stream import Stream
from extproc.upstream import UpstreamClient
from extproc.xds import XdsServer, registry_for

log = logging.getLogger(__name__)
RECHECK_GAP_S = 0.05  # an unknown tool name reads the catalog folder at most this often (a few stat calls)

SESSION_KEY_ENV = "MUSTER_EDGE_SESSION_KEY"
SUPERVISOR_STATE_ENV = "MUSTER_EDGE_SUPERVISOR_STATE"

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
        if tracing.ON:  # Envoy's trace context rides on the stream's gRPC metadata
            tracing.continue_stream(context.invocation_metadata())
        try:
            async for msg in request_iterator:
                started = time.perf_counter()
                reply = await stream.handle(msg)
                self.gateway.metrics.message(msg.WhichOneof("request") or "", time.perf_counter() - started)
                if reply is not None:
                    await context.write(reply)
        except asyncio.CancelledError:
            pass  # Envoy resets every stream when its HTTP request ends
        except Exception:
            # Fail closed: Envoy answers status_on_error (503) for a stream that errors.
            log.exception("processing a request failed")
            raise
        finally:
            stream.closed()


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
        edge = None
        if config.edge_login is not None and config.auth is not None:
            login = config.edge_login
            edge_secret = secrets.read_file(login.client_secret_file) if login.client_secret_file else \
                os.environ.get(login.client_secret_env, "") if login.client_secret_env else ""
            edge = EdgeLogin(config.auth.issuer, config.auth.jwks_uri, login.client_id, edge_secret, login.scopes,
                             config.auth.clock_skew_s)
        if config.auth is not None and edge is None:  # parse_config refuses this too: never store unproven logins
            raise ValueError("upstreamOAuth with auth needs edgeLogin")
        user_tokens = UserTokens(oauth, secret, config.callback_url, store, sealer, idp_http, internal, edge)
    broker = Broker(Exchanger(idp_http, store, secrets), secrets, user_tokens)

    async def own_calls(server: MCPServer, owner: str, bearer: str) -> Mapping[str, str]:
        return (await broker.credential(server, owner, bearer)).headers

    fleet = Fleet(client, prefix=config.prefix, mode=config.prefix_mode, default_ttl_ms=config.list_ttl_ms,
                  ttl_floor_ms=config.list_ttl_floor_ms, list_wait_s=config.list_wait_ms / 1000,
                  auth=own_calls, per_user=Broker.per_user, renew=broker.evict,
                  max_upstream_sessions=config.sessions.max_upstream_sessions,
                  active_window_s=config.sessions.active_window_s)
    sessions = Sessions(sealer, idle_timeout_s=config.sessions.idle_timeout_s)
    metrics = Metrics(histograms=config.metrics)
    gateway = Gateway(config, fleet, sessions, Cursors(sealer), broker, metrics)
    fleet.on_fetch = metrics.fetched
    broker.exchanger.on_exchange = metrics.exchanged
    metrics.list_ages(fleet.list_ages)
    workflows.install(gateway, Executions(config.workflows, sealer, config.redis_url))
    return gateway


def sibling_urls(config: GatewayConfig, status_port: int | None) -> list[str]:
    """The other workers of this gateway, by their status ports (worker i listens on status port + i)."""
    if status_port is None or config.workers < 2:
        return []
    host = config.status_listen.host
    host = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host in ("::", "[::]") else host
    ports = [config.status_listen.port + i for i in range(config.workers)]
    return [f"http://{host}:{p}/peer" for p in ports if p != status_port]


async def serve(config: GatewayConfig, *, port: int, status_port: int | None) -> None:
    tracing.setup(config.tracing)
    gateway = build_gateway(config)
    gateway.peers = Peers(gateway.sessions.sealer, sibling_urls(config, status_port), config.redis_url,
                          idle_timeout_s=config.sessions.idle_timeout_s, max_age_s=gateway.sessions.max_age_s)
    relays: set[asyncio.Task[None]] = set()

    def relay(event: dict[str, Any]) -> None:
        assert gateway.peers is not None
        task = asyncio.get_running_loop().create_task(gateway.peers.tell(event))
        relays.add(task)
        task.add_done_callback(relays.discard)

    gateway.peers.on_notify = gateway.notifier.from_peer
    gateway.peers.on_cancel = gateway.cancel_here
    gateway.notifier.relay = relay
    server = grpc.aio.server(options=GRPC_OPTIONS, maximum_concurrent_rpcs=20_000)
    epg.add_ExternalProcessorServicer_to_server(Processor(gateway), server)
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(
        AccessLogs(gateway.metrics, lambda: gateway.fleet.servers, KNOWN_METHODS), server)
    # grpc.health.v1 for Envoy's health checks on the processor cluster: a frozen worker misses them.
    healthy = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(healthy, server)
    server.add_insecure_port(f"{config.processor_listen.host}:{port}")
    first = read_catalog(config.catalog_dir)
    xds = serve_xds(config, gateway, server, first.servers)
    await server.start()
    await healthy.set("", health_pb2.HealthCheckResponse.SERVING)
    fleet = gateway.fleet
    gateway.set_catalog(first.servers, first.errors)
    workflows.of(gateway).set_workflows(first.workflows)

    def changed(result: LoadResult) -> None:
        if xds is not None:
            xds.set_catalog(result.servers)
        gateway.set_catalog(result.servers, result.errors)
        workflows.of(gateway).set_workflows(result.workflows)

    maintainer = asyncio.get_running_loop().create_task(fleet.maintain())
    flusher = asyncio.get_running_loop().create_task(flush_audit())
    sweeper = asyncio.get_running_loop().create_task(gateway.sweep_sessions())
    listener = asyncio.get_running_loop().create_task(gateway.peers.listen(gateway.end_here, gateway.lost_here))
    catalog_watch = CatalogWatch(config.catalog_dir, changed)
    gateway.recheck_catalog = lambda: catalog_watch.check(min_gap_s=RECHECK_GAP_S)
    watcher = asyncio.get_running_loop().create_task(catalog_watch.run())
    upkeep = xds_upkeep(xds)
    status_server = None
    if status_port is not None:
        status_server = await serve_status(config.status_listen.host, status_port,
                                           with_supervisor(lambda: with_bridges({**gateway.status(),
                                                                                 "sessions": gateway.session_status(),
                                                                                 **({"xds": xds.status()} if xds
                                                                                    else {})},
                                                                                config.state_dir)),
                                           gateway.metrics.render, gateway.peer_message, token=status_token(config),
                                           all_metrics=workers_metrics(config, status_port, gateway.metrics.render),
                                           stream=gateway.notifier.serve)
    log.info("processor listening on %s:%d", config.processor_listen.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.notifier.aclose()
    await shutdown(server, healthy, fleet, [watcher, maintainer, sweeper, listener, flusher, *upkeep], status_server,
                   gateway.peers)
    for handler in _audit_handlers:
        handler.flush()
    await workflows.of(gateway).executions.aclose()
    if tracing.ON:
        await asyncio.to_thread(tracing.shutdown)  # the last spans reach the collector


def serve_xds(config: GatewayConfig, gateway: Gateway, server: grpc.aio.Server,
              servers: Sequence[MCPServer]) -> XdsServer | None:
    """With `xds: true`, this worker also serves the catalog's clusters and routes to Envoys (ADS), and lists a new
    server only once every connected Envoy has acknowledged its cluster."""
    if not config.xds:
        return None
    xds = XdsServer(config, registry_for(config))
    xds.set_catalog(servers)
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(xds, server)
    gateway.fleet.envoy_acked = xds.gate.acked
    return xds


def xds_upkeep(xds: XdsServer | None) -> list[asyncio.Task[None]]:
    if xds is None:
        return []
    loop = asyncio.get_running_loop()
    return [loop.create_task(xds.heartbeat()), loop.create_task(xds.gate.refresh())]


async def shutdown(server: grpc.aio.Server, healthy: Any, fleet: Fleet, tasks: list[asyncio.Task[None]],
                   status_server: asyncio.Server | None, peers: Any = None) -> None:
    """Stop in dependency order, so nothing runs against a closed part: say NOT_SERVING (Envoy moves new streams
    away), stop the background loops, finish the in-flight streams, end the upstream sessions and wait for those
    DELETEs, and only then close the HTTP client they go out on."""
    await healthy.enter_graceful_shutdown()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if status_server is not None:
        status_server.close()
    await server.stop(1.0)
    await fleet.aclose()
    await _drain(timeout=3.0)
    await fleet.client.aclose()
    if peers is not None:
        await peers.aclose()


async def _drain(timeout: float) -> None:
    """Let the tasks still running (upstream session DELETEs, refreshes) end, then cancel what is left."""
    current = asyncio.current_task()
    pending = {t for t in asyncio.all_tasks() if t is not current and not t.done()}
    if not pending:
        return
    _, late = await asyncio.wait(pending, timeout=timeout)
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)


def with_supervisor(status: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Under `muster-edge run`, /status also shows what the supervisor did: each process's state, restarts and
    recent crashes, and the ones it gave up on (it writes them to a small file in the state folder)."""
    path = os.environ.get(SUPERVISOR_STATE_ENV, "")
    if not path:
        return status

    def combined() -> dict[str, Any]:
        out = status()
        with contextlib.suppress(OSError, ValueError), open(path, encoding="utf-8") as fh:
            out["supervisor"] = json.load(fh)
        return out

    return combined


_audit_handlers: list[logs.BatchingHandler] = []


async def flush_audit(every_s: float = 0.25) -> None:
    """Batched audit lines reach their streams within `every_s` even when no further line comes."""
    while True:
        await asyncio.sleep(every_s)
        for handler in _audit_handlers:
            handler.flush()


def run_processor(config: GatewayConfig, *, port: int, status_port: int | None) -> None:
    # Log records need no caller frame, thread or process names here: each costs a lookup per line.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    # audit lines in batches, to stderr and to their own file (one JSON object per line) for a log shipper
    audit_file = open(config.audit_log, "a", encoding="utf-8") if config.audit_log else None  # noqa: SIM115
    _audit_handlers[:] = logs.configure_audit([audit_file] if audit_file is not None else [])
    try:
        import uvloop

        uvloop.run(serve(config, port=port, status_port=status_port))
    except ImportError:
        asyncio.run(serve(config, port=port, status_port=status_port))
