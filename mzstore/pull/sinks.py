"""Where pulled bytes land: a directory in the source layout, or tensors.

:class:`DirectorySink` stages every file under ``OUT/.mzstore-partial-<id>/``
(same file system), writes chunks with ``pwrite`` at their final offsets, and
only after every chunk is verified fsyncs and renames the files into place:
nothing appears under a final name until it is complete and verified. While
the pull runs, a background thread fdatasyncs each file every
``FLUSH_BYTES`` (:class:`_Flusher`), so the disk writes overlap fetch and
decode instead of all waiting for the final fsync.
Safetensors files are rebuilt from the original header bytes kept in the
manifest, so they come back byte-identical to what was pushed.

:class:`StateDictSink` has chunks decoded straight into one preallocated
CPU buffer per tensor, then views it with the right dtype and shape and
moves it to the device.
"""

from __future__ import annotations

import os
import shutil
import struct
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mzstore.errors import InvalidArgument
from mzstore.format.manifest import FileEntry, Manifest, TensorEntry
from mzstore.pull.plan import ChunkTask, safetensors_data_start
from mzstore.storage.node import process_gone


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class ScratchBuffers:
    """One growing ``uint8`` buffer per thread: freed multi-MiB buffers would pile up in malloc arenas."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, size: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = self._local.buf = np.empty(size, dtype=np.uint8)
        return buf[:size]


def select_tensors(manifest: Manifest, files: list[str] | None) -> list[TensorEntry]:
    """The tensors of the chosen files; their names must be unique to make a state dict."""
    entries = [t for t in manifest.tensors if files is None or t.file in files]
    names = [t.name for t in entries]
    if len(set(names)) != len(names):
        raise InvalidArgument("tensor names repeat across files; choose one file with files=[...]")
    for t in entries:
        torch_dtype(t.dtype)  # fail early on dtypes torch cannot hold
    return entries


#: Files are staged under ``OUT/.mzstore-partial-<pid>-<random>/`` until verified.
PARTIAL_PREFIX = ".mzstore-partial-"


def _remove_dead_partials(out: Path) -> None:
    """Drop staging directories left by pulls whose process is gone (killed, crashed)."""
    for stage in out.glob(f"{PARTIAL_PREFIX}*"):
        # A live process's stage is another pull into the same directory: left alone.
        if process_gone(stage.name[len(PARTIAL_PREFIX) :].split("-", 1)[0]):
            shutil.rmtree(stage, ignore_errors=True)


#: Bytes written to one output file between background fdatasyncs.
FLUSH_BYTES = 64 * 1024 * 1024


class _Flusher:
    """Gets pulled bytes onto the disk while the pull goes on.

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


class DirectorySink:
    """Writes the selected files of a manifest under ``out_dir``."""

    def __init__(
        self, out_dir: str | os.PathLike[str], manifest: Manifest, files: list[FileEntry] | None = None
    ) -> None:
        self.out = Path(out_dir)
        self.files = files if files is not None else manifest.files
        self.stage = self.out / f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._fds: dict[str, int] = {}
        self._adopted: list[str] = []
        self._scratch = ScratchBuffers()
        self._flusher = _Flusher()

    def target(self, task: ChunkTask) -> np.ndarray:
        """A per-thread scratch buffer, reused so memory stays flat over the pull."""
        return self._scratch.get(task.chunk.raw_length)

    def open(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        _remove_dead_partials(self.out)
        self.stage.mkdir()
        for f in self.files:
            path = self.stage / f.path
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[f.path] = fd
            os.ftruncate(fd, f.size)
            if f.kind == "safetensors":
                assert f.header is not None
                header = f.header.encode("utf-8")
                os.pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
                assert safetensors_data_start(f) == 8 + len(header)

    def write(self, task: ChunkTask, data: np.ndarray) -> None:
        fd = self._fds[task.file]
        pwrite_all(fd, data.data, task.file_offset)
        self._flusher.wrote(fd, len(data))

    def adopt(self, path: str) -> None:
        """Commit a file the caller wrote itself at ``self.stage / path`` along with the others."""
        self._adopted.append(path)

    def commit(self) -> list[Path]:
        """fsync and move every file into place; return the final paths."""
        finals = []
        self._flusher.wait()
        for f in self.files:
            fd = self._fds.pop(f.path)
            os.fsync(fd)
            os.close(fd)
        for path in self._adopted:
            fd = os.open(self.stage / path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for rel in [f.path for f in self.files] + self._adopted:
            final = self.out / rel
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.stage / rel, final)
            finals.append(final)
        shutil.rmtree(self.stage, ignore_errors=True)
        return finals

    def abort(self) -> None:
        self._flusher.drain()
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        shutil.rmtree(self.stage, ignore_errors=True)


#: safetensors dtype → torch dtype attribute name.
TORCH_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}


def torch_dtype(name: str) -> Any:
    import torch

    attr = TORCH_DTYPES.get(name)
    if attr is None or not hasattr(torch, attr):
        raise InvalidArgument(f"dtype {name} cannot be loaded as a torch tensor (pull it to a directory instead)")
    return getattr(torch, attr)


class StateDictSink:
    """Builds ``{name: tensor}`` for the tensors of the selected files."""

    def __init__(self, manifest: Manifest, files: list[str] | None = None) -> None:
        import torch

        self.entries = select_tensors(manifest, files)
        self.buffers: dict[str, Any] = {}
        for t in self.entries:
            self.buffers[t.name] = torch.empty(t.data_offsets[1] - t.data_offsets[0], dtype=torch.uint8)

    def target(self, task: ChunkTask) -> np.ndarray:
        """Chunks decode straight into the tensor's own buffer: no extra copy."""
        assert task.tensor is not None
        buf = self.buffers[task.tensor].numpy()
        return buf[task.tensor_offset : task.tensor_offset + task.chunk.raw_length]

    def write(self, task: ChunkTask, data: np.ndarray) -> None:
        """Nothing to do: the verified bytes are already in place."""

    def result(self, device: str | Any = "cpu") -> dict[str, Any]:
        out = {}
        for t in self.entries:
            tensor = self.buffers.pop(t.name).view(torch_dtype(t.dtype)).reshape(t.shape)
            out[t.name] = tensor if str(device) == "cpu" else tensor.to(device)
        return out


class TensorParallelSink:
    """Builds one tensor-parallel rank's ``{name: slice}`` (see :mod:`mzstore.pull.tp`).

    Tensors split along dim 0 whose chunks are runs of whole rows are read
    *directly*: only the chunks overlapping the rank's rows are fetched, and
    their rows copied into a buffer of the slice's size. Other split tensors
    are assembled whole, then sliced; replicated tensors are loaded whole.
    """

    def __init__(
        self,
        manifest: Manifest,
        tp_size: int,
        tp_rank: int,
        rules: Any = None,
        files: list[str] | None = None,
    ) -> None:
        import torch

        from mzstore.pull.tp import DEFAULT_RULES, rank_range, split_dim

        self.entries = select_tensors(manifest, files)
        self.plan: dict[str, tuple[int | None, int, int, bool]] = {}
        self.buffers: dict[str, Any] = {}
        self._scratch = ScratchBuffers()
        for t in self.entries:
            dim = split_dim(t.name, t.shape, rules or DEFAULT_RULES)
            start, end = rank_range(t.shape[dim], tp_size, tp_rank) if dim is not None else (0, 0)
            rb = _row_bytes(t)
            direct = dim == 0 and rb is not None and all(c.raw_length == (c.rows[1] - c.rows[0]) * rb for c in t.chunks)
            self.plan[t.name] = (dim, start, end, direct)
            size = (end - start) * rb if direct and rb is not None else t.data_offsets[1] - t.data_offsets[0]
            self.buffers[t.name] = torch.empty(size, dtype=torch.uint8)

    def wants(self, task: ChunkTask) -> bool:
        """Whether this rank needs the chunk at all."""
        assert task.tensor is not None
        _, start, end, direct = self.plan[task.tensor]
        if not direct:
            return True
        lo, hi = task.chunk.rows
        return lo < end and hi > start and end > start

    def target(self, task: ChunkTask) -> np.ndarray:
        assert task.tensor is not None
        if self.plan[task.tensor][3]:
            return self._scratch.get(task.chunk.raw_length)
        buf = self.buffers[task.tensor].numpy()
        return buf[task.tensor_offset : task.tensor_offset + task.chunk.raw_length]

    def write(self, task: ChunkTask, data: np.ndarray) -> None:
        assert task.tensor is not None
        _, start, end, direct = self.plan[task.tensor]
        if not direct:
            return
        r0, r1 = task.chunk.rows
        rb = len(data) // (r1 - r0)
        lo, hi = max(start, r0), min(end, r1)
        out = self.buffers[task.tensor].numpy()
        out[(lo - start) * rb : (hi - start) * rb] = data[(lo - r0) * rb : (hi - r0) * rb]

    def result(self) -> dict[str, Any]:
        out = {}
        for t in self.entries:
            dim, start, end, direct = self.plan[t.name]
            tensor = self.buffers.pop(t.name).view(torch_dtype(t.dtype))
            if direct:
                out[t.name] = tensor.reshape([end - start, *t.shape[1:]])
            elif dim is None:
                out[t.name] = tensor.reshape(t.shape)
            else:
                out[t.name] = tensor.reshape(t.shape).narrow(dim, start, end - start).clone()
        return out


def _row_bytes(t: TensorEntry) -> int | None:
    from mzstore.format.dtypes import get_dtype
    from mzstore.push.planner import row_bytes

    return row_bytes(get_dtype(t.dtype), t.shape)
