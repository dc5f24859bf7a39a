"""The gRPC transport: the ``mzstore.v1.Store`` service over one channel.

How it works: one channel per transport (TLS when a CA is given, a bearer
token added to every call by an interceptor, keepalive so a dead peer fails
the calls on it within ``keepalive + 10 s``). Each method converts domain
values to protos, calls the stub with its deadline, and converts back.
``ReadBlob`` replies are not parsed by protobuf: they arrive as raw bytes and
:func:`~mzstore.transport.wire.blob_piece` reads offset and data in place.

This module is the client's one translation point from ``grpc.RpcError`` to
domain errors (:func:`translate`): the status code picks the class, and an
``mzstore-reason`` trailing-metadata entry, when the server sent one, picks a
more precise one (``session-busy`` → :class:`~mzstore.errors.SessionBusy`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc

from mzstore.errors import (
    ERROR_FOR_CODE,
    ERROR_FOR_REASON,
    REASON_KEY,
    DeadlineExceeded,
    IntegrityError,
    InvalidArgument,
    MzstoreError,
    ResourceExhausted,
    Unavailable,
)
from mzstore.limits import MAX_MESSAGE_BYTES
from mzstore.settings import KEEPALIVE_TIMEOUT_S, Settings, is_loopback, load_settings, server_address
from mzstore.transport.base import RefInfo, Topology, Transport
from mzstore.transport.buffers import ReceiveBuffers
from mzstore.transport.wire import blob_piece, file_data
from mzstore.v1 import store_pb2 as pb
from mzstore.v1 import store_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from mzstore.push.protocol import PushResult, UploadBegin, UploadEvent, UploadStatus

log = logging.getLogger("mzstore.transport.grpc")

#: What gRPC's server says when ``maximum_concurrent_rpcs`` turns a call away (its text is all there is).
_BUSY = "Concurrent RPC limit exceeded"


def translate(exc: grpc.RpcError, call: str | None = None, deadline: float | None = None) -> MzstoreError:
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
    """Turn a ``grpc.RpcError`` raised inside into a domain error (see :func:`translate`)."""
    try:
        yield
    except grpc.RpcError as exc:
        raise translate(exc, call, deadline) from None


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


def _method_path(name: str) -> str:
    return "/{}/{}".format(*pb.DESCRIPTOR.services_by_name["Store"].methods_by_name[name].full_name.rsplit(".", 1))


_READ_BLOB_PATH = _method_path("ReadBlob")
_PUSH_PATH = _method_path("Push")
_UPLOAD_PATH = _method_path("Upload")


def advertised_url(blob_url: str, address: str) -> str | None:
    """The blob URL base a server advertised, with a ``*`` host replaced by the host the client reached it at."""
    if not blob_url:
        return None
    host = address.rpartition(":")[0] if ":" in address and not address.startswith("unix") else "127.0.0.1"
    scheme, sep, rest = blob_url.partition("://")
    if sep and rest.startswith("*"):
        return f"{scheme}://{host}{rest[1:]}"
    return blob_url


def begin_proto(begin: UploadBegin) -> pb.PushBegin:
    """The ``PushBegin`` message of an upload."""
    return pb.PushBegin(
        ref=begin.ref,
        codec=begin.codec,
        files=[pb.FileInfo(path=f.path, size=f.size, kind=f.kind, sha256=f.sha256) for f in begin.files],
        source_kind=begin.source_kind,
        annotations=begin.annotations,
        keep=list(begin.keep),
        allocation=begin.allocation,
        base=begin.base,
    )


def push_requests(begin: UploadBegin, events: Iterable[UploadEvent]) -> Iterator[bytes]:
    """A streamed push as serialized ``PushRequest`` messages: the begin, then every event (the data
    ones written by :func:`~mzstore.transport.wire.file_data`)."""
    from mzstore.push.protocol import UploadData

    yield pb.PushRequest(begin=begin_proto(begin)).SerializeToString()
    for e in events:
        if isinstance(e, UploadData):
            yield file_data(e.file, e.offset, e.data)
        else:
            yield pb.PushRequest(end=pb.FileEnd(file=e.file, size=e.size, sha256=e.sha256)).SerializeToString()


def _upload_requests(session: str, events: Iterable[UploadEvent]) -> Iterator[bytes]:
    from mzstore.push.protocol import UploadData

    for e in events:
        if isinstance(e, UploadData):
            yield file_data(e.file, e.offset, e.data, session)
        else:
            end = pb.FileEnd(file=e.file, size=e.size, sha256=e.sha256)
            yield pb.UploadRequest(session=session, end=end).SerializeToString()


def _push_result(r: pb.PushResponse) -> PushResult:
    from dataclasses import fields

    from mzstore.push.protocol import PushResult

    return PushResult(**{f.name: getattr(r, f.name) for f in fields(PushResult)})  # the same fields, by name


def _upload_status(s: pb.UploadStatus) -> UploadStatus:
    from mzstore.push.protocol import UploadStatus

    return UploadStatus(
        s.session, list(s.received), list(s.ended), s.committed, list(s.known) or [False] * len(s.ended)
    )


class GrpcTransport(Transport):
    """A store behind an mzstore gRPC server.

    Args:
        address: ``HOST:PORT`` (or ``unix:PATH``).
        settings: deadlines, keepalive, TLS files and token; default from the environment.
        timeout: deadline of short calls (default ``settings.timeout``); a push has
            ``settings.push_timeout``, one blob range read ``settings.fetch_timeout``.
        token: bearer token (default ``settings.token``).
        tls_ca: CA bundle to verify the server with; given (or ``settings.tls_ca``), the
            channel is TLS, with ``settings.tls_cert``/``tls_key`` as client certificate.

    Raises:
        InvalidArgument: a token with a plaintext, non-loopback server (it would cross the
            network in clear text); an unreadable TLS file.

    Attributes:
        channel: the gRPC channel (without the token interceptor).
        stub: the generated ``StoreStub`` (with the token interceptor), for tools and tests.
        read_blob_call: the raw ``ReadBlob`` callable (replies are bytes, see :func:`blob_piece`).
        push_call, upload_call: the raw ``Push`` and ``Upload`` callables: they take serialized
            requests (:func:`push_requests`; data messages by :func:`~mzstore.transport.wire.file_data`).
    """

    def __init__(
        self,
        address: str,
        *,
        settings: Settings | None = None,
        timeout: float | None = None,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        self.address = address = server_address(address)
        self.timeout = self.settings.timeout if timeout is None else timeout
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
        if token and ca is None and not is_loopback(address):
            raise InvalidArgument(
                f"refusing to send a token in clear text to {address}: set MZSTORE_TLS_CA (--tls-ca) for TLS"
            )
        if ca is not None:
            creds = _tls_credentials(ca, self.settings.tls_cert, self.settings.tls_key)
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        channel = grpc.intercept_channel(self.channel, _TokenMetadata(token)) if token else self.channel
        self.stub = pb_grpc.StoreStub(channel)
        #: The HTTP blob URL base the server told with its last manifest (``None``: it has none).
        self.advertised: str | None = None
        self.read_blob_call = channel.unary_stream(
            _READ_BLOB_PATH, request_serializer=pb.ReadBlobRequest.SerializeToString, response_deserializer=None
        )
        # Uploads send messages serialized by push_requests/_upload_requests, as they are.
        self.push_call = channel.stream_unary(_PUSH_PATH, response_deserializer=pb.PushResponse.FromString)
        self.upload_call = channel.stream_unary(_UPLOAD_PATH, response_deserializer=pb.UploadStatus.FromString)
        self.buffers = ReceiveBuffers(self.settings.pull_inflight_bytes)
        #: Send an upload session's bytes by HTTP PUT when the server offers it (mzstore.transport.uploads).
        self.http_uploads = True
        self._token = token
        self._tls = (ca, self.settings.tls_cert, self.settings.tls_key) if ca is not None else None
        self._offered: dict[str, tuple[str, UploadBegin, UploadStatus]] = {}  # session → (URL, begin, status)

    def close(self) -> None:
        self.channel.close()
        self.buffers.clear()

    # -- control plane --------------------------------------------------------------
    def manifest(self, ref: str) -> tuple[str, str, bytes]:
        with rpc_errors("GetManifest", self.timeout):
            resp = self.stub.GetManifest(pb.GetManifestRequest(ref=ref), timeout=self.timeout)
        self.advertised = advertised_url(resp.blob_url, self.address)
        return resp.ref, resp.digest, bytes(resp.manifest)

    def list_refs(self, name: str | None = None) -> list[RefInfo]:
        with rpc_errors("List", self.timeout):
            resp = self.stub.List(pb.ListRequest(name=name or ""), timeout=self.timeout)
        return [RefInfo(e.name, e.tag, e.digest, e.bytes_raw, e.bytes_stored, e.updated) for e in resp.refs]

    def tag(self, source: str, target: str) -> tuple[str, str]:
        with rpc_errors("Tag", self.timeout):
            resp = self.stub.Tag(pb.TagRequest(source=source, target=target), timeout=self.timeout)
        return resp.ref, resp.digest

    def delete(self, ref: str) -> tuple[str, str]:
        with rpc_errors("Delete", self.timeout):
            resp = self.stub.Delete(pb.DeleteRequest(ref=ref), timeout=self.timeout)
        return resp.ref, resp.digest

    def topology(self) -> Topology:
        with rpc_errors("GetTopology", self.timeout):
            resp = self.stub.GetTopology(pb.GetTopologyRequest(), timeout=self.timeout)
        return Topology([(n.url, n.endpoint_url or None) for n in resp.nodes], resp.replicas)

    # -- push ---------------------------------------------------------------------------
    def push(self, begin: UploadBegin, events: Iterable[UploadEvent]) -> PushResult:
        deadline = self.settings.push_timeout
        with rpc_errors("Push", deadline):
            resp = self.push_call(push_requests(begin, events), timeout=deadline, wait_for_ready=False)
        return _push_result(resp)

    def start_upload(self, session: str, begin: UploadBegin) -> UploadStatus:
        with rpc_errors("StartUpload", self.timeout):
            resp = self.stub.StartUpload(
                pb.StartUploadRequest(session=session, begin=begin_proto(begin)), timeout=self.timeout
            )
        url = advertised_url(resp.upload_url, self.address) or ""
        status = dataclasses.replace(_upload_status(resp), upload_url=url)
        if url and self._may_put(url) and not all(status.ended):  # kept for the upload call that follows
            self._offered[session] = (url, begin, status)
        return status

    def held_sizes(self, sizes: list[int]) -> list[bool]:
        try:
            with rpc_errors("FindFileSizes", self.timeout):
                resp = self.stub.FindFileSizes(pb.FindFileSizesRequest(sizes=sizes), timeout=self.timeout)
        except MzstoreError as exc:  # an older server, a read-only one: hash every file
            log.debug("FindFileSizes: %s; every file is hashed first", exc)
            return [True] * len(sizes)
        held = list(resp.held)
        return held if len(held) == len(sizes) else [True] * len(sizes)

    def _may_put(self, url: str) -> bool:
        """Whether an upload may go to ``url``: asked for, and a token never in clear text off this machine."""
        if not self.http_uploads:
            return False
        parts = urlsplit(url)
        return not (self._token and parts.scheme != "https" and not is_loopback(f"{parts.hostname}:0"))

    def upload(self, session: str, events: Iterable[UploadEvent]) -> UploadStatus:
        offered = self._offered.pop(session, None)
        if offered is not None:
            from mzstore.transport.http import tls_context
            from mzstore.transport.uploads import UploadUrlUnreachable, put_upload

            url, begin, status = offered
            events = iter(events)
            try:
                return put_upload(
                    url,
                    events,
                    sizes=[f.size for f in begin.files],
                    hashes=[f.sha256 for f in begin.files],
                    received=status.received,
                    ended=status.ended,
                    timeout=self.settings.push_timeout,
                    token=self._token,
                    context=tls_context(*(self._tls or (None, None, None))) if url.startswith("https:") else None,
                )
            except UploadUrlUnreachable as exc:  # nothing sent: the stream takes it, as it does from now on
                log.warning("%s; uploading over gRPC instead", exc)
                self.http_uploads = False
        deadline = self.settings.push_timeout
        with rpc_errors("Upload", deadline):
            resp = self.upload_call(_upload_requests(session, events), timeout=deadline)
        return _upload_status(resp)

    def commit_upload(self, session: str) -> PushResult:
        deadline = self.settings.push_timeout
        with rpc_errors("CommitUpload", deadline):
            resp = self.stub.CommitUpload(pb.CommitUploadRequest(session=session), timeout=deadline)
        return _push_result(resp)

    # -- data plane ----------------------------------------------------------------------
    def read_blob(self, digest: str, offset: int, length: int) -> memoryview | bytearray:
        """One streamed ``ReadBlob`` call (deadline ``settings.fetch_timeout``), read into one buffer
        (reused, see :mod:`mzstore.transport.buffers`)."""
        buf = self.buffers.take(length)
        pos = 0
        deadline = self.settings.fetch_timeout
        call: Any = self.read_blob_call(
            pb.ReadBlobRequest(digest=digest, offset=offset, length=length), timeout=deadline
        )
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

    def stream_blob(
        self, digest: str, offset: int = 0, timeout: float | None = None
    ) -> Iterator[tuple[int, memoryview]]:
        call: Any = self.read_blob_call(
            pb.ReadBlobRequest(digest=digest, offset=offset, length=0),
            timeout=timeout if timeout is not None else self.settings.fetch_timeout,
        )
        try:
            with rpc_errors("ReadBlob"):
                for message in call:
                    yield blob_piece(message)
        finally:
            call.cancel()  # a consumer that stops early must not leave the stream running
