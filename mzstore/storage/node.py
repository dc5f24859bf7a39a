"""Storage nodes: one URL, a handful of durable operations.

A node is addressed by an fsspec URL. ``file://`` (or a plain path) gets
:class:`LocalNode`, which uses the OS directly because durability needs
``fsync`` of the file *and* of its directory, which fsspec's local backend
does not do. Every other protocol gets :class:`FsspecNode` (object stores
make a single PUT atomic by themselves).

Why temp-then-rename: a reader (another server over the same root, or a
pull racing a push) must never see a half-written blob or manifest; a
crash must leave either the old state or the new one. See the same
reasoning in huggingface_hub's ``_download_to_tmp_and_move``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from mzstore.errors import Conflict, NotFound, ResourceExhausted, Unavailable

TMP_DIR = "tmp"


class Node(Protocol):
    """What the store needs from a storage node. Paths are '/'-separated keys."""

    url: str

    def write(self, key: str, chunks: Iterable[bytes | memoryview]) -> None:
        """Durably write ``key`` from ``chunks``; readers see all of it or none."""
        ...

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes (``None``: to the end) at ``offset``."""
        ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def walk(self, prefix: str) -> Iterator[str]:
        """Keys of the files under ``prefix``."""
        ...

    def tempdir(self) -> Path | None:
        """A local directory for spool files on the same disk, if any."""
        ...


def _map_oserror(exc: OSError, key: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"storage node is full while writing {key}")
    if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        return Conflict(f"{key} conflicts with an existing path on the storage node")
    if isinstance(exc, FileNotFoundError):
        return NotFound(f"{key} not found")
    return Unavailable(f"storage node error on {key}: {exc.strerror or exc}")


class LocalNode:
    """A directory on a local (or mounted) file system."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()
        self.url = self.root.as_uri()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / TMP_DIR).mkdir(exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key

    def tempdir(self) -> Path:
        return self.root / TMP_DIR

    def stage(self, key: str, chunks: Iterable[bytes | memoryview]) -> Path:
        """Write ``chunks`` durably to a temp file for ``key``; :meth:`publish` makes it visible."""
        tmp = self.root / TMP_DIR / f"{Path(key).name}.{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise _map_oserror(exc, key) from exc
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp

    def publish(self, staged: Path, key: str) -> None:
        """Atomically move a staged file to ``key`` (rename, then fsync the directory)."""
        final = self._path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                staged.unlink()
            raise _map_oserror(exc, key) from exc

    def write(self, key: str, chunks: Iterable[bytes | memoryview]) -> None:
        self.publish(self.stage(key, chunks), key)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            with open(self._path(key), "rb") as fh:
                if length is None:
                    fh.seek(offset)
                    return fh.read()
                return os.pread(fh.fileno(), length, offset)
        except OSError as exc:
            raise _map_oserror(exc, key) from exc

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except OSError as exc:
            raise _map_oserror(exc, key) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            raise NotFound(f"{key} not found") from None
        except OSError as exc:
            raise _map_oserror(exc, key) from exc
        # Remove now-empty parent directories up to the top-level folder.
        parent = self._path(key).parent
        with contextlib.suppress(OSError):
            while parent != self.root and parent.parent != self.root:
                parent.rmdir()
                parent = parent.parent

    def walk(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                yield (Path(dirpath) / name).relative_to(self.root).as_posix()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FsspecNode:
    """Any fsspec file system (object stores, ``memory://``)."""

    def __init__(self, url: str, **storage_options: object) -> None:
        import fsspec  # adapter-only import

        self.url = url.rstrip("/")
        self.fs, self.base = fsspec.core.url_to_fs(self.url, **storage_options)
        self.base = self.base.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def tempdir(self) -> None:
        return None

    def write(self, key: str, chunks: Iterable[bytes | memoryview]) -> None:
        try:
            with self.fs.open(self._path(key), "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
        except OSError as exc:
            raise _map_oserror(exc, key) from exc

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            end = None if length is None else offset + length
            return bytes(self.fs.cat_file(self._path(key), start=offset, end=end))
        except OSError as exc:
            raise _map_oserror(exc, key) from exc

    def size(self, key: str) -> int:
        try:
            return int(self.fs.size(self._path(key)))
        except OSError as exc:
            raise _map_oserror(exc, key) from exc

    def exists(self, key: str) -> bool:
        return bool(self.fs.isfile(self._path(key)))

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except OSError as exc:
            raise _map_oserror(exc, key) from exc

    def walk(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix)
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return
        root = self.base.lstrip("/")
        for path in found:
            yield path.lstrip("/")[len(root) + 1 :]


def open_node(url: str | os.PathLike[str]) -> LocalNode | FsspecNode:
    """Open a node from a URL or a local path."""
    text = os.fspath(url)
    if "://" not in text:
        return LocalNode(text)
    if text.startswith("file://"):
        return LocalNode(text[len("file://") :])
    return FsspecNode(text)


def remove_tree(path: Path) -> None:
    """Remove a local directory tree, ignoring errors (spool cleanup)."""
    shutil.rmtree(path, ignore_errors=True)
