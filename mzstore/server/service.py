"""gRPC servicer: proto → domain → library call → proto.

The only place where domain errors become gRPC status codes
(:func:`_abort`). Handlers stay short: pushes are handed to
:class:`~mzstore.push.ingest.Ingest`, reads to the :class:`Store`. The
server never decodes stored data on pull; it streams blob bytes.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import grpc

from mzstore.errors import FormatError, InvalidArgument, MzstoreError
from mzstore.format.refs import parse_ref
from mzstore.push.ingest import Ingest, UploadBegin, UploadData, UploadEnd, UploadEvent, UploadFile
from mzstore.settings import TRANSFER_BYTES, Settings
from mzstore.storage.store import Store
from mzstore.v1 import store_pb2 as pb
from mzstore.v1 import store_pb2_grpc as pb_grpc

log = logging.getLogger("mzstore.server")
F = TypeVar("F", bound=Callable[..., Any])


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """Translate a domain error into a gRPC status (the one translation point)."""
    if isinstance(exc, MzstoreError):
        code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
        context.abort(code, str(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # Spool and temp files on the server's own disk: the store's nodes map this themselves.
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server's disk is full ({exc.strerror})")
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {type(exc).__name__}")


def _handler(fn: F) -> F:
    @wraps(fn)
    def wrapper(self: StoreService, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001 - translated, never leaked
            _abort(context, exc)

    return wrapper  # type: ignore[return-value]


def _stream_handler(fn: F) -> F:
    @wraps(fn)
    def wrapper(self: StoreService, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(self, request, context)
        except Exception as exc:  # noqa: BLE001
            _abort(context, exc)

    return wrapper  # type: ignore[return-value]


def _events(requests: Iterator[pb.PushRequest], context: grpc.ServicerContext) -> Iterator[UploadEvent]:
    for req in requests:
        which = req.WhichOneof("msg")
        if which == "data":
            yield UploadData(req.data.file, req.data.offset, req.data.data)
        elif which == "end":
            yield UploadEnd(req.end.file, req.end.size, req.end.sha256)
        else:
            raise InvalidArgument(f"unexpected {which or 'empty'} message inside a push")
    if not context.is_active():
        raise InvalidArgument("client went away during the upload")


class StoreService(pb_grpc.StoreServicer):
    """The ``mzstore.v1.Store`` service over one :class:`Store`."""

    def __init__(self, store: Store, settings: Settings, spool_dir: Path | None = None) -> None:
        self.store = store
        self.settings = settings
        self.spool_dir = spool_dir

    @_handler
    def Push(self, request_iterator: Iterator[pb.PushRequest], context: grpc.ServicerContext) -> pb.PushResponse:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "begin":
            raise InvalidArgument("a push must start with a begin message")
        b = first.begin
        begin = UploadBegin(
            ref=b.ref,
            codec=b.codec or "lossless",
            files=[UploadFile(f.path, f.size, f.kind) for f in b.files],
            source_kind=b.source_kind or "hf-dir",
            annotations=dict(b.annotations),
            keep=tuple(b.keep),
        )
        ingest = Ingest(
            self.store,
            chunk_bytes=self.settings.chunk_bytes,
            shard_bytes=self.settings.shard_bytes,
            spool_dir=self.spool_dir,
        )
        result = ingest.run(begin, _events(request_iterator, context))
        log.info("pushed %s %s (%d → %d bytes)", result.ref, result.digest, result.bytes_raw, result.bytes_stored)
        return pb.PushResponse(
            ref=result.ref,
            digest=result.digest,
            bytes_raw=result.bytes_raw,
            bytes_stored=result.bytes_stored,
            bytes_received=result.bytes_received,
            tensors=result.tensors,
            chunks=result.chunks,
            shards=result.shards,
        )

    @_handler
    def GetManifest(self, request: pb.GetManifestRequest, context: grpc.ServicerContext) -> pb.GetManifestResponse:
        ref, digest = self.store.resolve(request.ref)
        return pb.GetManifestResponse(ref=str(ref), digest=digest, manifest=self.store.get_manifest(digest))

    @_stream_handler
    def ReadBlob(self, request: pb.ReadBlobRequest, context: grpc.ServicerContext) -> Iterator[pb.BlobChunk]:
        size = self.store.blob_size(request.digest)
        end = size if request.length == 0 else request.offset + request.length
        if request.offset > size or end > size:
            raise InvalidArgument(
                f"range {request.offset}+{request.length} is outside blob {request.digest} ({size} bytes)"
            )
        offset = request.offset
        while offset < end and context.is_active():
            n = min(TRANSFER_BYTES, end - offset)
            data = self.store.read_blob(request.digest, offset, n)
            if len(data) != n:
                raise FormatError(f"blob {request.digest} is shorter than expected")
            yield pb.BlobChunk(offset=offset, data=data)
            offset += n

    @_handler
    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        entries = self.store.list_refs(request.name or None)
        return pb.ListResponse(refs=[pb.RefEntry(name=e.name, tag=e.tag, digest=e.digest) for e in entries])

    @_handler
    def Tag(self, request: pb.TagRequest, context: grpc.ServicerContext) -> pb.TagResponse:
        _, digest = self.store.resolve(request.source)
        target = parse_ref(request.target)
        if target.digest:
            raise InvalidArgument("the target of a tag is name[:tag], not a digest")
        self.store.set_ref(target.name, target.tag, digest)
        return pb.TagResponse(ref=f"{target.name}:{target.tag}", digest=digest)

    @_handler
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        ref = parse_ref(request.ref)
        if ref.digest:
            raise InvalidArgument("rm removes a tag; give name[:tag]")
        digest = self.store.delete_ref(ref.name, ref.tag)
        return pb.DeleteResponse(ref=f"{ref.name}:{ref.tag}", digest=digest)

    @_handler
    def GetTopology(self, request: pb.GetTopologyRequest, context: grpc.ServicerContext) -> pb.Topology:
        nodes = [pb.NodeInfo(url=n.url, endpoint_url=getattr(n, "endpoint_url", None) or "") for n in self.store.nodes]
        return pb.Topology(nodes=nodes, replicas=self.store.replicas)
