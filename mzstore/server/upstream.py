"""Pull-through cache: a server that fronts another mzstore server (``mzstore serve --upstream HOST:PORT``).

A site or region runs one of these next to its inference servers and edge
devices; the first pull of a model through it fills its local store, later
pulls are served from there without touching the upstream.

How it works::

    GetManifest name:tag ──▶ resolved less than ``ttl`` s ago? ──yes──▶ that digest
                               │ no
                               ▼
                             upstream GetManifest (digest checked, manifest parsed)
                               ──▶ put_manifest + set_ref locally ──▶ digest
                               │ upstream unreachable
                               ▼
                             the local ref (warning): an offline site keeps serving what it has
    GetManifest name@sha256 ──▶ local manifest, else upstream ──▶ put_manifest
    ReadBlob ──▶ local blob? ──no──▶ one fill per digest (concurrent readers wait for it):
                                     stream the whole blob from upstream into a spool file on
                                     the local disk, hashing as it goes; sha256 == digest ──▶
                                     publish (rename); else discard it, IntegrityError
    List ──▶ upstream's list; the local one when upstream is unreachable
    Push / Tag / Delete ──▶ refused (FAILED_PRECONDITION): the cache is read-only
    GetTopology ──▶ refused: direct readers would find only what was pulled so far

Memory stays bounded whatever the blob size (shards target
``MZSTORE_SHARD_BYTES``, 1 GiB by default and unbounded by configuration):
a fill holds one gRPC message (about 1 MiB) at a time. A stream that breaks
after moving bytes resumes where it stopped; one that moves nothing fails.
A fill covers the whole blob, because only a whole blob can be checked
against its digest: the first range read of a shard waits for all of it.

Blobs and manifests are content-addressed, so nothing the cache holds can
go stale; only tags can, for at most ``ttl`` seconds. An outage is
remembered as long (the local tag is served without asking again), so an
offline site does not wait for the upstream's deadline on every pull.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from mzstore.errors import (
    Conflict,
    DeadlineExceeded,
    IntegrityError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from mzstore.format.manifest import digest_of, parse_manifest
from mzstore.format.refs import Ref, parse_ref, validate_digest
from mzstore.server.service import StoreService, handler
from mzstore.settings import Settings
from mzstore.storage.node import LocalNode, Node, node_has, temp_prefix
from mzstore.storage.store import RefEntry, Staged, Store, blob_key
from mzstore.transport.base import Transport
from mzstore.transport.wire import FileDataMessage
from mzstore.v1 import store_pb2 as pb

log = logging.getLogger("mzstore.server.upstream")

#: How long a tag resolved upstream is trusted before asking again (seconds).
DEFAULT_TTL_S = 60.0
#: Deadline of short upstream calls (manifests, lists); an unreachable upstream falls back to local data.
UPSTREAM_TIMEOUT_S = 10.0
#: Deadline of one blob stream from upstream; a stream cut by it resumes if it moved bytes.
BLOB_STREAM_TIMEOUT_S = 600.0

#: Upstream failures that make the cache serve what it has.
_OFFLINE = (Unavailable, DeadlineExceeded)


def upstream_transport(server: str, settings: Settings | None = None) -> Transport:
    """The transport to an upstream server: gRPC with the short deadline of :data:`UPSTREAM_TIMEOUT_S`.

    Its token and TLS files come from this server's own environment (``MZSTORE_TOKEN``,
    ``MZSTORE_TLS_CA``…). The client-side chunk cache plays no part: the server's own store is the cache.
    """
    from mzstore.transport.grpc import GrpcTransport

    return GrpcTransport(server, settings=settings, timeout=UPSTREAM_TIMEOUT_S)


def checked_manifest(upstream: Transport, ref: str) -> tuple[str, bytes]:
    """``(digest, manifest bytes)`` of ``ref`` from upstream, checked against the digest and parsed.

    Raises:
        IntegrityError: the bytes do not match the digest; FormatError: not a manifest;
        NotFound, Unavailable…: as the upstream answers.
    """
    _, digest, data = upstream.manifest(ref)
    validate_digest(digest)
    if digest_of(data) != digest:
        raise IntegrityError(f"upstream {upstream.address} sent a manifest for {ref} that does not match {digest}")
    parse_manifest(data)  # never store what a client could not read
    return digest, data


class _KeyedLocks:
    """One lock per key, created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[key]


class PullThroughStore(Store):
    """A :class:`Store` over local nodes that fills itself from an upstream mzstore server.

    Args:
        nodes: the local nodes (a directory, node URLs…), as for :class:`Store`.
        upstream: ``HOST:PORT`` of the upstream server, or a transport to it.
        replicas: copies of every blob on the local nodes.
        ttl: seconds a tag resolved upstream is trusted (0: ask upstream on every resolve).
        settings: client settings for the upstream connection.
    """

    def __init__(
        self,
        nodes: Node | str | Path | Sequence[Node | str | Path],
        upstream: str | Transport,
        *,
        replicas: int = 1,
        ttl: float = DEFAULT_TTL_S,
        settings: Settings | None = None,
    ) -> None:
        super().__init__(nodes, replicas)
        if not ttl >= 0:
            raise InvalidArgument(f"the upstream TTL must be at least 0 seconds, got {ttl}")
        self.upstream = upstream if isinstance(upstream, Transport) else upstream_transport(upstream, settings)
        self.ttl = ttl
        self._fresh: dict[tuple[str, str], tuple[str, float]] = {}  # (name, tag) → (digest, monotonic expiry)
        self._flights = _KeyedLocks()
        self._present: set[str] = set()  # blobs known to be on the local nodes
        self._fills: dict[str, int] = {}  # digest → fills done by this process

    @property
    def upstream_address(self) -> str:
        return self.upstream.address

    def close(self) -> None:
        self.upstream.close()

    def read_only(self, verb: str) -> Conflict:
        """The error a write to the cache gets."""
        up = self.upstream_address
        return Conflict(
            f"cannot {verb}: this server is a read-only pull-through cache of {up}; "
            f"run it against the upstream instead (--server {up})"
        )

    # -- refs and manifests ---------------------------------------------------
    def resolve(self, ref: str | Ref) -> tuple[Ref, str]:
        """Resolve ``ref`` upstream (tags: at most once per ``ttl``), keeping the manifest and tag locally."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.digest:
            if not self.has_manifest(parsed.digest):
                with self._flights.hold(f"manifest:{parsed.digest}"):
                    if not self.has_manifest(parsed.digest):
                        self._fetch_by_digest(parsed)
            return parsed, parsed.digest
        key = (parsed.name, parsed.tag)
        with self._flights.hold(f"ref:{parsed.name}:{parsed.tag}"):
            fresh = self._fresh.get(key)
            if fresh is not None and time.monotonic() < fresh[1]:
                return parsed, fresh[0]
            digest = self._resolve_tag(parsed)
            if self.ttl > 0:
                self._fresh[key] = (digest, time.monotonic() + self.ttl)
        return parsed, digest

    def _resolve_tag(self, ref: Ref) -> str:
        try:
            digest, data = checked_manifest(self.upstream, str(ref))
        except _OFFLINE as exc:
            try:
                digest = self.get_ref(ref.name, ref.tag)
            except NotFound:
                raise NotFound(
                    f"{ref} is not in this cache and upstream {self.upstream_address} is unreachable ({exc})"
                ) from None
            log.warning(
                "upstream %s unreachable (%s); serving the cached %s → %s", self.upstream_address, exc, ref, digest
            )
            return digest
        except NotFound:
            self._forget(ref)  # mirror the upstream: a tag removed there is not served from here either
            raise
        self.put_manifest(data)
        if self._local_ref(ref) != digest:
            self.set_ref(ref.name, ref.tag, digest)
        return digest

    def _fetch_by_digest(self, ref: Ref) -> None:
        assert ref.digest is not None
        try:
            digest, data = checked_manifest(self.upstream, str(ref))
        except _OFFLINE as exc:
            raise NotFound(
                f"manifest {ref.digest} is not in this cache and upstream {self.upstream_address} "
                f"is unreachable ({exc})"
            ) from None
        if digest != ref.digest:
            raise IntegrityError(f"upstream {self.upstream_address} answered {ref} with manifest {digest}")
        self.put_manifest(data)

    def _local_ref(self, ref: Ref) -> str | None:
        try:
            return self.get_ref(ref.name, ref.tag)
        except NotFound:
            return None

    def _forget(self, ref: Ref) -> None:
        with contextlib.suppress(NotFound):
            self.delete_ref(ref.name, ref.tag)
        self._fresh.pop((ref.name, ref.tag), None)

    def list_refs(self, name: str | None = None) -> list[RefEntry]:
        """The upstream's list; the local one (what this cache holds) when upstream is unreachable."""
        try:
            return [RefEntry(*r) for r in self.upstream.list_refs(name)]
        except _OFFLINE as exc:
            log.warning("upstream %s unreachable (%s); listing the cached refs", self.upstream_address, exc)
            return super().list_refs(name)

    # -- blobs --------------------------------------------------------------------
    def blob_size(self, digest: str) -> int:
        self._ensure_blob(digest)
        fills = self._fills.get(digest, 0)
        try:
            return super().blob_size(digest)
        except IntegrityError:
            self._refill(digest, fills)
            return super().blob_size(digest)

    def blob_location(self, digest: str) -> tuple[Node, str]:
        self._ensure_blob(digest)
        fills = self._fills.get(digest, 0)
        try:
            return super().blob_location(digest)
        except IntegrityError:
            self._refill(digest, fills)
            return super().blob_location(digest)

    def read_blob(self, digest: str, offset: int = 0, length: int | None = None) -> bytes:
        self._ensure_blob(digest)
        fills = self._fills.get(digest, 0)
        try:
            return super().read_blob(digest, offset, length)
        except IntegrityError:
            self._refill(digest, fills)
            return super().read_blob(digest, offset, length)

    def _on_some_node(self, digest: str) -> bool:
        key = blob_key(digest)
        return any(node_has(n, key) for n in self.nodes)

    def _ensure_blob(self, digest: str) -> None:
        """Fill ``digest`` from upstream unless a local node has it (one fill per digest at a time)."""
        if digest in self._present:
            self.counts["hit"] += 1
            return
        if not self._on_some_node(digest):
            with self._flights.hold(digest):
                if not self._on_some_node(digest):  # another reader may have filled it meanwhile
                    self.counts["miss"] += 1
                    self._fill(digest)
        else:
            self.counts["hit"] += 1
        self._present.add(digest)

    def _refill(self, digest: str, fills: int) -> None:
        """No intact local copy is left (lost or corrupt): fetch the blob again.

        ``fills`` is the number of fills of ``digest`` the failed read saw; when it has
        grown meanwhile, another reader already fetched the blob again.
        """
        with self._flights.hold(digest):
            if self._fills.get(digest, 0) == fills:
                log.warning("no intact local copy of blob %s; fetching it again from %s", digest, self.upstream_address)
                self._fill(digest)

    def _spool_dir(self) -> Path | None:
        local = [n for n in self.nodes if isinstance(n, LocalNode)]
        return local[0].tempdir() if local else None

    def _fill(self, digest: str) -> None:
        """Copy a blob from upstream into the local nodes, publishing it only if it matches its digest.

        Raises:
            IntegrityError: the upstream's bytes do not hash to ``digest`` (nothing is stored).
            NotFound, Unavailable: as the upstream answers.
        """
        validate_digest(digest)
        start = time.perf_counter()
        fd, name = tempfile.mkstemp(prefix=temp_prefix("pull"), suffix=".part", dir=self._spool_dir())
        spool: Path | None = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                size, got = self._download(digest, fh)
                fh.flush()
                os.fsync(fh.fileno())
            if got != digest:
                raise IntegrityError(
                    f"upstream {self.upstream_address} sent blob {digest} with different content "
                    f"(sha256 {got}); it was discarded"
                )
            only = self.nodes[0]
            if len(self.nodes) == 1 and isinstance(only, LocalNode):
                # The spool is on the node's own disk, fsynced and checked: publishing is a rename.
                self.publish_blob(Staged(digest, [(only, Path(name))]))
                spool = None
                with self._lock:
                    self._verified.add((only.url, digest))
            else:
                staged_digest, staged = self.stage_blob(Path(name))
                if staged_digest != digest:  # the spool changed under us
                    self.discard_blob(staged)
                    raise IntegrityError(f"blob {digest} changed while it was being stored")
                self.publish_blob(staged)
        finally:
            if spool is not None:
                spool.unlink(missing_ok=True)
        self._fills[digest] = self._fills.get(digest, 0) + 1
        seconds = time.perf_counter() - start
        log.info("filled blob %s from %s (%d bytes, %.2f s)", digest, self.upstream_address, size, seconds)

    def _download(self, digest: str, fh: Any) -> tuple[int, str]:
        """Stream the whole blob into ``fh``; return its size and ``sha256:<hex>``."""
        hasher = hashlib.sha256()
        pos = 0
        while True:
            start = pos
            try:
                for offset, data in self.upstream.stream_blob(digest, pos, timeout=BLOB_STREAM_TIMEOUT_S):
                    if offset != pos:
                        raise IntegrityError(f"upstream {self.upstream_address} sent blob {digest} out of order")
                    fh.write(data)
                    hasher.update(data)
                    pos += len(data)
                return pos, "sha256:" + hasher.hexdigest()
            except _OFFLINE as exc:
                if pos == start:
                    raise Unavailable(f"upstream {self.upstream_address}: {exc}") from None
                log.warning(
                    "blob %s from %s broke off at %d bytes (%s); resuming", digest, self.upstream_address, pos, exc
                )


class PullThroughService(StoreService):
    """The Store service of a pull-through cache: reads go through :class:`PullThroughStore`, writes are refused."""

    def __init__(self, store: PullThroughStore, settings: Settings) -> None:
        super().__init__(store, settings)
        self.cache = store

    @handler
    def Push(
        self, request_iterator: Iterator[pb.PushRequest | FileDataMessage], context: grpc.ServicerContext
    ) -> pb.PushResponse:
        raise self.cache.read_only("push")

    @handler
    def StartUpload(self, request: pb.StartUploadRequest, context: grpc.ServicerContext) -> pb.UploadStatus:
        raise self.cache.read_only("push")

    @handler
    def FindFileSizes(
        self, request: pb.FindFileSizesRequest, context: grpc.ServicerContext
    ) -> pb.FindFileSizesResponse:
        raise self.cache.read_only("push")

    @handler
    def Tag(self, request: pb.TagRequest, context: grpc.ServicerContext) -> pb.TagResponse:
        raise self.cache.read_only("tag")

    @handler
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> pb.DeleteResponse:
        raise self.cache.read_only("rm")

    @handler
    def GetTopology(self, request: pb.GetTopologyRequest, context: grpc.ServicerContext) -> pb.Topology:
        # The cache's nodes hold only what has been pulled through it: direct readers would miss the rest.
        raise Conflict(
            f"cannot read directly from a pull-through cache of {self.cache.upstream_address}: "
            "its storage fills on demand; pull without --direct"
        )
