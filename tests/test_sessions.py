"""Resumable upload sessions at the library level: resume at the reported offsets, commit once."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from conftest import small_model_dir

from mzstore.errors import Conflict, IntegrityError, InvalidArgument, NotFound
from mzstore.push.ingest import Ingest
from mzstore.push.protocol import UploadData, UploadEnd
from mzstore.push.sessions import UploadSessions
from mzstore.push.source import open_source
from mzstore.push.upload import begin_for, iter_events
from mzstore.storage import Store


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return small_model_dir(tmp_path / "src")


def _ingest(store: Store) -> Ingest:
    return Ingest(store, chunk_bytes=64 * 1024, shard_bytes=256 * 1024)


def test_interrupted_upload_resumes_at_reported_offsets_and_commits_once(model: Path, tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    sessions = UploadSessions(tmp_path / "uploads")
    src = open_source(model)
    begin = begin_for(src, "s/m:v1", "lossless")
    sid = uuid.uuid4().hex
    assert sessions.start(sid, begin).received == [0, 0]
    assert sessions.start(sid, begin).received == [0, 0]  # idempotent

    events = list(iter_events(src, block=64 * 1024))

    def cut(after: int):  # the stream breaks after `after` events
        for i, e in enumerate(events):
            if i == after:
                raise ConnectionError("stream broke")
            yield e

    with pytest.raises(ConnectionError):
        sessions.append(sid, cut(5))
    status = sessions.status(sid)
    sent = sum(len(e.data) for e in events[:5] if isinstance(e, UploadData))
    assert sum(status.received) == sent > 0 and not status.complete
    # Resending from the start is refused: data must continue at the reported offset.
    with pytest.raises(InvalidArgument, match=r"expected|already ended"):
        sessions.append(sid, iter(events))
    rest = [
        e
        for e in events
        if not status.ended[e.file] and (isinstance(e, UploadEnd) or e.offset >= status.received[e.file])
    ]
    status = sessions.append(sid, iter(rest))
    assert status.complete

    result = sessions.commit(sid, _ingest(store).run)
    assert not (tmp_path / "uploads" / sid).exists()  # a committed session is gone
    with pytest.raises(NotFound):
        sessions.commit(sid, _ingest(store).run)
    # The committed model is exactly what a streamed push stores.
    direct = _ingest(Store(tmp_path / "other")).run(begin, iter_events(src))
    assert direct.digest == result.digest


def test_sessions_refuse_bad_input_and_keep_what_arrived(model: Path, tmp_path: Path) -> None:
    sessions = UploadSessions(tmp_path / "uploads")
    src = open_source(model)
    begin = begin_for(src, "s/m:v1", "lossless")
    sid = uuid.uuid4().hex
    with pytest.raises(InvalidArgument, match="32 lowercase hex"):
        sessions.start("../../etc", begin)
    with pytest.raises(NotFound):
        sessions.status(uuid.uuid4().hex)
    sessions.start(sid, begin)
    with pytest.raises(Conflict, match="another push"):
        sessions.start(sid, begin_for(src, "s/other:v1", "lossless"))
    w = next(i for i, f in enumerate(begin.files) if f.path == "model.safetensors")
    size = begin.files[w].size
    with pytest.raises(IntegrityError, match="longer"):
        sessions.append(sid, iter([UploadData(w, 0, b"x" * (size + 1))]))
    sessions.append(sid, iter([UploadData(w, 0, b"y" * 100)]))
    with pytest.raises(IntegrityError, match="ended at"):
        sessions.append(sid, iter([UploadEnd(w, 100, hashlib.sha256(b"y" * 100).hexdigest())]))
    assert sessions.status(sid).received[w] == 100
    with pytest.raises(InvalidArgument, match="incomplete"):
        sessions.commit(sid, _ingest(Store(tmp_path / "store")).run)


def test_altered_bytes_fail_the_commit_and_store_nothing(model: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    sessions = UploadSessions(tmp_path / "uploads")
    src = open_source(model)
    begin = begin_for(src, "s/m:v1", "lossless")
    sid = uuid.uuid4().hex
    sessions.start(sid, begin)
    sessions.append(sid, iter_events(src))
    w = next(i for i, f in enumerate(begin.files) if f.path == "model.safetensors")
    data = tmp_path / "uploads" / sid / "data" / str(w)
    raw = bytearray(data.read_bytes())
    raw[-10] ^= 0xFF  # bit rot on the server's disk between the upload and the commit
    data.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        sessions.commit(sid, _ingest(Store(store_dir)).run)
    assert not (tmp_path / "uploads" / sid).exists()
    assert not (store_dir / "refs").exists() or not any((store_dir / "refs").rglob("*"))


def test_sweep_removes_idle_sessions(model: Path, tmp_path: Path) -> None:
    sessions = UploadSessions(tmp_path / "uploads", max_age=0)
    src = open_source(model)
    sid = uuid.uuid4().hex
    sessions.start(sid, begin_for(src, "s/m:v1", "lossless"))
    assert sessions.sweep() == [sid]
    with pytest.raises(NotFound):
        sessions.status(sid)


def test_a_failed_spool_write_records_only_the_bytes_written(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The raw bytes go to disk behind the receiving thread: when a write fails (a full disk), the
    progress names exactly the bytes on disk, nothing queued after the failure is written, and the
    upload resumes from there to the same digest."""
    from mzstore.durable import DirectAppender

    store = Store(tmp_path / "store")
    sessions = UploadSessions(tmp_path / "uploads")
    src = open_source(model)
    begin = begin_for(src, "s/m:v1", "lossless")
    sid = uuid.uuid4().hex
    sessions.start(sid, begin)
    events = list(iter_events(src, block=64 * 1024))
    real, calls = DirectAppender.write, []

    def failing(self: DirectAppender, data: bytes) -> None:
        calls.append(len(data))
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real(self, data)

    monkeypatch.setattr(DirectAppender, "write", failing)
    with pytest.raises(OSError, match="No space"):
        sessions.append(sid, iter(events))
    monkeypatch.setattr(DirectAppender, "write", real)
    assert len(calls) == 4  # the writes queued after the failed one were skipped
    written = [e for e in events if isinstance(e, UploadData)][:3]
    want = [sum(len(e.data) for e in written if e.file == i) for i in range(len(src.files))]
    status = sessions.status(sid)
    assert status.received == want and not status.complete
    for i, n in enumerate(want):
        if n:
            kept = (tmp_path / "uploads" / sid / "data" / str(i)).read_bytes()[:n]
            assert kept == (model / src.files[i].path).read_bytes()[:n]
    sessions.append(sid, iter_events(src, block=64 * 1024, start=status.received, ended=status.ended))
    result = sessions.commit(sid, lambda b, ev: _ingest(store).run(b, ev))
    assert result.digest == _ingest(Store(tmp_path / "other")).run(begin, iter(events)).digest


def test_a_streamed_sessions_bytes_go_once_its_result_is_recorded(model: Path, tmp_path: Path) -> None:
    """Ingested as it arrived: the result is kept for the commit and the raw bytes are dropped, off the
    push's path (renamed aside, removed by a thread); what a crash leaves aside is swept."""
    import os
    import threading
    import time

    store = Store(tmp_path / "store")
    sessions = UploadSessions(tmp_path / "uploads", max_age=3600)
    src = open_source(model)
    sid = uuid.uuid4().hex
    begin = begin_for(src, "s/m:v1", "lossless")
    sessions.start(sid, begin)
    stream = sessions.stream(sid, iter_events(src))
    result = _ingest(store).run(begin, stream)
    stream.close()
    assert (tmp_path / "uploads" / sid / "data").is_dir()
    sessions.record_result(sid, result)
    assert not (tmp_path / "uploads" / sid / "data").exists()  # gone from the session at once
    for t in threading.enumerate():
        if t.name == "mzstore-session-drop":
            t.join(10)
    assert not [p for p in (tmp_path / "uploads").iterdir() if p.name.startswith(".drop-")]
    assert sessions.commit(sid, lambda b, e: _ingest(store).run(b, e)).digest == result.digest
    # a crash between the rename and the removal: swept once its process is gone, not before
    dead = tmp_path / "uploads" / ".drop-x-999999999"
    live = tmp_path / "uploads" / f".drop-y-{os.getpid()}"
    for p in (dead, live):
        (p / "data").mkdir(parents=True)
    time.sleep(0.01)
    assert sessions.sweep() == [dead.name] and live.exists()
