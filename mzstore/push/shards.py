"""Shard writer: encoded chunks → safetensors shards → blobs.

How it works: encoded chunks are appended to a spool file on local disk
(memory stays bounded whatever the model size). When the spool reaches the
target shard size, or at the end of the push, the shard is sealed: its
safetensors header is built — one ``U8`` entry per chunk, plus
``__metadata__ = {"format": "pt", "mzstore": <json>}`` describing every
chunk — and header + spool are copied in one pass, computing the digest on
the way, to a staged blob (on a local node: a fsynced temp file on the same
disk). A large push to a store whose only node is a local disk skips that
copy: its spool is written in the node's temp directory behind a header
region reserved up front (:data:`HEADER_RESERVE`), the header is written
into it at sealing (padded with spaces, which the format allows), and the
spool itself becomes the staged blob, hashed as it is read back from the
page cache. Such a spool is written by a thread of its own, up to
:data:`WRITE_AHEAD` bytes behind the ingest, and flushed to the disk in
the background as it grows (:class:`~mzstore.durable.Flusher`); at sealing,
its hash and its final fsync run side by side, off the receiving thread.
:meth:`ShardWriter.publish` renames the staged shards into
``blobs/`` just before the manifest is written, so a failed push leaves no
blob behind. The chunk records handed out by :meth:`append` are filled in
with their blob digest and absolute offset at sealing; that is what the
manifest stores. Any safetensors reader can open a shard and list its
entries; mzstore readers use the manifest offsets and need no header parse.
"""

from __future__ import annotations

import json
import os
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mzstore.behind import Behind
from mzstore.durable import Flusher, write_pieces
from mzstore.format.manifest import Chunk
from mzstore.format.safetensors import build_header
from mzstore.storage.node import temp_prefix
from mzstore.storage.store import Staged, Store

#: Pushes of at least this many raw bytes write each shard once (see above); smaller ones keep exact,
#: unpadded headers (a reserved header region would be a visible share of a small model).
DIRECT_MIN_BYTES = 256 * 1024 * 1024
#: The header region of a shard written once: 256 KiB, about 0.03 % of a 1 GB shard. A shard is sealed
#: early when its header could outgrow it (several hundred chunks).
HEADER_RESERVE = 256 * 1024
#: What the header of a shard costs besides its entries (the metadata keys and braces).
_HEADER_BASE = 256
#: Encoded bytes the ingest may hand a shard's writer thread before it waits for the disk.
WRITE_AHEAD = 64 * 1024 * 1024
#: A shard written once is hashed after its header, so only once it is sealed, and the last shard's hash
#: is the push's tail (0.4 s for a 700 MB shard, with one core idle). So a push written once seals its
#: shard early, once the raw bytes still to come are at most the shard's stored bytes (and the shard
#: holds at least this much): that hash runs while the rest arrives, and the last shard is small. The
#: next shard is cut the same way, and so on while shards stay above this size, on two hash threads.
#: A 1 GB bf16 push: the time after its last byte went from 0.6 to 0.2 s with one cut at half the
#: shard (``bench/bench_push_modes.py``). That hash, sharing the cores with the ingest, still ran 0.2 s
#: past the last byte; cut at the whole shard and again after it, the tail is the last shard's few
#: tens of MB.
TAIL_MIN_BYTES = 64 * 1024 * 1024


@dataclass
class _Entry:
    key: str
    chunk: Chunk
    meta: dict[str, Any]
    begin: int
    end: int


@dataclass
class ShardStats:
    shards: int = 0
    bytes_stored: int = 0
    blobs: list[str] = field(default_factory=list)
    staged: list[Staged] = field(default_factory=list)


class ShardWriter:
    """Packs encoded chunks into shards of about ``shard_bytes`` and stores them."""

    def __init__(self, store: Store, shard_bytes: int, spool_dir: Path | None = None) -> None:
        self.store = store
        self.shard_bytes = shard_bytes
        self.spool_dir = spool_dir
        self.stats = ShardStats()
        self._entries: list[_Entry] = []
        self._spool: Any = None
        self._size = 0
        self._direct: Path | None = None  # see expect()
        # Shards written once are hashed on a thread of their own while the next one fills: (the hash,
        # the final fsync, the shard's entries, its header length, its file), settled in order before publishing.
        self._hashing: list[tuple[Future[tuple[str, Staged]], Future[None], list[_Entry], int, Path]] = []
        self._hasher: ThreadPoolExecutor | None = None
        # ... and written by another, at most WRITE_AHEAD bytes behind the ingest.
        self._io: Behind[tuple[Any, bytes]] = Behind(self._write, "mzstore-shard-io", WRITE_AHEAD)
        self._flusher = Flusher()
        self._reserve = 0
        self._header_bound = _HEADER_BASE
        self._raw_left: int | None = None  # raw bytes still to come, until the early cut (see TAIL_MIN_BYTES)

    def expect(self, raw_bytes: int) -> None:
        """Say how many raw bytes the push holds (before the first :meth:`append`): a large push to a
        store whose only node is a local disk writes each shard once, and cuts a small last shard."""
        if self._spool is None and not self.stats.shards:
            self._direct = self.store.local_stage_dir() if raw_bytes >= DIRECT_MIN_BYTES else None
            self._reserve = HEADER_RESERVE if self._direct is not None else 0
            self._raw_left = raw_bytes if self._direct is not None else None

    def append(self, key_hint: str, payload: bytes, chunk: Chunk, meta: dict[str, Any]) -> None:
        """Add one encoded chunk. ``chunk.blob``/``chunk.offset`` are set when its shard is sealed."""
        key = f"{len(self._entries):06d}:{key_hint}"
        if self._reserve:
            # An upper bound of what the entry adds to the header: its JSON entry, and its metadata
            # record, whose quotes are escaped inside the metadata string (at most doubling it).
            cost = 2 * len(json.dumps(meta | {"key": key}, separators=(",", ":"))) + 2 * len(key) + 96
            if self._entries and self._header_bound + cost > self._reserve:
                self.seal()
                key = f"{len(self._entries):06d}:{key_hint}"
            self._header_bound += cost
        if self._spool is None:
            self._spool = tempfile.NamedTemporaryFile(
                prefix=temp_prefix("shard"),
                suffix=".spool",
                dir=self._direct if self._direct is not None else self.spool_dir,
                delete=False,
            )
            self._spool.seek(self._reserve)  # the header goes in front, at sealing
        if self._direct is not None:
            self._io.put((self._spool, payload), len(payload))
        else:
            write_pieces(self._spool, payload)
        self._entries.append(_Entry(key, chunk, meta, self._size, self._size + len(payload)))
        self._size += len(payload)
        tail = False
        if self._raw_left is not None:  # cut again at each such point: the shards shrink towards the end
            self._raw_left -= chunk.raw_length
            tail = self._raw_left <= self._size and self._size >= TAIL_MIN_BYTES
        if self._size >= self.shard_bytes or tail:
            self.seal()

    def _write(self, item: tuple[Any, bytes]) -> None:
        """On the writer thread: one payload into its shard's file."""
        spool, payload = item
        write_pieces(spool, payload)
        self._flusher.wrote(spool.fileno(), len(payload))

    def _sync_close(self, spool: Any) -> None:
        """On the writer thread: the shard's last bytes onto the disk (most are already), then close it."""
        try:
            self._flusher.wait()
            spool.flush()
            os.fsync(spool.fileno())
        finally:
            spool.close()

    def seal(self) -> None:
        """Finish the current shard, if any, and store it as a blob."""
        if self._spool is None:
            return
        self._io.wait()  # every payload of this shard is in its file
        spool, entries = self._spool, self._entries
        self._spool, self._entries, self._size, self._header_bound = None, [], 0, _HEADER_BASE
        adopted = False
        try:
            metadata = {
                "format": "pt",
                "mzstore": json.dumps([e.meta | {"key": e.key} for e in entries], separators=(",", ":")),
            }
            layout: list[tuple[str, str, tuple[int, ...], int, int]] = [
                (e.key, "U8", (e.end - e.begin,), e.begin, e.end) for e in entries
            ]
            if self._reserve:
                header = build_header(layout, metadata, size=self._reserve)
                if len(header) == self._reserve:  # written into its place: this file is the blob
                    spool.flush()
                    os.pwrite(spool.fileno(), header, 0)
                    if self._hasher is None:
                        self._hasher = ThreadPoolExecutor(2, thread_name_prefix="mzstore-shard-hash")
                    path = Path(spool.name)
                    # The hash reads the page cache while the writer thread syncs: both before publishing.
                    hashed = self._hasher.submit(self.store.adopt_blob, path)
                    synced = self._io.call(lambda: self._sync_close(spool))
                    self._hashing.append((hashed, synced, entries, len(header), path))
                    adopted = True
                    self.stats.shards += 1
                    self.stats.bytes_stored += len(header) + (entries[-1].end if entries else 0)
                    return
                else:  # cannot happen with the bound in append; copied as a small push's shard is
                    spool.close()
                    header = build_header(layout, metadata)
                    digest, staged = self.store.stage_blob(Path(spool.name), prefix=header, skip=self._reserve)
            else:
                spool.flush()
                spool.close()
                header = build_header(layout, metadata)
                digest, staged = self.store.stage_blob(Path(spool.name), prefix=header)
        finally:
            if not adopted:
                try:
                    spool.close()
                finally:
                    os.unlink(spool.name)
        for e in entries:
            e.chunk.blob = digest
            e.chunk.offset = len(header) + e.begin
        self.stats.shards += 1
        self.stats.bytes_stored += len(header) + (entries[-1].end if entries else 0)
        self.stats.blobs.append(digest)
        self.stats.staged.append(staged)

    def settle(self) -> None:
        """Wait for the shards still being hashed: their chunks get their blob digest and offset."""
        while self._hashing:
            future, synced, entries, header_len, _ = self._hashing[0]
            digest, staged = future.result()  # on failure the rest stay listed, for abort()
            synced.result()
            self._hashing.pop(0)
            for e in entries:
                e.chunk.blob = digest
                e.chunk.offset = header_len + e.begin
            self.stats.blobs.append(digest)
            self.stats.staged.append(staged)
        self._shutdown()

    def _shutdown(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None
        self._io.close()

    def publish(self) -> None:
        """Make every sealed shard visible in the store (called just before the manifest)."""
        self.settle()
        for staged in self.stats.staged:
            self.store.publish_blob(staged)
        self.stats.staged = []

    def abort(self) -> None:
        """Drop the unsealed shard and every staged one (on a failed push)."""
        self._io.close()  # the writer thread is done with the spool before it is closed
        if self._spool is not None:
            try:
                self._spool.close()  # flushes what it buffered: fails again on a full disk
            except OSError:
                pass
            finally:
                os.unlink(self._spool.name)
            self._spool = None
        self._entries = []
        hashing, self._hashing = self._hashing, []
        for future, synced, _, _, path in hashing:
            try:
                synced.result()
            except Exception:  # noqa: BLE001 - the file goes either way
                pass
            try:
                self.stats.staged.append(future.result()[1])
            except Exception:  # noqa: BLE001 - a shard that could not be hashed: its file goes
                path.unlink(missing_ok=True)
        for staged in self.stats.staged:
            self.store.discard_blob(staged)
        self.stats.staged = []
        self._flusher.drain()
        self._shutdown()
