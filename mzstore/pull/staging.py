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

While a pull runs, a background thread fdatasyncs each file every
:data:`~mzstore.durable.FLUSH_BYTES` (:class:`~mzstore.durable.Flusher`), so disk writes overlap fetch and
decode instead of all waiting for the final fsync.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

from mzstore.durable import Flusher, fsync_path, process_gone

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


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class StagedFiles:
    """Files written under ``OUT/.mzstore-partial-<pid>-<random>/`` and moved into place together.

    Args:
        out_dir: the destination directory (created by :meth:`open`).
    """

    def __init__(self, out_dir: str | os.PathLike[str], durable: bool = True) -> None:
        self.out = Path(out_dir)
        self.durable = durable
        self.stage = self.out / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._fds: dict[str, int] = {}
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
        return fd

    def write(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset`` of a file from :meth:`create`."""
        pwrite_all(fd, data, offset)
        if self.durable:
            self._flusher.wrote(fd, len(memoryview(data).cast("B")))

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

    def abort(self) -> None:
        """Drop everything staged (nothing appears under a final name)."""
        self._flusher.drain()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        shutil.rmtree(self.stage, ignore_errors=True)
