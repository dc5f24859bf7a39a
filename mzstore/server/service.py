"""gRPC servicer: proto → domain → library call → proto.

The only place where domain errors become gRPC status codes
(:func:`abort_with`; an error's ``reason`` travels as ``mzstore-reason``
trailing metadata). Handlers stay short: every upload, streamed or through a
session, is ingested by :meth:`StoreService.ingest`
(:class:`~mzstore.push.ingest.Ingest`); reads go to the :class:`Store`. The
server never decodes stored data on pull; it streams blob bytes.

Deadlines and cancellation (issue #6): the long calls, Push and ReadBlob,
stop as soon as the client cancels, goes away or runs out of its deadline:
ReadBlob checks ``context.is_active()`` before every message, and Push's
event stream raises :class:`~mzstore.errors.Cancelled` into the ingest,
which deletes its spool and staged shards (no ref is written). A call may run
at most ``settings.max_deadline_s`` whatever the client asked
(:class:`_DeadlineCap`).
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import grpc

from mzstore.errors import (
    REASON_KEY,
    Cancelled,
    DeadlineExceeded,
    FormatError,
    IntegrityError,
    InvalidArgument,
    MzstoreError,
    ResourceExhausted,
)
from mzstore.format.refs import parse_ref
from mzstore.limits import TRANSFER_BYTES
from mzstore.push.ingest import Ingest
from mzstore.push.protocol import (
    PushResult,
    UploadBegin,
    UploadData,
    UploadEnd,
    UploadEvent,
    UploadFile,
    UploadStatus,
    validate_begin,
)
from mzstore.push.reuse import KnownFiles
from mzstore.push.sessions import UploadSessions
from mzstore.server import metrics
from mzstore.settings import Settings
from mzstore.storage.store import Store
from mzstore.transport.wire import FileDataMessage, blob_chunk
from mzstore.v1 import store_pb2 as pb
from mzstore.v1 import store_pb2_grpc as pb_grpc

log = logging.getLogger("mzstore.server")
F = TypeVar("F", bound=Callable[..., Any])


def abort_with(context: grpc.ServicerContext, exc: BaseException) -> None:
    """Translate a domain error into a gRPC status (the one translation point), its reason into metadata."""
    if isinstance(exc, grpc.RpcError):  # a request stream broke: the client cancelled or went away
        exc = Cancelled("the client cancelled the call or went away")
    if isinstance(exc, MzstoreError):
        code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
        if exc.reason is not None:
            context.set_trailing_metadata(((REASON_KEY, exc.reason),))
        context.abort(code, str(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # Spool and temp files on the server's own disk: the store's nodes map this themselves.
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server's disk is full ({exc.strerror})")
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}")


def handler(fn: F) -> F:
    """A unary handler whose errors become gRPC statuses (see :func:`abort_with`)."""

    @wraps(fn)
    def wrapper(self: StoreService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - translated, never leaked
            abort_with(context, exc)

    return wrapper  # type: ignore[return-value]


def stream_handler(fn: F) -> F:
    """A streaming handler whose errors become gRPC statuses (see :func:`abort_with`)."""

    @wraps(fn)
    def wrapper(self: StoreService, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:  # noqa: BLE001
            abort_with(context, exc)

    return wrapper  # type: ignore[return-value]


class _DeadlineCap:
    """The server's maximum call duration, ``max_s`` seconds, whatever deadline the client sent.

    A client deadline within the cap is enforced by gRPC itself (the call is cancelled on both sides).
    A call with no deadline or a longer one gets an expiry: streaming handlers :meth:`check` it per
    message and fail with ``DEADLINE_EXCEEDED`` and a message; a call still running :data:`GRACE_S`
    later (stuck waiting for its client's next message, or in a storage read) is cancelled by one
    watcher thread, which runs only while such calls exist.
    """

    GRACE_S = 1.0

    def __init__(self, max_s: float) -> None:
        self.max_s = max_s
        self._lock = threading.Lock()
        self._calls: dict[int, tuple[float, grpc.ServicerContext]] = {}
        self._watcher: threading.Thread | None = None

    def start(self, context: grpc.ServicerContext) -> float | None:
        """Watch a call; return its expiry (``time.monotonic()``), or ``None`` when gRPC enforces one already."""
        remaining = context.time_remaining()
        if remaining is not None and remaining <= self.max_s:
            return None
        expiry = time.monotonic() + self.max_s
        key = id(context)
        with self._lock:
            self._calls[key] = (expiry, context)
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="mzstore-deadlines", daemon=True)
                self._watcher.start()
        context.add_callback(lambda: self._forget(key))
        return expiry

    def check(self, expiry: float | None, what: str) -> None:
        if expiry is not None and time.monotonic() > expiry:
            raise DeadlineExceeded(f"{what} ran past this server's maximum call time of {self.max_s:g} s")

    def _forget(self, key: int) -> None:
        with self._lock:
            self._calls.pop(key, None)

    def _watch(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    self._watcher = None
                    return
                now = time.monotonic()
                late = [k for k, (expiry, _) in self._calls.items() if expiry + self.GRACE_S <= now]
                contexts = [self._calls.pop(k)[1] for k in late]
            for context in contexts:
                context.cancel()  # wakes a handler blocked on the request stream
            time.sleep(0.1)


def _events(
    requests: Iterator[pb.PushRequest | pb.UploadRequest | FileDataMessage],
    context: grpc.ServicerContext,
    check: Callable[[], None] = lambda: None,
) -> Iterator[UploadEvent]:
    """Upload events from a Push stream; :class:`Cancelled` as soon as the client cancels or goes away."""
    it = iter(requests)
    while True:
        try:
            req = next(it, None)
        except grpc.RpcError:  # gRPC's request iterator: the call was cancelled or its deadline passed
            raise Cancelled("the client cancelled the push or went away") from None
        if req is None:
            break
        if not context.is_active():
            raise Cancelled("the client cancelled the push or went away")
        check()
        if isinstance(req, FileDataMessage):  # read in place (mzstore.transport.wire)
            yield UploadData(req.file, req.offset, req.data)
            continue
        which = req.WhichOneof("msg")
        if which == "data":
            yield UploadData(req.data.file, req.data.offset, req.data.data)
        elif which == "end":
            yield UploadEnd(req.end.file, req.end.size, req.end.sha256)
        else:
            raise InvalidArgument(f"unexpected {which or 'empty'} message inside a push")
    if not context.is_active():
        raise Cancelled("client went away during the upload")


class _Drained(Iterator[UploadEvent]):
    """An event iterator that remembers whether its stream ran out (rather than its consumer stopping)."""

    def __init__(self, events: Iterator[UploadEvent]) -> None:
        self.events = events
        self.drained = False

    def __next__(self) -> UploadEvent:
        try:
            return next(self.events)
        except StopIteration:
            self.drained = True
            raise


def _begin(b: pb.PushBegin) -> UploadBegin:
    return UploadBegin(
        ref=b.ref,
        codec=b.codec or "lossless",
        files=[UploadFile(f.path, f.size, f.kind, f.sha256) for f in b.files],
        source_kind=b.source_kind or "hf-dir",
        annotations=dict(b.annotations),
        keep=tuple(b.keep),
        allocation=b.allocation,
        base=b.base,
    )


def _push_response(r: PushResult) -> pb.PushResponse:
    return pb.PushResponse(**dataclasses.asdict(r))  # the same fields, by name


def _status(s: UploadStatus) -> pb.UploadStatus:
    return pb.UploadStatus(
        session=s.session,
        received=s.received,
        ended=s.ended,
        committed=s.committed,
        known=s.known,
        upload_url=s.upload_url,
    )


class StoreService(pb_grpc.StoreServicer):
    """The ``mzstore.v1.Store`` service over one :class:`Store`."""

    def __init__(self, store: Store, settings: Settings, spool_dir: Path | None = None) -> None:
        self.store = store
        self.settings = settings
        self.spool_dir = spool_dir
        self.deadlines = _DeadlineCap(settings.max_deadline_s)
        #: Upload sessions live on the server's local disk: beside the spool, else in the system temp dir.
        uploads = spool_dir / "uploads" if spool_dir is not None else Path(tempfile.gettempdir()) / "mzstore-uploads"
        self.sessions = UploadSessions(uploads)
        #: Where the HTTP plane serves blobs, told to clients with every manifest ("" when there is none).
        self.blob_url = ""
        #: Base URL of the HTTP plane's upload route (``<listener>/v1/uploads``; "" when there is none).
        self.upload_url = ""

    @handler
    def Push(
        self, request_iterator: Iterator[pb.PushRequest | FileDataMessage], context: grpc.ServicerContext
    ) -> pb.PushResponse:
        expiry = self.deadlines.start(context)
        first = next(request_iterator, None)
        if not isinstance(first, pb.PushRequest) or first.WhichOneof("msg") != "begin":
            raise InvalidArgument("a push must start with a begin message")
        begin = _begin(first.begin)

        def check() -> None:
            self.deadlines.check(expiry, "the push")

        return _push_response(self.ingest(begin, _events(request_iterator, context, check)))

    def ingest(self, begin: UploadBegin, events: Iterable[UploadEvent], session: str | None = None) -> PushResult:
        """Encode and commit one upload: the one ingest path of every push (streamed, or an upload session's)."""
        start = time.perf_counter()
        result = Ingest(
            self.store,
            chunk_bytes=self.settings.chunk_bytes,
            shard_bytes=self.settings.shard_bytes,
            spool_dir=self.spool_dir,
            limits=self.settings.limits,
        ).run(begin, events)
        metrics.PUSH_BYTES.labels("raw").inc(result.bytes_raw)
        metrics.PUSH_BYTES.labels("stored").inc(result.bytes_stored)
        metrics.PUSH_SECONDS.observe(time.perf_counter() - start)
        how = f"upload session {session}" if session else "streamed"
        log.info(
            "pushed %s %s (%d → %d bytes, %s)", result.ref, result.digest, result.bytes_raw, result.bytes_stored, how
        )
        return result

    # -- resumable uploads (mzstore.push.sessions) ------------------------------

    @handler
    def StartUpload(self, request: pb.StartUploadRequest, context: grpc.ServicerContext) -> pb.UploadStatus:
        begin = _begin(request.begin)
        validate_begin(begin, self.settings.limits)  # refuse before the client sends a byte
        known = KnownFiles(self.store, self.settings.chunk_bytes).find(begin)  # files not to send again
        status = self.sessions.start(request.session, begin, known)
        if self.upload_url:  # the bytes may come by HTTP instead
            status = dataclasses.replace(status, upload_url=f"{self.upload_url}/{request.session}")
        return _status(status)

    @handler
    def Upload(
        self, request_iterator: Iterator[pb.UploadRequest | FileDataMessage], context: grpc.ServicerContext
    ) -> pb.UploadStatus:
        expiry = self.deadlines.start(context)
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument("an upload stream needs at least one message naming its session")

        def check() -> None:
            self.deadlines.check(expiry, "the upload")

        def requests() -> Iterator[pb.UploadRequest | FileDataMessage]:
            yield first
            yield from request_iterator

        return _status(self.upload(first.session, _events(requests(), context, check)))

    def upload(self, session: str, events: Iterator[UploadEvent]) -> UploadStatus:
        """One stream of a session's bytes: an ``Upload`` call's, or an HTTP PUT's (:mod:`mzstore.server.uploads`)."""
        sessions = self.sessions
        drained = _Drained(events)
        status = sessions.status(session)
        if any((r or e) and not k for r, e, k in zip(status.received, status.ended, status.known, strict=True)):
            return sessions.append(session, drained)  # a resume: the commit replays
        # A fresh upload is ingested as it arrives, as a streamed push is; the bytes are kept
        # meanwhile so that a break can be resumed (the commit then replays them).
        stream = sessions.stream(session, drained)
        try:
            result = self.ingest(sessions.begin_of(session), stream, session)
        except (FormatError, IntegrityError, InvalidArgument, ResourceExhausted) as exc:
            stream.close()  # records what arrived and releases the session
            if drained.drained and not all(sessions.status(session).ended):
                # The stream stopped before its files ended (a client killed or cut off, whose end
                # its transport reported as a close): what arrived is kept, and a rerun resumes after it.
                raise Cancelled("the upload stream ended before its files did; rerun the push to resume") from None
            if not isinstance(exc, ResourceExhausted):
                sessions.drop(session)  # malformed or altered: resuming cannot fix it
            raise
        finally:
            stream.close()
        sessions.record_result(session, result)
        return sessions.status(session)

    @handler
    def FindFileSizes(
        self, request: pb.FindFileSizesRequest, context: grpc.ServicerContext
    ) -> pb.FindFileSizesResponse:
        sizes = list(request.sizes)
        if len(sizes) > self.settings.limits.files:
            raise InvalidArgument(f"at most {self.settings.limits.files} sizes (a push's file limit), got {len(sizes)}")
        return pb.FindFileSizesResponse(held=KnownFiles(self.store, self.settings.chunk_bytes).held_sizes(sizes))

    @handler
    def CommitUpload(self, request: pb.CommitUploadRequest, context: grpc.ServicerContext) -> pb.PushResponse:
        session = request.session
        return _push_response(self.sessions.commit(session, lambda begin, events: self.ingest(begin, events, session)))

    @handler
    def GetManifest(self, request: pb.GetManifestRequest, context: grpc.ServicerContext) -> pb.GetManifestResponse:
        ref, digest = self.store.resolve(request.ref)
        manifest = self.store.get_manifest(digest)
        return pb.GetManifestResponse(ref=str(ref), digest=digest, manifest=manifest, blob_url=self.blob_url)

    @stream_handler
    def ReadBlob(self, request: pb.ReadBlobRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        """The range as serialized ``BlobChunk`` messages (see :func:`mzstore.transport.wire.blob_chunk`)."""
        size = self.store.blob_size(request.digest)
        end = size if request.length == 0 else request.offset + request.length
        if request.offset > size or end > size:
            raise InvalidArgument(
                f"range {request.offset}+{request.length} is outside blob {request.digest} ({size} bytes)"
            )
        expiry = self.deadlines.start(context)
        offset = request.offset
        while offset < end and context.is_active():
            self.deadlines.check(expiry, f"reading blob {request.digest}")
            n = min(TRANSFER_BYTES, end - offset)
            data = self.store.read_blob(request.digest, offset, n)
            if len(data) != n:
                raise FormatError(f"blob {request.digest} is shorter than expected")
            yield blob_chunk(offset, data)
            metrics.BLOB_BYTES.labels("grpc").inc(n)
            offset += n

    @handler
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        entries = self.store.list_refs(request.name or None)
        return pb.ListResponse(refs=[pb.RefEntry(**dataclasses.asdict(e)) for e in entries])

    @handler
    def Tag(self, request: pb.TagRequest, context: grpc.ServicerContext) -> pb.TagResponse:
        _, digest = self.store.resolve(request.source)
        target = parse_ref(request.target)
        if target.digest:
            raise InvalidArgument("the target of a tag is name[:tag], not a digest")
        self.store.set_ref(target.name, target.tag, digest)
        return pb.TagResponse(ref=f"{target.name}:{target.tag}", digest=digest)

    @handler
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        ref = parse_ref(request.ref)
        if ref.digest:
            raise InvalidArgument("rm removes a tag; give name[:tag]")
        digest = self.store.delete_ref(ref.name, ref.tag)
        return pb.DeleteResponse(ref=f"{ref.name}:{ref.tag}", digest=digest)

    @handler
    def GetTopology(self, request: pb.GetTopologyRequest, context: grpc.ServicerContext) -> pb.Topology:
        nodes = [pb.NodeInfo(url=n.url, endpoint_url=getattr(n, "endpoint_url", None) or "") for n in self.store.nodes]
        return pb.Topology(nodes=nodes, replicas=self.store.replicas)
