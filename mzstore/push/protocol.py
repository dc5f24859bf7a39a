"""The upload protocol, transport-agnostic: the events of a push and the rules they follow.

A push is a :class:`UploadBegin` (ref, policy, the files with their sizes
and kinds) followed by, per file, :class:`UploadData` pieces at increasing
offsets and one :class:`UploadEnd` with the file's size and sha256. The
client makes these events from a source (:mod:`mzstore.push.upload`); a
transport carries them (gRPC today: one ``Push`` stream, or an upload
session fed by any number of ``Upload`` streams); the server checks them
with one :class:`UploadState` and ingests them (:mod:`mzstore.push.ingest`).

Two delivery modes share the same rules:

* **streamed** (``in_order=True``): files arrive one after the other, each
  complete, as one stream — the ingest reads it as it arrives;
* **session** (``in_order=False``): any file may continue, always exactly at
  the offset the server recorded for it, so a broken stream resumes there
  (:mod:`mzstore.push.sessions`).

:func:`validate_begin` checks everything that can be checked before any
data (the client calls it too, to fail before uploading).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from mzstore.errors import FormatError, IntegrityError, InvalidArgument, ResourceExhausted
from mzstore.format.manifest import validate_relpath
from mzstore.format.refs import parse_ref
from mzstore.limits import MAX_ANNOTATION_KEY, MAX_ANNOTATION_VALUE, MAX_ANNOTATIONS, MAX_INT
from mzstore.settings import Limits

#: Kinds of uploaded files: parsed as safetensors, or stored as plain bytes.
FILE_KINDS = ("safetensors", "file")
#: What the client pushed from (recorded in the manifest).
SOURCE_KINDS = ("safetensors", "hf-dir", "torch")


@dataclass(frozen=True)
class UploadFile:
    """A file of a push: its path in the model, size, kind, and sha256 (hex) when the client knows it."""

    path: str
    size: int
    kind: str
    sha256: str = ""


@dataclass(frozen=True)
class UploadBegin:
    ref: str
    codec: str
    files: list[UploadFile]
    source_kind: str = "hf-dir"
    annotations: dict[str, str] = field(default_factory=dict)
    keep: tuple[str, ...] = ()
    #: ``ecsq`` policies: the client's bit allocation (:class:`mzstore.codecs.allocation.Allocation` JSON).
    allocation: str = ""
    #: ``push --base``: the base model's ref; lossless tensors are stored as deltas against it.
    base: str = ""

    @property
    def storage_policy(self) -> str:
        """What decides how the safetensors files are stored: the policy, the allocation's digest, the base."""
        text = self.codec
        if self.allocation:
            text += f"#{hashlib.sha256(self.allocation.encode()).hexdigest()[:24]}"
        if self.base:
            text += f"#base={self.base}"
        return text


@dataclass(frozen=True)
class UploadData:
    file: int
    offset: int
    #: Bytes read from the source, or a view into the message they arrived in (the server).
    data: bytes | memoryview


@dataclass(frozen=True)
class UploadEnd:
    file: int
    size: int
    sha256: str


@dataclass(frozen=True)
class UploadKnown:
    """The store already holds file ``file`` (``sha256``, under this push's policy) in ``manifest``.

    Made by the server (never sent by a client): it stands for the file's data and end.
    """

    file: int
    size: int
    sha256: str
    manifest: str


UploadEvent = UploadData | UploadEnd | UploadKnown


@dataclass(frozen=True)
class PushResult:
    """What a committed push stored (the server's answer)."""

    ref: str
    digest: str
    bytes_raw: int
    bytes_stored: int
    bytes_received: int
    tensors: int
    chunks: int
    shards: int


@dataclass
class UploadStatus:
    """How far an upload session got: per file, the bytes the store holds and whether it ended."""

    session: str
    received: list[int]
    ended: list[bool]
    committed: bool = False
    known: list[bool] = field(default_factory=list)  # files the store already held: nothing to send
    #: Where the rest may go by HTTP PUT instead of an upload stream ("": nowhere; see the proto).
    upload_url: str = ""

    @property
    def complete(self) -> bool:
        return all(self.ended)


#: Bytes of a file's sha256 in an HTTP upload body, after the file's data, when the begin does not give it.
DIGEST_BYTES = 32


def upload_body_bytes(
    sizes: Sequence[int], hashes: Sequence[str], received: Sequence[int], ended: Sequence[bool]
) -> int:
    """The length of a session's HTTP upload body (``UploadStatus.upload_url``): every unended file from its
    received offset to its end, and the sha256 of each such file the begin does not give (``hashes`` "")."""
    return sum(
        size - got + (0 if sha else DIGEST_BYTES)
        for size, sha, got, done in zip(sizes, hashes, received, ended, strict=True)
        if not done
    )


_HEX64 = re.compile(r"[0-9a-f]{64}")

#: An annotation key: letters, digits and ``. _ - /``, starting with a letter or digit
#: (``fine-tuned-from``, ``org.opencontainers.image.source``).
ANNOTATION_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*")


def validate_annotations(annotations: dict[str, str]) -> None:
    """Check a push's annotations: how many, key grammar, sizes.

    Raises:
        InvalidArgument: too many, a malformed key, or a key or value too long.
    """
    if len(annotations) > MAX_ANNOTATIONS:
        raise InvalidArgument(f"push has {len(annotations)} annotations, more than {MAX_ANNOTATIONS}")
    for key, value in annotations.items():
        if not ANNOTATION_KEY.fullmatch(key) or len(key) > MAX_ANNOTATION_KEY:
            raise InvalidArgument(
                f"annotation key {key[:40]!r} must be letters, digits and . _ - / (at most {MAX_ANNOTATION_KEY})"
            )
        if len(value.encode("utf-8", "surrogatepass")) > MAX_ANNOTATION_VALUE:
            raise InvalidArgument(f"annotation {key} is longer than {MAX_ANNOTATION_VALUE} bytes")


def validate_begin(begin: UploadBegin, limits: Limits | None = None) -> None:
    """Check everything about a push that can be checked before any data.

    Args:
        begin: the push's first message.
        limits: the server's limits; ``None`` (the client) checks only the structure.

    Raises:
        InvalidArgument: bad ref, policy, kinds, paths or sizes.
        ResourceExhausted: more files or declared bytes than ``limits`` allow.
    """
    from mzstore.codecs.policy import parse_policy  # here: the codecs package loads numpy

    if parse_ref(begin.ref).digest:
        raise InvalidArgument("push to a name[:tag], not to a digest")
    if begin.base:
        parse_ref(begin.base)
    policy = parse_policy(begin.codec, begin.keep)
    if policy.ecsq is not None:
        if begin.allocation:
            from mzstore.codecs.allocation import Allocation

            Allocation.from_json(begin.allocation)
        elif policy.ecsq.target != "step":
            raise InvalidArgument(
                f"{policy.text} needs the bit allocation its client computes (mzstore push does); "
                "without one, only ecsq:step=D (one step for every tensor) can be pushed"
            )
    elif begin.allocation:
        raise InvalidArgument("an allocation goes only with an ecsq policy")
    if begin.source_kind not in SOURCE_KINDS:
        raise InvalidArgument(f"unknown source kind {begin.source_kind[:40]!r}")
    if not begin.files:
        raise InvalidArgument("push has no files")
    validate_annotations(begin.annotations)
    if limits is not None and len(begin.files) > limits.files:
        raise ResourceExhausted(
            f"push has {len(begin.files)} files, more than the limit of {limits.files} (MZSTORE_MAX_FILES)"
        )
    seen = set()
    for f in begin.files:
        try:
            validate_relpath(f.path)
        except FormatError as exc:
            raise InvalidArgument(str(exc)) from None
        if f.path in seen:
            raise InvalidArgument(f"file {f.path!r} is listed twice")
        seen.add(f.path)
        if f.kind not in FILE_KINDS:
            raise InvalidArgument(f"file {f.path!r} has unknown kind {f.kind[:40]!r}")
        if f.size < 0 or f.size > MAX_INT:
            raise InvalidArgument(f"file {f.path!r} has an invalid size {f.size}")
        if f.sha256 and not _HEX64.fullmatch(f.sha256):
            raise InvalidArgument(f"file {f.path!r}: sha256 must be 64 lowercase hex digits")
    total = sum(f.size for f in begin.files)
    if limits is not None and total > limits.upload_bytes:
        raise ResourceExhausted(
            f"push declares {total} bytes, more than the limit of {limits.upload_bytes} (MZSTORE_MAX_UPLOAD_BYTES)"
        )


class UploadState:
    """How far each file of an upload got, and the one set of rules every event is checked against.

    Args:
        begin: the upload's first message (its files and declared sizes).
        received: bytes already held per file (a resumed session); default none.
        ended: files already ended; default none.
        in_order: a streamed push: files arrive one after the other, each ended before the next.

    Raises (from :meth:`accept` and :meth:`finish`):
        InvalidArgument: an event out of place (unknown file, wrong offset, a file after its end,
            another file than the current one in a streamed push, data after the last file).
        IntegrityError: more bytes than declared, an end at another size, a stream that ends early.
    """

    def __init__(
        self,
        begin: UploadBegin,
        received: Sequence[int] | None = None,
        ended: Sequence[bool] | None = None,
        *,
        in_order: bool = False,
    ) -> None:
        self.files = begin.files
        self.received = list(received) if received is not None else [0] * len(self.files)
        self.ended = list(ended) if ended is not None else [False] * len(self.files)
        self.in_order = in_order
        #: The file a streamed push expects next.
        self.current = 0

    def accept(self, event: UploadEvent) -> None:
        """Check ``event`` against the upload so far and record it."""
        i = event.file
        if self.in_order:
            if self.current >= len(self.files):
                raise InvalidArgument("data after the last file")
            if i != self.current:
                f = self.files[self.current]
                raise InvalidArgument(f"expected data for file #{self.current} ({f.path}), got file #{i}")
        elif not 0 <= i < len(self.files):
            raise InvalidArgument(f"file index {i} is not in this upload")
        f = self.files[i]
        if self.ended[i]:
            raise InvalidArgument(f"{f.path} already ended")
        if isinstance(event, UploadKnown):
            if self.received[i] or event.size != f.size:
                raise InvalidArgument(f"{f.path}: a known file cannot also have data")
            self.received[i] = f.size
            self.ended[i] = True
            self.current = i + 1
            return
        if isinstance(event, UploadData):
            if event.offset != self.received[i]:
                raise InvalidArgument(f"{f.path}: data at offset {event.offset}, expected {self.received[i]}")
            if self.received[i] + len(event.data) > f.size:
                raise IntegrityError(f"{f.path} is longer than its declared {f.size} bytes")
            self.received[i] += len(event.data)
            return
        if event.size != self.received[i] or event.size != f.size:
            raise IntegrityError(f"{f.path}: ended at {event.size} bytes, received {self.received[i]} of {f.size}")
        self.ended[i] = True
        self.current = i + 1

    def finish(self) -> None:
        """The stream is over: a streamed push must have ended every file."""
        if self.in_order and self.current < len(self.files):
            f = self.files[self.current]
            raise IntegrityError(f"upload ended early: {f.path} has {self.received[self.current]} of {f.size} bytes")

    @property
    def complete(self) -> bool:
        return all(self.ended)
