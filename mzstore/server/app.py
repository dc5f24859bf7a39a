"""Building and running the gRPC server.

``build_server`` wires the Store service, standard health checking
(``grpc.health.v1``) and reflection onto a ``grpc.Server`` bound to
``listen`` (port 0 picks a free port, as tests do). ``serve`` runs it until
SIGINT/SIGTERM, then stops accepting RPCs and gives running ones a grace
period (graceful shutdown). Servers hold no state of their own: any number
of them can serve the same root.

Security (issue #6): ``auth`` (a token file, see :mod:`mzstore.server.auth`)
adds the token interceptor; ``tls`` serves TLS, and mutual TLS when it names
a client CA. Tokens over plaintext are refused unless ``listen`` is loopback.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import ssl
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mzstore.errors import InvalidArgument
from mzstore.limits import MAX_MESSAGE_BYTES
from mzstore.push.sessions import UploadSessions
from mzstore.server.auth import TokenFile, TokenInterceptor
from mzstore.server.files import ServedFiles
from mzstore.server.http import HttpOptions, HttpPlane
from mzstore.server.metrics import MetricsInterceptor, watch_store
from mzstore.server.s3 import DEFAULT_BUCKET, S3Options, S3Plane
from mzstore.server.service import StoreService
from mzstore.server.uploads import PREFIX as UPLOAD_PREFIX
from mzstore.server.uploads import HttpUploads
from mzstore.server.upstream import DEFAULT_TTL_S, PullThroughService, PullThroughStore
from mzstore.settings import KEEPALIVE_TIMEOUT_S, Settings, is_loopback
from mzstore.storage.node import LocalNode, open_node, sweep_temp
from mzstore.storage.store import Store
from mzstore.transport.wire import push_request, upload_request
from mzstore.v1 import store_pb2, store_pb2_grpc

log = logging.getLogger("mzstore.server")
SERVICE_NAME = store_pb2.DESCRIPTOR.services_by_name["Store"].full_name
SPOOL_MAX_AGE_S = 24 * 3600


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key (PEM files); with ``client_ca``, clients must present a certificate it issued."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def ssl_context(self) -> ssl.SSLContext:
        """The same certificate (and client CA) for the HTTP plane."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.cert, self.key)
            if self.client_ca:
                context.load_verify_locations(self.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise InvalidArgument(f"cannot use the TLS files for HTTP: {exc}") from None
        return context

    def credentials(self) -> grpc.ServerCredentials:
        try:
            pair = (self.key.read_bytes(), self.cert.read_bytes())
            ca = self.client_ca.read_bytes() if self.client_ca else None
        except OSError as exc:
            raise InvalidArgument(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    store: Store
    http: HttpPlane | None = None
    s3: S3Plane | None = None
    files: ServedFiles | None = None  # the decoded-file reader the HTTP and S3 faces share
    service: StoreService | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str | None:
        """``http://127.0.0.1:PORT`` of the HTTP plane, if it runs."""
        return f"{self.http.url.split('://')[0]}://127.0.0.1:{self.http.port}" if self.http else None

    @property
    def s3_url(self) -> str | None:
        """``http(s)://127.0.0.1:PORT`` of the S3 face, if it runs."""
        return f"{self.s3.url.split('://')[0]}://127.0.0.1:{self.s3.port}" if self.s3 else None

    def stop(self, grace: float | None = 5.0) -> None:
        self.health.enter_graceful_shutdown()
        if self.s3 is not None:
            self.s3.stop()
        if self.http is not None:
            self.http.stop()
        if self.files is not None:
            self.files.close()
        self.server.stop(grace).wait()


def _clean_spool(node: LocalNode) -> None:
    """Remove spool and temp files left behind by dead pushes (see :func:`sweep_temp`)."""
    for path in sweep_temp(node.tempdir(), SPOOL_MAX_AGE_S):
        log.info("removed %s, left by a dead upload", path.name)


def build_server(
    root: str | Path | Store | list[str],
    listen: str = "127.0.0.1:0",
    settings: Settings | None = None,
    max_workers: int = 16,
    upstream: str | None = None,
    upstream_ttl: float = DEFAULT_TTL_S,
    auth: str | Path | TokenFile | None = None,
    tls: TlsConfig | None = None,
    http: str | None = None,
    http_advertise: str | None = None,
    public_blobs: bool = False,
    presign: bool = True,
    public_hub: bool = False,
    s3: str | None = None,
    s3_bucket: str = DEFAULT_BUCKET,
    public_s3: bool = False,
) -> RunningServer:
    """Create and start a server over storage nodes.

    Args:
        root: a directory or node URL (the embedded default), a list of node
            URLs (one replica per blob), or a configured :class:`Store`.
        listen: ``HOST:PORT``; port 0 picks a free port.
        settings: chunk and shard sizes; defaults from :class:`Settings`.
        upstream: ``HOST:PORT`` of another server: serve as its read-only
            pull-through cache (see :mod:`mzstore.server.upstream`), filling
            ``root``'s nodes on first pull. A :class:`PullThroughStore` given
            as ``root`` is one already.
        upstream_ttl: seconds a tag resolved upstream is trusted.
        auth: a token file (path or :class:`TokenFile`): every Store call needs a token with the right scope.
        tls: serve TLS (mutual TLS with a client CA) instead of plaintext.
        http: ``HOST:PORT`` of the HTTP data plane (:mod:`mzstore.server.http`), ``"auto"`` for the
            gRPC port + 1 on the same host (a free port when the gRPC port is 0), ``None`` for none.
        http_advertise: the blob URL base clients are told (default: the listener's own URL), for a
            server behind a proxy or a CDN.
        public_blobs: anonymous clients may read blobs over HTTP (tokens still guard everything else).
        public_hub: anonymous clients may read models through the Hugging Face face (``HF_ENDPOINT``).
        s3: ``HOST:PORT`` of the read-only S3 face (:mod:`mzstore.server.s3`; ``None``: off), its bucket
            ``s3_bucket``; ``public_s3``: unsigned requests are served even with a token file.
        presign: blobs on S3 nodes are answered with a redirect to a presigned URL.

    Returns:
        The started server and the port it bound.

    Raises:
        InvalidArgument: tokens over plaintext on a non-loopback address; an unreadable token or TLS file.
    """
    settings = settings or Settings()
    if auth is not None and tls is None and not is_loopback(listen):
        raise InvalidArgument(
            f"refusing to accept tokens over plaintext on {listen}: give --tls-cert/--tls-key or listen on loopback"
        )
    tokens = auth if isinstance(auth, TokenFile) or auth is None else TokenFile(auth)
    credentials = tls.credentials() if tls else None
    if isinstance(root, Store):
        store = root
    elif isinstance(root, list):
        store = Store([open_node(u) for u in root])
    else:
        store = Store(open_node(root))
    if upstream is not None and not isinstance(store, PullThroughStore):
        store = PullThroughStore(store.nodes, upstream, replicas=store.replicas, ttl=upstream_ttl, settings=settings)
    local = [n for n in store.nodes if isinstance(n, LocalNode)]
    # Shards are spooled on a local node's disk when there is one (staging there is a rename).
    spool = local[0].tempdir() if local else None
    for node in local:
        _clean_spool(node)
    if spool is not None:
        UploadSessions(spool / "uploads").sweep()  # sessions idle for a day
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
        # Keepalive (issue #6): ping an idle client every keepalive_s; one that does not answer within
        # KEEPALIVE_TIMEOUT_S is gone, and its calls are cancelled (their handlers stop, pushes clean up).
        ("grpc.keepalive_time_ms", int(settings.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # accept client pings this often (clients ping every keepalive_s; faster pingers get GOAWAY)
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(min(settings.keepalive_s, 5.0) * 1000)),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="mzstore-rpc"),
        options=options,
        interceptors=[MetricsInterceptor(), *([TokenInterceptor(tokens)] if tokens else [])],
        # more calls than this at once (running or queued for a worker) get RESOURCE_EXHAUSTED
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
    )
    watch_store(store)
    plane = None
    # one decoded-file reader for the Hugging Face and S3 faces, keeping files decoded on the spool's disk
    files = ServedFiles(store, decoded_bytes=settings.files_cache_bytes, decoded_dir=spool)
    context = tls.ssl_context() if tls and (http is not None or s3 is not None) else None
    if http is not None:
        host, port = _http_address(http, listen)
        http_options = HttpOptions(
            tokens=tokens, public_blobs=public_blobs, public_hub=public_hub, presign=presign, ssl_context=context
        )
        plane = HttpPlane(store, host, port, http_options, files).start()
    s3_plane = None
    if s3 is not None:
        host, port = _host_port(s3, "--s3 must be HOST:PORT")
        s3_options = S3Options(bucket=s3_bucket, tokens=tokens, public=public_s3)
        s3_plane = S3Plane(store, host, port, s3_options, files, context).start()
    service = (
        PullThroughService(store, settings)
        if isinstance(store, PullThroughStore)
        else StoreService(store, settings, spool)
    )
    service.blob_url = http_advertise or (plane.url if plane is not None else "")
    if plane is not None and not isinstance(store, PullThroughStore):  # pushes' bytes may come by HTTP too
        plane.uploads = HttpUploads(service)
        service.upload_url = plane.url + UPLOAD_PREFIX
    _add_store_service(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    if port == 0:
        for listener in (plane, s3_plane):
            if listener is not None:
                listener.stop()
        files.close()
        raise OSError(f"cannot listen on {listen}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer, store, plane, s3_plane, files, service)


def _http_address(http: str, listen: str) -> tuple[str, int]:
    """``(host, port)`` of the HTTP plane: ``HOST:PORT``, or ``"auto"``: the gRPC port + 1 on its host."""
    if http == "auto":
        host, _, port = listen.rpartition(":")
        return host.strip("[]"), int(port) + 1 if int(port) else 0
    return _host_port(http, "--http must be HOST:PORT, 'auto' or 'off'")


def _host_port(text: str, usage: str) -> tuple[str, int]:
    """``(host, port)`` of ``HOST:PORT`` (``[v6]:PORT`` too); :class:`InvalidArgument` saying ``usage`` if not."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"{usage}, got {text!r}")
    return host.strip("[]"), int(port)


class _Handlers:
    """Stands in for a server to catch the method handlers the generated code registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def _add_store_service(service: StoreService, server: grpc.Server) -> None:
    """Register the Store service as generated, except where the bulk bytes go by.

    ``StoreService.ReadBlob`` yields ``BlobChunk`` messages already serialized
    (:func:`mzstore.transport.wire.blob_chunk`), which gRPC then sends as they are: one
    copy of the data per message instead of two. ``Push`` and ``Upload`` read their data
    messages in place (:func:`mzstore.transport.wire.push_request`, ``upload_request``).
    """
    caught = _Handlers()
    store_pb2_grpc.add_StoreServicer_to_server(service, caught)
    handlers = caught.handlers
    handlers["ReadBlob"] = grpc.unary_stream_rpc_method_handler(
        service.ReadBlob, request_deserializer=store_pb2.ReadBlobRequest.FromString
    )
    handlers["Push"] = grpc.stream_unary_rpc_method_handler(
        service.Push, request_deserializer=push_request, response_serializer=store_pb2.PushResponse.SerializeToString
    )
    handlers["Upload"] = grpc.stream_unary_rpc_method_handler(
        service.Upload,
        request_deserializer=upload_request,
        response_serializer=store_pb2.UploadStatus.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


#: glibc malloc arenas for a server process (``MALLOC_ARENA_MAX`` in the environment wins).
MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's per-thread malloc arenas; return whether the cap was set.

    Every gRPC and encoder thread otherwise gets its own arena, and the
    1 MiB message buffers they free stay cached per arena: measured with
    ``bench/bench_load.py`` (4 clients, 70/30 pull/push), server RSS grew
    from 157 to 194 MiB over 240 s; with 2 arenas it stayed at 103–112 MiB
    over 90 s, at the same throughput. A no-op off glibc.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_arena_max = -8  # from glibc's malloc.h
    return bool(libc.mallopt(m_arena_max, arenas))


def serve(
    root: str | Path | Store | list[str],
    listen: str,
    settings: Settings | None = None,
    ready: threading.Event | None = None,
    grace: float = 10.0,
    upstream: str | None = None,
    upstream_ttl: float = DEFAULT_TTL_S,
    auth: str | Path | TokenFile | None = None,
    tls: TlsConfig | None = None,
    http: str | None = "auto",
    http_advertise: str | None = None,
    public_blobs: bool = False,
    presign: bool = True,
    public_hub: bool = False,
    s3: str | None = None,
    s3_bucket: str = DEFAULT_BUCKET,
    public_s3: bool = False,
) -> None:
    """Run a server until SIGINT or SIGTERM, then shut down gracefully (with its HTTP plane, by default).

    With ``upstream``, the server is a read-only pull-through cache of that server; ``auth`` and ``tls``
    as in :func:`build_server`.
    """
    limit_malloc_arenas()
    running = build_server(
        root,
        listen,
        settings,
        upstream=upstream,
        upstream_ttl=upstream_ttl,
        auth=auth,
        tls=tls,
        http=http,
        http_advertise=http_advertise,
        public_blobs=public_blobs,
        presign=presign,
        public_hub=public_hub,
        s3=s3,
        s3_bucket=s3_bucket,
        public_s3=public_s3,
    )
    host = listen.rsplit(":", 1)[0]
    where = ", ".join(running.store.urls)
    copies = f" ({running.store.replicas} replicas)" if len(running.store.nodes) > 1 else ""
    cache = running.store if isinstance(running.store, PullThroughStore) else None
    fronts = (
        f" as a pull-through cache of {cache.upstream_address} (tags rechecked every {cache.ttl:g} s)" if cache else ""
    )
    security = (" over mutual TLS" if tls.client_ca else " over TLS") if tls else ""
    security += " with tokens" if auth is not None else ""
    log.info("mzstore serving %s%s on %s:%d%s%s", where, copies, host, running.port, fronts, security)
    blobs = f"; blobs over HTTP at {running.http.url}" if running.http else ""
    blobs += f"; S3 (bucket {running.s3.options.bucket}) at {running.s3.url}" if running.s3 else ""
    print(f"mzstore serving {where}{copies} on {host}:{running.port}{fronts}{security}{blobs}", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    if ready:
        ready.set()
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("mzstore: shutting down", flush=True)
        running.stop(grace)
        if cache:
            cache.close()
