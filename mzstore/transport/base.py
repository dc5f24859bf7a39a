"""The transport interface: what a client can ask of a store, whatever carries it.

A :class:`Transport` returns plain values and raises domain errors
(:mod:`mzstore.errors`); it does no verification of its own beyond what its
wire needs (a blob read returns exactly the bytes asked for, or fails).
Checking manifests against their digests, decoding and verifying chunks,
retrying and resuming belong to the workflows that use it
(:mod:`mzstore.client`, :mod:`mzstore.pull`, :mod:`mzstore.push.upload`).

Deadlines: every call of an implementation has a finite one (short calls,
whole pushes and single blob reads each have their own; see
:class:`~mzstore.settings.Settings`); a call past it raises
:class:`~mzstore.errors.DeadlineExceeded`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    # A blob range as a transport returns it: a ``memoryview`` over a pooled receive buffer
    # (:mod:`mzstore.transport.buffers`), a ``bytearray`` or ``bytes``. For annotations only:
    # importing mzstore.durable here would add it to every command's start-up.
    from mzstore.durable import Data as Payload
    from mzstore.push.protocol import PushResult, UploadBegin, UploadEvent, UploadStatus


class Topology(NamedTuple):
    """The storage nodes behind a server (``(url, endpoint_url)``, no credentials) and its replica count."""

    nodes: list[tuple[str, str | None]]
    replicas: int


class RefInfo(NamedTuple):
    """A tag as a store lists it: what it points at, that model's sizes, and when the tag was written."""

    name: str
    tag: str
    digest: str
    bytes_raw: int = 0
    bytes_stored: int = 0
    updated: float = 0.0  # POSIX seconds; 0 when the store cannot say


class Transport(ABC):
    """One store, reached one way. Implementations: :class:`~mzstore.transport.grpc.GrpcTransport`,
    :class:`~mzstore.transport.direct.DirectTransport`.

    Attributes:
        address: where the store is, for messages (``HOST:PORT``).
    """

    address: str

    # -- control plane --------------------------------------------------------------
    @abstractmethod
    def manifest(self, ref: str) -> tuple[str, str, bytes]:
        """``(resolved ref, digest, manifest bytes)`` of ``name[:tag][@digest]``, as the store sent them.

        Raises:
            NotFound: no such ref; InvalidName: a malformed one.
        """

    @abstractmethod
    def list_refs(self, name: str | None = None) -> list[RefInfo]:
        """Every tag, or ``name``'s tags, sorted by name and tag."""

    @abstractmethod
    def tag(self, source: str, target: str) -> tuple[str, str]:
        """Point ``target`` at what ``source`` resolves to; ``(target ref, digest)``."""

    @abstractmethod
    def delete(self, ref: str) -> tuple[str, str]:
        """Remove the tag ``ref``; ``(ref, digest it pointed at)``."""

    @abstractmethod
    def topology(self) -> Topology:
        """The storage nodes a direct reader may read blobs from."""

    # -- push ---------------------------------------------------------------------------
    @abstractmethod
    def push(self, begin: UploadBegin, events: Iterable[UploadEvent]) -> PushResult:
        """One streamed push: ``begin``, then every file's events in order; nothing resumes."""

    @abstractmethod
    def start_upload(self, session: str, begin: UploadBegin) -> UploadStatus:
        """Create the upload session ``session`` (or find it, for the same ``begin``) and say how far it got.

        Raises:
            SessionBusy: another stream holds it; SessionMismatch: it exists for another push.
        """

    @abstractmethod
    def upload(self, session: str, events: Iterable[UploadEvent]) -> UploadStatus:
        """Send events into a session, each file continuing at the offset the session holds.

        Raises:
            SessionNotFound: the store no longer has the session; SessionBusy: another stream holds it.
        """

    @abstractmethod
    def commit_upload(self, session: str) -> PushResult:
        """Ingest a complete session and commit it under its ref."""

    def held_sizes(self, sizes: list[int]) -> list[bool]:
        """Per size, whether the store may hold a file of it (those are hashed before a resumable push).

        This default says every size, which costs a hash of every file and loses nothing.
        """
        return [True] * len(sizes)

    # -- data plane ----------------------------------------------------------------------
    @abstractmethod
    def read_blob(self, digest: str, offset: int, length: int) -> Payload:
        """Exactly ``length`` stored bytes of blob ``digest`` at ``offset``.

        Raises:
            Unavailable, DeadlineExceeded, ResourceExhausted: transient; callers retry.
            NotFound: no such blob; IntegrityError: the bytes that came are not the ones asked for.
        """

    def read_blob_again(self, digest: str, offset: int, length: int) -> Payload:
        """A range read again after its bytes failed their check: from the origin, past any cache between.

        The same as :meth:`read_blob` where nothing stands between (gRPC, the nodes themselves).
        """
        return self.read_blob(digest, offset, length)

    @abstractmethod
    def stream_blob(
        self, digest: str, offset: int = 0, timeout: float | None = None
    ) -> Iterator[tuple[int, memoryview]]:
        """``(offset, data)`` pieces of a blob from ``offset`` to its end (a consumer may stop early)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (idempotent)."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ControlledTransport(Transport):
    """A transport that reads blobs its own way and sends everything else to ``control`` (the server):
    refs, admin calls and pushes. :class:`~mzstore.transport.http.HttpTransport` and
    :class:`~mzstore.transport.direct.DirectTransport` are two.
    """

    def __init__(self, control: Transport) -> None:
        self.control = control
        self.address = control.address

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

    def held_sizes(self, sizes: list[int]) -> list[bool]:
        return self.control.held_sizes(sizes)
