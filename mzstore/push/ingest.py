"""Server-side ingest: an upload stream in, a committed model out.

How it works::

    UploadBegin ──▶ validate ref, policy, file list          (nothing stored yet)
                    ecsq: each tensor's step from the client's allocation
                    --base: the base manifest's tensors, by name
    UploadData* ──▶ per file, in order:
                      safetensors: 8-byte prefix → strict header parse →
                                   plan row chunks → fill one chunk at a time
                      other files: fixed-size byte chunks
                    each full chunk → worker pool: BLAKE3(raw) + codec.encode
                                      (--base: against the base's chunk of the same rows)
                    results drained in order → ShardWriter (spool → sealed shard blobs)
    UploadEnd   ──▶ size and sha256 of the file checked against what arrived
    end of stream ─▶ seal last shard → manifest → ref (Store.commit)

Memory stays bounded: one chunk being filled plus at most ``max_inflight``
chunks being encoded, whatever the model size (plus the safetensors header,
capped at 100 MB). Any error (malformed input, short or altered upload,
client gone) aborts before the manifest is written, so no ref ever points
at a partial model; shards already sealed are unreferenced blobs that
garbage collection reclaims.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mzstore.behind import BehindSha256
from mzstore.codecs import get_codec
from mzstore.codecs.allocation import Allocation
from mzstore.codecs.delta import DeltaCodec
from mzstore.codecs.policy import Policy, Spec, mode_name, parse_policy
from mzstore.codecs.quant import Stats, auto_margin, encode_auto, encode_spec
from mzstore.errors import FormatError, IntegrityError, InvalidArgument, ResourceExhausted
from mzstore.format.dtypes import DType, get_dtype, row_bytes
from mzstore.format.hashing import blake3_hex
from mzstore.format.manifest import Chunk, FileEntry, Manifest, TensorEntry, parse_manifest
from mzstore.format.refs import parse_ref
from mzstore.format.safetensors import TensorInfo, parse_header, read_header_len
from mzstore.limits import MAX_CHUNK_BYTES, MAX_DELTA_DEPTH
from mzstore.pull.pipeline import BaseOf, base_reader
from mzstore.push.planner import ChunkPlan, plan_file, plan_tensor
from mzstore.push.protocol import (
    PushResult,
    UploadBegin,
    UploadData,
    UploadEvent,
    UploadFile,
    UploadKnown,
    UploadState,
    validate_begin,
)
from mzstore.push.reuse import KnownFiles, reused_bytes
from mzstore.push.shards import ShardWriter
from mzstore.settings import Limits
from mzstore.storage.store import Store
from mzstore.transport.buffers import ReceiveBuffers

_pool: ThreadPoolExecutor | None = None
#: Where a tensor's chunk is assembled from the upload's messages: reused once its encode is drained (nothing
#: refers to it then), instead of a fresh zero-filled ``bytearray`` per chunk (see mzstore.transport.buffers).
CHUNK_BUFFERS = ReceiveBuffers(128 * 1024 * 1024)


def _encode_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="mzstore-encode")
    return _pool


@dataclass(frozen=True)
class DeltaMode:
    """``push --base``: a lossless chunk encoded against ``base`` (the base model's chunk of the same rows),
    whose decoded bytes ``read`` gives."""

    base: Chunk
    read: BaseOf


#: How a chunk is encoded: a lossless codec name, a prune/quantize spec, auto (model cosine target, margin,
#: servable: no ECSQ), or a delta against a base chunk.
Mode = str | Spec | tuple[float, float, bool] | DeltaMode
#: The codec name :func:`_encode` returns for a chunk whose bytes are its base chunk's: stored as that chunk.
SAME_AS_BASE = "=base"
#: (codec, payload, params, BLAKE3 of what a pull decodes, fidelity stats or None, the decoded bytes when
#: they differ from the raw ones, else None)
_Encoded = tuple[str, bytes, dict[str, Any], str, Stats | None, memoryview | None]


class _Served:
    """The sha256 of a safetensors file as a pull writes it, when lossy tensors make it differ from the
    pushed file (``FileEntry.decoded_sha256``): its header, then each chunk's decoded bytes, in file order
    (the order chunks are emitted and drained)."""

    def __init__(self, prefix: bytes) -> None:
        self.hasher = hashlib.sha256(prefix)
        self.lossy = False
        self.entry: FileEntry | None = None

    def update(self, raw: bytes | bytearray | memoryview, decoded: memoryview | None) -> None:
        if decoded is None:
            self.hasher.update(raw)
        else:
            self.lossy = True
            self.hasher.update(decoded)

    def settle(self) -> None:
        if self.entry is not None and self.lossy:
            self.entry.decoded_sha256 = self.hasher.hexdigest()


class _Job:
    """A chunk queued for encoding, with where its result goes."""

    __slots__ = ("base", "chunk_list", "entry", "future", "key", "meta", "raw", "rows", "served")

    def __init__(
        self,
        future: Future[_Encoded],
        chunk_list: list[Chunk],
        rows: list[int],
        meta: dict[str, Any],
        key: str,
        entry: TensorEntry | None,
        served: _Served | None = None,
        raw: bytes | bytearray | memoryview = b"",
        base: Chunk | None = None,
    ) -> None:
        self.base = base
        self.future = future
        self.chunk_list = chunk_list
        self.rows = rows
        self.meta = meta
        self.key = key
        self.entry = entry
        self.served = served
        self.raw = raw


def _encode(mode: Mode, dtype: DType, raw: bytes | bytearray | memoryview, rows: int) -> _Encoded:
    """Encode one chunk in a worker thread."""
    if isinstance(mode, DeltaMode):
        return _encode_delta(mode, dtype, raw)
    if isinstance(mode, str):
        payload, params = get_codec(mode).encode(memoryview(raw), dtype)
        return mode, payload, params, blake3_hex(raw), None, None
    enc = encode_spec(raw, dtype, rows, mode) if isinstance(mode, Spec) else encode_auto(raw, dtype, rows, *mode)
    params = dict(enc.params)
    if enc.codec == "quant":
        # Lets a device target verify the compact bytes before expanding them there.
        params["payload_blake3"] = blake3_hex(enc.payload)
    # A chunk's hash is of its decoded bytes: exactly what a host-side pull verifies.
    decoded = enc.decoded.data
    return enc.codec, enc.payload, params, blake3_hex(decoded), enc.stats, decoded if enc.codec == "quant" else None


#: A delta larger than this share of the raw chunk is compared with the chunk coded on its own.
DELTA_CHECK_SHARE = 0.5


def _encode_delta(mode: DeltaMode, dtype: DType, raw: bytes | bytearray | memoryview) -> _Encoded:
    """A chunk against its base chunk: the base chunk itself when the bytes are the same, else the delta
    (:mod:`mzstore.codecs.delta`), unless coding the chunk on its own is smaller (a tensor that changed
    entirely)."""
    base = mode.read(mode.base)
    data = np.frombuffer(raw, dtype=np.uint8)
    sha = blake3_hex(raw)
    if np.array_equal(data, base):
        return SAME_AS_BASE, b"", {}, sha, None, None
    payload, params = DeltaCodec().encode_against(raw, base, dtype)
    if len(payload) > DELTA_CHECK_SHARE * len(raw):
        plain, plain_params = get_codec("lossless").encode(memoryview(raw), dtype)
        if len(plain) <= len(payload):
            return "lossless", plain, plain_params, sha, None, None
    return "delta", payload, params, sha, None, None


class Ingest:
    """One push. Feed it events with :meth:`run`."""

    def __init__(
        self,
        store: Store,
        *,
        chunk_bytes: int,
        shard_bytes: int,
        spool_dir: Path | None = None,
        max_inflight: int = 4,
        limits: Limits | None = None,
    ) -> None:
        # A pull refuses chunks above MAX_CHUNK_BYTES (stored or decoded); half leaves room for codec overhead.
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES // 2:
            raise InvalidArgument(f"chunk size {chunk_bytes} must be between 1 and {MAX_CHUNK_BYTES // 2} bytes")
        self.store = store
        self.limits = limits or Limits()
        self.chunk_bytes = chunk_bytes
        self.writer = ShardWriter(store, shard_bytes, spool_dir)
        self.max_inflight = max_inflight
        self._jobs: deque[_Job] = deque()
        self.files: list[FileEntry] = []
        self.tensors: list[TensorEntry] = []
        self.bytes_received = 0
        self.n_chunks = 0
        self.policy: Policy = parse_policy("lossless")
        self.fidelity: dict[int, Stats] = {}
        self.known = KnownFiles(store, chunk_bytes)
        self._served: list[_Served] = []  # files whose pulled bytes may differ from the pushed ones
        self._reused_tensors: set[int] = set()
        self._reused_blobs: set[str] = set()
        self._reused_ranges: dict[str, set[tuple[int, int]]] = {}  # blob → (offset, length) of reused chunks
        self.base_digest: str | None = None  # push --base: the base model's manifest
        self.base_tensors: dict[str, TensorEntry] = {}

    # -- chunk pipeline ------------------------------------------------------
    def _submit(
        self,
        mode: Mode,
        dtype: DType,
        raw: bytes | bytearray | memoryview,
        chunk_list: list[Chunk],
        rows: list[int],
        meta: dict[str, Any],
        key: str,
        entry: TensorEntry | None = None,
        matrix_rows: int = 1,
        served: _Served | None = None,
    ) -> None:
        future = _encode_pool().submit(_encode, mode, dtype, raw, matrix_rows)
        base = mode.base if isinstance(mode, DeltaMode) else None
        self._jobs.append(_Job(future, chunk_list, rows, meta, key, entry, served, raw if served else b"", base))
        while len(self._jobs) > self.max_inflight:
            self._drain_one()

    def _drain_one(self) -> None:
        job = self._jobs.popleft()
        codec, payload, params, sha, stats, decoded = job.future.result()
        if job.served is not None:
            job.served.update(job.raw, decoded)
            job.raw = b""
        if codec == SAME_AS_BASE:  # the base's chunk as it is stored: nothing new to write
            assert job.base is not None
            job.chunk_list.append(job.base)
            self._share(job.base)
            self.n_chunks += 1
            return
        meta = job.meta | {"codec": codec}
        chunk = Chunk(
            blob="",
            offset=0,
            length=len(payload),
            rows=job.rows,
            raw_length=meta["raw_length"],
            sha256=None,
            codec=codec,
            params=params,
            blake3=sha,
            base=job.base if codec == "delta" else None,
        )
        if chunk.base is not None:
            self._reused_blobs.update(b.blob for b in chunk.base.chain())
        if stats is not None and job.entry is not None:
            self.fidelity.setdefault(id(job.entry), Stats()).merge(stats)
        job.chunk_list.append(chunk)
        self.n_chunks += 1
        self.writer.append(job.key, payload, chunk, meta | {"rows": job.rows, "params": params, "blake3": sha})

    def _share(self, chunk: Chunk) -> None:
        """A chunk of another manifest that this one uses as it is (its blobs, and its bases')."""
        self._reused_blobs.update(b.blob for b in chunk.chain())
        self._reused_ranges.setdefault(chunk.blob, set()).add((chunk.offset, chunk.length))

    def _drain_all(self) -> None:
        while self._jobs:
            self._drain_one()

    def _cancel(self) -> None:
        for job in self._jobs:
            job.future.cancel()
        for job in self._jobs:
            if not job.future.cancelled():
                try:
                    job.future.result()
                except Exception:  # noqa: BLE001 - already failing
                    pass
        self._jobs.clear()
        self.writer.abort()

    # -- the stream ----------------------------------------------------------
    def run(self, begin: UploadBegin, events: Iterable[UploadEvent]) -> PushResult:
        """Consume the whole upload and commit it.

        Raises:
            InvalidArgument / FormatError: the upload is malformed.
            IntegrityError: a file arrived short, long or altered.
        """
        validate_begin(begin, self.limits)
        ref = parse_ref(begin.ref)
        self.policy = parse_policy(begin.codec, begin.keep)
        if begin.base:  # its tensors, by name, for the sinks to delta against
            _, self.base_digest = self.store.resolve(begin.base)
            base = parse_manifest(self.store.get_manifest(self.base_digest))
            self.base_tensors = {t.name: t for t in base.tensors}
        allocation = None
        if begin.allocation:  # ecsq: each tensor's step, decided by the client (validate_begin checked it)
            allocation = Allocation.from_json(begin.allocation)
            self.policy = self.policy.with_steps(allocation.steps)
        self.writer.expect(sum(f.size for f in begin.files))
        try:
            self._consume(begin, iter(events))
            self._drain_all()
            for served in self._served:
                served.settle()
            self.writer.seal()
            self.writer.publish()
        except BaseException:
            self._cancel()
            raise
        for entry in self.tensors:
            if id(entry) in self._reused_tensors:
                continue  # as stored the first time: fidelity and the codec auto chose are recorded already
            stats = self.fidelity.get(id(entry))
            if stats is not None:
                entry.fidelity = stats.report()
            if entry.codec.startswith("auto"):
                # Record what auto chose: one spec, or the mix over the tensor's chunks.
                chosen = sorted({str(c.params.get("spec", c.codec)) for c in entry.chunks})
                entry.codec = f"{entry.codec}→{'+'.join(chosen)}"
        manifest = Manifest(
            files=self.files,
            tensors=self.tensors,
            source_kind=begin.source_kind,
            codec=self.policy.text,
            bytes_raw=sum(f.size for f in self.files),
            bytes_stored=self.writer.stats.bytes_stored + self._reused_bytes(),
            annotations=dict(begin.annotations),
            allocation=allocation.record() if allocation is not None else None,
            base=self.base_digest,
        )
        data = manifest.to_json()
        digest = self.store.commit(ref.name, ref.tag, data, [*self.writer.stats.blobs, *sorted(self._reused_blobs)])
        self.known.remember(begin, self.files, digest)
        return PushResult(
            ref=f"{ref.name}:{ref.tag}",
            digest=digest,
            bytes_raw=manifest.bytes_raw,
            bytes_stored=manifest.bytes_stored + len(data),
            bytes_received=self.bytes_received,
            tensors=len(self.tensors),
            chunks=self.n_chunks,
            shards=self.writer.stats.shards,
        )

    def _reused_bytes(self) -> int:
        """The stored bytes of reused files (in blobs no new shard repeats): see :func:`reused_bytes`."""
        written = set(self.writer.stats.blobs)
        return reused_bytes(self.store, {b: r for b, r in self._reused_ranges.items() if b not in written})

    def _reuse(self, upload: UploadFile, known: UploadKnown) -> None:
        """A file the store holds already: its entries, as stored, under this push's path."""
        entry, tensors, blobs = self.known.entries(upload, known)
        self.files.append(entry)
        self.tensors.extend(tensors)
        self._reused_tensors.update(id(t) for t in tensors)
        self._reused_blobs |= blobs
        for chunk in [*entry.chunks, *(c for t in tensors for c in t.chunks)]:
            self._reused_ranges.setdefault(chunk.blob, set()).add((chunk.offset, chunk.length))
        self.n_chunks += len(entry.chunks) + sum(len(t.chunks) for t in tensors)

    def _consume(self, begin: UploadBegin, events: Iterable[UploadEvent]) -> None:
        """Feed each file's bytes to its sink as they arrive; check every event and every file's sha256."""
        state = UploadState(begin, in_order=True)
        # The open file's sink and hasher; the sha256 runs behind this thread (see mzstore.behind).
        current: tuple[_SafetensorsSink | _FileSink, BehindSha256] | None = None
        try:
            for event in events:
                state.accept(event)
                upload = begin.files[event.file]
                if isinstance(event, UploadKnown):
                    self._reuse(upload, event)
                    continue
                if current is None:
                    sink = (
                        _SafetensorsSink(self, upload, self.policy)
                        if upload.kind == "safetensors"
                        else _FileSink(self, upload)
                    )
                    current = (sink, BehindSha256())
                sink, hasher = current
                if isinstance(event, UploadData):
                    hasher.update(event.data)
                    self.bytes_received += len(event.data)
                    sink.feed(memoryview(event.data))
                    continue
                current = None
                sha = hasher.hexdigest()
                if event.sha256 != sha:
                    raise IntegrityError(f"{upload.path}: sha256 mismatch (upload altered or truncated)")
                self.files.append(sink.finish(sha))
            state.finish()
        finally:
            if current is not None:
                current[1].close()


class _SafetensorsSink:
    """Strict streaming parse of one safetensors file."""

    def __init__(self, ingest: Ingest, upload: UploadFile, policy: Policy) -> None:
        self.ingest = ingest
        self.upload = upload
        self.policy = policy
        self.buf = bytearray()
        self.header_len: int | None = None
        self.header_text: str | None = None
        self.queue: deque[tuple[TensorEntry, DType, ChunkPlan, Mode]] = deque()
        self.current: memoryview | bytearray | None = None
        self.fill = 0
        self.served: _Served | None = None
        if upload.size < 8:
            raise FormatError(f"{upload.path}: not a safetensors file: {upload.size} bytes, need at least 8")

    @contextmanager
    def _naming_the_file(self) -> Iterator[None]:
        """The header parsers do not know which file they read: their errors get its path."""
        try:
            yield
        except FormatError as exc:
            raise FormatError(f"{self.upload.path}: {exc}") from None

    def feed(self, data: memoryview) -> None:
        if self.header_text is None:
            self.buf += data
            if self.header_len is None:
                if len(self.buf) < 8:
                    return
                with self._naming_the_file():
                    self.header_len = read_header_len(
                        bytes(self.buf[:8]), self.upload.size, max_header=self.ingest.limits.header_bytes
                    )
            if len(self.buf) < 8 + self.header_len:
                return
            self._start(bytes(self.buf[8 : 8 + self.header_len]))
            data = memoryview(bytes(self.buf[8 + self.header_len :]))
            self.buf = bytearray()
        self._take(data)

    def _start(self, header_bytes: bytes) -> None:
        limit = self.ingest.limits.tensors
        with self._naming_the_file():
            header = parse_header(header_bytes, self.upload.size, max_tensors=limit)
        if len(self.ingest.tensors) + len(header.tensors) > limit:
            raise ResourceExhausted(
                f"{self.upload.path}: push has more than {limit} tensors, the limit (MZSTORE_MAX_TENSORS)"
            )
        self.header_text = header_bytes.decode("utf-8")
        modes = [self.policy.mode_for(t.name, t.dtype.name, t.shape) for t in header.tensors]
        if any(not isinstance(m, str) for m in modes):  # a lossy policy applies: hash what a pull will write
            self.served = _Served(struct.pack("<Q", len(header_bytes)) + header_bytes)
            self.ingest._served.append(self.served)
        for t, policy_mode in zip(header.tensors, modes, strict=True):
            entry = TensorEntry(
                file=self.upload.path,
                name=t.name,
                dtype=t.dtype.name,
                shape=list(t.shape),
                data_offsets=[t.begin, t.end],
                codec=self.policy.text if isinstance(policy_mode, float) else mode_name(policy_mode),
                chunks=[],
            )
            mode: Mode = (
                (policy_mode, auto_margin(t.name), self.policy.auto_servable)
                if isinstance(policy_mode, float)
                else policy_mode
            )
            self.ingest.tensors.append(entry)
            plans = plan_tensor(t.dtype, t.shape, t.nbytes, self.ingest.chunk_bytes)
            bases = self._base_chunks(t, plans) if policy_mode == "lossless" else None
            read = base_reader(self.ingest.store.read_blob, t.dtype.name, f"{t.name} of the base") if bases else None
            for i, plan in enumerate(plans):
                base = bases[i] if bases is not None else None
                chunk_mode: Mode = DeltaMode(base, read) if base is not None and read is not None else mode
                self.queue.append((entry, t.dtype, plan, chunk_mode))
        self._flush_empty()

    def _base_chunks(self, t: TensorInfo, plans: list[ChunkPlan]) -> list[Chunk | None] | None:
        """The base model's chunk for each planned chunk of ``t`` (same name, dtype, shape, rows, bytes),
        ``None`` where there is none or its delta chain is already :data:`MAX_DELTA_DEPTH` deep."""
        entry = self.ingest.base_tensors.get(t.name)
        if entry is None or entry.dtype != t.dtype.name or entry.shape != list(t.shape):
            return None
        if len(entry.chunks) != len(plans):
            return None
        out: list[Chunk | None] = []
        for plan, c in zip(plans, entry.chunks, strict=True):
            fits = c.rows == [plan.row_start, plan.row_end] and c.raw_length == plan.nbytes and plan.nbytes > 0
            out.append(c if fits and len(c.chain()) <= MAX_DELTA_DEPTH else None)
        return out if any(c is not None for c in out) else None

    def _flush_empty(self) -> None:
        """Emit chunks that need no data (zero-size tensors)."""
        while self.queue and self.queue[0][2].nbytes == 0:
            self._emit(bytearray())

    def _emit(self, raw: memoryview | bytearray) -> None:
        entry, dtype, plan, mode = self.queue.popleft()
        meta = {
            "file": entry.file,
            "tensor": entry.name,
            "dtype": entry.dtype,
            "shape": entry.shape,
            "raw_length": plan.nbytes,
        }
        rb = row_bytes(dtype, entry.shape)
        whole_rows = rb is not None and plan.byte_start == plan.row_start * rb and plan.byte_end == plan.row_end * rb
        self.ingest._submit(
            mode,
            dtype,
            raw,
            entry.chunks,
            [plan.row_start, plan.row_end],
            meta,
            f"{entry.name}@{plan.index}",
            entry=entry,
            matrix_rows=plan.row_end - plan.row_start if whole_rows else 1,
            served=self.served,
        )

    def _take(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            if not self.queue:
                raise FormatError(f"{self.upload.path}: trailing bytes after the last tensor")
            plan = self.queue[0][2]
            if self.current is None:
                self.current = CHUNK_BUFFERS.take(plan.nbytes)
                self.fill = 0
            n = min(plan.nbytes - self.fill, len(data) - pos)
            self.current[self.fill : self.fill + n] = data[pos : pos + n]
            self.fill += n
            pos += n
            if self.fill == plan.nbytes:
                raw, self.current = self.current, None
                self._emit(raw)
                self._flush_empty()

    def finish(self, sha256: str) -> FileEntry:
        if self.header_text is None:
            raise FormatError(f"{self.upload.path}: not a safetensors file (too short)")
        if self.queue or self.current is not None:
            raise IntegrityError(f"{self.upload.path}: upload ended inside the tensor data")
        entry = FileEntry(self.upload.path, "safetensors", self.upload.size, sha256, header=self.header_text)
        if self.served is not None:
            self.served.entry = entry  # its decoded_sha256 is set once every chunk is drained
        return entry


class _FileSink:
    """A plain file: fixed-size chunks, zstd."""

    def __init__(self, ingest: Ingest, upload: UploadFile) -> None:
        self.ingest = ingest
        self.upload = upload
        self.entry = FileEntry(upload.path, "file", upload.size, "", chunks=[])
        self.queue = deque(plan_file(upload.size, ingest.chunk_bytes))
        self.current = bytearray()
        self._dtype = get_dtype("U8")
        if upload.size == 0:
            self._emit()

    def _emit(self) -> None:
        plan = self.queue.popleft()
        meta = {"file": self.upload.path, "raw_length": plan.nbytes}
        raw, self.current = self.current, bytearray()
        self.ingest._submit(
            "zstd",
            self._dtype,
            raw,
            self.entry.chunks,
            [plan.byte_start, plan.byte_end],
            meta,
            f"{self.upload.path}@{plan.index}",
        )

    def feed(self, data: memoryview) -> None:
        pos = 0
        while pos < len(data):
            need = self.queue[0].nbytes - len(self.current)
            self.current += data[pos : pos + need]
            pos += need
            if len(self.current) == self.queue[0].nbytes:
                self._emit()

    def finish(self, sha256: str) -> FileEntry:
        self.entry.sha256 = sha256
        return self.entry
