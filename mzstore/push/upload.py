"""Client-side upload: source files → upload events → a transport, resumably.

Each file is read in ``TRANSFER_BYTES`` pieces with their offsets, and
closed by an :class:`~mzstore.push.protocol.UploadEnd` carrying its size and
the sha256 of what was read, which the server checks. :func:`push_resumable`
drives an upload session over any :class:`~mzstore.transport.base.Transport`
(retry, backoff, resume at the server's offsets); :func:`push_streamed` sends
one stream with no resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from mzstore.durable import write_file
from mzstore.errors import (
    Cancelled,
    Conflict,
    DeadlineExceeded,
    IntegrityError,
    NotFound,
    SessionBusy,
    SessionNotFound,
    Unavailable,
)
from mzstore.limits import TRANSFER_BYTES
from mzstore.push.protocol import PushResult, UploadBegin, UploadData, UploadEnd, UploadEvent, UploadFile
from mzstore.push.source import Source, SourceFile

if TYPE_CHECKING:
    from mzstore.transport.base import Transport

log = logging.getLogger("mzstore.push")


def begin_for(
    source: Source,
    ref: str,
    codec: str,
    annotations: dict[str, str] | None = None,
    keep: tuple[str, ...] = (),
    hashes: Sequence[str] | None = None,
    allocation: str = "",
    base: str = "",
) -> UploadBegin:
    """The first message of a push; with ``hashes`` (per file), the store can skip files it holds."""
    return UploadBegin(
        ref=ref,
        codec=codec,
        files=[UploadFile(f.path, f.size, f.kind, hashes[i] if hashes else "") for i, f in enumerate(source.files)],
        source_kind=source.kind,
        annotations=dict(annotations or {}),
        keep=tuple(keep),
        allocation=allocation,
        base=base,
    )


def iter_events(
    source: Source,
    on_bytes: Callable[[int], None] | None = None,
    block: int = TRANSFER_BYTES,
    start: Sequence[int] | None = None,
    ended: Sequence[bool] | None = None,
    hashes: Sequence[str] | None = None,
) -> Iterator[UploadEvent]:
    """Yield the data and end events of every file, in order.

    To resume an upload session, ``start`` gives per file the offset the
    server already holds (those bytes are not sent) and ``ended`` the files
    it has whole (skipped). A file whose sha256 is in ``hashes`` (hashed
    before the upload, or remembered) is not hashed again: its end event
    carries that digest, which the server checks against the bytes it got,
    so a file that changed after it was hashed fails the push instead of
    storing a torn copy. Other files are hashed as they are read (a resumed
    one from its start).
    """
    for index, f in enumerate(source.files):
        if ended is not None and ended[index]:
            if on_bytes:
                on_bytes(f.size)
            continue
        skip = start[index] if start is not None else 0
        known = hashes[index] if hashes is not None else ""
        hasher = None if known else hashlib.sha256()
        offset = 0
        with f.opener() as fh:
            if hasher is None and skip:
                offset = fh.seek(skip)
                if on_bytes:
                    on_bytes(offset)
            while offset < skip and (data := fh.read(min(block, skip - offset))):
                if hasher is not None:
                    hasher.update(data)
                offset += len(data)
                if on_bytes:
                    on_bytes(len(data))
            if offset != skip or (hasher is None and skip > f.size):
                raise IntegrityError(f"{f.path} is shorter than what the server already received: it changed")
            while data := fh.read(block):
                if hasher is not None:
                    hasher.update(data)
                yield UploadData(index, offset, data)
                offset += len(data)
                if on_bytes:
                    on_bytes(len(data))
        yield UploadEnd(index, offset, hasher.hexdigest() if hasher is not None else known)


#: Bytes read per block when hashing a file.
HASH_BLOCK = 8 * 1024 * 1024


def _sha256(f: SourceFile) -> str:
    hasher = hashlib.sha256()
    with f.opener() as fh:
        while block := fh.read(HASH_BLOCK):
            hasher.update(block)
    return hasher.hexdigest()


def _identity(f: SourceFile) -> str | None:
    """What says a file on disk is unchanged since it was hashed: path, size, mtime, inode."""
    if f.disk_path is None:
        return None
    try:
        st = os.stat(f.disk_path)
    except OSError:
        return None
    return f"{f.disk_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def file_hashes(
    source: Source, remembered: Path | None = None, workers: int = 4, only: Sequence[bool] | None = None
) -> list[str]:
    """The sha256 (hex) of every file of ``source``, for the store to skip files it already holds.

    Files are hashed on ``workers`` threads (hashlib releases the GIL). With ``remembered`` (a JSON
    file), a file on disk whose path, size, mtime and inode are unchanged since it was last hashed
    is not read again, as ``huggingface_hub`` keeps an upload cache. With ``only`` (per file), a
    file not selected and not remembered is not hashed: its entry is ``""`` (it is hashed as it is sent).
    """
    known = _remembered(remembered) if remembered is not None else {}
    ids = [_identity(f) for f in source.files]
    todo = [
        i
        for i, key in enumerate(ids)
        if (key is None or not isinstance(known.get(key), str)) and (only is None or only[i])
    ]
    out = [known.get(key, "") if key is not None else "" for key in ids]
    with ThreadPoolExecutor(
        max_workers=max(1, min(workers, len(todo) or 1)), thread_name_prefix="mzstore-hash"
    ) as pool:
        for i, digest in zip(todo, pool.map(lambda i: _sha256(source.files[i]), todo), strict=True):
            out[i] = digest
            key = ids[i]
            if key is not None:
                known[key] = digest
    if remembered is not None and todo:
        try:
            write_file(remembered, json.dumps(known).encode(), durable=False)
        except OSError as exc:
            log.warning("could not remember file hashes in %s: %s", remembered, exc)
    return out


def _remembered(path: Path) -> dict[str, str]:
    """The remembered hashes in ``path`` (none when it is missing or unreadable)."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def forget_hashes(source: Source, remembered: Path) -> None:
    """Drop the remembered sha256 of ``source``'s files (one of them changed after it was hashed)."""
    known = _remembered(remembered)
    paths = {f"{f.disk_path.resolve()}|" for f in source.files if f.disk_path is not None}
    kept = {k: v for k, v in known.items() if not any(k.startswith(p) for p in paths)}
    if len(kept) != len(known):
        try:
            write_file(remembered, json.dumps(kept).encode(), durable=False)
        except OSError as exc:
            log.warning("could not forget file hashes in %s: %s", remembered, exc)


def file_identities(source: Source) -> list[str | None]:
    """What says each file is unchanged (see :func:`file_hashes`), taken before a push reads it."""
    return [_identity(f) for f in source.files]


def remember_hashes(source: Source, remembered: Path, digests: dict[int, str], before: list[str | None]) -> None:
    """Remember the sha256 of files hashed as they were sent (``digests``, by file index), for the next push;
    only files whose identity is still ``before``'s (unchanged while they were read)."""
    known = _remembered(remembered)
    added = 0
    for i, digest in digests.items():
        key = _identity(source.files[i])
        if key is not None and key == before[i] and known.get(key) != digest:
            known[key] = digest
            added += 1
    if added:
        try:
            write_file(remembered, json.dumps(known).encode(), durable=False)
        except OSError as exc:
            log.warning("could not remember file hashes in %s: %s", remembered, exc)


class _Counted:
    """Upload events passed through, counting the data bytes that went out and keeping each file's sha256."""

    def __init__(self, events: Iterator[UploadEvent], ends: dict[int, str] | None = None) -> None:
        self.bytes = 0
        self._events = events
        self._ends = ends

    def __iter__(self) -> Iterator[UploadEvent]:
        for e in self._events:
            if isinstance(e, UploadData):
                self.bytes += len(e.data)
            elif self._ends is not None:
                self._ends[e.file] = e.sha256
            yield e


def push_streamed(
    transport: Transport, source: Source, begin: UploadBegin, progress: Callable[[int], None] | None = None
) -> tuple[PushResult, int]:
    """One ``Push`` stream straight into the server's ingest (no resume); the result and the bytes sent."""
    counted = _Counted(iter_events(source, progress))
    result = transport.push(begin, counted)
    return result, result.bytes_received


def push_resumable(
    transport: Transport,
    source: Source,
    begin: UploadBegin,
    *,
    progress: Callable[[int], None] | None = None,
    retries: int = 5,
    record: Path | None = None,
    busy_wait: float = 40.0,
    hashed: dict[int, str] | None = None,
) -> tuple[PushResult, int]:
    """Upload through a resumable session; return the commit's result and the data bytes sent.

    ``hashed`` gets the sha256 of every file whose end went out (file index → hex), for the caller
    to remember.

    How it works: the session id is random, and kept in ``record`` (a small JSON file) until
    the commit, so a push rerun after its process died resumes where the server's copy ends.
    Each attempt asks the server how far the session got (``start_upload``), sends the rest,
    and commits. A broken connection is retried ``retries`` times with backoff, each attempt
    resuming at the offsets the server holds. A session another stream still holds
    (:class:`SessionBusy`: the dead process's stream, until the server notices) is polled for
    up to ``busy_wait`` seconds. A remembered session that is gone (:class:`SessionNotFound`),
    taken for other bytes (:class:`SessionMismatch`), or whose bytes fail the commit is dropped
    once and the upload starts over in a new session.

    Raises:
        Unavailable, DeadlineExceeded, Cancelled: out of retries (the session stays on the
            server for a later rerun).
        Conflict, NotFound, IntegrityError: the push cannot succeed as it is.
    """
    session = uuid.uuid4().hex
    resumed = False
    if record is not None:
        try:
            session = json.loads(record.read_text())["session"]
            resumed = True
        except (OSError, ValueError, KeyError):
            pass
    sent = 0
    attempt = 0
    started = False
    busy_until: float | None = None
    while True:
        try:
            status = transport.start_upload(session, begin)
            started = True
            if record is not None:
                record.parent.mkdir(parents=True, exist_ok=True)
                record.write_text(json.dumps({"session": session, "ref": begin.ref}))
            if not all(status.ended):
                hashes = [f.sha256 for f in begin.files]  # a file without one is hashed as it is read
                events = iter_events(source, progress, start=status.received, ended=status.ended, hashes=hashes)
                counted = _Counted(events, hashed)
                try:
                    transport.upload(session, counted)
                finally:
                    sent += counted.bytes
            result = transport.commit_upload(session)
            if record is not None:
                record.unlink(missing_ok=True)
            return result, sent
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
        except SessionBusy:
            # The stream of the process that died may still hold the session until the server
            # sees its connection close (at once, or a keepalive later on a silent network).
            if busy_until is None:
                busy_until = time.monotonic() + busy_wait
            if time.monotonic() < busy_until:
                time.sleep(0.5)
                continue
            if not _may_start_over(record, resumed, False, attempt, retries):
                raise
            session, resumed, attempt = uuid.uuid4().hex, False, attempt + 1
        except (Conflict, NotFound, IntegrityError) as exc:
            # Taken, gone (swept, another server) or made for other bytes (the source changed
            # since): a remembered session is dropped once and the upload starts over in a new one.
            if not _may_start_over(record, resumed, isinstance(exc, SessionNotFound), attempt, retries):
                raise
            session, resumed, attempt = uuid.uuid4().hex, False, attempt + 1


def _may_start_over(record: Path | None, resumed: bool, stale: bool, attempt: int, retries: int) -> bool:
    """Whether a failed session is replaced by a new one; if not, its record is dropped (the failure stands)."""
    if (resumed or stale) and attempt < retries:
        return True
    if record is not None:
        record.unlink(missing_ok=True)
    return False
