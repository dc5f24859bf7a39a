"""What the HTTP faces share: model files as a pull writes them, and files sent with ``sendfile``.

:class:`ServedFiles` is the one decoded-file reader of a server: parsed
manifests, file layouts (:mod:`mzstore.pull.fileview`), the sha256 of each
file as served, and a response writer that decodes the next chunk while the
current one goes out; the Hugging Face face (:mod:`mzstore.server.hub`) and
the S3 face (:mod:`mzstore.server.s3`) use the same instance, so they share
its LRU of decoded chunks. :class:`DecodedFiles` keeps files that were read
decoded once on the server's disk, so repeat reads (a fleet of inference
servers loading one model through a face) are sent with ``sendfile``
instead of decoded again. :class:`DigestFile` sends a file from disk with
``sendfile`` under a sha256 ``ETag`` (blob routes, exported files), and
:func:`byte_range` reads the one ``Range`` of a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from aiohttp import hdrs, web

from mzstore.durable import write_pieces
from mzstore.errors import MzstoreError, NotFound
from mzstore.format.manifest import Manifest, parse_manifest
from mzstore.format.refs import Ref
from mzstore.pull.fileview import ChunkReader, FileLayout, file_sha256, read_range
from mzstore.server import metrics
from mzstore.storage.node import temp_prefix
from mzstore.storage.store import Store, manifest_key

T = TypeVar("T")
log = logging.getLogger("mzstore.files")
#: Decoded chunks kept for concurrent readers (bytes).
DECODED_CACHE_BYTES = 256 * 1024 * 1024
#: Parsed manifests kept (manifests are immutable, so they never go stale).
MANIFESTS_KEPT = 64
#: Files smaller than this are decoded for every read (one chunk: ``sendfile`` would save little).
MATERIALIZE_MIN_BYTES = 16 * 1024 * 1024
#: Free disk a decoded file leaves beside itself; below it, files are decoded for every read.
FREE_MARGIN_BYTES = 1024**3


class DecodedFiles:
    """Files decoded once onto the server's disk, then sent with ``sendfile`` (an LRU bounded in bytes).

    A read of a file of at least :data:`MATERIALIZE_MIN_BYTES` that is not here yet is served by
    decoding, as before, and queues the file: one builder thread writes it in file order through
    the server's :class:`ChunkReader` (so chunks a request just decoded are not decoded twice), and
    only a whole file is renamed into place. Every chunk of it passed its decoded-hash check on the
    way (the reader never returns a chunk that failed), the header bytes come from the manifest,
    and the layout tiles the file exactly: the file is the served bytes by construction, with the
    sha256 the manifest records, which names it. It is not re-read on each send: like nginx's or a
    CDN's cache, the copy is trusted on the disk it was written to, for the life of the server
    (the folder is a temp dir, removed when the server stops).

    Evicted files are unlinked; a response that already opened one keeps reading it.
    """

    def __init__(self, reader: ChunkReader, limit_bytes: int, root: Path | None = None) -> None:
        self.reader = reader
        self.limit_bytes = limit_bytes
        self._parent = root
        self._root: Path | None = None
        self._lock = threading.Lock()
        self._done: OrderedDict[str, tuple[Path, int]] = OrderedDict()
        self._queued: set[str] = set()
        self._failed: set[str] = set()
        self._closed = False
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="mzstore-decoded-files")
        #: Files written, and sends served from them (for tests and the bench).
        self.built = 0
        self.hits = 0

    def open(self, sha256: str) -> BinaryIO | None:
        """The decoded file named ``sha256``, opened for reading, or ``None`` when it is not here."""
        with self._lock:
            hit = self._done.get(sha256)
            if hit is None:
                return None
            try:
                fh = open(hit[0], "rb")  # under the lock: eviction cannot unlink it between lookup and open
            except OSError:
                del self._done[sha256]
                return None
            self._done.move_to_end(sha256)
            self.hits += 1
            return fh

    def want(self, sha256: str, layout: FileLayout) -> None:
        """Queue ``layout``'s file (served as ``sha256``) for writing, unless it is small, too big, here or queued."""
        if not sha256 or layout.size < MATERIALIZE_MIN_BYTES or layout.size > self.limit_bytes:
            return
        with self._lock:
            if self._closed or sha256 in self._done or sha256 in self._queued or sha256 in self._failed:
                return
            self._queued.add(sha256)
        try:
            self._builder.submit(self._build, sha256, layout)
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._queued.discard(sha256)

    def wait(self) -> None:
        """Block until the files queued so far are written (tests, the bench)."""
        self._builder.submit(lambda: None).result()

    def _dir(self) -> Path:
        with self._lock:
            if self._root is None:
                if self._parent is not None:
                    self._parent.mkdir(parents=True, exist_ok=True)
                # named for its writer, so a restarted server sweeps a dead one's folder (sweep_temp)
                self._root = Path(tempfile.mkdtemp(prefix=temp_prefix("decoded-files"), dir=self._parent))
            return self._root

    def _build(self, sha256: str, layout: FileLayout) -> None:
        tmp: Path | None = None
        try:
            root = self._dir()
            free = shutil.disk_usage(root).free
            if free < layout.size + FREE_MARGIN_BYTES:
                log.warning("not keeping %s decoded: %d bytes free on %s", layout.entry.path, free, root)
                return
            tmp = root / f".{sha256}.{threading.get_ident()}.part"
            with open(tmp, "wb") as fh:
                for block in read_range(layout, self.reader, 0, layout.size):
                    write_pieces(fh, block)
            final = root / sha256
            os.replace(tmp, final)
            tmp = None
            with self._lock:
                if self._closed:
                    final.unlink(missing_ok=True)
                    return
                self._done[sha256] = (final, layout.size)
                self.built += 1
                metrics.DECODED_FILES_BYTES.inc(layout.size)
                self._evict()
        except (MzstoreError, OSError) as exc:
            log.warning("could not keep %s decoded: %s", layout.entry.path, exc)
            if isinstance(exc, MzstoreError):
                with self._lock:
                    self._failed.add(sha256)  # a chunk that fails its check fails again: serve by decoding
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            with self._lock:
                self._queued.discard(sha256)

    def _evict(self) -> None:
        held = sum(size for _, size in self._done.values())
        while held > self.limit_bytes and self._done:
            _, (path, size) = self._done.popitem(last=False)
            path.unlink(missing_ok=True)
            held -= size
            metrics.DECODED_FILES_BYTES.dec(size)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            root, self._root = self._root, None
            metrics.DECODED_FILES_BYTES.dec(sum(size for _, size in self._done.values()))
            self._done.clear()
        self._builder.shutdown(wait=True, cancel_futures=True)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


class ServedFiles:
    """Files of stored models as ``mzstore pull -o`` writes them, readable at any range (see the module docstring).

    ``decoded_bytes`` bounds the files kept decoded on disk (:class:`DecodedFiles`; 0 keeps none),
    in a temp dir under ``decoded_dir`` (default: the system's).
    """

    def __init__(
        self,
        store: Store,
        decode_workers: int = 4,
        decoded_bytes: int = 0,
        decoded_dir: Path | None = None,
    ) -> None:
        self.store = store
        #: Where the faces' temp folders go (kept decoded files, Hub exports); ``None``: the system's.
        self.temp_dir = decoded_dir
        self.reader = ChunkReader(store.read_blob, DECODED_CACHE_BYTES)
        self.decoded = DecodedFiles(self.reader, decoded_bytes, decoded_dir)
        self.pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="mzstore-files")
        self._lock = threading.Lock()
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._layouts: dict[tuple[str, str], FileLayout] = {}
        self._sha: dict[tuple[str, str], str] = {}
        self._tag_times: dict[tuple[str, str, str], float] = {}  # (name, tag, digest) → when written

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.decoded.close()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the decode pool (storage reads and decoding block)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def tag(self, name: str, tag: str) -> tuple[str, float] | None:
        """The manifest digest of ``name:tag`` and when the tag was written (POSIX seconds), or ``None``.

        Resolved by :meth:`Store.resolve`, the code every face shares: on a pull-through cache it asks
        the upstream (within its TTL), elsewhere it reads the versioned tag on the nodes. When the tag
        was written is read once per tag and digest (the version does not change while the digest stays).
        """
        try:
            _, digest = self.store.resolve(Ref(name, tag))
        except NotFound:
            return None
        key = (name, tag, digest)
        with self._lock:
            written = self._tag_times.get(key)
        if written is None:
            try:
                value = self.store.ref_value(name, tag)
                written = value.version.time_ms / 1000 if value.digest == digest else 0.0
            except MzstoreError:
                written = 0.0
            written = written or self.store.written(manifest_key(digest))
            with self._lock:
                self._tag_times[key] = written
        return digest, written

    def manifest(self, digest: str) -> Manifest:
        """The parsed manifest (kept: manifests never change)."""
        with self._lock:
            hit = self._manifests.get(digest)
            if hit is not None:
                self._manifests.move_to_end(digest)
                return hit
        manifest = parse_manifest(self.store.get_manifest(digest))
        with self._lock:
            self._manifests[digest] = manifest
            while len(self._manifests) > MANIFESTS_KEPT:
                old, _ = self._manifests.popitem(last=False)
                for key in [k for k in self._layouts if k[0] == old]:
                    del self._layouts[key]
        return manifest

    def layout(self, digest: str, manifest: Manifest, path: str) -> FileLayout:
        """Where the bytes of ``path`` come from.

        Raises:
            FileNotFoundError: the version has no such file.
        """
        key = (digest, path)
        with self._lock:
            hit = self._layouts.get(key)
        if hit is not None:
            return hit
        layout = FileLayout(manifest, path)
        with self._lock:
            self._layouts[key] = layout
        return layout

    def sha256(self, digest: str, layout: FileLayout) -> str:
        """The sha256 of the file as served: recorded in the manifest, or (older lossy pushes) read once."""
        known = layout.sha256
        if known:
            return known
        key = (digest, layout.entry.path)
        with self._lock:
            hit = self._sha.get(key)
        if hit is None:
            hit = file_sha256(layout, self.reader)
            with self._lock:
                self._sha[key] = hit
        return hit

    async def send(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        layout: FileLayout,
        sha256: str,
        start: int,
        end: int,
        plane: str,
    ) -> None:
        """Write ``[start, end)`` of the file (served as ``sha256``) on the prepared ``response``.

        A file kept decoded on disk (:class:`DecodedFiles`) goes out with ``sendfile``. Otherwise the
        file is decoded, the next chunk while the current one goes out, and queued to be kept. A chunk
        that fails its check raises after the headers went out: the connection is cut, and the client
        sees a short body (``Content-Length`` tells it), never wrong bytes.
        """
        loop = asyncio.get_running_loop()
        kept = self.decoded.open(sha256) if sha256 else None
        if kept is not None:
            metrics.FACE_FILE_READS.labels("sendfile").inc()
            with kept, corked(request):
                try:
                    if request.transport is None:
                        raise ConnectionResetError("connection lost")
                    await loop.sendfile(request.transport, kept, start, end - start)
                finally:  # asyncio leaves the file's offset after the last byte sent, also when cut off
                    metrics.BLOB_BYTES.labels(plane).inc(max(0, os.lseek(kept.fileno(), 0, os.SEEK_CUR) - start))
            return
        metrics.FACE_FILE_READS.labels("decode").inc()
        self.decoded.want(sha256, layout)
        pieces = list(layout.covering(start, end))
        pending = None
        for i, (piece, lo, hi) in enumerate(pieces):
            if piece.literal is not None:
                data: bytes | memoryview = piece.literal[lo:hi]
            else:
                assert piece.task is not None
                future = (
                    pending if pending is not None else loop.run_in_executor(self.pool, self.reader.read, piece.task)
                )
                pending = None
                nxt = next((p for p, _, _ in pieces[i + 1 :] if p.task is not None), None)
                if nxt is not None and nxt.task is not None:
                    pending = loop.run_in_executor(self.pool, self.reader.read, nxt.task)
                try:
                    data = memoryview(await future)[lo:hi]
                except MzstoreError:
                    if pending is not None:
                        pending.cancel()
                    raise
            await response.write(data)
            metrics.BLOB_BYTES.labels(plane).inc(len(data))


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


def iso_utc(seconds: float) -> str:
    """``2026-12-05T19:00:00.000Z``: the timestamp form of the Hub's API and of S3 listings."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds * 1000) % 1000:03d}Z"


async def start_body(request: web.BaseRequest, status: int, headers: dict[str, str], length: int) -> web.StreamResponse:
    """Send the status and headers of a streamed ``application/octet-stream`` body of ``length`` bytes."""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_type = "application/octet-stream"
    response.content_length = length
    await response.prepare(request)
    return response


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
