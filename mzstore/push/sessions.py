"""Resumable upload sessions: a push that survives dropped connections.

As in OCI registries, an upload is a session the client names (a random
id) and feeds in any number of streams: the server keeps the raw bytes it
received durably, reports how far each file got, and the client resumes
from there. When every file has ended, a commit runs the normal ingest
(:class:`~mzstore.push.ingest.Ingest`) over the kept bytes and removes the
session. A fresh session's first stream is also fed to the ingest as it
arrives (:meth:`UploadSessions.stream`), so an unbroken upload is encoded
while it streams, as a streamed push is, and its commit only returns the
recorded result; the kept bytes serve a resume after a break. A commit retried after a lost reply finds no session; the client
then uploads again in a new one, which stores the same digest (pushes are
content-addressed), so nothing is duplicated.

Layout, on a local disk of the server (``ROOT/tmp/uploads/<session>/``)::

    begin.json      the push's first message (ref, policy, file list)
    progress.json   offsets received and file ends, rewritten atomically
    data/<index>    the bytes of file <index> received so far
    lock            flock'd by whoever appends or commits

The bytes are written behind the receiving thread (:mod:`mzstore.behind`)
and around the page cache (:class:`~mzstore.durable.DirectAppender`): they
are read back only after a break, and filling the cache cost more CPU than
the rest of the copy. Durability: ``progress.json`` records only offsets
whose bytes were written (the writer thread's offsets, never the received
ones), and a resumed stream first truncates
each file back to its recorded offset, so a killed server never leaves
stray bytes inside an upload. Nothing is fsync'ed: after a power loss the
page cache may have dropped recorded bytes, but the ingest checks every
file's size and sha256 at commit, so such an upload fails that check, the
session is dropped and the client uploads again — slower, never wrong.
What an acknowledged push stores is fsync'ed as always.

Sessions are bound to the server's disk: a client that resumes on another
server behind a load balancer finds no session and starts over (the
session id is its own, so that is safe). Idle sessions are swept after
``max_age`` seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from mzstore.behind import Behind
from mzstore.durable import DirectAppender, process_gone, write_json
from mzstore.errors import IntegrityError, InvalidArgument, SessionBusy, SessionMismatch, SessionNotFound
from mzstore.limits import TRANSFER_BYTES
from mzstore.push.protocol import (
    PushResult,
    UploadBegin,
    UploadData,
    UploadEnd,
    UploadEvent,
    UploadFile,
    UploadKnown,
    UploadState,
    UploadStatus,
)

#: What a commit hands the kept upload to: the server's ingest (``Ingest(...).run``).
Ingestor = Callable[[UploadBegin, Iterable[UploadEvent]], PushResult]


SESSION_RE = re.compile(r"^[0-9a-f]{32}$")
#: Received offsets are recorded at least this often within a stream.
SYNC_EVERY = 64 * 1024 * 1024
#: Sessions untouched for this long are removed.
SESSION_MAX_AGE_S = 24 * 3600


def _known_event(index: int, end: dict[str, object]) -> UploadKnown:
    """The event that stands for a file the store already held (recorded in progress.json)."""
    return UploadKnown(index, int(str(end["size"])), str(end["sha256"]), str(end["known"]))


class UploadSessions:
    """Every upload session under one directory."""

    def __init__(self, directory: str | os.PathLike[str], max_age: float = SESSION_MAX_AGE_S) -> None:
        self.dir = Path(directory)
        self.max_age = max_age

    def _path(self, session: str) -> Path:
        if not SESSION_RE.match(session):
            raise InvalidArgument("an upload session id is 32 lowercase hex characters")
        return self.dir / session

    @contextmanager
    def _locked(self, session: str) -> Iterator[Path]:
        path = self._path(session)
        if not (path / "begin.json").exists():
            raise SessionNotFound(f"no upload session {session} on this server (expired, or another server's)")
        fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SessionBusy(f"upload session {session} is busy with another stream") from None
            os.utime(path)  # last activity, for the sweep
            yield path
        finally:
            os.close(fd)

    # -- lifecycle ----------------------------------------------------------
    def start(self, session: str, begin: UploadBegin, known: dict[int, str] | None = None) -> UploadStatus:
        """Create the session, or return its status if it exists with the same first message.

        ``known`` (file index → manifest digest, from :class:`~mzstore.push.reuse.KnownFiles`)
        are files the store already holds: a new session records them as ended, so the client
        sends none of their bytes, and the ingest takes their stored entries instead.
        """
        path = self._path(session)
        record = asdict(begin)
        if (path / "begin.json").exists():
            if json.loads((path / "begin.json").read_text()) != json.loads(json.dumps(record)):
                raise SessionMismatch(f"upload session {session} exists for another push")
            with self._locked(session):  # a stream still running (a dead client's, not yet noticed): busy
                return self.status(session)  # and its offsets are final, not a checkpoint behind
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".new-{session}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "data").mkdir(parents=True)
        known = known or {}
        received = [begin.files[i].size if i in known else 0 for i in range(len(begin.files))]
        ends: list[dict[str, object] | None] = [
            {"size": f.size, "sha256": f.sha256, "known": known[i]} if i in known else None
            for i, f in enumerate(begin.files)
        ]
        write_json(tmp / "progress.json", {"received": received, "ends": ends})
        write_json(tmp / "begin.json", record)
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (path / "begin.json").exists():
                raise
            return self.start(session, begin, known)  # created meanwhile by a concurrent start
        return self.status(session)

    def begin_of(self, session: str) -> UploadBegin:
        raw = json.loads((self._path(session) / "begin.json").read_text())
        return UploadBegin(
            ref=raw["ref"],
            codec=raw["codec"],
            files=[UploadFile(**f) for f in raw["files"]],
            source_kind=raw["source_kind"],
            annotations=raw["annotations"],
            keep=tuple(raw["keep"]),
            allocation=raw.get("allocation", ""),
            base=raw.get("base", ""),
        )

    def status(self, session: str) -> UploadStatus:
        path = self._path(session)
        if (path / "result.json").exists():
            files = self.begin_of(session).files
            return UploadStatus(
                session, [f.size for f in files], [True] * len(files), committed=True, known=[False] * len(files)
            )
        try:
            progress = json.loads((path / "progress.json").read_text())
        except FileNotFoundError:
            raise SessionNotFound(
                f"no upload session {session} on this server (expired, or another server's)"
            ) from None
        ends = progress["ends"]
        known = [isinstance(e, dict) and "known" in e for e in ends]
        return UploadStatus(session, progress["received"], [e is not None for e in ends], known=known)

    def append(self, session: str, events: Iterable[UploadEvent]) -> UploadStatus:
        """Take a stream of data and end events; each file's data must continue at its received offset."""
        for _ in self.stream(session, events):
            pass
        return self.status(session)

    def stream(self, session: str, events: Iterable[UploadEvent]) -> Generator[UploadEvent, None, None]:
        """Record each event, then yield it (so an ingest can run on the upload as it arrives).

        The session is locked while the generator runs; whatever arrived intact is recorded when
        it ends, also when the stream (or its consumer) fails, so the client can resume after it.
        """
        with self._locked(session) as path:
            begin = self.begin_of(session)
            progress = json.loads((path / "progress.json").read_text())
            ends: list[dict[str, object] | None] = progress["ends"]
            state = UploadState(begin, progress["received"], [e is not None for e in ends])
            received = state.received  # advanced by state.accept
            fds: dict[int, int] = {}
            unsynced = 0
            # The bytes go to disk behind this thread (mzstore.behind); progress records only the
            # offsets written, so a crash or a failed write never records bytes that are not there.
            written = list(received)

            appenders: dict[int, DirectAppender] = {}  # around the page cache: read back only on a resume

            def write(item: tuple[int, int, bytes | memoryview]) -> None:
                i, offset, data = item
                if i not in appenders:
                    appenders[i] = DirectAppender(path / "data" / str(i), fds[i], offset)
                appenders[i].write(data)
                written[i] = appenders[i].pos

            def finish(i: int) -> None:
                appender = appenders.pop(i)
                try:
                    appender.finish()
                finally:
                    written[i] = appender.pos

            behind: Behind[tuple[int, int, bytes | memoryview]] = Behind(write, "mzstore-session-io")

            def sync() -> None:
                write_json(path / "progress.json", {"received": list(written), "ends": ends}, durable=False)

            # Files the store held already are not sent: the consumer gets an UploadKnown for each,
            # in file order, so an in-order ingest sees every file where it belongs.
            known = [_known_event(i, e) for i, e in enumerate(ends) if isinstance(e, dict) and "known" in e]

            try:
                for event in events:
                    i = event.file
                    while known and known[0].file < i:
                        yield known.pop(0)
                    if isinstance(event, UploadData):
                        offset = received[i] if 0 <= i < len(received) else 0
                        state.accept(event)  # the offset is the recorded one, the file not ended nor too long
                        if i not in fds:
                            fds[i] = os.open(path / "data" / str(i), os.O_WRONLY | os.O_CREAT, 0o600)
                            os.ftruncate(fds[i], offset)  # drop bytes a crash left unrecorded
                        behind.put((i, offset, event.data), len(event.data))
                        unsynced += len(event.data)
                        if unsynced >= SYNC_EVERY:
                            sync()
                            unsynced = 0
                    else:
                        behind.wait()  # a file ends only once its bytes are all written
                        if i in appenders:
                            behind.call(functools.partial(finish, i)).result()
                        state.accept(event)
                        ends[i] = {"size": event.size, "sha256": event.sha256}
                    yield event
                yield from known
                behind.wait()
            finally:
                behind.close()  # what was queued is written (or failed) before progress is recorded
                for i in list(appenders):  # what they buffered, also after a failure (those bytes came in order)
                    with contextlib.suppress(OSError):
                        finish(i)
                sync()
                for fd in fds.values():
                    os.close(fd)

    def record_result(self, session: str, result: PushResult) -> None:
        """The upload was ingested as it arrived: keep the result for the commit, drop the bytes."""
        path = self._path(session)
        write_json(path / "result.json", asdict(result))
        self._remove_later(path / "data")

    def _remove_later(self, path: Path) -> None:
        """Remove ``path`` on a thread of its own: freeing a 1 GiB file's blocks took 0.17 s of a push's
        tail. It is renamed out of the session first; :meth:`sweep` removes what a crash left."""
        doomed = self.dir / f".drop-{uuid.uuid4().hex}-{os.getpid()}"
        try:
            os.rename(path, doomed)
        except FileNotFoundError:
            return
        threading.Thread(
            target=shutil.rmtree, args=(doomed,), kwargs={"ignore_errors": True}, name="mzstore-session-drop"
        ).start()

    def drop(self, session: str) -> None:
        """Remove a session whose bytes are bad (a resume cannot fix them)."""
        shutil.rmtree(self._path(session), ignore_errors=True)

    def events(self, session: str) -> Iterator[UploadEvent]:
        """The kept upload as the event stream a streamed push would have sent."""
        path = self._path(session)
        progress = json.loads((path / "progress.json").read_text())
        for i, end in enumerate(progress["ends"]):
            if end is None:
                raise InvalidArgument(f"upload session {session}: file {i} has not ended")
            if "known" in end:
                yield _known_event(i, end)
                continue
            data = path / "data" / str(i)
            offset = 0
            if data.exists():
                with open(data, "rb") as fh:
                    while block := fh.read(TRANSFER_BYTES):
                        yield UploadData(i, offset, block)
                        offset += len(block)
            yield UploadEnd(i, int(end["size"]), str(end["sha256"]))

    def commit(self, session: str, ingest: Ingestor) -> PushResult:
        """Ingest the kept upload and remove the session (also when the upload turns out bad)."""
        with self._locked(session) as path:
            if (path / "result.json").exists():  # already ingested while it streamed in
                done = PushResult(**json.loads((path / "result.json").read_text()))
                shutil.rmtree(path, ignore_errors=True)
                return done
            status = self.status(session)
            if not status.complete:
                missing = [self.begin_of(session).files[i].path for i, e in enumerate(status.ended) if not e]
                raise InvalidArgument(f"upload session {session} is incomplete: {', '.join(missing[:3])} not ended")
            try:
                result = ingest(self.begin_of(session), self.events(session))
            except (IntegrityError, InvalidArgument):
                shutil.rmtree(path, ignore_errors=True)  # bad bytes: resuming cannot fix them
                raise
            shutil.rmtree(path, ignore_errors=True)
            return result

    def sweep(self) -> list[str]:
        """Remove sessions idle for longer than ``max_age`` (and half-created ones)."""
        removed = []
        cutoff = time.time() - self.max_age
        for path in self.dir.iterdir() if self.dir.exists() else []:
            try:
                if path.name.startswith((".new-", ".drop-")) and process_gone(path.name.rsplit("-", 1)[-1]):
                    shutil.rmtree(path, ignore_errors=True)  # a start that died before its rename
                    removed.append(path.name)
                elif path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path.name)
            except OSError:
                pass
        return removed
