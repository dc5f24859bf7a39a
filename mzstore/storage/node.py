"""Storage nodes: one URL, a handful of durable operations.

A node is addressed by an fsspec URL. ``file://`` (or a plain path) gets
:class:`LocalNode`, which uses the OS directly because durability needs
``fsync`` of the file *and* of its directory, which fsspec's local backend
does not do. Every other protocol gets :class:`FsspecNode` (object stores
make a single PUT atomic by themselves; a large write is a multipart upload
completed only after its last part, and aborted if the source fails).

Why temp-then-rename: a reader (another server over the same root, or a
pull racing a push) must never see a half-written blob or manifest; a
crash must leave either the old state or the new one. See the same
reasoning in huggingface_hub's ``_download_to_tmp_and_move``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from mzstore import durable
from mzstore.durable import process_gone
from mzstore.errors import (
    Conflict,
    IntegrityError,
    InvalidArgument,
    MissingDependency,
    MzstoreError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

TMP_DIR = "tmp"
#: Lock files of conditional writes (:meth:`LocalNode.write_if`): ``refs.lock``.
LOCK_DIR = "locks"
#: Temp files older than this are swept whoever wrote them (a writer on another host, say).
TEMP_MAX_AGE_S = 24 * 3600


def temp_prefix(stem: str) -> str:
    """``stem~HOST~PID~``: temp files name their writer, so a restarted server can sweep the dead ones."""
    return f"{stem}~{socket.gethostname()}~{os.getpid()}~"


def _writer_is_dead(name: str) -> bool:
    """True for a temp file written by a process of this host that no longer runs."""
    parts = name.split("~")
    return len(parts) >= 4 and parts[1] == socket.gethostname() and process_gone(parts[2])


def sweep_temp(directory: Path, max_age: float = TEMP_MAX_AGE_S) -> list[Path]:
    """Remove temp files of dead writers on this host, and any older than ``max_age``; return them.

    Several servers may share one root, so a young file of a live process
    (here or on another host) is left alone. A temp folder (a server's decoded
    files) goes only with its writer: a live server's folder may be old.
    """
    removed = []
    cutoff = time.time() - max_age
    for path in directory.iterdir() if directory.exists() else []:
        try:
            if path.is_dir() and not path.is_symlink():
                if _writer_is_dead(path.name):
                    shutil.rmtree(path)
                    removed.append(path)
            elif _writer_is_dead(path.name) or path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:
            pass
    return removed


class Node(Protocol):
    """What the store needs from a storage node. Paths are '/'-separated keys."""

    url: str

    def write(self, key: str, chunks: Iterable[bytes | memoryview]) -> None:
        """Durably write ``key`` from ``chunks``; readers see all of it or none."""
        ...

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read ``length`` bytes (``None``: to the end) at ``offset``."""
        ...

    def write_if(self, key: str, data: bytes, accept: Callable[[bytes | None], bool]) -> bool:
        """Write the small object ``key`` unless ``accept(current)`` says no (``current``: ``None`` when
        there is none); atomic against other ``write_if`` calls on the same key, from any process.
        Returns whether it wrote."""
        ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def mtime(self, key: str) -> float:
        """When ``key`` was last written, in POSIX seconds (garbage collection's grace period)."""
        ...

    def delete(self, key: str) -> None: ...

    def walk(self, prefix: str) -> Iterator[str]:
        """Keys of the files under ``prefix``."""
        ...

    def tempdir(self) -> Path | None:
        """A local directory for spool files on the same disk, if any."""
        ...


def node_has(node: Node, key: str) -> bool:
    """Whether ``node`` holds ``key``; an unreachable or failing node counts as not holding it."""
    try:
        return node.exists(key)
    except (MzstoreError, OSError):
        return False


#: Block size of :func:`read_stream`.
STREAM_BLOCK = 8 * 1024 * 1024


def read_stream(node: Node, key: str) -> Iterator[bytes]:
    """The bytes of ``key`` on ``node``, in blocks (an object that ends early is an :class:`IntegrityError`)."""
    size = node.size(key)
    offset = 0
    while offset < size:
        block = node.read(key, offset, min(STREAM_BLOCK, size - offset))
        if not block:
            raise IntegrityError(f"{key} on {node.url} ended early")
        yield block
        offset += len(block)


def _decide_and_write(node: Node, key: str, data: bytes, accept: Callable[[bytes | None], bool]) -> bool:
    """``write_if``'s step, for a caller that holds the key's lock: read, ask ``accept``, write."""
    try:
        current: bytes | None = node.read(key)
    except NotFound:
        current = None
    if not accept(current):
        return False
    node.write(key, [data])
    return True


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
        tmp = self.root / TMP_DIR / f"{temp_prefix(Path(key).name)}{uuid.uuid4().hex}.part"
        try:
            return durable.write_temp(tmp, chunks)
        except OSError as exc:
            raise _map_oserror(exc, key) from exc

    def publish(self, staged: Path, key: str) -> None:
        """Atomically move a staged file to ``key`` (rename, then fsync the directory)."""
        try:
            durable.replace(staged, self._path(key))
        except OSError as exc:
            raise _map_oserror(exc, key) from exc

    def write(self, key: str, chunks: Iterable[bytes | memoryview]) -> None:
        self.publish(self.stage(key, chunks), key)

    def write_if(self, key: str, data: bytes, accept: Callable[[bytes | None], bool]) -> bool:
        """Under an exclusive ``flock`` of ``ROOT/locks/<top folder of key>.lock`` (one lock for all tags:
        their writes are rare and short; servers sharing this root take the same one), read, decide,
        then write through the usual temp file and rename."""
        locks = self.root / LOCK_DIR
        try:
            locks.mkdir(exist_ok=True)
            fd = os.open(locks / f"{key.split('/', 1)[0]}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _map_oserror(exc, key) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return _decide_and_write(self, key, data, accept)
        finally:
            os.close(fd)  # releases the lock

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

    def mtime(self, key: str) -> float:
        try:
            return self._path(key).stat().st_mtime
        except OSError as exc:
            raise _map_oserror(exc, key) from exc

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


#: Options each protocol gets unless the caller passes its own (dicts merge one
#: level deep, so ``config_kwargs={"read_timeout": 60}`` keeps the other keys).
#:
#: s3: a dead or blackholed endpoint must fail in seconds so the store can fail
#: over to another replica, not after botocore's default of minutes of retries;
#: and listings are never cached, because other servers write to the same
#: bucket and a cached listing would hide their keys from ``walk``/``exists``.
_PROTOCOL_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {
        "use_listings_cache": False,
        "config_kwargs": {
            "connect_timeout": 2,
            "read_timeout": 20,
            "retries": {"max_attempts": 2, "mode": "standard"},
        },
    },
}
_PROTOCOL_OPTIONS["s3a"] = _PROTOCOL_OPTIONS["s3"]

#: s3fs retries some errors itself (read timeouts, dropped connections) on top
#: of botocore's retries; its default of 5 multiplies a hung endpoint's delay.
_PROTOCOL_ATTRIBUTES: dict[str, dict[str, Any]] = {"s3": {"retries": 2}, "s3a": {"retries": 2}}

#: The pip extra of mzstore that installs each protocol's fsspec backend.
_EXTRAS = {"s3": "s3", "s3a": "s3"}

#: Protocols whose ``open(..., "wb")`` publishes bytes as they are written (the
#: in-process memory file system): writes there are buffered and set at once.
_WHOLE_VALUE_PROTOCOLS = frozenset({"memory"})

#: Conditional writes (:meth:`FsspecNode.write_if`) tried before giving up on a key that keeps changing.
CAS_ATTEMPTS = 50
#: ``write_if`` on file systems with no conditional write (``memory://``, in this process only).
_PROCESS_LOCK = threading.Lock()

#: Writes up to this size are one PUT; larger ones stream as a multipart upload
#: of parts this size, completed only after the last chunk (S3's minimum part is 5 MiB).
WRITE_PART_BYTES = 16 * 1024 * 1024


def _merge_options(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    # Deep copies: botocore rewrites the ``retries`` dict it is given in place.
    merged = copy.deepcopy(defaults)
    for name, value in copy.deepcopy(given).items():
        if isinstance(value, dict) and isinstance(merged.get(name), dict):
            merged[name] = {**merged[name], **value}
        else:
            merged[name] = value
    return merged


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception types an fsspec backend raises for I/O trouble (beyond ``OSError``)."""
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError as AiohttpClientError

        errors.append(AiohttpClientError)
    return tuple(errors)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 300 else line[:297] + "..."


def _s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated, if it kept the cause."""
    for err in (exc, exc.__cause__):
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
    return None


class FsspecNode:
    """Any fsspec file system (object stores, ``memory://``).

    Keys are relative to the URL's path (``s3://bucket/prefix`` stores ``k``
    at ``bucket/prefix/k``). Writes never expose partial bytes: a small value
    is one PUT, a large one a multipart upload that is completed only after
    the last chunk and aborted if the chunks fail, so readers (and other
    servers) see the old object or the new one. Failures surface as
    :mod:`mzstore.errors`: a missing key is :class:`NotFound`; an unreachable
    endpoint, a missing bucket or denied access is :class:`Unavailable`, with
    a one-line message naming the node, so the store can fail over.
    """

    def __init__(self, url: str, *, endpoint_url: str | None = None, **storage_options: Any) -> None:
        """Open the file system for ``url``.

        Args:
            url: an fsspec URL such as ``s3://bucket/prefix`` or ``memory://root``.
            endpoint_url: the object store's endpoint (MinIO, Ceph RGW, a test
                server); ``None`` uses the backend's own configuration (for S3:
                ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS).
            storage_options: passed to the fsspec file system, over the
                protocol's defaults (for s3: short timeouts, no listing cache).
        """
        import fsspec  # adapter-only import

        self.url = url.rstrip("/")
        self.protocol = fsspec.core.split_protocol(self.url)[0] or "file"
        if endpoint_url is not None:
            storage_options["endpoint_url"] = endpoint_url
        self.endpoint_url = endpoint_url
        options = _merge_options(_PROTOCOL_OPTIONS.get(self.protocol, {}), storage_options)
        try:
            self.fs, base = fsspec.core.url_to_fs(self.url, **options)
        except ImportError:
            extra = _EXTRAS.get(self.protocol)
            hint = f"pip install 'mzstore[{extra}]'" if extra else f"install fsspec's backend for {self.protocol}://"
            raise MissingDependency(
                f"{self.protocol}:// storage nodes need a package that is not installed: {hint}"
            ) from None
        for name, value in _PROTOCOL_ATTRIBUTES.get(self.protocol, {}).items():
            setattr(self.fs, name, value)
        self.base = base.rstrip("/")
        self._caught = _transport_errors()

    def __repr__(self) -> str:
        return f"FsspecNode({self.url!r})"

    def _path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def tempdir(self) -> None:
        return None

    # -- error mapping ----------------------------------------------------
    def _where(self) -> str:
        return f"storage node {self.url}" + (f" (endpoint {self.endpoint_url})" if self.endpoint_url else "")

    def _map_error(self, exc: BaseException, key: str) -> Exception:
        """Translate a backend exception into the matching :mod:`mzstore.errors` one."""
        code = _s3_error_code(exc)
        if code in ("NoSuchBucket", "AllAccessDisabled"):
            return Unavailable(f"{self._where()}: the bucket does not exist or is disabled ({_one_line(exc)})")
        if isinstance(exc, FileNotFoundError):
            return NotFound(f"{key} not found")
        if isinstance(exc, PermissionError):
            return Unavailable(
                f"{self._where()} denied access to {key}; check its credentials and bucket policy ({_one_line(exc)})"
            )
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return ResourceExhausted(f"{self._where()} is full while writing {key}")
        if isinstance(exc, (FileExistsError, NotADirectoryError, IsADirectoryError)):
            return Conflict(f"{key} conflicts with an existing path on {self._where()}")
        return Unavailable(f"{self._where()} is unavailable ({key}): {_one_line(exc)}")

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        try:
            yield
        except MzstoreError:
            raise
        except self._caught as exc:
            raise self._map_error(exc, key) from exc

    def _file_info(self, path: str) -> dict[str, Any] | None:
        """``path``'s info if it is an object, ``None`` if there is none.

        Errors other than a missing key (unreachable endpoint, missing
        bucket, denied access) propagate.
        """
        try:
            info = self.fs.info(path)
        except FileNotFoundError as exc:
            if _s3_error_code(exc) in ("NoSuchBucket", "AllAccessDisabled"):
                raise
            return None
        return info if info.get("type") == "file" else None

    def _require_file(self, path: str) -> dict[str, Any]:
        info = self._file_info(path)
        if info is None:
            raise FileNotFoundError(path)
        return info

    # -- operations -------------------------------------------------------
    def write(self, key: str, chunks: Iterable[bytes | memoryview]) -> None:
        # Only the backend calls are mapped to node errors: an exception from
        # ``chunks`` (the source) propagates as it is.
        path = self._path(key)
        head: list[bytes | memoryview] = []
        buffered = 0
        it = iter(chunks)
        for chunk in it:
            head.append(chunk)
            buffered += chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)
            if buffered > WRITE_PART_BYTES and self.protocol not in _WHOLE_VALUE_PROTOCOLS:
                self._write_multipart(path, key, head, it)
                return
        # Small (or whole-value) write: one PUT, atomic by itself.
        with self._errors(key):
            self.fs.pipe_file(path, b"".join(head))

    def _write_multipart(
        self, path: str, key: str, head: list[bytes | memoryview], rest: Iterator[bytes | memoryview]
    ) -> None:
        # autocommit=False: closing uploads the last part but publishes nothing;
        # commit() completes the upload, so the object appears all at once.
        with self._errors(key):
            fh = self.fs.open(path, "wb", block_size=WRITE_PART_BYTES, autocommit=False)
        try:
            with self._errors(key):
                for chunk in head:
                    fh.write(chunk)
            head.clear()
            for chunk in rest:
                with self._errors(key):
                    fh.write(chunk)
            with self._errors(key):
                fh.close()
                fh.commit()
        except BaseException:
            # Abort the multipart upload, and mark the file closed so neither
            # close() nor the finaliser can flush and publish a partial object.
            with contextlib.suppress(Exception):
                fh.discard()
            fh.closed = True
            raise

    def write_if(self, key: str, data: bytes, accept: Callable[[bytes | None], bool]) -> bool:
        """On S3: read the object and its ETag, decide, and ``PUT`` with ``If-Match: <etag>`` (or
        ``If-None-Match: *`` when there was none); a precondition that fails means another writer came
        in between, and the whole step is tried again. Elsewhere (``memory://``): under a process lock.
        """
        if self.protocol not in ("s3", "s3a"):
            with _PROCESS_LOCK:
                return _decide_and_write(self, key, data, accept)
        path = self._path(key)
        bucket, obj, _ = self.fs.split_path(path)
        for _ in range(CAS_ATTEMPTS):
            with self._errors(key):
                info = self._file_info(path)
                etag = info.get("ETag") if info is not None else None
                current = bytes(self.fs.cat_file(path)) if info is not None else None
                if info is not None and (self._file_info(path) or {}).get("ETag") != etag:
                    continue  # changed while it was read
            if not accept(current):
                return False
            condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                with self._errors(key):
                    self.fs.call_s3("put_object", Bucket=bucket, Key=obj, Body=data, **condition)
                    self.fs.invalidate_cache(path)
            except MzstoreError as exc:
                if _s3_error_code(exc.__cause__ or exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
                    continue
                raise
            return True
        raise Unavailable(f"{self._where()}: {key} kept changing under {CAS_ATTEMPTS} conditional writes")

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        with self._errors(key):
            if length == 0:
                # An empty byte range cannot be asked of S3 ("bytes=5-4" is
                # ignored and the whole object comes back), so check and answer here.
                self._require_file(path)
                return b""
            if offset == 0 and length is None:
                return bytes(self.fs.cat_file(path))
            end = None if length is None else offset + length
            try:
                return bytes(self.fs.cat_file(path, start=offset, end=end))
            except OSError as exc:
                # S3 answers a range that starts past the end with 416
                # (InvalidRange → EINVAL); a file read there returns nothing.
                if exc.errno == errno.EINVAL and offset >= self.size(key):
                    return b""
                raise

    def size(self, key: str) -> int:
        path = self._path(key)
        with self._errors(key):
            return int(self._require_file(path)["size"])

    def exists(self, key: str) -> bool:
        with self._errors(key):
            return self._file_info(self._path(key)) is not None

    def mtime(self, key: str) -> float:
        path = self._path(key)
        with self._errors(key):
            modified = self._require_file(path).get("LastModified") or self.fs.modified(path)
            return float(modified.timestamp())

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key):
            # Object stores delete missing keys without complaint; the Node
            # contract says NotFound.
            self._require_file(path)
            self.fs.rm_file(path)

    def walk(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix).rstrip("/")
        with self._errors(prefix):
            try:
                found = self.fs.find(base)
            except FileNotFoundError as exc:
                if _s3_error_code(exc) in ("NoSuchBucket", "AllAccessDisabled"):
                    raise
                return
        root = self.base.strip("/") + "/"
        under = base.strip("/") + "/"
        for path in sorted(found):
            name = path.lstrip("/")
            # Skip the prefix itself (when it names an object) and "folder/"
            # placeholder objects that consoles create.
            if name.startswith(under) and not name.endswith("/"):
                yield name[len(root) :]


def open_node(
    url: str | os.PathLike[str], *, endpoint_url: str | None = None, **storage_options: Any
) -> LocalNode | FsspecNode:
    """Open a node from a URL or a local path.

    Args:
        url: a local path, ``file://`` URL, or any fsspec URL (``s3://bucket/prefix``).
        endpoint_url: object-store endpoint for non-AWS S3 (MinIO, Ceph RGW);
            path-style addressing is used with a custom endpoint.
        storage_options: extra fsspec options for object-store URLs.

    Returns:
        :class:`LocalNode` for local paths, else :class:`FsspecNode`.

    Raises:
        InvalidArgument: if ``endpoint_url`` or storage options are given for a local path.
    """
    text = os.fspath(url)
    local = "://" not in text or text.startswith("file://")
    if local:
        if endpoint_url is not None or storage_options:
            raise InvalidArgument(f"endpoint_url and storage options apply to object-store URLs, not {text}")
        return LocalNode(text[len("file://") :] if text.startswith("file://") else text)
    return FsspecNode(text, endpoint_url=endpoint_url, **storage_options)
