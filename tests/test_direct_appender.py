"""``DirectAppender``: a resumable upload's raw bytes written around the page cache (``O_DIRECT``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mzstore import durable
from mzstore.durable import DIRECT_ALIGN, DirectAppender


def _direct_ok(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    return bool(getattr(os, "O_DIRECT", 0))


def _append(path: Path, start: int, pieces: list[bytes]) -> tuple[DirectAppender, list[int]]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    app = DirectAppender(path, fd, start)
    seen = []
    try:
        for p in pieces:
            app.write(p)
            seen.append(app.pos)
        app.finish()
    finally:
        os.close(fd)
    return app, seen


@pytest.mark.parametrize("start", [0, 3 * DIRECT_ALIGN, 1000])
def test_pieces_of_any_size_land_byte_exact(tmp_path: Path, start: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "DIRECT_BUFFER", 4 * DIRECT_ALIGN)  # pieces cross the buffer often
    rng = __import__("random").Random(start)
    pieces = [os.urandom(rng.choice([1, 7, 4095, 4096, 4097, 9000, 20000, 65536])) for _ in range(60)]
    path = tmp_path / "spool"
    path.write_bytes(b"P" * start)  # what an earlier stream wrote
    app, seen = _append(path, start, pieces)
    data = b"".join(pieces)
    assert path.read_bytes() == b"P" * start + data
    assert app.pos == start + len(data)
    # pos never runs ahead of what is written; aligned starts go around the cache, others through fd
    assert all(p <= start + sum(len(x) for x in pieces[: i + 1]) for i, p in enumerate(seen))
    if start % DIRECT_ALIGN == 0 and _direct_ok(path):
        assert seen[-1] < start + len(data)  # the tail was still buffered before finish()
    else:
        assert seen[-1] == start + len(data)  # through fd: written as it came


def test_a_file_system_without_o_direct_gets_ordinary_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refuse(path: object, flags: int, *args: int) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")  # tmpfs
        return real_open(path, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)
    pieces = [b"a" * 5000, b"b" * 3, b"c" * 8192]
    _, seen = _append(tmp_path / "f", 0, pieces)
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)
    assert seen == [5000, 5003, 13195]  # unbuffered: written as it comes


def test_a_failed_write_stops_at_the_last_good_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "DIRECT_BUFFER", 2 * DIRECT_ALIGN)
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    app = DirectAppender(path, fd, 0)
    app.write(b"x" * (2 * DIRECT_ALIGN))  # one full buffer, written
    real, calls = os.pwrite, []

    def full(fd_: int, data: object, offset: int) -> int:
        calls.append(offset)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError, match="No space"):
        app.write(b"y" * (2 * DIRECT_ALIGN))
    monkeypatch.setattr(os, "pwrite", real)
    with pytest.raises(OSError, match="earlier write"):
        app.write(b"z")
    app.finish()  # writes nothing more
    os.close(fd)
    assert app.pos == 2 * DIRECT_ALIGN and path.read_bytes() == b"x" * (2 * DIRECT_ALIGN)


def test_page_cache_writes_go_in_small_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large writes through the page cache are cut into PAGE_CACHE_PIECE calls (fresh large folios are
    what made them cost 2-8x more on the test VM); the bytes land exact, and piece=0 writes whole."""
    sizes: list[int] = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, off: (sizes.append(len(data)), real_pwrite(fd, data, off))[1])
    data = os.urandom(durable.PAGE_CACHE_PIECE * 4 + 5)
    fd = os.open(tmp_path / "a", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        durable.pwrite_all(fd, data, 3)
        assert sizes == [durable.PAGE_CACHE_PIECE] * 4 + [5]
        sizes.clear()
        durable.pwrite_all(fd, data, 3, piece=0)
        assert sizes == [len(data)]
    finally:
        os.close(fd)
    assert (tmp_path / "a").read_bytes() == bytes(3) + data
    written: list[int] = []

    class Recorder:
        def write(self, b: memoryview) -> int:
            written.append(len(b))
            return len(b)

    durable.write_pieces(Recorder(), data)
    assert written == [durable.PAGE_CACHE_PIECE] * 4 + [5]
    durable.write_temp(tmp_path / "b", [data[:10], data], durable=False)  # write_temp goes through it
    assert (tmp_path / "b").read_bytes() == data[:10] + data
