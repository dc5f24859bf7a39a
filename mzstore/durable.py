"""Durable local writes: temp name → fsync → rename → fsync of the directory.

Every file mzstore writes for keeps on a local disk goes through here: blobs,
manifests and refs of a local storage node, upload-session records, the
chunk cache, staged pull output. A reader (another server over the same
root, a pull racing a push) must never see a half-written file, and a crash
must leave either the old state or the new one: the bytes are written under
a temporary name, flushed to the disk, renamed over the final name (atomic
on POSIX), and the directory is flushed so the rename itself survives a
power loss. huggingface_hub's ``_download_to_tmp_and_move`` follows the
same reasoning.

``durable=False`` keeps the atomic rename but skips the flushes, for data
that is checked on every read anyway and merely costs a refetch when lost
(the chunk cache, upload-session progress).

Temp names carry the writer's pid (:func:`process_gone` tells whether it
still runs), so leftovers of killed processes can be swept safely while a
live writer's files are left alone.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

Data = bytes | bytearray | memoryview
#: Bytes written to one file between background fdatasyncs (:class:`Flusher`).
FLUSH_BYTES = 64 * 1024 * 1024


#: Writes through the page cache go to the kernel in pieces of at most this many bytes. Why: a
#: write of several MiB gets large page-cache folios, and on a VM that hands freed memory back to
#: its host (free page reporting) their pages come fresh from the host, a fault per 4 KiB: 1 GB
#: written in 16 MiB pieces cost 0.7 to 2.5 CPU-s on the test VM, in 256 KiB pieces 0.26 to 0.33
#: (``bench/bench_floor.py``). Elsewhere the extra calls (4096 per GB) cost nothing measurable.
PAGE_CACHE_PIECE = 256 * 1024


def write_pieces(fh: Any, data: Data) -> None:
    """``fh.write(data)`` (a file object) in pieces of at most :data:`PAGE_CACHE_PIECE` bytes."""
    view = memoryview(data).cast("B")
    if len(view) <= PAGE_CACHE_PIECE:
        fh.write(view)
        return
    for i in range(0, len(view), PAGE_CACHE_PIECE):
        fh.write(view[i : i + PAGE_CACHE_PIECE])


def pwrite_all(fd: int, data: Data, offset: int, piece: int = PAGE_CACHE_PIECE) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked), at most ``piece``
    bytes a call (0: no limit, for ``O_DIRECT`` descriptors, which bypass the page cache)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view[:piece] if piece else view, offset)
        view = view[n:]
        offset += n


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file (written by someone else) or a directory's entries (a rename in it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(tmp: Path, data: Data | Iterable[Data], *, durable: bool = True, direct: bool = False) -> Path:
    """Write ``data`` (bytes, or an iterable of byte blocks) to the new file ``tmp``; fsync it if ``durable``;
    around the page cache if ``direct`` (:class:`DirectAppender`: for files read back rarely).

    On any failure the partial file is removed and the error re-raised.
    """
    blocks: Iterable[Data] = (data,) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with open(tmp, "wb") as fh:
            if direct:
                appender = DirectAppender(tmp, fh.fileno(), 0)
                try:
                    for block in blocks:
                        appender.write(block)
                finally:
                    appender.finish()
            else:
                for block in blocks:
                    write_pieces(fh, block)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return tmp


def replace(tmp: Path, final: Path, *, durable: bool = True) -> None:
    """Rename ``tmp`` over ``final`` (creating its parent directories) and flush the directory if ``durable``.

    On failure ``tmp`` is removed and the error re-raised.
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
        if durable:
            fsync_path(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def temp_name(final: Path, tmp_dir: Path | None = None) -> Path:
    """A fresh temp path for ``final``: in ``tmp_dir`` (same file system) or beside it, naming this pid."""
    where = tmp_dir if tmp_dir is not None else final.parent
    return where / f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"


def write_file(
    final: Path,
    data: Data | Iterable[Data],
    *,
    durable: bool = True,
    tmp_dir: Path | None = None,
    direct: bool = False,
) -> None:
    """Write ``final`` atomically: readers see the old file or the whole new one, never a part.

    Args:
        final: the file to (re)write.
        data: its bytes, or an iterable of byte blocks.
        durable: flush file and directory to the disk (off: atomic, not crash-proof).
        tmp_dir: where the temp file goes (default: beside ``final``); same file system.
        direct: write around the page cache (:class:`DirectAppender`), for files read back rarely.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    if tmp_dir is not None:
        tmp_dir.mkdir(parents=True, exist_ok=True)
    replace(write_temp(temp_name(final, tmp_dir), data, durable=durable, direct=direct), final, durable=durable)


def write_json(
    final: Path, obj: Any, *, durable: bool = True, indent: int | None = None, sort_keys: bool = False
) -> None:
    """:func:`write_file` of ``obj`` as JSON (``indent``/``sort_keys`` as :func:`json.dumps`; a newline at the end)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys) + ("\n" if indent is not None else "")
    write_file(final, text.encode("utf-8"), durable=durable)


#: The largest pid Linux hands out (``/proc/sys/kernel/pid_max`` can be at most 2**22).
MAX_PID = 2**22


def process_gone(pid: str) -> bool:
    """True when ``pid`` (decimal text) names no running process on this host; False if unsure.

    A number no pid can have (0, or above :data:`MAX_PID`) is gone: ``os.kill`` would signal the
    process group, or overflow.
    """
    if not pid.isdigit():
        return False
    number = int(pid)
    if number == 0 or number > MAX_PID:
        return True
    try:
        os.kill(number, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # running, as another user
        return False
    return False


class Flusher:
    """Gets bytes onto the disk while they are still being written (pulled files, pushed shards).

    Linux keeps dirty pages in memory until a share of RAM (10 % by default)
    is dirty, so a pull of a 1 GB model into a 24 GiB machine used to write
    all of it in its final fsync, after every chunk was decoded: measured
    here, 2.1 s of pulling, then 1.4 s of fsync. After every ``FLUSH_BYTES``
    written to a file, one background thread fdatasyncs it (one sync per file
    in flight at a time); the commit's fsync has only the tail left.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirty: dict[int, int] = {}
        self._pending: dict[int, Future[None]] = {}
        self._pool: ThreadPoolExecutor | None = None

    def wrote(self, fd: int, n: int) -> None:
        with self._lock:
            dirty = self._dirty.get(fd, 0) + n
            busy = fd in self._pending and not self._pending[fd].done()
            if dirty < FLUSH_BYTES or busy:
                self._dirty[fd] = dirty
                return
            self._dirty[fd] = 0
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="mzstore-flush")
            self._pending[fd] = self._pool.submit(os.fdatasync, fd)

    def wait(self) -> None:
        """Wait for every background sync; an I/O error of one is raised here (the pull fails)."""
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        try:
            for future in pending:
                future.result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def drain(self) -> None:
        """Wait for every background sync, ignoring errors (before closing the files of an aborted pull)."""
        try:
            self.wait()
        except OSError:
            pass


#: Alignment of ``O_DIRECT`` offsets, lengths and buffers (the largest logical block size in use).
DIRECT_ALIGN = 4096
#: The reused aligned buffer of a :class:`DirectAppender`.
DIRECT_BUFFER = 8 * 1024 * 1024


_local = threading.local()


def _direct_buffer() -> mmap.mmap:
    """This thread's aligned buffer, reused by every :class:`DirectAppender` it runs (a new one would
    be fresh pages: the cost the appender exists to avoid). One appender per thread at a time."""
    buf: mmap.mmap | None = getattr(_local, "buf", None)
    if buf is None or len(buf) != DIRECT_BUFFER:
        buf = _local.buf = mmap.mmap(-1, DIRECT_BUFFER)
    return buf


def open_direct(path: str | os.PathLike[str]) -> int | None:
    """A second, write-only descriptor of ``path`` that bypasses the page cache (``O_DIRECT``), or
    ``None`` where the platform or the file system refuses it (tmpfs, macOS)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def buffer_address(view: memoryview) -> int | None:
    """Where a writable buffer's first byte is in memory (``None`` for a read-only one)."""
    import ctypes  # 2 ms: only pulls that write files pay it

    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


def direct_span(view: memoryview, offset: int) -> tuple[int, int]:
    """The part ``[start, end)`` of ``view`` (to be written at file ``offset``) that ``O_DIRECT`` can take:
    whole :data:`DIRECT_ALIGN` blocks at aligned file offsets whose memory is aligned too. ``(0, 0)``
    when there is none: the buffer's address and ``offset`` differ modulo the alignment, or the
    bytes do not cover a whole aligned block."""
    start = -offset % DIRECT_ALIGN
    end = start + (len(view) - start) // DIRECT_ALIGN * DIRECT_ALIGN if len(view) > start else start
    if end <= start:
        return 0, 0
    address = buffer_address(view)
    if address is None or (address + start) % DIRECT_ALIGN:
        return 0, 0
    return start, end


class DirectAppender:
    """Sequential writes to a file from ``start`` on, around the page cache where the file system allows.

    Why: bytes written once and read back rarely (a resumable upload's copy of the raw bytes, read
    only if the upload is resumed after a server restart) gain nothing from the page cache, and
    filling it is the costly part of a buffered write: a fresh page per 4 KiB, which on a VM that
    hands freed memory back to its host is a host page fault each time. On the 2-core test VM a
    buffered write of 1 GB cost 0.2 to 1.8 CPU-s, an ``O_DIRECT`` one 0.09 (``dd``).

    How: bytes are copied into the thread's page-aligned buffer of :data:`DIRECT_BUFFER` bytes,
    written with ``pwrite`` on an ``O_DIRECT`` descriptor whenever it is full (a page-aligned block
    that starts at an aligned position is written from where it is, without the copy: a pull's
    receive buffers, :mod:`mzstore.transport.buffers`); :meth:`finish` writes
    the aligned part of the rest the same way and the unaligned tail through ``fd`` (the file's
    ordinary descriptor). :attr:`pos` is the end of what is written (the buffer not included). Where
    ``O_DIRECT`` is refused (tmpfs, other platforms) or ``start`` is not aligned, every write goes
    through ``fd``. One writer thread; the caller fsyncs if it needs to (``O_DIRECT`` is not a flush).
    """

    def __init__(self, path: Path, fd: int, start: int) -> None:
        self.fd = fd
        self.pos = start
        self._dfd = open_direct(path) if start % DIRECT_ALIGN == 0 else None
        self._buf = _direct_buffer() if self._dfd is not None else None
        self._fill = 0
        self._broken = False  # a write failed: pos is where the file's good bytes end, write no more

    def write(self, data: Data) -> None:
        if self._broken:
            raise OSError(f"an earlier write to this file failed at byte {self.pos}")
        if self._buf is None:
            self._pwrite(self.fd, data)
            return
        view = memoryview(data).cast("B")
        if not self._fill:
            start, end = direct_span(view, self.pos)
            if end and not start:  # page-aligned already, at an aligned position: no copy
                assert self._dfd is not None
                self._pwrite(self._dfd, view[:end])
                view = view[end:]
        while view:
            n = min(len(view), DIRECT_BUFFER - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == DIRECT_BUFFER:
                self._drain(DIRECT_BUFFER)

    def _pwrite(self, fd: int, data: Data) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(fd, view, self.pos)
                self.pos += n
                view = view[n:]
        except BaseException:
            self._broken = True
            raise

    def _drain(self, n: int) -> None:
        """Write the buffer's first ``n`` bytes (a multiple of :data:`DIRECT_ALIGN`) around the cache."""
        assert self._buf is not None and self._dfd is not None
        with memoryview(self._buf) as mv:
            self._pwrite(self._dfd, mv[:n])
        rest = self._fill - n
        if rest:
            self._buf.move(0, n, rest)
        self._fill = rest

    def finish(self) -> None:
        """Write what is buffered and release the direct descriptor (not ``fd``); write no more after."""
        try:
            if self._buf is not None and self._fill and not self._broken:
                aligned = self._fill - self._fill % DIRECT_ALIGN
                if aligned:
                    self._drain(aligned)
                if self._fill:
                    with memoryview(self._buf) as mv:
                        self._pwrite(self.fd, mv[: self._fill])
                    self._fill = 0
        finally:
            if self._dfd is not None:
                os.close(self._dfd)
                self._dfd = None
            self._buf = None  # the thread's, kept for its next appender
