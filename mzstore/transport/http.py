"""The HTTP data plane on the client: blob ranges over plain HTTP, control over another transport.

How it works: control calls (manifests, pushes, tags) go to ``control`` (the
gRPC transport). A blob range is one ``GET <base>/blobs/sha256:<hex>`` with
``Range: bytes=START-END`` on a keep-alive connection from a pool (urllib3,
one connection per pull worker), read straight into the buffer the pipeline
decodes from (``readinto``). Redirects are followed (a ``307`` to a
presigned object-store URL; the ``Authorization`` header is not sent to
another host). The response must be ``206`` with exactly the asked
``Content-Range``, or ``200`` for a request that covers the whole blob, and
exactly ``length`` bytes.

Any HTTP failure of a range — connection refused or reset, a timeout, an
error status, a short or wrong answer — falls back to ``control`` for that
range, with one warning per transport. A range asked for again (the pull
pipeline re-fetches a chunk that failed its hash check) is read from
``control``, i.e. from the origin server: a cache between the client and the
blob URL (nginx, a CDN) that returned bad bytes is bypassed for that chunk,
never trusted twice.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from mzstore.errors import IntegrityError
from mzstore.settings import Settings
from mzstore.transport.base import RefInfo, Topology, Transport

if TYPE_CHECKING:
    from mzstore.push.protocol import PushResult, UploadBegin, UploadEvent, UploadStatus

log = logging.getLogger("mzstore.transport.http")

#: Ranges remembered to tell a repeat (a chunk asked again) from a first ask.
REMEMBERED = 100_000


class HttpTransport(Transport):
    """Blob ranges from an HTTP blob URL base, everything else (and every fallback) through ``control``.

    Args:
        control: the transport to the server.
        base_url: ``http(s)://host:port[/prefix]``; blobs are at ``<base_url>/blobs/sha256:<hex>``.
        settings: deadlines and the worker count (the connection pool's size).
        token: sent as ``Authorization: Bearer`` (over HTTPS, or to a loopback host).
        tls_ca: CA bundle for an ``https`` base URL (default: the system's).
        tls_cert, tls_key: the client certificate and key for a server that asks for one (mutual TLS:
            the same pair the gRPC channel presents, ``settings.tls_cert``/``tls_key``).
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
    ) -> None:
        import urllib3

        self.control = control
        self.address = control.address
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=max(4, 2 * settings.pull_workers),
            retries=urllib3.Retry(total=3, connect=0, read=0, status=0, redirect=3, raise_on_redirect=True),
            timeout=urllib3.Timeout(connect=5.0, read=settings.fetch_timeout),
            ca_certs=tls_ca,
            cert_file=tls_cert,
            key_file=tls_key,
        )
        self._asked: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._lock = threading.Lock()
        self._warned = False

    def close(self) -> None:
        self.pool.clear()
        self.control.close()

    def url(self, digest: str) -> str:
        return f"{self.base_url}/blobs/{digest}"

    # -- data plane -------------------------------------------------------------------------
    def _first_ask(self, key: tuple[str, int, int]) -> bool:
        with self._lock:
            if key in self._asked:
                self._asked.move_to_end(key)
                return False
            self._asked[key] = None
            if len(self._asked) > REMEMBERED:
                self._asked.popitem(last=False)
            return True

    def read_blob(self, digest: str, offset: int, length: int) -> bytes | bytearray:
        """A range over HTTP; from ``control`` when HTTP fails or when the range is asked again."""
        if not self._first_ask((digest, offset, length)):
            return self.control.read_blob(digest, offset, length)
        reason: Exception
        try:
            return self._get(digest, offset, length)
        except Exception as exc:  # noqa: BLE001 - urllib3's, the socket's, ours: fall back, never fail here
            reason = exc
        if not self._warned:
            self._warned = True
            log.warning("HTTP blob reads from %s failed (%s); using the server for those ranges", self.base_url, reason)
        return self.control.read_blob(digest, offset, length)

    def _get(self, digest: str, offset: int, length: int) -> bytearray:
        headers = {**self.headers, "Range": f"bytes={offset}-{offset + length - 1}"} if length else dict(self.headers)
        response: Any = self.pool.request(
            "GET", self.url(digest), headers=headers, preload_content=False, redirect=True, decode_content=False
        )
        try:
            if response.status == 206:
                want = f"bytes {offset}-{offset + length - 1}/"
                if not str(response.headers.get("Content-Range", "")).startswith(want):
                    raise IntegrityError(f"blob {digest}: the server answered another range")
            elif not (response.status == 200 and offset == 0):
                raise IntegrityError(f"blob {digest}: HTTP {response.status} for a range read")
            buf = bytearray(length)
            view = memoryview(buf)
            got = 0
            while got < length:
                n = response.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != length or (response.status == 200 and response.read(1)):
                raise IntegrityError(f"blob {digest}: got {got} of {length} bytes over HTTP")
            return buf
        finally:
            response.release_conn()

    def stream_blob(
        self, digest: str, offset: int = 0, timeout: float | None = None
    ) -> Iterator[tuple[int, memoryview]]:
        return self.control.stream_blob(digest, offset, timeout)

    # -- control plane: the server's --------------------------------------------------------------
    def manifest(self, ref: str) -> tuple[str, str, bytes]:
        return self.control.manifest(ref)

    def list_refs(self, name: str | None = None) -> list[RefInfo]:
        return self.control.list_refs(name)

    def tag(self, source: str, target: str) -> tuple[str, str]:
        return self.control.tag(source, target)

    def delete(self, ref: str) -> tuple[str, str]:
        return self.control.delete(ref)

    def topology(self) -> Topology:
        return self.control.topology()

    def push(self, begin: UploadBegin, events: Iterable[UploadEvent]) -> PushResult:
        return self.control.push(begin, events)

    def start_upload(self, session: str, begin: UploadBegin) -> UploadStatus:
        return self.control.start_upload(session, begin)

    def upload(self, session: str, events: Iterable[UploadEvent]) -> UploadStatus:
        return self.control.upload(session, events)

    def commit_upload(self, session: str) -> PushResult:
        return self.control.commit_upload(session)
