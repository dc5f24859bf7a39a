"""The HTTP data plane on the client: blob ranges over plain HTTP, control over another transport.

How it works: control calls (manifests, pushes, tags) go to ``control`` (the
gRPC transport). A blob range is one ``GET <base>/blobs/sha256:<hex>`` with
``Range: bytes=START-END`` on a keep-alive connection (one per reader thread
at a time, from a small pool per host), read straight into the buffer the
pipeline decodes from with ``readinto``: the kernel copies each byte once,
into that buffer, which comes from a pool of reused page-aligned buffers
(:mod:`mzstore.transport.buffers`). (urllib3, used first, copies every byte three times on its
way there — its ``readinto`` is a ``read`` plus a copy — and its import cost
25 ms of every pull's start.) Redirects are followed (a ``307`` to a
presigned object-store URL; the ``Authorization`` header is not sent to
another host). The response must be ``206`` with exactly the asked
``Content-Range``, or ``200`` for a request that covers the whole blob, and
exactly ``length`` bytes. A kept-alive connection the server closed meanwhile
is replaced once, as any HTTP client does.

Any HTTP failure of a range — connection refused or reset, a timeout, an
error status, a short or wrong answer — falls back to ``control`` for that
range, with one warning per transport. A chunk that failed its hash check is
read again with :meth:`read_blob_again`, which goes to ``control``, i.e. to
the origin server: a cache between the client and the blob URL (nginx, a
CDN) that returned bad bytes is bypassed for that chunk, never trusted twice.
"""

from __future__ import annotations

import http.client
import logging
import os
import ssl
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from mzstore.errors import IntegrityError, InvalidArgument
from mzstore.settings import Settings
from mzstore.transport.base import ControlledTransport, Transport
from mzstore.transport.buffers import ReceiveBuffers

if TYPE_CHECKING:
    from mzstore.transport.base import Payload

log = logging.getLogger("mzstore.transport.http")

#: Redirects followed for one range read.
MAX_REDIRECTS = 3
#: Idle connections kept per host.
KEEP_PER_HOST = 16
#: Seconds to open a connection (reads then wait up to ``settings.fetch_timeout``).
CONNECT_TIMEOUT = 5.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
#: (scheme, host, port) of the origin, and (host, port) of the forward proxy in between, if any.
_Key = tuple[str, str, int, "tuple[str, int] | None"]


class _Connections:
    """Keep-alive connections by (scheme, host, port): taken by one thread for one request, then given back."""

    def __init__(self, timeout: float, context: ssl.SSLContext | None) -> None:
        self.timeout = timeout
        self.context = context
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def take(self, key: _Key) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to ``key``, and whether it was used before (it may have been closed by the server)."""
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                return idle.pop(), True
        scheme, host, port, proxy = key
        conn: http.client.HTTPConnection
        at_host, at_port = proxy or (host, port)
        if scheme == "https":
            context = self.context or ssl.create_default_context()
            conn = http.client.HTTPSConnection(at_host, at_port, timeout=CONNECT_TIMEOUT, context=context)
            if proxy:
                conn.set_tunnel(host, port)  # CONNECT through the proxy, TLS to the origin
        else:
            conn = http.client.HTTPConnection(at_host, at_port, timeout=CONNECT_TIMEOUT)
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(self.timeout)
        return conn, False

    def give(self, key: _Key, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < KEEP_PER_HOST:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _key(url: str, proxy: tuple[str, int] | None = None) -> tuple[_Key, str]:
    """The connection key of an absolute URL and the request target to send on it.

    Through a forward proxy, a plain-HTTP request names the whole URL (absolute form); an HTTPS one
    goes through a ``CONNECT`` tunnel and names only the path.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise IntegrityError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if proxy is not None and parts.scheme == "http":
        target = url
    return (parts.scheme, parts.hostname, port, proxy), target


def _proxy_address(proxy: str | None) -> tuple[str, int] | None:
    if not proxy:
        return None
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidArgument(f"MZSTORE_BLOB_PROXY must be http://HOST:PORT, got {proxy!r}")
    return parts.hostname, parts.port or 80


def tls_context(
    ca: str | os.PathLike[str] | None, cert: str | os.PathLike[str] | None, key: str | os.PathLike[str] | None
) -> ssl.SSLContext:
    """A client's TLS context: the system's CAs (a presigned URL's host) and ``ca`` (the server's), and the
    client certificate ``cert``/``key`` for a server that asks for one."""
    context = ssl.create_default_context()
    if ca:
        context.load_verify_locations(ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


class HttpTransport(ControlledTransport):
    """Blob ranges from an HTTP blob URL base, everything else (and every fallback) through ``control``.

    Args:
        control: the transport to the server.
        base_url: ``http(s)://host:port[/prefix]``; blobs are at ``<base_url>/blobs/sha256:<hex>``.
        settings: deadlines and the read streams of a pull (the connection pool's size).
        token: sent as ``Authorization: Bearer`` (over HTTPS, or to a loopback host).
        tls_ca: CA bundle for an ``https`` base URL (default: the system's).
        tls_cert, tls_key: the client certificate and key for a server that asks for one (mutual TLS:
            the same pair the gRPC channel presents, ``settings.tls_cert``/``tls_key``).
        proxy: ``http://HOST:PORT`` of a forward proxy for the range reads (``MZSTORE_BLOB_PROXY``:
            a Dragonfly peer, a corporate proxy); control calls never go through it.
    """

    def __init__(
        self,
        control: Transport,
        base_url: str,
        settings: Settings,
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        proxy: str | None = None,
    ) -> None:
        super().__init__(control)
        self.base_url = base_url.rstrip("/")
        self.token = token
        context = None
        if base_url.startswith("https:") or tls_ca or tls_cert:
            context = tls_context(tls_ca, tls_cert, tls_key)
        self.pool = _Connections(settings.fetch_timeout, context)
        self.buffers = ReceiveBuffers(settings.pull_inflight_bytes)
        self.proxy = _proxy_address(proxy)
        self._warned = False

    def close(self) -> None:
        self.pool.close()
        self.buffers.clear()
        self.control.close()

    def url(self, digest: str) -> str:
        """The blob's URL under the base."""
        return f"{self.base_url}/blobs/{digest}"

    # -- data plane -------------------------------------------------------------------------
    def read_blob(self, digest: str, offset: int, length: int) -> Payload:
        """A range over HTTP; from ``control`` when HTTP fails."""
        reason: Exception
        try:
            return self._get(digest, offset, length)
        except Exception as exc:  # noqa: BLE001 - urllib3's, the socket's, ours: fall back, never fail here
            reason = exc
        if not self._warned:
            self._warned = True
            log.warning("HTTP blob reads from %s failed (%s); using the server for those ranges", self.base_url, reason)
        return self.control.read_blob(digest, offset, length)

    def read_blob_again(self, digest: str, offset: int, length: int) -> Payload:
        """From the origin server (``control``): bytes that failed their check may come from a cache in between."""
        return self.control.read_blob(digest, offset, length)

    def read_parts(self, digest: str, offset: int, lengths: list[int]) -> Iterator[Payload]:
        """Adjacent ranges of one blob in one GET, each yielded in its own pooled buffer as soon as it is in.

        A pull asks for runs of chunks this way (:func:`~mzstore.pull.pipeline.run_pull`): every request
        costs the server about 1 ms of CPU (aiohttp's request handling and file open, measured on the
        2-core VM), and a chunk still decodes as soon as its own bytes are in. A failure raises from the
        iterator; the parts yielded before it are whole. There is no fallback here: the pipeline reads
        the remaining chunks one by one (:meth:`read_blob`, which falls back to ``control``).
        """
        key, conn, response = self._open(digest, offset, sum(lengths))
        try:
            for n in lengths:
                yield self._read(digest, response, n)
            if response.status == 200 and response.read(1):
                raise IntegrityError(f"blob {digest}: more bytes than asked for over HTTP")
        except BaseException:  # an error, or the consumer stopped early (GeneratorExit): the rest is unread
            conn.close()
            raise
        self._done(key, conn, response)

    def _get(self, digest: str, offset: int, length: int) -> Payload:
        (buf,) = self.read_parts(digest, offset, [length])  # unpacking runs the reader to its end: checked, pooled
        return buf

    def _open(
        self, digest: str, offset: int, length: int
    ) -> tuple[_Key, http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send the GET of ``length`` bytes at ``offset`` (following redirects); the response, its body unread."""
        url = self.url(digest)
        home = _key(url)[0][:3]
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"} if length else {}
        for _ in range(MAX_REDIRECTS + 1):
            key, target = _key(url, self.proxy)
            sent = dict(headers)
            if self.token and key[:3] == home:  # never to another host (a presigned URL carries its own grant)
                sent["Authorization"] = f"Bearer {self.token}"
            conn, response = self._request(key, target, sent)
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                response.read()
                self._done(key, conn, response)
                if not location:
                    raise IntegrityError(f"blob {digest}: HTTP {response.status} without a Location")
                url = urljoin(url, location)
                continue
            try:
                self._check(digest, offset, length, response)
            except BaseException:
                conn.close()
                raise
            return key, conn, response
        raise IntegrityError(f"blob {digest}: more than {MAX_REDIRECTS} redirects")

    def _request(
        self, key: _Key, target: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one GET; a reused connection the server has closed meanwhile is replaced once."""
        while True:
            conn, reused = self.pool.take(key)  # a new one is connected (OSError when it cannot be)
            try:
                conn.request("GET", target, headers=headers)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if not reused:
                    raise
            except BaseException:
                conn.close()
                raise

    def _done(self, key: _Key, conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Keep the connection for the next range when its response was read to the end."""
        if response.isclosed() and not response.will_close:
            self.pool.give(key, conn)
        else:
            conn.close()

    def _check(self, digest: str, offset: int, length: int, response: http.client.HTTPResponse) -> None:
        """The response holds exactly the range asked for, unencoded (a 200 only for a read from 0)."""
        if response.status == 206:
            want = f"bytes {offset}-{offset + length - 1}/"
            if not str(response.getheader("Content-Range", "")).startswith(want):
                raise IntegrityError(f"blob {digest}: the server answered another range")
        elif not (response.status == 200 and offset == 0):
            raise IntegrityError(f"blob {digest}: HTTP {response.status} for a range read")
        if response.getheader("Content-Encoding", "identity") != "identity":
            raise IntegrityError(f"blob {digest}: the server encoded the body")

    def _read(self, digest: str, response: http.client.HTTPResponse, length: int) -> memoryview | bytearray:
        """The next ``length`` bytes of the body, in a reused, page-aligned buffer (see mzstore.transport.buffers)."""
        buf = self.buffers.take(length)
        view = memoryview(buf)
        got = 0
        while got < length:
            n = response.readinto(view[got:])
            if not n:
                break
            got += n
        if got != length:
            raise IntegrityError(f"blob {digest}: got {got} of {length} bytes over HTTP")
        return buf

    def stream_blob(
        self, digest: str, offset: int = 0, timeout: float | None = None
    ) -> Iterator[tuple[int, memoryview]]:
        return self.control.stream_blob(digest, offset, timeout)
