"""The Python client: push, pull, load_state_dict and admin calls over gRPC.

Transport glue only: the work happens in :mod:`mzstore.push` and
:mod:`mzstore.pull`, which take plain events and a ``fetch`` callable. This
module is the one place where ``grpc.RpcError`` becomes a domain error
(:func:`_translate`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mzstore.codecs.policy import parse_policy
from mzstore.errors import (
    ERROR_FOR_CODE,
    ERROR_FOR_REASON,
    REASON_KEY,
    Cancelled,
    Conflict,
    DeadlineExceeded,
    IntegrityError,
    InvalidArgument,
    MzstoreError,
    NotFound,
    ResourceExhausted,
    SessionBusy,
    SessionNotFound,
    Unavailable,
)
from mzstore.format.manifest import Manifest, digest_of, parse_manifest
from mzstore.format.refs import parse_ref
from mzstore.limits import MAX_MESSAGE_BYTES
from mzstore.pull.cache import ChunkCache
from mzstore.pull.pipeline import Fetch, PullStats, run_pull
from mzstore.pull.plan import plan_pull
from mzstore.pull.sinks import DirectorySink, StateDictSink, TensorParallelSink
from mzstore.push.protocol import UploadData, UploadEvent, validate_begin
from mzstore.push.source import Source, check_policy_applies, open_source
from mzstore.push.upload import begin_for, iter_events
from mzstore.settings import KEEPALIVE_TIMEOUT_S, Settings, is_loopback, load_settings
from mzstore.v1 import store_pb2 as pb
from mzstore.v1 import store_pb2_grpc as pb_grpc
from mzstore.wire import blob_piece

ProgressFn = Callable[[int], None]
log = logging.getLogger("mzstore.client")


#: What gRPC's server says when ``maximum_concurrent_rpcs`` turns a call away.
_BUSY = "Concurrent RPC limit exceeded"


def _translate(exc: grpc.RpcError, call: str | None = None, deadline: float | None = None) -> MzstoreError:
    """gRPC status → domain error (the client's one translation point).

    ``call`` and ``deadline`` (seconds) name what timed out in a ``DEADLINE_EXCEEDED`` message.
    """
    code = exc.code() if hasattr(exc, "code") else None
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if name == "UNAVAILABLE":
        return Unavailable(details.split(";")[0])
    if name == "DEADLINE_EXCEEDED" and call is not None and details == "Deadline Exceeded":
        # gRPC's own text says neither which call nor how long; a server's message is kept as is
        limit = f" of {deadline:g} s" if deadline is not None else ""
        return DeadlineExceeded(f"{call} did not finish within its deadline{limit}")
    if name == "RESOURCE_EXHAUSTED" and details.startswith(_BUSY):
        what = call or "the call"
        return ResourceExhausted(f"the server is at its limit of concurrent calls; {what} was refused, retry later")
    metadata = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    reason = next((str(v) for k, v in metadata or () if k == REASON_KEY), None)
    cls = ERROR_FOR_REASON.get(reason or "") or ERROR_FOR_CODE.get(name, MzstoreError)
    return cls(details)


@contextmanager
def rpc_errors(call: str | None = None, deadline: float | None = None) -> Iterator[None]:
    """Turn a ``grpc.RpcError`` raised inside into a domain error (see :func:`_translate`)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise _translate(exc, call, deadline) from None


@dataclass(frozen=True)
class PushInfo:
    ref: str
    digest: str
    bytes_raw: int
    bytes_stored: int
    bytes_transferred: int
    seconds: float
    tensors: int
    chunks: int
    shards: int
    skipped: list[str]
    worst: dict[str, Any] | None = None


@dataclass(frozen=True)
class PullInfo:
    ref: str
    digest: str
    bytes_raw: int
    bytes_stored: int
    bytes_transferred: int
    seconds: float
    files: list[str]
    chunks: int
    bytes_cached: int = 0
    chunks_cached: int = 0

    @classmethod
    def of(
        cls, name: str, digest: str, manifest: Manifest, start: float, finals: list[Path], stats: PullStats
    ) -> PullInfo:
        """What a pull that wrote ``finals`` reports, from its pipeline counts."""
        return cls(
            ref=name,
            digest=digest,
            bytes_raw=manifest.bytes_raw,
            bytes_stored=manifest.stored_total,
            bytes_transferred=stats.bytes_transferred,
            seconds=time.perf_counter() - start,
            files=[str(p) for p in finals],
            chunks=stats.chunks,
            bytes_cached=stats.bytes_cached,
            chunks_cached=stats.chunks_cached,
        )


@contextmanager
def _staged(out_dir: str | os.PathLike[str], manifest: Manifest, files: Any = None) -> Iterator[DirectorySink]:
    """An open :class:`DirectorySink`; anything raised inside aborts it (nothing under final names)."""
    sink = DirectorySink(out_dir, manifest, files)
    sink.open()
    try:
        yield sink
    except BaseException:
        sink.abort()
        raise


_READ_BLOB_PATH = "/{}/{}".format(
    *pb.DESCRIPTOR.services_by_name["Store"].methods_by_name["ReadBlob"].full_name.rsplit(".", 1)
)


def _begin_proto(begin: Any) -> pb.PushBegin:
    return pb.PushBegin(
        ref=begin.ref,
        codec=begin.codec,
        files=[pb.FileInfo(path=f.path, size=f.size, kind=f.kind) for f in begin.files],
        source_kind=begin.source_kind,
        annotations=begin.annotations,
        keep=list(begin.keep),
    )


class _counting:
    """Upload requests of a session from events (an iterator, as gRPC wants), counting the data bytes sent."""

    def __init__(self, session: str, events: Iterator[UploadEvent]) -> None:
        self.bytes = 0
        self._requests = self._convert(session, events)

    def __iter__(self) -> _counting:
        return self

    def __next__(self) -> pb.UploadRequest:
        return next(self._requests)

    def _convert(self, session: str, events: Iterator[UploadEvent]) -> Iterator[pb.UploadRequest]:
        for e in events:
            if isinstance(e, UploadData):
                self.bytes += len(e.data)
                yield pb.UploadRequest(session=session, data=pb.FileData(file=e.file, offset=e.offset, data=e.data))
            else:
                yield pb.UploadRequest(session=session, end=pb.FileEnd(file=e.file, size=e.size, sha256=e.sha256))


def _proto_events(begin: Any, events: Iterator[UploadEvent]) -> Iterator[pb.PushRequest]:
    yield pb.PushRequest(begin=_begin_proto(begin))
    for e in events:
        if isinstance(e, UploadData):
            yield pb.PushRequest(data=pb.FileData(file=e.file, offset=e.offset, data=e.data))
        else:
            yield pb.PushRequest(end=pb.FileEnd(file=e.file, size=e.size, sha256=e.sha256))


def _tls_credentials(
    ca: str | os.PathLike[str], cert: os.PathLike[str] | None, key: os.PathLike[str] | None
) -> grpc.ChannelCredentials:
    """TLS trusting ``ca``; with ``cert`` and ``key``, also a client certificate (mutual TLS)."""
    if (cert is None) != (key is None):
        raise InvalidArgument("a client certificate needs both MZSTORE_TLS_CERT and MZSTORE_TLS_KEY")
    try:
        pem = [Path(p).read_bytes() if p is not None else None for p in (ca, key, cert)]
    except OSError as exc:
        raise InvalidArgument(f"cannot read TLS file {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_channel_credentials(root_certificates=pem[0], private_key=pem[1], certificate_chain=pem[2])


class _TokenMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (works on TLS and loopback plaintext alike)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        # grpc hands interceptors a namedtuple of the call's details
        return details._replace(metadata=[*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _cosine(fidelity: dict[str, Any] | None) -> float:
    value = (fidelity or {}).get("cosine")
    return float(value) if value is not None else 1.0


class Client:
    """A connection to an mzstore server.

    Args:
        server: ``HOST:PORT``; default from ``MZSTORE_SERVER`` or ``127.0.0.1:50051``.
        settings: defaults for everything else (see :class:`~mzstore.settings.Settings`).
        timeout: deadline in seconds for short calls; default ``settings.timeout``. Every call has a
            finite deadline: a push ``settings.push_timeout``, each blob range read on pull
            ``settings.fetch_timeout`` (retried like an unreachable server). A call past its deadline
            raises :class:`~mzstore.errors.DeadlineExceeded` naming the call and the deadline.
        cache: use the local chunk cache (:mod:`mzstore.pull.cache`); default ``settings.cache``.
        direct: read blob bytes straight from the storage nodes the server reports
            (:mod:`mzstore.pull.direct`) instead of through the server.
        token: bearer token sent as ``authorization`` metadata on every call; default ``settings.token``.
        tls_ca: PEM CA bundle to verify the server with; given (or ``settings.tls_ca``), the channel is TLS,
            with ``settings.tls_cert``/``tls_key`` as the client certificate for mutual TLS.

    Raises:
        InvalidArgument: a token with a plaintext, non-loopback server (it would cross the network in
            clear text); an unreadable TLS file.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        settings: Settings | None = None,
        timeout: float | None = None,
        cache: bool | None = None,
        direct: bool = False,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.direct = direct
        self._direct: Any = None
        self.server = server or self.settings.server
        self.timeout = self.settings.timeout if timeout is None else timeout
        use_cache = self.settings.cache if cache is None else cache
        self.cache = ChunkCache(self.settings.cache_dir) if use_cache else None
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # Keepalive (issue #6): a dead peer or a silent network path fails the calls on the connection
            # with UNAVAILABLE within keepalive + timeout, even during a long quiet stream; the server
            # accepts pings this often (see mzstore.server.app).
            ("grpc.keepalive_time_ms", int(self.settings.keepalive_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_S * 1000)),
            ("grpc.http2.max_pings_without_data", 0),
            # Reconnect soon after a dropped connection, so the pull/push retries (backoff 0.2 s,
            # 0.4 s, …) meet a live channel instead of gRPC's default 1 s (growing) backoff.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        token = token or self.settings.token
        ca = tls_ca or self.settings.tls_ca
        if token and ca is None and not is_loopback(self.server):
            raise InvalidArgument(
                f"refusing to send a token in clear text to {self.server}: set MZSTORE_TLS_CA (--tls-ca) for TLS"
            )
        if ca is not None:
            creds = _tls_credentials(ca, self.settings.tls_cert, self.settings.tls_key)
            self._channel = grpc.secure_channel(self.server, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(self.server, options=options)
        channel = grpc.intercept_channel(self._channel, _TokenMetadata(token)) if token else self._channel
        self._stub = pb_grpc.StoreStub(channel)
        # ReadBlob replies arrive as raw bytes and are parsed by blob_piece (see there).
        self._read_blob = channel.unary_stream(
            _READ_BLOB_PATH, request_serializer=pb.ReadBlobRequest.SerializeToString, response_deserializer=None
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- push -------------------------------------------------------------
    def push(
        self,
        source: str | os.PathLike[str] | Source,
        ref: str,
        *,
        codec: str = "lossless",
        keep: tuple[str, ...] | list[str] = (),
        annotations: dict[str, str] | None = None,
        progress: ProgressFn | None = None,
        resumable: bool = True,
        retries: int = 5,
        origin: str | os.PathLike[str] | None = None,
    ) -> PushInfo:
        """Upload ``source`` (file or directory) and store it as ``ref``, encoded with ``codec``.

        Args:
            codec: policy (see :mod:`mzstore.codecs.policy`), e.g. ``"int8"`` or ``"auto:cos=0.99"``.
            keep: tensor-name patterns that lossy policies keep exact.
            resumable: upload through a session (:mod:`mzstore.push.sessions`): a dropped
                connection is retried up to ``retries`` times, each resuming at the offsets the
                server holds. ``False`` streams straight into the ingest (one stream, no resume).
            origin: the path ``source`` was opened from, when ``source`` is an opened
                :class:`Source`; with it a rerun of a killed push resumes its session.

        Raises:
            InvalidArgument: bad source, ref or policy, or a policy with nothing to apply to
                (raised before anything is uploaded); FormatError: malformed safetensors;
            IntegrityError: the upload was altered; Unavailable: no server, or the connection broke;
            DeadlineExceeded: the push took longer than ``settings.push_timeout``.
            A failed push stores no ref; pushing again is safe (content-addressed, nothing duplicated).
        """
        src = source if isinstance(source, Source) else open_source(source)
        begin = begin_for(src, ref, codec, annotations, tuple(keep))
        validate_begin(begin)  # fail before any upload on what the client can check
        policy = parse_policy(codec, keep)
        check_policy_applies(src, policy)
        start = time.perf_counter()
        deadline = self.settings.push_timeout
        if resumable:
            resp, sent = self._push_session(src, begin, progress, retries, origin=origin or source)
        else:
            with rpc_errors("Push", deadline):
                resp = self._stub.Push(
                    _proto_events(begin, iter_events(src, progress)), timeout=deadline, wait_for_ready=False
                )
            sent = resp.bytes_received
        return PushInfo(
            ref=resp.ref,
            digest=resp.digest,
            bytes_raw=resp.bytes_raw,
            bytes_stored=resp.bytes_stored,
            bytes_transferred=sent,
            seconds=time.perf_counter() - start,
            tensors=resp.tensors,
            chunks=resp.chunks,
            shards=resp.shards,
            skipped=src.skipped,
            worst=self._worst(resp.ref, resp.digest) if policy.lossy else None,
        )

    def _session_record(self, begin: Any, origin: object) -> Path | None:
        """Where this push remembers its upload session, so a rerun after a crash resumes it."""
        where = str(Path(os.fspath(origin)).resolve()) if isinstance(origin, (str, os.PathLike)) else None
        if where is None:
            return None
        key = json.dumps(
            [self.server, where, begin.ref, begin.codec, list(begin.keep), [(f.path, f.size) for f in begin.files]]
        )
        return self.settings.cache_dir / "uploads" / (hashlib.sha256(key.encode()).hexdigest() + ".json")

    def _push_session(
        self, src: Source, begin: Any, progress: ProgressFn | None, retries: int, origin: object = None
    ) -> tuple[pb.PushResponse, int]:
        """Upload through a resumable session; return the commit's response and the bytes sent.

        The session id is kept under ``$MZSTORE_HOME/cache/uploads`` until the commit, so a push
        rerun after its process died resumes where the server's copy ends. Connection failures
        after the session exists are retried (``retries`` times), each resuming at the offsets the
        server reports; a session the server no longer has is started afresh.
        """
        record = self._session_record(begin, origin)
        session = uuid.uuid4().hex
        resumed = False
        if record is not None:
            try:
                session = json.loads(record.read_text())["session"]
                resumed = True
            except (OSError, ValueError, KeyError):
                pass
        begin_pb = _begin_proto(begin)
        deadline = self.settings.push_timeout
        sent = 0
        attempt = 0
        started = False
        busy_until: float | None = None
        while True:
            try:
                with rpc_errors("StartUpload", self.timeout):
                    status = self._stub.StartUpload(
                        pb.StartUploadRequest(session=session, begin=begin_pb), timeout=self.timeout
                    )
                started = True
                if record is not None:
                    record.parent.mkdir(parents=True, exist_ok=True)
                    record.write_text(json.dumps({"session": session, "ref": begin.ref}))
                if not all(status.ended):
                    events = iter_events(src, progress, start=list(status.received), ended=list(status.ended))
                    counted = _counting(session, events)
                    try:
                        with rpc_errors("Upload", deadline):
                            self._stub.Upload(counted, timeout=deadline)
                    finally:
                        sent += counted.bytes
                with rpc_errors("CommitUpload", deadline):
                    resp = self._stub.CommitUpload(pb.CommitUploadRequest(session=session), timeout=deadline)
                if record is not None:
                    record.unlink(missing_ok=True)
                return resp, sent
            except (Unavailable, DeadlineExceeded, Cancelled) as exc:
                attempt += 1
                if not started:
                    # No session yet: a stale connection gets two quick, quiet retries; no server fails fast.
                    if attempt > 2 or isinstance(exc, DeadlineExceeded):
                        raise
                    time.sleep(0.2 * attempt)
                    continue
                if attempt > retries:
                    raise  # out of retries: the session stays on the server for a later rerun
                log.warning("push interrupted (%s); resuming (attempt %d of %d)", exc, attempt, retries)
                time.sleep(min(5.0, 0.2 * 2**attempt))
            except (Conflict, NotFound, IntegrityError) as exc:
                if isinstance(exc, SessionBusy):
                    # The stream of the process that died may still hold the session until the server
                    # sees its connection close (at once, or a keepalive later on a silent network).
                    if busy_until is None:
                        busy_until = time.monotonic() + self.settings.keepalive_s + KEEPALIVE_TIMEOUT_S
                    if time.monotonic() < busy_until:
                        time.sleep(0.5)
                        continue
                # Taken, gone (swept, another server) or made for other bytes (the source changed
                # since): a remembered session is dropped once and the upload starts over in a new one.
                stale = isinstance(exc, SessionNotFound)
                if not (resumed or stale) or attempt >= retries:
                    if record is not None:
                        record.unlink(missing_ok=True)
                    raise
                attempt += 1
                resumed = False
                session = uuid.uuid4().hex

    def _worst(self, ref: str, digest: str) -> dict[str, Any] | None:
        """The lossy tensor with the lowest cosine to its original, from the stored manifest."""
        _, _, manifest = self.manifest(f"{parse_ref(ref).name}@{digest}")
        lossy = [t for t in manifest.tensors if t.fidelity is not None and t.codec != "lossless"]
        if not lossy:
            return None
        t = min(lossy, key=lambda t: _cosine(t.fidelity))
        return {"tensor": t.name, "codec": t.codec, **(t.fidelity or {})}

    # -- reading ----------------------------------------------------------
    def manifest(self, ref: str) -> tuple[str, str, Manifest]:
        """Return ``(ref, digest, manifest)``; the manifest bytes are checked against the digest.

        A ``name@sha256:…`` ref found in the local cache needs no server (digests are immutable).
        """
        parsed = parse_ref(ref)
        if parsed.digest and self.cache is not None:
            cached = self.cache.get_manifest(parsed.digest)
            if cached is not None:
                return str(parsed), parsed.digest, cached
        with rpc_errors("GetManifest", self.timeout):
            resp = self._stub.GetManifest(pb.GetManifestRequest(ref=ref), timeout=self.timeout)
        if digest_of(resp.manifest) != resp.digest:
            raise IntegrityError(f"manifest of {ref} does not match its digest {resp.digest}")
        if self.cache is not None:
            self.cache.put_manifest(resp.ref, self.server, resp.digest, resp.manifest)
        return resp.ref, resp.digest, parse_manifest(resp.manifest)

    def fetch(self, digest: str, offset: int, length: int) -> bytearray:
        """Read ``length`` bytes of a blob at ``offset`` (one streamed RPC, deadline ``settings.fetch_timeout``).

        Raises:
            Unavailable, DeadlineExceeded: transient; the pull pipeline retries them.
            IntegrityError: the server sent other bytes than asked for.
        """
        buf = bytearray(length)
        pos = 0
        deadline = self.settings.fetch_timeout
        call: Any = self._read_blob(pb.ReadBlobRequest(digest=digest, offset=offset, length=length), timeout=deadline)
        try:
            with rpc_errors("ReadBlob", deadline):
                for message in call:
                    at, data = blob_piece(message)
                    if at != offset + pos or pos + len(data) > length:
                        raise IntegrityError(f"blob {digest}: out-of-order or oversized data from server")
                    buf[pos : pos + len(data)] = data
                    pos += len(data)
        finally:
            call.cancel()  # no-op when complete; on an error the server's handler stops at once
        if pos != length:
            raise IntegrityError(f"blob {digest}: got {pos} of {length} bytes")
        return buf

    def topology(self) -> tuple[list[tuple[str, str | None]], int]:
        """The server's storage nodes ``[(url, endpoint_url)]`` and replica count."""
        with rpc_errors("GetTopology", self.timeout):
            resp = self._stub.GetTopology(pb.GetTopologyRequest(), timeout=self.timeout)
        return [(n.url, n.endpoint_url or None) for n in resp.nodes], resp.replicas

    def _reader(self) -> Fetch:
        """The direct reader's fetch, opened once from the server's topology."""
        if self._direct is None:
            from mzstore.pull.direct import DirectReader

            self._direct = DirectReader.open(self.topology()[0])
        return self._direct.fetch  # type: ignore[no-any-return]

    def _chunk_cache(self) -> ChunkCache | None:
        """The chunk cache, unless direct reads come from directories on this machine."""
        if self.direct:
            self._reader()
            if self._direct.local:
                return None
        return self.cache

    def _run(
        self, tasks: list[Any], sink: Any, workers: int | None = None, progress: ProgressFn | None = None
    ) -> PullStats:
        """Run the pull pipeline for ``tasks`` into ``sink`` (every pull path goes through here)."""
        return run_pull(
            tasks,
            self._reader() if self.direct else self.fetch,
            sink,
            workers=workers or self.settings.pull_workers,
            on_bytes=progress,
            cache=self._chunk_cache(),
            inflight_bytes=self.settings.pull_inflight_bytes,
            coalesce_bytes=self.settings.pull_coalesce_bytes,
        )

    def pull(
        self,
        ref: str,
        out_dir: str | os.PathLike[str],
        *,
        progress: ProgressFn | None = None,
        workers: int | None = None,
        keep_quantized: bool = False,
        tp_size: int = 1,
        tp_rank: int = 0,
        tp_rules: list[tuple[str, int | None]] | None = None,
    ) -> PullInfo:
        """Pull ``ref`` into ``out_dir`` in its source layout.

        Nothing appears under a final file name until every chunk is verified.

        Args:
            keep_quantized: write quantized weights in the compressed-tensors layout vLLM
                serves (see :mod:`mzstore.pull.compressed_tensors`) instead of dequantizing.
            tp_size, tp_rank: write only this tensor-parallel rank's slice of every tensor
                (same file names, sliced tensors; see :meth:`load_state_dict`).
        """
        start = time.perf_counter()
        name, digest, manifest = self.manifest(ref)
        if tp_size > 1 or tp_rank:
            if keep_quantized:
                raise InvalidArgument("--keep-quantized and tensor-parallel slices cannot be combined")
            return self._pull_tp(name, digest, manifest, out_dir, tp_size, tp_rank, tp_rules, workers, start)
        if keep_quantized:
            from mzstore.pull.compressed_tensors import export_keep_quantized

            finals = export_keep_quantized(
                manifest,
                self._reader() if self.direct else self.fetch,
                out_dir,
                workers=workers or self.settings.pull_workers,
                progress=progress,
            )
            chunks = manifest.chunks()
            counts = PullStats(chunks=len(chunks), bytes_transferred=sum(c.length for c in chunks))
            return PullInfo.of(name, digest, manifest, start, finals, counts)
        with _staged(out_dir, manifest) as sink:
            stats = self._run(plan_pull(manifest), sink, workers, progress)
            finals = sink.commit()
        return PullInfo.of(name, digest, manifest, start, finals, stats)

    def _load_tp(
        self,
        manifest: Manifest,
        tp_size: int,
        tp_rank: int,
        tp_rules: list[tuple[str, int | None]] | None,
        files: list[str] | None,
        workers: int | None,
    ) -> tuple[dict[str, Any], PullStats]:
        sink = TensorParallelSink(manifest, tp_size, tp_rank, tp_rules, files)
        tasks = [t for t in plan_pull(manifest, files, tensors_only=True) if sink.wants(t)]
        stats = self._run(tasks, sink, workers)
        return sink.result(), stats

    def _pull_tp(
        self,
        name: str,
        digest: str,
        manifest: Manifest,
        out_dir: str | os.PathLike[str],
        tp_size: int,
        tp_rank: int,
        tp_rules: list[tuple[str, int | None]] | None,
        workers: int | None,
        start: float,
    ) -> PullInfo:
        """One rank's slices written as safetensors files under their source names, plus the other files."""
        import json

        from safetensors.torch import save_file

        plain = [f for f in manifest.files if f.kind != "safetensors"]
        with _staged(out_dir, manifest, plain) as sink:
            stats = self._run(plan_pull(manifest, [f.path for f in plain]), sink, workers)
            tensors, tp_stats = self._load_tp(manifest, tp_size, tp_rank, tp_rules, None, workers)
            for f in manifest.files:
                if f.kind != "safetensors":
                    continue
                header = json.loads(f.header or "{}")
                metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
                metadata.update({"mzstore.tp_size": str(tp_size), "mzstore.tp_rank": str(tp_rank), "mzstore.ref": name})
                part = {t.name: tensors.pop(t.name).contiguous() for t in manifest.tensors_of(f.path)}
                path = sink.stage / f.path
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(part, str(path), metadata=metadata)
                del part
                sink.adopt(f.path)
            finals = sink.commit()
        info = PullInfo.of(name, digest, manifest, start, finals, stats.plus(tp_stats))
        return dataclasses.replace(info, bytes_raw=sum(p.stat().st_size for p in finals))  # the slices' size

    def load_state_dict(
        self,
        ref: str,
        *,
        device: str | Any = "cpu",
        files: list[str] | None = None,
        workers: int | None = None,
        expand_on_device: bool | None = None,
        tp_size: int = 1,
        tp_rank: int = 0,
        tp_rules: list[tuple[str, int | None]] | None = None,
    ) -> dict[str, Any]:
        """Pull the tensors of ``ref`` into memory: ``{name: torch.Tensor}`` on ``device``.

        Args:
            device: where the tensors go (``"cpu"``, ``"cuda:1"``…).
            files: only the tensors of these source files.
            expand_on_device: move quantized chunks to ``device`` in compact form and
                expand them there (default: for any device but the CPU).
            tp_size, tp_rank: load only this tensor-parallel rank's slices (see
                :mod:`mzstore.pull.tp`); chunks outside the rank's rows are not fetched.
            tp_rules: ``(name regex, split dim or None)`` rules replacing the defaults.
        """
        _, _, manifest = self.manifest(ref)
        if tp_size > 1 or tp_rank:
            result, _ = self._load_tp(manifest, tp_size, tp_rank, tp_rules, files, workers)
            return result if str(device) == "cpu" else {k: v.to(device) for k, v in result.items()}
        if expand_on_device is None:
            expand_on_device = str(device) != "cpu"
        if expand_on_device:
            from mzstore.pull.device import DeviceStateDictSink

            device_sink = DeviceStateDictSink(manifest, device, files)
            self._run(plan_pull(manifest, files, tensors_only=True), device_sink, workers)
            return device_sink.result()
        sink = StateDictSink(manifest, files)
        self._run(plan_pull(manifest, files, tensors_only=True), sink, workers)
        return sink.result(device)

    def load_into(
        self,
        model: Any,
        ref: str,
        *,
        device_map: Any = None,
        devices: list[Any] | None = None,
        strict: bool = True,
        prefix: str | None = None,
        files: list[str] | None = None,
        workers: int | None = None,
        expand_on_device: bool | None = None,
        progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """Load the tensors of ``ref`` into ``model``, each straight onto its device.

        The checkpoint is matched to the model and placed before anything is
        fetched; then every tensor is pulled onto its device (GPU targets get
        quantized chunks in compact form and expand them there) and put in with
        ``model.load_state_dict(..., assign=True)``, so a model built under
        ``torch.device("meta")`` ends up materialized on the mapped devices, and a
        normal model's parameters move there. Tensors keep the checkpoint's dtype.
        Tied parameters (``lm_head`` sharing the embeddings) stay one tensor,
        loaded through the first of their names the checkpoint holds.
        Non-persistent buffers are set when the checkpoint holds them; those it
        lacks keep their value, and on a meta model stay on ``meta``
        (listed in the report's ``meta``).

        Args:
            model: a ``torch.nn.Module``.
            device_map: ``None`` (each tensor where the model's tensor is now, the
                CPU for ``meta``), one device (``"cuda:1"``, ``1``),
                ``{module prefix: device}`` (longest dotted prefix wins, ``""`` for
                the rest) or ``"balanced"`` (whole layers, in order, spread by bytes
                over ``devices``, default every visible GPU); see
                :mod:`mzstore.pull.device_map`.
            strict: the checkpoint must provide every state-dict key of the model
                and nothing else; ``strict=False`` loads what matches and fetches
                nothing else.
            prefix: added to every checkpoint name to give the model's name;
                default: the names as stored, or one prefix added or removed when
                that matches more (``0.model.`` for a sentence-transformers model).
            files: only the tensors of these source files.
            expand_on_device: force the device path for CPU targets too (tests).

        Returns:
            A report: ``devices`` (``{device: {"tensors", "bytes"}}``), ``missing``
            and ``unexpected`` keys, ``tied`` (name → the name it shares a tensor
            with), ``names`` (the name mapping used) and ``meta`` (what is still on
            the meta device).

        Raises:
            InvalidArgument: names or shapes that do not match (with ``strict``),
                or a bad ``device_map``; raised before any byte is fetched.
        """
        from mzstore.pull.device import DeviceMapSink, apply_loaded, plan_load

        _, _, manifest = self.manifest(ref)
        plan = plan_load(
            model, manifest, device_map=device_map, devices=devices, strict=strict, prefix=prefix, files=files
        )
        sink = DeviceMapSink(manifest, plan.placement, files, expand_on_device=expand_on_device)
        try:
            tasks = [t for t in plan_pull(manifest, files, tensors_only=True) if sink.wants(t)]
            self._run(tasks, sink, workers, progress)
            tensors = sink.result()
        finally:
            sink.close()
        return apply_loaded(model, plan, tensors, strict=strict)

    # -- admin ------------------------------------------------------------
    def ls(self, name: str | None = None) -> list[tuple[str, str, str]]:
        with rpc_errors("List", self.timeout):
            resp = self._stub.List(pb.ListRequest(name=name or ""), timeout=self.timeout)
        return [(e.name, e.tag, e.digest) for e in resp.refs]

    def tag(self, source: str, target: str) -> tuple[str, str]:
        with rpc_errors("Tag", self.timeout):
            resp = self._stub.Tag(pb.TagRequest(source=source, target=target), timeout=self.timeout)
        return resp.ref, resp.digest

    def rm(self, ref: str) -> tuple[str, str]:
        with rpc_errors("Delete", self.timeout):
            resp = self._stub.Delete(pb.DeleteRequest(ref=ref), timeout=self.timeout)
        return resp.ref, resp.digest


def load_state_dict(
    ref: str, *, device: str | Any = "cpu", server: str | None = None, files: list[str] | None = None
) -> dict[str, Any]:
    """Load the tensors of ``ref`` from an mzstore server (see :meth:`Client.load_state_dict`)."""
    with Client(server) as client:
        return client.load_state_dict(ref, device=device, files=files)


def load_into(
    model: Any,
    ref: str,
    *,
    device_map: Any = None,
    devices: list[Any] | None = None,
    strict: bool = True,
    prefix: str | None = None,
    server: str | None = None,
    files: list[str] | None = None,
) -> dict[str, Any]:
    """Load the tensors of ``ref`` into ``model`` on the mapped devices (see :meth:`Client.load_into`)."""
    with Client(server) as client:
        return client.load_into(
            model, ref, device_map=device_map, devices=devices, strict=strict, prefix=prefix, files=files
        )


def pull(ref: str, out_dir: str | os.PathLike[str], *, server: str | None = None) -> PullInfo:
    """Pull ``ref`` into ``out_dir`` (see :meth:`Client.pull`)."""
    with Client(server) as client:
        return client.pull(ref, out_dir)


def push(
    source: str | os.PathLike[str],
    ref: str,
    *,
    codec: str = "lossless",
    keep: tuple[str, ...] | list[str] = (),
    server: str | None = None,
) -> PushInfo:
    """Push ``source`` as ``ref`` (see :meth:`Client.push`)."""
    with Client(server) as client:
        return client.push(source, ref, codec=codec, keep=keep)


__all__ = ["Client", "PullInfo", "PushInfo", "load_into", "load_state_dict", "pull", "push"]
