"""Client-side upload: source files → upload events (transport-agnostic).

Each file is read in ``TRANSFER_BYTES`` pieces with their offsets, and
closed by an :class:`~mzstore.push.protocol.UploadEnd` carrying its size and
the sha256 of what was read, which the server checks; the gRPC client wraps
these events in protos.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

from mzstore.errors import IntegrityError
from mzstore.limits import TRANSFER_BYTES
from mzstore.push.protocol import UploadBegin, UploadData, UploadEnd, UploadEvent, UploadFile
from mzstore.push.source import Source


def begin_for(
    source: Source, ref: str, codec: str, annotations: dict[str, str] | None = None, keep: tuple[str, ...] = ()
) -> UploadBegin:
    """The first message of a push."""
    return UploadBegin(
        ref=ref,
        codec=codec,
        files=[UploadFile(f.path, f.size, f.kind) for f in source.files],
        source_kind=source.kind,
        annotations=dict(annotations or {}),
        keep=tuple(keep),
    )


def iter_events(
    source: Source,
    on_bytes: Callable[[int], None] | None = None,
    block: int = TRANSFER_BYTES,
    start: Sequence[int] | None = None,
    ended: Sequence[bool] | None = None,
) -> Iterator[UploadEvent]:
    """Yield the data and end events of every file, in order.

    To resume an upload session, ``start`` gives per file the offset the
    server already holds (those bytes are read and hashed, not sent) and
    ``ended`` the files it has whole (skipped).
    """
    for index, f in enumerate(source.files):
        if ended is not None and ended[index]:
            if on_bytes:
                on_bytes(f.size)
            continue
        skip = start[index] if start is not None else 0
        hasher = hashlib.sha256()
        offset = 0
        with f.opener() as fh:
            while offset < skip and (data := fh.read(min(block, skip - offset))):
                hasher.update(data)
                offset += len(data)
                if on_bytes:
                    on_bytes(len(data))
            if offset != skip:
                raise IntegrityError(f"{f.path} is shorter than what the server already received: it changed")
            while data := fh.read(block):
                hasher.update(data)
                yield UploadData(index, offset, data)
                offset += len(data)
                if on_bytes:
                    on_bytes(len(data))
        yield UploadEnd(index, offset, hasher.hexdigest())
