"""Staged output: files written in a hidden folder, moved into place together once all are verified.

Every pull that writes files (a plain pull, a tensor-parallel rank's
slices, a keep-quantized export) stages them in
``OUT/.mzstore-partial-<pid>-<random>/`` on the same file system, writes
chunks at their final offsets, and only after the last chunk is verified
fsyncs and renames every file into place (then fsyncs the directories): a
reader never sees a file under its final name before it is complete, and a
failed pull leaves the previous contents of ``OUT`` as they were.

The pid in the folder's name says who owns it. Before staging, a pull
sweeps the folders of processes that no longer run (killed, crashed); a
live process's folder is another pull into the same directory and is left
alone. Folders named without a pid (written by mzstore before this layout)
are swept once nothing in them has changed for :data:`LEGACY_STALE_S`.

A durable pull writes around the page cache where it can: the whole 4 KiB
blocks of a chunk whose buffer sits at the same place in its page as the
chunk in the file (:class:`~mzstore.pull.sinks.DirectorySink` decodes into
such buffers) go out with ``O_DIRECT`` straight from that buffer; the partial
blocks at a chunk's two ends, and everything on a file system that refuses
``O_DIRECT`` (tmpfs), go through the page cache. Why: on the test VM a
buffered write of 1 GB plus its fsync took 2.4 s and 1.3 CPU-s, the same
bytes with ``O_DIRECT`` 1.1 s and 0.15 CPU-s (``dd``,
``bench/bench_floor.py``): a page-cache page is a fresh page, and the
final fsync waits for all of them. The trade: the pulled files are not left
in the page cache, so the first read of them comes from the disk (as the
Run:ai streamer's default reads do anyway). A pull with ``--no-fsync``
writes through the page cache, which is what it is for.

While a pull runs, a background thread fdatasyncs each file every
:data:`~mzstore.durable.FLUSH_BYTES` written through the page cache
(:class:`~mzstore.durable.Flusher`), so those writes overlap fetch and
decode instead of all waiting for the final fsync.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from mzstore.durable import Data, Flusher, direct_span, fsync_path, open_direct, process_gone, pwrite_all

#: Files smaller than this, and writes smaller than this, go through the page cache only.
DIRECT_MIN_BYTES = 256 * 1024
#: Staging folders are ``OUT/.mzstore-partial-<pid>-<12 hex>/``.
PARTIAL_PREFIX = ".mzstore-partial-"
_OWNED = re.compile(r"(\d+)-[0-9a-f]{12}")
#: A staging folder with no owner in its name is a leftover once untouched for this long (seconds).
LEGACY_STALE_S = 3600.0


def partial_owner(name: str) -> str | None:
    """The pid (decimal text) in a staging folder's name, or ``None`` when it names none."""
    m = _OWNED.fullmatch(name[len(PARTIAL_PREFIX) :]) if name.startswith(PARTIAL_PREFIX) else None
    return m.group(1) if m else None


def _last_change(folder: Path) -> float:
    """The newest modification time of ``folder`` and everything in it (a file being written counts)."""
    newest = folder.stat().st_mtime
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            try:
                newest = max(newest, os.stat(os.path.join(dirpath, name)).st_mtime)
            except OSError:
                pass
    return newest


def sweep_partials(out: Path, now: float | None = None) -> list[Path]:
    """Remove the staging folders in ``out`` left by processes that are gone; return them."""
    removed = []
    now = time.time() if now is None else now
    for stage in out.glob(f"{PARTIAL_PREFIX}*"):
        owner = partial_owner(stage.name)
        try:
            dead = process_gone(owner) if owner is not None else now - _last_change(stage) > LEGACY_STALE_S
        except OSError:
            continue
        if dead:
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage)
    return removed


class StagedFiles:
    """Files written under ``OUT/.mzstore-partial-<pid>-<random>/`` and moved into place together.

    Args:
        out_dir: the destination directory (created by :meth:`open`).
        durable: fsync every file before it takes its final name (see :meth:`commit`), and write its
            aligned blocks with ``O_DIRECT`` (see the module's docstring).
    """

    def __init__(self, out_dir: str | os.PathLike[str], durable: bool = True) -> None:
        self.out = Path(out_dir)
        self.durable = durable
        self.stage = self.out / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[int, int] = {}  # a file's descriptor -> its O_DIRECT one
        self._order: list[str] = []
        self._flusher = Flusher()

    def open(self) -> None:
        """Create the destination and the staging folder (sweeping dead pulls' folders first)."""
        self.out.mkdir(parents=True, exist_ok=True)
        sweep_partials(self.out)
        self.stage.mkdir()

    def path(self, rel: str) -> Path:
        """Where ``rel`` is staged (its parent directories exist)."""
        path = self.stage / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def create(self, rel: str, size: int) -> int:
        """Create the staged file ``rel`` of ``size`` bytes (zeros) and return its descriptor."""
        fd = os.open(self.path(rel), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fds[rel] = fd
        self._order.append(rel)
        os.ftruncate(fd, size)
        if self.durable and size >= DIRECT_MIN_BYTES:
            dfd = open_direct(self.stage / rel)
            if dfd is not None:
                self._direct_fds[fd] = dfd
        return fd

    def write(self, fd: int, data: Data, offset: int) -> None:
        """Write ``data`` at ``offset`` of a file from :meth:`create`: its aligned blocks with ``O_DIRECT``
        where they can go that way, the rest through the page cache."""
        view = memoryview(data).cast("B")
        dfd = self._direct_fds.get(fd)
        start, end = direct_span(view, offset) if dfd is not None and len(view) >= DIRECT_MIN_BYTES else (0, 0)
        if end:
            assert dfd is not None
            try:
                pwrite_all(dfd, view[start:end], offset + start, piece=0)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # The file system took the descriptor but not the write (an alignment it needs that is
                # larger than ours): this file goes through the page cache from now on.
                self._direct_fds.pop(fd, None)
                os.close(dfd)
                start = end = 0
        if end:
            if start:
                pwrite_all(fd, view[:start], offset)
            if end < len(view):
                pwrite_all(fd, view[end:], offset + end)
            buffered = len(view) - (end - start)
        else:
            pwrite_all(fd, view, offset)
            buffered = len(view)
        if self.durable and buffered:
            self._flusher.wrote(fd, buffered)

    def adopt(self, rel: str) -> None:
        """Commit a file the caller wrote whole at :meth:`path` along with the others."""
        self._order.append(rel)

    def commit(self) -> list[Path]:
        """fsync every file, move them all into place, fsync their directories; return the final paths.

        Not ``durable``: the same moves without the fsyncs (what ``hf download`` and ``aws s3 cp`` do);
        a crash may then leave final names with missing data, which ``mzstore pull`` into the same
        folder replaces.
        """
        self._flusher.wait()
        self._close_direct()
        for rel in self._order:
            fd = self._fds.pop(rel, None)
            if fd is None:
                if self.durable:
                    fsync_path(self.stage / rel)
                continue
            if self.durable:
                os.fsync(fd)
            os.close(fd)
        finals = []
        for rel in self._order:
            final = self.out / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.stage / rel, final)
            finals.append(final)
        for directory in {f.parent for f in finals} if self.durable else ():
            fsync_path(directory)
        shutil.rmtree(self.stage, ignore_errors=True)
        return finals

    def _close_direct(self) -> None:
        dfds, self._direct_fds = self._direct_fds, {}
        for dfd in dfds.values():
            with contextlib.suppress(OSError):
                os.close(dfd)

    def abort(self) -> None:
        """Drop everything staged (nothing appears under a final name)."""
        self._flusher.drain()
        self._close_direct()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        shutil.rmtree(self.stage, ignore_errors=True)
