"""The HTTP data plane: immutable, content-addressed blob URLs beside the gRPC control plane.

How it works: an aiohttp web server runs on its own event loop in a thread
of the ``mzstore serve`` process, over the same :class:`Store` as the gRPC
service. Routes:

``GET|HEAD /v2/<name>/blobs/sha256:<hex>`` (OCI-distribution shaped; the name is validated, then ignored:
blobs are content-addressed) and the name-free alias ``/blobs/sha256:<hex>``
    The blob's stored bytes. A blob on a local node is sent with
    ``sendfile`` by aiohttp's ``FileResponse`` (no Python copy per byte),
    which also answers ``Range`` (one range → ``206`` with ``Content-Range``;
    an unsatisfiable one → ``416``). ``ETag`` is the digest (strong),
    ``Cache-Control: public, max-age=31536000, immutable``, no
    ``Content-Encoding``; ``If-None-Match`` with the digest → ``304``;
    ``If-Range`` with the digest keeps the range. Several ranges in one
    request are refused with ``416`` (documented: ask one range at a time, as
    every mzstore client and nginx's ``slice`` module do). A blob on an S3
    node is a ``307`` to a presigned GET URL (valid ``presign_seconds``), so
    the server carries none of its bytes; without presigning (or for other
    object stores) it is streamed from the node.
``/api/models/…`` and ``/{repo}/resolve/{revision}/{path}``
    The Hugging Face Hub face (:mod:`mzstore.server.hub`): ``HF_ENDPOINT``
    pointed here lets ``huggingface_hub``, transformers and
    sentence-transformers download models from the store.
``PUT /v1/uploads/<session>``
    An upload session's remaining bytes as one body, instead of an ``Upload``
    stream (:mod:`mzstore.server.uploads`; needs ``write``).
``GET /metrics``
    Prometheus text format (:mod:`mzstore.server.metrics`).
``GET /healthz``, ``GET /readyz``
    Liveness, and readiness (the store's first node answers).

Every blob is checked against its digest once per process before it is
served (:meth:`Store.blob_location`: failover and repair as for gRPC reads),
so a corrupt copy is never sent. Tokens and scopes are the gRPC ones
(``Authorization: Bearer``; blob reads need ``read``), checked before any
storage access; ``public_blobs`` lets anonymous clients read blobs (a digest
is a 256-bit capability), so a CDN or site cache can serve a fleet without
tokens. Errors are JSON ``{"error": …}`` with an ``X-Error-Code`` header
naming the reason, as the Hugging Face Hub does; a domain error also names
its gRPC status (``grpc_code``), so an mzstore client raises what it would
for the same gRPC call.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Self

from aiohttp import hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mzstore.errors import (
    Cancelled,
    Conflict,
    DeadlineExceeded,
    IntegrityError,
    InvalidArgument,
    MzstoreError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from mzstore.format.refs import validate_digest, validate_name
from mzstore.server import metrics
from mzstore.server.auth import TokenFile
from mzstore.server.files import DigestFile, ServedFiles, byte_range, start_body
from mzstore.server.hub import HubFace
from mzstore.server.uploads import ROUTE as UPLOAD_ROUTE
from mzstore.server.uploads import HttpUploads
from mzstore.storage.node import FsspecNode, LocalNode
from mzstore.storage.store import Store

log = logging.getLogger("mzstore.server.http")

#: What a blob response says to every cache between the server and the client.
IMMUTABLE = "public, max-age=31536000, immutable"
#: Longest request path accepted (a digest path is under 200 bytes; names are at most 255 characters).
MAX_PATH = 1024
#: Seconds a presigned object-store URL stays valid.
PRESIGN_SECONDS = 300
#: Bytes per read when a blob is streamed from a node that has no file to send.
STREAM_BLOCK = 4 * 1024 * 1024
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
#: Status of each domain error on the HTTP plane.
HTTP_STATUS: dict[type[MzstoreError], int] = {
    InvalidArgument: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    Conflict: 409,
    IntegrityError: 502,
    Unavailable: 503,
    DeadlineExceeded: 504,
    ResourceExhausted: 507,
    Cancelled: 499,  # as nginx logs a request its client closed
}


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, grpc_code: str | None = None
) -> web.Response:
    body = {"error": message, "code": code, **({"grpc_code": grpc_code} if grpc_code else {})}
    return web.json_response(body, status=status, headers={"X-Error-Code": code, **(headers or {})})


def error_response(exc: MzstoreError) -> web.Response:
    """A domain error as JSON, with its gRPC status name too (``grpc_code``): an mzstore client raises the
    same class as for the gRPC call (:data:`~mzstore.errors.ERROR_FOR_REASON`, then ``ERROR_FOR_CODE``)."""
    return _error(_status_of(exc), exc.reason or type(exc).__name__, str(exc), grpc_code=exc.grpc_code)


def _status_of(exc: MzstoreError) -> int:
    for cls, status in HTTP_STATUS.items():
        if isinstance(exc, cls):
            return status
    return 500


@dataclass
class HttpOptions:
    """How the HTTP plane is set up.

    Attributes:
        tokens: the token file (``None``: no tokens needed, as the gRPC side).
        public_blobs: anonymous clients may read blobs.
        public_hub: anonymous clients may read models through the Hugging Face face.
        presign: answer blobs on S3 nodes with a redirect to a presigned URL.
        ssl_context: serve HTTPS with this context (mutual TLS when it asks for client certificates).
    """

    tokens: TokenFile | None = None
    public_blobs: bool = False
    public_hub: bool = False
    presign: bool = True
    ssl_context: ssl.SSLContext | None = None


class Listener:
    """An aiohttp application on its own event loop, in a thread of the server process.

    Subclasses fill the application in :meth:`build`; :meth:`start` binds (port 0: a free one, read
    back into ``port``) and :meth:`stop` closes it with its connections.
    """

    name = "mzstore-http"

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http(s)://host:port`` of the listener (an unspecified host stays ``*``: see the client)."""
        scheme = "https" if self.ssl_context else "http"
        host = "*" if self.host in ("", "0.0.0.0", "::", "[::]") else self.host
        return f"{scheme}://{host}:{self.port}"

    def build(self) -> web.Application:
        raise NotImplementedError

    def start(self) -> Self:
        """Bind and serve in a background thread; ``port`` is the bound port afterwards."""
        ready: asyncio.Future[None] = self._loop.create_future()

        async def boot() -> None:
            app = self.build()
            # keep-alive connections idle this long are closed; a client that stops reading a body
            # is dropped by the kernel's send timeout, never holding a thread (the loop is async)
            self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=75.0)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host or None, self.port, ssl_context=self.ssl_context, backlog=512)
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []
            if sockets:
                self.port = sockets[0].getsockname()[1]

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(boot())
            except BaseException as exc:  # noqa: BLE001 - handed to start()
                self._loop.call_soon(ready.set_exception, exc)
                self._loop.run_until_complete(asyncio.sleep(0))
                return
            ready.set_result(None)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        waited = asyncio.run_coroutine_threadsafe(asyncio.wait_for(asyncio.shield(ready), 30), self._loop)
        waited.result(35)
        return self

    def stop(self) -> None:
        """Stop serving (idempotent); open connections are closed."""
        if self._thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._thread = None
        self.closed()

    def closed(self) -> None:
        """Called once the listener has stopped."""


class HttpPlane(Listener):
    """The HTTP listener of a server: blobs, the Hugging Face face, metrics and probes."""

    def __init__(
        self, store: Store, host: str, port: int, options: HttpOptions | None = None, files: ServedFiles | None = None
    ) -> None:
        self.options = options or HttpOptions()
        super().__init__(host, port, self.options.ssl_context)
        self.store = store
        self._own_files = files is None
        self.files = files or ServedFiles(store)
        self.hub = HubFace(store, self.files)
        #: The upload route's handler, once the server has a Store service that takes pushes.
        self.uploads: HttpUploads | None = None

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._observe, self._guard], client_max_size=1024)
        app.on_response_prepare.append(self._count)
        app.router.add_route("GET", r"/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_route("HEAD", r"/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_route("GET", "/blobs/{digest}", self._blob)
        app.router.add_route("HEAD", "/blobs/{digest}", self._blob)
        self.hub.add_routes(app.router)
        app.router.add_put(UPLOAD_ROUTE, self._upload)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    def closed(self) -> None:
        self.hub.close()
        if self.uploads is not None:
            self.uploads.close()
        if self._own_files:
            self.files.close()

    # -- middleware -------------------------------------------------------------------------
    @web.middleware
    async def _observe(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Refuses malformed paths; turns domain errors into JSON errors."""
        try:
            if len(request.raw_path) > MAX_PATH or "\x00" in request.raw_path or "%00" in request.raw_path:
                return _error(400, "BadPath", "the request path is too long or malformed")
            return await handler(request)
        except MzstoreError as exc:
            return error_response(exc)

    async def _count(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every response by route and final status, as its headers go out (a file's 206 is known by then)."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics.HTTP_REQUESTS.labels(route, str(response.status)).inc()

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Tokens and scopes, before any storage access (blobs and the Hub face need ``read``, uploads
        ``write`` as the ``Upload`` call does: the session, made by ``StartUpload`` under the token's
        prefixes, names what it writes; probes and metrics are open)."""
        tokens = self.options.tokens
        info = request.match_info
        is_blob = "digest" in info
        is_hub = "repo" in info or "rest" in info
        is_upload = "session" in info
        if tokens is None or not (is_blob or is_hub or is_upload):
            return await handler(request)
        if (is_blob and self.options.public_blobs) or (is_hub and self.options.public_hub):
            return await handler(request)
        auth = request.headers.get(hdrs.AUTHORIZATION, "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("this server needs a token: send Authorization: Bearer <token> (HF_TOKEN)")
        grant = tokens.lookup(token.strip())
        if grant is None:
            raise Unauthenticated("the token is not known to this server")
        needed, what = ("write", "uploads") if is_upload else ("read", "reads")
        if not grant.allows(needed):
            raise PermissionDenied(f"token {grant.name!r} has scope {grant.scope}; {what} need {needed}")
        return await handler(request)

    # -- routes -----------------------------------------------------------------------------
    async def _upload(self, request: web.Request) -> web.StreamResponse:
        if self.uploads is None:
            raise NotFound("this server takes no uploads over HTTP")
        return await self.uploads.put(request)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if not _DIGEST.fullmatch(digest):
            return _error(400, "BadDigest", "a blob is named sha256:<64 lowercase hex digits>")
        validate_digest(digest)
        if "name" in request.match_info:
            validate_name(request.match_info["name"])
        etag = f'"{digest.split(":", 1)[1]}"'
        headers = {
            hdrs.ETAG: etag,
            hdrs.CACHE_CONTROL: IMMUTABLE,
            hdrs.ACCEPT_RANGES: "bytes",
            "Docker-Content-Digest": digest,
        }
        none_match = request.headers.get(hdrs.IF_NONE_MATCH)
        if none_match is not None and (none_match.strip() == "*" or etag in [t.strip() for t in none_match.split(",")]):
            return web.Response(status=304, headers=headers)
        ranges = request.headers.get(hdrs.RANGE)
        if ranges is not None and "," in ranges:
            return _error(416, "MultipleRanges", "ask for one byte range per request (Range: bytes=START-END)", headers)
        loop = asyncio.get_running_loop()
        node, key = await loop.run_in_executor(None, self.store.blob_location, digest)  # verified once per process
        if isinstance(node, LocalNode):
            return DigestFile(node.root / key, digest.split(":", 1)[1], headers)
        if self.options.presign and isinstance(node, FsspecNode) and hasattr(node.fs, "sign"):
            url = await loop.run_in_executor(None, node.fs.sign, node.base + "/" + key, PRESIGN_SECONDS)
            return web.Response(status=307, headers={**headers, hdrs.LOCATION: str(url)})
        return await self._stream(request, digest, headers)

    async def _stream(self, request: web.Request, digest: str, headers: dict[str, str]) -> web.StreamResponse:
        """A blob on a node with no file to send: read it from the store, range by range."""
        loop = asyncio.get_running_loop()
        size = await loop.run_in_executor(None, self.store.blob_size, digest)
        start, end = 0, size
        status = 200
        if request.headers.get(hdrs.RANGE) is not None:
            try:
                start, end = byte_range(request, size)
            except ValueError as exc:
                return _error(416, "BadRange", str(exc), {hdrs.CONTENT_RANGE: f"bytes */{size}"})
            status = 206
            headers = {**headers, hdrs.CONTENT_RANGE: f"bytes {start}-{end - 1}/{size}"}
        response = await start_body(request, status, headers, end - start)
        if request.method == "HEAD":
            return response
        offset = start
        while offset < end:
            n = min(STREAM_BLOCK, end - offset)
            data = await loop.run_in_executor(None, self.store.read_blob, digest, offset, n)
            await response.write(data)
            metrics.BLOB_BYTES.labels("http").inc(len(data))
            offset += n
        await response.write_eof()
        return response

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(metrics.REGISTRY)
        return web.Response(body=body, headers={hdrs.CONTENT_TYPE: CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.store.node.exists, "refs")
        except (MzstoreError, OSError) as exc:
            return _error(503, "NotReady", f"storage is not reachable: {exc}")
        return web.json_response({"status": "ready"})
