"""Upload sessions over HTTP: a push's bulk bytes as one ``PUT`` body instead of gRPC messages.

How it works: ``StartUpload`` (gRPC, the control plane) answers with an
``upload_url`` when the server has an HTTP plane. The client then sends
``PUT /v1/uploads/<session>`` with a body that is, in file order, each file the
session has not ended from its ``received`` offset to its end, then, for a
file whose sha256 the begin left empty (the client hashes first only files
the store may hold, see :mod:`mzstore.push.reuse`), the 32 bytes of that
sha256; and nothing else (``Content-Length`` is required and must be
exactly that). No other framing is needed: the begin gives every file's
size, the session its offsets, and each file is checked against its sha256
(:class:`~mzstore.push.ingest.Ingest` hashes the bytes that arrive, as for a
stream's ``FileEnd``). The body is cut into the same upload events
(:mod:`mzstore.push.protocol`) an ``Upload`` stream gives,
and goes through the same session code
(:meth:`~mzstore.server.service.StoreService.upload`): ingested as it
arrives, kept for a resume, resumed at the offsets the answer reports.

Why: the design moves bulk bytes over plain HTTP, and a push's are the
bulkiest. The client sends the file's bytes as they are read, with no
message to build (its CPU for a 1 GiB push: 0.7 → 0.4 s); the server's
receiving costs about what reading the gRPC messages in place does.

The event loop reads the body and hands its pieces (``bytes`` as asyncio
received them, up to :data:`PIECE_QUEUE_BYTES` queued) to a thread that runs
the session code; the loop is woken only when the queue drains below half.
A client that goes away, or sends nothing for :data:`IDLE_S` seconds, ends
the upload as a broken ``Upload`` stream does (``Cancelled``: what arrived is
kept for a rerun); an upload past the server's maximum call time fails with
``DeadlineExceeded``. The answer is the session's status as JSON (the
``UploadStatus`` fields); an error is ``{"error", "code", "grpc_code"}``
with the HTTP status of :data:`~mzstore.server.http.HTTP_STATUS`, so the
client raises the class it would have raised for the stream.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import TYPE_CHECKING

from aiohttp import web

from mzstore.errors import Cancelled, DeadlineExceeded, InvalidArgument, MzstoreError
from mzstore.push.protocol import (
    DIGEST_BYTES,
    UploadBegin,
    UploadData,
    UploadEnd,
    UploadEvent,
    UploadStatus,
    upload_body_bytes,
)

if TYPE_CHECKING:
    from mzstore.server.service import StoreService

#: Where sessions' bodies go, under the HTTP plane's root, and the route (one session each).
PREFIX = "/v1/uploads"
ROUTE = PREFIX + "/{session}"
#: Body bytes the event loop may queue ahead of the session's thread.
PIECE_QUEUE_BYTES = 16 * 1024 * 1024
#: Seconds without a body byte after which an upload is given up (its bytes kept for a rerun).
IDLE_S = 60.0
#: Uploads running at once over HTTP (more wait for a thread).
MAX_UPLOADS = 8
_SESSION = re.compile(r"[0-9A-Za-z._-]{1,128}")


class _Pieces:
    """Body pieces from the event loop to the session's thread, bounded, with one wake-up per drain."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._ended = False
        self._error: MzstoreError | None = None
        self._cv = threading.Condition()
        self._room = asyncio.Event()
        self._waiting = False

    # -- the event loop's side ---------------------------------------------------------------
    async def feed(self, request: web.Request) -> None:
        """Read the body into the queue; a client that goes away or stalls ends it with :class:`Cancelled`."""
        try:
            while True:
                piece = await asyncio.wait_for(request.content.readany(), IDLE_S)
                if not piece:
                    break
                with self._cv:
                    self._queue.append(piece)
                    self._queued += len(piece)
                    self._cv.notify()
                    full = self._queued >= PIECE_QUEUE_BYTES
                    if full:
                        self._room.clear()
                        self._waiting = True
                if full:
                    await self._room.wait()
            self._finish(None)
        except TimeoutError:
            self._finish(Cancelled(f"no upload bytes for {IDLE_S:g} s; rerun the push to resume"))
        except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            self._finish(Cancelled(f"the upload's connection broke ({exc}); rerun the push to resume"))
        except Exception as exc:  # noqa: BLE001 - aiohttp's payload errors (a truncated body) are not OSErrors
            self._finish(Cancelled(f"the upload's body broke off ({type(exc).__name__}); rerun the push to resume"))

    def _finish(self, error: MzstoreError | None) -> None:
        with self._cv:
            self._ended = True
            self._error = error
            self._cv.notify()

    def stop(self) -> None:
        """The session's thread is done: let a feeder waiting for room go (it then finds the thread gone)."""
        with self._cv:
            self._ended = True
            self._queue.clear()
        self._loop.call_soon_threadsafe(self._room.set)

    # -- the session thread's side -----------------------------------------------------------
    def __iter__(self) -> Iterator[bytes]:
        while True:
            with self._cv:
                while not self._queue and not self._ended:
                    self._cv.wait()
                if not self._queue:
                    if self._error is not None:
                        raise self._error
                    return
                piece = self._queue.popleft()
                self._queued -= len(piece)
                if self._waiting and self._queued <= PIECE_QUEUE_BYTES // 2:
                    self._waiting = False
                    self._loop.call_soon_threadsafe(self._room.set)
            yield piece


def remaining(begin: UploadBegin, status: UploadStatus) -> int:
    """The bytes a ``PUT`` body must hold (:func:`~mzstore.push.protocol.upload_body_bytes`)."""
    files = begin.files
    return upload_body_bytes([f.size for f in files], [f.sha256 for f in files], status.received, status.ended)


def body_events(
    begin: UploadBegin, status: UploadStatus, pieces: Iterator[bytes], expiry: float | None, max_s: float
) -> Iterator[UploadEvent]:
    """The upload events of a ``PUT`` body: each unended file's data from its received offset, then its
    end with the begin's sha256, or the one after its data. A body that stops early stops the events
    there (a broken stream)."""
    it = iter(pieces)
    view = memoryview(b"")

    def more() -> bool:
        nonlocal view
        piece = next(it, None)
        if piece is None:
            return False
        if expiry is not None and time.monotonic() > expiry:
            raise DeadlineExceeded(f"the upload ran past this server's maximum call time of {max_s:g} s")
        view = memoryview(piece)
        return True

    for index, f in enumerate(begin.files):
        if status.ended[index]:
            continue
        pos = status.received[index]
        while pos < f.size:
            if not view and not more():
                return
            n = min(len(view), f.size - pos)
            yield UploadData(index, pos, view[:n])
            view = view[n:]
            pos += n
        sha = f.sha256
        if not sha:
            digest = b""
            while len(digest) < DIGEST_BYTES:
                if not view and not more():
                    return  # cut inside the digest: the file's bytes are all in, its end is not
                take = DIGEST_BYTES - len(digest)
                digest, view = digest + bytes(view[:take]), view[take:]
            sha = digest.hex()
        yield UploadEnd(index, f.size, sha)
    if view or next(it, None) is not None:
        raise InvalidArgument("the upload body holds more bytes than the session's files")


class HttpUploads:
    """The ``PUT /v1/uploads/<session>`` route of the HTTP plane, over a :class:`StoreService`."""

    def __init__(self, service: StoreService) -> None:
        self.service = service
        self._threads = ThreadPoolExecutor(MAX_UPLOADS, thread_name_prefix="mzstore-http-upload")

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def put(self, request: web.Request) -> web.StreamResponse:
        """The session's status as JSON; a domain error is answered by the plane's middleware."""
        return web.json_response(asdict(await self._put(request)))

    async def _put(self, request: web.Request) -> UploadStatus:
        session = request.match_info["session"]
        if not _SESSION.fullmatch(session):
            raise InvalidArgument("an upload session is named by 1 to 128 letters, digits, '.', '_' or '-'")
        loop = asyncio.get_running_loop()
        sessions = self.service.sessions

        def look() -> tuple[UploadBegin, UploadStatus]:
            status = sessions.status(session)  # SessionNotFound first
            return sessions.begin_of(session), status

        begin, status = await loop.run_in_executor(self._threads, look)
        need = remaining(begin, status)
        if request.content_length != need:
            raise InvalidArgument(
                f"the upload body must be the {need} bytes the session still needs (Content-Length), "
                f"got {request.content_length if request.content_length is not None else 'none'}"
            )
        max_s = self.service.settings.max_deadline_s
        expiry = time.monotonic() + max_s if max_s else None
        pieces = _Pieces(loop)

        def run() -> UploadStatus:
            try:
                return self.service.upload(session, body_events(begin, status, iter(pieces), expiry, max_s))
            finally:
                pieces.stop()

        done = loop.run_in_executor(self._threads, run)
        feeding = asyncio.ensure_future(pieces.feed(request))
        try:
            return await done
        finally:
            if not feeding.done():
                feeding.cancel()  # the session failed before its body ended: the rest is not read
                await asyncio.gather(feeding, return_exceptions=True)
