"""Files sent over HTTP with ``sendfile``: a digest for an ``ETag``, corked segments, one byte range.

Shared by the blob routes (:mod:`mzstore.server.http`) and the Hugging Face
face (:mod:`mzstore.server.hub`).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web

from mzstore.server import metrics

#: Request headers decided against the digest before aiohttp sees the request.
CONDITIONS = frozenset(
    {"if-none-match", "if-match", "if-range", "if-modified-since", "if-unmodified-since", "accept-encoding"}
)


@contextlib.contextmanager
def corked(request: web.BaseRequest) -> Iterator[None]:
    """``TCP_CORK`` on the connection while a file is sent: only full segments leave (as nginx's ``tcp_nopush``).

    aiohttp turns ``TCP_NODELAY`` on, so each ``sendfile`` batch would be pushed as it comes; corked,
    the kernel builds full-size segments, which cut the server's CPU per GB served about 2.5x on this
    machine (``bench/bench_link.py``). Uncorking flushes the tail.
    """
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    cork = getattr(socket, "TCP_CORK", None)
    if sock is None or cork is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        yield
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)


class DigestFile(web.FileResponse):
    """A ``FileResponse`` whose ``ETag`` is a sha256 (aiohttp would make one from mtime and size).

    The conditional headers were decided by the handler against the digest; aiohttp sees a request
    without them (its own validators would be the mtime ones), and without ``Accept-Encoding`` (so
    it never picks a compressed sibling file). ``plane`` names the bytes in the served-bytes metric.
    """

    def __init__(self, path: Path, sha256: str, headers: dict[str, str], plane: str = "http") -> None:
        super().__init__(path, chunk_size=1024 * 1024, headers=headers)
        self._sha256 = sha256
        self._plane = plane
        self.content_type = "application/octet-stream"

    async def prepare(self, request: web.BaseRequest) -> Any:
        if_range = request.headers.get(hdrs.IF_RANGE)
        clean = {k: v for k, v in request.headers.items() if k.lower() not in CONDITIONS}
        if if_range is not None and if_range.strip() != self.headers[hdrs.ETAG]:
            clean.pop(hdrs.RANGE, None)  # a validator of another version: the whole file (RFC 9110 13.1.5)
        with corked(request):
            writer = await super().prepare(request.clone(headers=clean))
        if request.method == "GET" and self.status in (200, 206) and self.content_length:
            metrics.BLOB_BYTES.labels(self._plane).inc(self.content_length)
        return writer

    @property  # type: ignore[override]
    def etag(self) -> Any:
        return super().etag

    @etag.setter
    def etag(self, value: Any) -> None:  # FileResponse sets its own; the digest is the one that holds
        web.StreamResponse.etag.fset(self, self._sha256)  # type: ignore[attr-defined]


def byte_range(request: web.BaseRequest, size: int) -> tuple[int, int]:
    """``[start, end)`` of the one ``Range`` of a request for ``size`` bytes: ``bytes=N-``, ``N-M``, ``-N``.

    Raises:
        ValueError: several ranges, another unit, a malformed or an unsatisfiable range (answer ``416``).
    """
    text = request.headers.get(hdrs.RANGE, "")
    if "," in text:
        raise ValueError("ask for one byte range per request (Range: bytes=START-END)")
    try:
        rng = request.http_range  # a suffix "-N" comes back as slice(-N, None)
    except ValueError:
        raise ValueError(f"malformed Range {text[:80]!r}") from None
    first = rng.start if rng.start is not None else 0
    if first < 0:
        first = max(0, size + first)
    last = min(size, rng.stop) if rng.stop is not None else size
    if first >= size or first >= last:
        raise ValueError(f"Range {text[:80]!r} is outside the {size} bytes")
    return first, last
