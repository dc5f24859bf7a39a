"""Shard writer: encoded chunks → safetensors shards → blobs.

How it works: encoded chunks are appended to a spool file on local disk
(memory stays bounded whatever the model size). When the spool reaches the
target shard size, or at the end of the push, the shard is sealed: its
safetensors header is built — one ``U8`` entry per chunk, plus
``__metadata__ = {"format": "pt", "mzstore": <json>}`` describing every
chunk — and header + spool are copied in one pass, computing the digest on
the way, to a staged blob (on a local node: a fsynced temp file on the same
disk). :meth:`ShardWriter.publish` renames the staged shards into
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mzstore.format.manifest import Chunk
from mzstore.format.safetensors import build_header
from mzstore.storage.node import temp_prefix
from mzstore.storage.store import Staged, Store


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

    def append(self, key_hint: str, payload: bytes, chunk: Chunk, meta: dict[str, Any]) -> None:
        """Add one encoded chunk. ``chunk.blob``/``chunk.offset`` are set when its shard is sealed."""
        if self._spool is None:
            self._spool = tempfile.NamedTemporaryFile(
                prefix=temp_prefix("shard"), suffix=".spool", dir=self.spool_dir, delete=False
            )
        self._spool.write(payload)
        key = f"{len(self._entries):06d}:{key_hint}"
        self._entries.append(_Entry(key, chunk, meta, self._size, self._size + len(payload)))
        self._size += len(payload)
        if self._size >= self.shard_bytes:
            self.seal()

    def seal(self) -> None:
        """Finish the current shard, if any, and store it as a blob."""
        if self._spool is None:
            return
        spool, entries = self._spool, self._entries
        self._spool, self._entries, self._size = None, [], 0
        try:
            spool.flush()
            spool.close()
            metadata = {
                "format": "pt",
                "mzstore": json.dumps([e.meta | {"key": e.key} for e in entries], separators=(",", ":")),
            }
            header = build_header([(e.key, "U8", (e.end - e.begin,), e.begin, e.end) for e in entries], metadata)
            digest, staged = self.store.stage_blob(Path(spool.name), prefix=header)
        finally:
            os.unlink(spool.name)
        for e in entries:
            e.chunk.blob = digest
            e.chunk.offset = len(header) + e.begin
        self.stats.shards += 1
        self.stats.bytes_stored += len(header) + (entries[-1].end if entries else 0)
        self.stats.blobs.append(digest)
        self.stats.staged.append(staged)

    def publish(self) -> None:
        """Make every sealed shard visible in the store (called just before the manifest)."""
        for staged in self.stats.staged:
            self.store.publish_blob(staged)
        self.stats.staged = []

    def abort(self) -> None:
        """Drop the unsealed shard and every staged one (on a failed push)."""
        if self._spool is not None:
            self._spool.close()
            os.unlink(self._spool.name)
            self._spool = None
        self._entries = []
        for staged in self.stats.staged:
            self.store.discard_blob(staged)
        self.stats.staged = []
