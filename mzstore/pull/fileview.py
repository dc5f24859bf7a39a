"""Files as a pull would write them, readable at any byte range (the Hugging Face face serves these).

How it works: :class:`FileLayout` maps a file of a manifest onto pieces in
file order: the literal bytes of a safetensors file's 8-byte length and
header (kept verbatim in the manifest), then every chunk's decoded bytes at
the offset the pull plan gives it (:mod:`mzstore.pull.plan`); a plain file is
its chunks. The pieces must tile the file exactly, or the manifest is
refused. :class:`ChunkReader` fetches a chunk's stored bytes through a
``fetch`` callable, decodes and verifies them (:func:`decode_verified`: a
chunk whose decoded bytes fail their hash is never served), and keeps the
most recent decoded chunks in a bounded LRU, so concurrent readers of one
file (a download and its resume, several clients of one model) decode each
chunk once. :func:`read_range` yields the bytes of ``[start, end)`` piece by
piece: memory stays at a few chunks whatever the file size.

Lossless chunks decode to the original bytes, so the served file is the
pushed file (same sha256). Lossy chunks decode to their dequantized values in
the tensor's own dtype, so the header and layout are the same and only the
values differ; that file's sha256 is recorded at push (``FileEntry.decoded_sha256``).
"""

from __future__ import annotations

import bisect
import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from mzstore.errors import FormatError
from mzstore.format.manifest import FileEntry, Manifest
from mzstore.pull.pipeline import base_reader, decode_verified, read_retrying
from mzstore.pull.plan import ChunkTask, file_tasks, tensor_tasks

#: ``fetch(blob, offset, length)``: stored bytes of a blob range.
Fetch = Callable[[str, int, int], bytes | bytearray | memoryview]
#: Codecs whose decoded bytes are the pushed bytes.
EXACT_CODECS = frozenset({"lossless", "zstd"})


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of a file: ``literal`` ones, or the decoded bytes of ``task``'s chunk."""

    start: int
    end: int
    literal: bytes | None = None
    task: ChunkTask | None = None


class FileLayout:
    """Where every byte of one file of a manifest comes from."""

    def __init__(self, manifest: Manifest, path: str) -> None:
        entry = next((f for f in manifest.files if f.path == path), None)
        if entry is None:
            raise FileNotFoundError(path)
        self.entry: FileEntry = entry
        self.size = entry.size
        pieces: list[Piece] = []
        if entry.kind == "safetensors":
            assert entry.header is not None
            header = entry.header.encode("utf-8")
            pieces.append(Piece(0, 8 + len(header), literal=struct.pack("<Q", len(header)) + header))
            tasks = [task for t in manifest.tensors if t.file == path for task in tensor_tasks(entry, t)]
        else:
            tasks = file_tasks(entry)
        for task in sorted(tasks, key=lambda k: k.file_offset):
            if task.chunk.raw_length:
                pieces.append(Piece(task.file_offset, task.file_offset + task.chunk.raw_length, task=task))
        pos = 0
        for piece in pieces:
            if piece.start != pos:
                raise FormatError(f"{path}: the manifest's chunks do not tile the file (gap or overlap at byte {pos})")
            pos = piece.end
        if pos != self.size:
            raise FormatError(f"{path}: the manifest's chunks cover {pos} of {self.size} bytes")
        self.pieces = pieces
        self._starts = [p.start for p in pieces]
        #: Whether the served bytes are the pushed ones (every chunk lossless).
        self.exact = all(p.task is None or p.task.chunk.codec in EXACT_CODECS for p in pieces)

    @property
    def sha256(self) -> str | None:
        """The sha256 (hex) of the bytes served, when the manifest knows it."""
        if self.exact:
            return self.entry.sha256
        return self.entry.decoded_sha256

    def covering(self, start: int, end: int) -> Iterator[tuple[Piece, int, int]]:
        """``(piece, lo, hi)`` for every piece overlapping ``[start, end)``; ``lo:hi`` is the part of it inside."""
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self.pieces) and self.pieces[i].start < end:
            piece = self.pieces[i]
            lo, hi = max(start, piece.start) - piece.start, min(end, piece.end) - piece.start
            if hi > lo:
                yield piece, lo, hi
            i += 1


class ChunkReader:
    """Decoded chunks through a ``fetch`` callable, each decoded once at a time, the recent ones kept."""

    def __init__(self, fetch: Fetch, cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.fetch = fetch
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._held = 0
        self._inflight: dict[tuple[str, int, int], Future[bytes]] = {}
        #: Chunks decoded (not found in the LRU).
        self.decoded = 0

    def read(self, task: ChunkTask) -> bytes:
        """The decoded, verified bytes of ``task``'s chunk."""
        c = task.chunk
        key = (c.blob, c.offset, c.length)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            waiting = self._inflight.get(key)
            if waiting is None:
                mine: Future[bytes] = Future()
                self._inflight[key] = mine
        if waiting is not None:
            return waiting.result()
        try:
            payload = read_retrying(self.fetch, c.blob, c.offset, c.length)
            out = np.empty(c.raw_length, dtype=np.uint8)
            what = f"{task.file}" + (f" tensor {task.tensor}" if task.tensor else "")
            base_of = base_reader(self.fetch, task.dtype, what) if c.base is not None else None
            data = decode_verified(c, task.dtype, what, payload, out, base_of).tobytes()
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            mine.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
            self.decoded += 1
            if len(data) <= self.cache_bytes:
                self._cache[key] = data
                self._held += len(data)
                while self._held > self.cache_bytes:
                    _, old = self._cache.popitem(last=False)
                    self._held -= len(old)
        mine.set_result(data)
        return data


def read_range(layout: FileLayout, reader: ChunkReader, start: int, end: int) -> Iterator[bytes | memoryview]:
    """The bytes ``[start, end)`` of the file, piece by piece."""
    for piece, lo, hi in layout.covering(start, end):
        if piece.literal is not None:
            yield piece.literal[lo:hi]
        else:
            assert piece.task is not None
            yield memoryview(reader.read(piece.task))[lo:hi]


def file_sha256(layout: FileLayout, reader: ChunkReader) -> str:
    """The sha256 of the whole file as served, by reading it (for manifests that do not record it)."""
    hasher = hashlib.sha256()
    for block in read_range(layout, reader, 0, layout.size):
        hasher.update(block)
    return hasher.hexdigest()
