"""Where pulled bytes land: the one sink interface, and the sinks for files and CPU tensors.

Every output of a pull is a :class:`Sink`, driven the same way by
:class:`~mzstore.pull.puller.Puller`: ``wants`` filters the planned chunk
tasks, ``open`` prepares, the pipeline (:func:`~mzstore.pull.pipeline.run_pull`)
calls ``target``/``write`` — or ``write_payload`` for the chunks ``compact``
claims in their stored form — for every verified chunk, then ``finish``
returns the result, or ``abort`` undoes everything after a failure.

Sinks here:

* :class:`DirectorySink`: the source layout under a directory, staged and
  renamed into place (:mod:`mzstore.pull.staging`). Safetensors files are
  rebuilt from the original header bytes kept in the manifest, so they come
  back byte-identical to what was pushed.
* :class:`StateDictSink`: ``{name: tensor}``, chunks decoded straight into
  one preallocated CPU buffer per tensor.
* :class:`TensorParallelSink`: one tensor-parallel rank's slices;
  :class:`TensorParallelFilesSink` writes them as safetensors files beside
  the model's other files.

Device sinks (compact chunks expanded on a GPU) are in
:mod:`mzstore.pull.device`; the keep-quantized export in
:mod:`mzstore.pull.keep_quantized`.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from mzstore.durable import DIRECT_ALIGN, Data
from mzstore.errors import InvalidArgument, requires
from mzstore.format.dtypes import get_dtype, row_bytes
from mzstore.format.manifest import FileEntry, Manifest, TensorEntry
from mzstore.pull.plan import ChunkTask, safetensors_data_start
from mzstore.pull.staging import StagedFiles

if TYPE_CHECKING:  # numpy is imported by the decoders, once the first bytes are in (see pipeline.run_pull)
    import numpy as np

R = TypeVar("R")
#: A chunk's stored bytes as a fetch returns them (a transport's pooled receive buffer is a ``memoryview``).
Payload = Data


class Sink(ABC, Generic[R]):
    """Where a pull's verified chunks go, and what the pull returns (``R``).

    The pipeline calls :meth:`target`, :meth:`write` and :meth:`write_payload`
    from several worker threads at once, each for a different chunk.

    Attributes:
        compact_codecs: codecs whose chunks :meth:`compact` claims (the default rule).
    """

    compact_codecs: frozenset[str] = frozenset()

    def wants(self, task: ChunkTask) -> bool:
        """Whether this sink needs ``task``'s chunk at all (a tensor-parallel rank skips the others' rows)."""
        return True

    def open(self) -> None:
        """Prepare (create files, allocate); called once, before any chunk."""

    def compact(self, task: ChunkTask) -> bool:
        """Whether ``task``'s chunk is handed over as its verified-length stored bytes (:meth:`write_payload`)
        instead of being decoded into :meth:`target` by the pipeline (default: its codec is in
        :attr:`compact_codecs`)."""
        return task.chunk.codec in self.compact_codecs

    @abstractmethod
    def target(self, task: ChunkTask) -> np.ndarray:
        """The ``uint8`` array of ``task.chunk.raw_length`` bytes the chunk is decoded into.

        Its final place (the tensor's own memory), or a per-thread scratch buffer reused for
        the thread's next chunk once :meth:`write` returns.
        """

    def write(self, task: ChunkTask, data: np.ndarray) -> None:
        """``data`` (the array :meth:`target` gave) holds the chunk's decoded, hash-checked bytes."""

    def write_payload(self, task: ChunkTask, payload: Payload) -> None:
        """A chunk :meth:`compact` claimed, as stored. The sink verifies it before using it.

        Raises:
            IntegrityError: the payload fails its check (the pipeline fetches it again once).
        """
        raise NotImplementedError(f"{type(self).__name__} takes no compact chunks")

    @abstractmethod
    def finish(self) -> R:
        """Every chunk arrived and was verified: complete the output and return it."""

    def abort(self) -> None:
        """The pull failed: undo what :meth:`open` and the chunks did (wait for async work, remove staging)."""


class ScratchBuffers:
    """One growing ``uint8`` buffer per thread: freed multi-MiB buffers would pile up in malloc arenas."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, size: int) -> np.ndarray:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            import numpy as np

            buf = self._local.buf = np.empty(size, dtype=np.uint8)
        return buf[:size]


class PagedWriteBehind:
    """Scratch buffers whose bytes are written to a file behind the decoder that filled them.

    For :class:`DirectorySink`: :meth:`target` hands a decoder thread ``size`` bytes whose address is
    ``offset`` modulo :data:`~mzstore.durable.DIRECT_ALIGN` (page-aligned ``mmap`` memory at the chunk's
    place in a page), so that a durable pull's :meth:`~mzstore.pull.staging.StagedFiles.write` can
    send its whole blocks with ``O_DIRECT`` straight from there. :meth:`write` queues the write on
    one writer thread and returns; each decoder thread has two buffers and takes the other for its
    next chunk, waiting only if that one is still being written. Why a writer of its own: an
    ``O_DIRECT`` write waits for the disk (16 MiB: about 11 ms here), and a write into the page
    cache (``--no-fsync``) from two decoders at once made them spin on the file's lock (8 % of a
    pull in ``perf``) and wait on the copies into fresh pages; with the one writer a 1 GB
    ``--no-fsync`` pull took 1.39 s and 1.93 CPU-s instead of 1.82 s and 2.62 (loopback, medians of 5).

    A failed write is raised by the decoder's next :meth:`target` and by :meth:`wait`.
    """

    SLOTS = 2

    def __init__(self, write: Callable[[int, memoryview, int], None]) -> None:
        self._write = write
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pending: list[Future[None]] = []
        self._pool: ThreadPoolExecutor | None = None

    def target(self, size: int, offset: int) -> np.ndarray:
        import numpy as np

        local = self._local
        if not hasattr(local, "bufs"):
            local.bufs, local.futures, local.next = [None] * self.SLOTS, [None] * self.SLOTS, 0
        i = local.next
        future = local.futures[i]
        if future is not None:
            local.futures[i] = None
            future.result()  # the buffer is free once its write is done (a failed write fails this chunk)
        phase = offset % DIRECT_ALIGN
        buf = local.bufs[i]
        if buf is None or len(buf) < phase + size:
            # Anonymous mmap: page-aligned. Rounded up to a MiB so a slightly larger chunk reuses it.
            length = -(-(DIRECT_ALIGN + size) // (1 << 20)) * (1 << 20)
            buf = local.bufs[i] = np.frombuffer(mmap.mmap(-1, length), dtype=np.uint8)
        local.slot = i
        return buf[phase : phase + size]

    def write(self, fd: int, data: np.ndarray, offset: int) -> None:
        """Queue the write of ``data`` (the array :meth:`target` last gave this thread) at ``offset``."""
        local = self._local
        i = local.slot
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="mzstore-write")
            future = self._pool.submit(self._write, fd, data.data, offset)
            # Done writes are dropped from the list, failed ones kept for :meth:`wait` to raise.
            self._pending = [f for f in self._pending if not f.done() or f.exception() is not None]
            self._pending.append(future)
        local.futures[i] = future
        local.next = (i + 1) % self.SLOTS

    def wait(self) -> None:
        """Wait for every queued write; the first error is raised."""
        with self._lock:
            pending, self._pending = self._pending, []
            pool, self._pool = self._pool, None
        try:
            for future in pending:
                future.result()
        finally:
            if pool is not None:
                pool.shutdown(wait=True)


# --- files ------------------------------------------------------------------------------


class DirectorySink(Sink[list[Path]]):
    """Writes the selected files of a manifest under ``out_dir``, in their source layout.

    Chunks are written with ``pwrite`` at their final offsets in staged files;
    :meth:`finish` returns the final paths.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        manifest: Manifest,
        files: list[FileEntry] | None = None,
        durable: bool = True,
    ) -> None:
        self.staged = StagedFiles(out_dir, durable)
        self.files = files if files is not None else manifest.files
        self._paths = {f.path for f in self.files}
        self._fds: dict[str, int] = {}
        self._behind = PagedWriteBehind(self.staged.write)

    @property
    def stage(self) -> Path:
        return self.staged.stage

    def wants(self, task: ChunkTask) -> bool:
        return task.file in self._paths

    def open(self) -> None:
        self.staged.open()
        for f in self.files:
            fd = self._fds[f.path] = self.staged.create(f.path, f.size)
            if f.kind == "safetensors":
                assert f.header is not None
                header = f.header.encode("utf-8")
                os.pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
                assert safetensors_data_start(f) == 8 + len(header)

    def target(self, task: ChunkTask) -> np.ndarray:
        """A per-thread scratch buffer, reused so memory stays flat over the pull, at the chunk's place in
        a page and written behind the decoder (:class:`PagedWriteBehind`): a durable pull sends its whole
        blocks to the disk from there with ``O_DIRECT``."""
        return self._behind.target(task.chunk.raw_length, task.file_offset)

    def write(self, task: ChunkTask, data: np.ndarray) -> None:
        self._behind.write(self._fds[task.file], data, task.file_offset)

    def finish(self) -> list[Path]:
        """fsync and move every file into place; return the final paths."""
        self._behind.wait()
        return self.staged.commit()

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the pull failed already; its first error stands
            self._behind.wait()
        self.staged.abort()


class FileBytesSink(Sink[bytes]):
    """One plain file of a model, in memory (a ``config.json`` the client wants to read)."""

    def __init__(self, entry: FileEntry) -> None:
        self.entry = entry
        self.data = bytearray(entry.size)

    def wants(self, task: ChunkTask) -> bool:
        return task.tensor is None and task.file == self.entry.path

    def target(self, task: ChunkTask) -> np.ndarray:
        import numpy as np

        return np.frombuffer(self.data, dtype=np.uint8)[task.file_offset : task.file_offset + task.chunk.raw_length]

    def finish(self) -> bytes:
        return bytes(self.data)


# --- tensors ----------------------------------------------------------------------------

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


def torch_module(feature: str = "loading tensors") -> Any:
    """``torch``, or a one-line :class:`~mzstore.errors.MissingDependency` naming the ``torch`` extra."""
    return requires("torch", "torch", feature)


def torch_dtype(name: str) -> Any:
    torch = torch_module()
    attr = TORCH_DTYPES.get(name)
    if attr is None or not hasattr(torch, attr):
        raise InvalidArgument(f"dtype {name} cannot be loaded as a torch tensor (pull it to a directory instead)")
    return getattr(torch, attr)


def select_tensors(manifest: Manifest, files: list[str] | None) -> list[TensorEntry]:
    """The tensors of the chosen files; their names must be unique to make a state dict."""
    entries = [t for t in manifest.tensors if files is None or t.file in files]
    names = [t.name for t in entries]
    if len(set(names)) != len(names):
        raise InvalidArgument("tensor names repeat across files; choose one file with files=[...]")
    for t in entries:
        torch_dtype(t.dtype)  # fail early on dtypes torch cannot hold
    return entries


class StateDictSink(Sink[dict[str, Any]]):
    """Builds ``{name: tensor}`` for the tensors of the selected files, moved to ``device`` at the end."""

    def __init__(self, manifest: Manifest, files: list[str] | None = None, device: str | Any = "cpu") -> None:
        torch = torch_module("load_state_dict")
        self.entries = select_tensors(manifest, files)
        self.device = device
        self.buffers: dict[str, Any] = {}
        for t in self.entries:
            self.buffers[t.name] = torch.empty(t.data_offsets[1] - t.data_offsets[0], dtype=torch.uint8)

    def wants(self, task: ChunkTask) -> bool:
        return task.tensor in self.buffers

    def target(self, task: ChunkTask) -> np.ndarray:
        """Chunks decode straight into the tensor's own buffer: no extra copy."""
        assert task.tensor is not None
        buf = self.buffers[task.tensor].numpy()
        return buf[task.tensor_offset : task.tensor_offset + task.chunk.raw_length]

    def finish(self) -> dict[str, Any]:
        out = {}
        for t in self.entries:
            tensor = self.buffers.pop(t.name).view(torch_dtype(t.dtype)).reshape(t.shape)
            out[t.name] = tensor if str(self.device) == "cpu" else tensor.to(self.device)
        return out


class TensorParallelSink(Sink[dict[str, Any]]):
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
        device: str | Any = "cpu",
    ) -> None:
        from mzstore.pull.tp import DEFAULT_RULES, rank_range, split_dim

        torch = torch_module("tensor-parallel slices")
        self.entries = select_tensors(manifest, files)
        self.device = device
        self.plan: dict[str, tuple[int | None, int, int, bool]] = {}
        self.buffers: dict[str, Any] = {}
        self._scratch = ScratchBuffers()
        for t in self.entries:
            dim = split_dim(t.name, t.shape, rules or DEFAULT_RULES)
            start, end = rank_range(t.shape[dim], tp_size, tp_rank) if dim is not None else (0, 0)
            rb = row_bytes(get_dtype(t.dtype), t.shape)
            direct = dim == 0 and rb is not None and all(c.raw_length == (c.rows[1] - c.rows[0]) * rb for c in t.chunks)
            self.plan[t.name] = (dim, start, end, direct)
            size = (end - start) * rb if direct and rb is not None else t.data_offsets[1] - t.data_offsets[0]
            self.buffers[t.name] = torch.empty(size, dtype=torch.uint8)

    def wants(self, task: ChunkTask) -> bool:
        """Whether this rank needs the chunk at all."""
        if task.tensor not in self.plan:
            return False
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

    def finish(self) -> dict[str, Any]:
        out = {}
        for t in self.entries:
            dim, start, end, direct = self.plan[t.name]
            tensor = self.buffers.pop(t.name).view(torch_dtype(t.dtype))
            if direct:
                tensor = tensor.reshape([end - start, *t.shape[1:]])
            elif dim is None:
                tensor = tensor.reshape(t.shape)
            else:
                tensor = tensor.reshape(t.shape).narrow(dim, start, end - start).clone()
            out[t.name] = tensor if str(self.device) == "cpu" else tensor.to(self.device)
        return out


class TensorParallelFilesSink(Sink[list[Path]]):
    """One rank's slices written as safetensors files under their source names, plus the other files.

    Plain files go through a :class:`DirectorySink`; tensors through a
    :class:`TensorParallelSink`, whose slices are saved into the same staging
    folder (metadata: the source file's, plus ``mzstore.tp_size``,
    ``mzstore.tp_rank`` and ``mzstore.ref``) and committed with the others.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        manifest: Manifest,
        tp_size: int,
        tp_rank: int,
        rules: Any = None,
        ref: str = "",
        durable: bool = True,
    ) -> None:
        self.manifest = manifest
        self.files = DirectorySink(
            out_dir, manifest, [f for f in manifest.files if f.kind != "safetensors"], durable=durable
        )
        self.tensors = TensorParallelSink(manifest, tp_size, tp_rank, rules)
        self.metadata = {"mzstore.tp_size": str(tp_size), "mzstore.tp_rank": str(tp_rank), "mzstore.ref": ref}

    def _part(self, task: ChunkTask) -> Sink[Any]:
        return self.files if task.tensor is None else self.tensors

    def wants(self, task: ChunkTask) -> bool:
        return self._part(task).wants(task)

    def open(self) -> None:
        self.files.open()

    def target(self, task: ChunkTask) -> np.ndarray:
        return self._part(task).target(task)

    def write(self, task: ChunkTask, data: np.ndarray) -> None:
        self._part(task).write(task, data)

    def finish(self) -> list[Path]:
        from safetensors.torch import save_file

        tensors = self.tensors.finish()
        for f in self.manifest.files:
            if f.kind != "safetensors":
                continue
            header = json.loads(f.header or "{}")
            metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()} | self.metadata
            part = {t.name: tensors.pop(t.name).contiguous() for t in self.manifest.tensors_of(f.path)}
            save_file(part, str(self.files.staged.path(f.path)), metadata=metadata)
            del part
            self.files.staged.adopt(f.path)
        return self.files.finish()

    def abort(self) -> None:
        self.files.abort()
