"""Files the store already holds: a re-push sends only what is new (as Docker and ORAS skip known layers).

How it works: the client sends each file's sha256 in the push's first
message (it hashes the files before uploading; a cache keyed by path, size
and mtime spares a rehash of unchanged files). The server keeps a small
index on its nodes, ``index/files/<2 hex>/<key>`` → the digest of the last
manifest that stored that file, where the key (:func:`file_key`) is the
sha256 of everything that decides how a file is stored: its bytes' sha256,
its kind, and — for safetensors files — the codec policy, the ``--keep``
patterns and the chunk size. When an upload session starts, every file
whose key is in the index, and whose entries in that manifest still have
all their blobs, is *known*: the session marks it ended, the client sends
none of its bytes, and the ingest copies its entries (the file and its
tensors, with their chunks, hashes and fidelity) into the new manifest
under the new path. An identical re-push thus stores nothing new and gets
the same manifest digest; a fine-tune that changed one file sends that file.

Nothing is trusted blindly: a known file's blobs are checked to exist when
the session starts and again by the commit; the chunks are verified like any
other on every pull. A stale index entry (its manifest or blobs collected by
``gc``) is just not a match.

A first push need not hash everything before it sends a byte: the server
also keeps ``index/sizes/<size>`` for every file it indexed, and the client
asks (``FindFileSizes``) which of its files' sizes the store holds. Only
those files (and those whose hash it remembers) are hashed first; the
others can be no known file, and their sha256 is computed as they are sent
and checked by the ingest as always. A fine-tune of a model in the store has
the base's sizes and is hashed first, as before; a new model starts sending
at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading

from mzstore.errors import MzstoreError
from mzstore.format.manifest import FileEntry, Manifest, TensorEntry, parse_manifest
from mzstore.push.protocol import UploadBegin, UploadFile, UploadKnown
from mzstore.storage.store import SIZES_COMPLETE, Store, blob_key

log = logging.getLogger("mzstore.push")
_BACKFILL = threading.Lock()

#: Bumped when the way files are stored changes, so older index entries stop matching.
STORAGE_VERSION = 1


def stored_size(store: Store, digest: str) -> int:
    """The size of a stored blob, from the first node that says (no read of its bytes); 0 if none can."""
    for node in store.preference(digest):
        try:
            return node.size(blob_key(digest))
        except (MzstoreError, OSError):
            continue
    return 0


def reused_bytes(store: Store, ranges: dict[str, set[tuple[int, int]]]) -> int:
    """What reused chunks add to a model's stored size: ``ranges`` maps each reused blob to its used ranges.

    A blob the model uses all of (an identical re-push) counts whole, its shard header included, so
    the manifest equals the first push's; a blob it uses part of (a config file reused from a shard of
    another model) counts only the chunks it reads — never the other model's weights.
    """
    total = 0
    for digest, used in ranges.items():
        size = stored_size(store, digest)
        payload = size - 8 - _header_len(store, digest)
        referenced = sum(length for _, length in used)
        total += size if size and referenced >= payload else referenced
    return total


def _header_len(store: Store, digest: str) -> int:
    """The length of a shard's safetensors header (its first 8 bytes), from the first node that answers."""
    for node in store.preference(digest):
        try:
            return int.from_bytes(node.read(blob_key(digest), 0, 8), "little")
        except (MzstoreError, OSError):
            continue
    return 0


def file_key(upload: UploadFile, policy: str, keep: tuple[str, ...], chunk_bytes: int) -> str:
    """The index key of a file: its sha256 and everything that decides how it is stored."""
    if upload.kind == "safetensors":
        how = [policy, sorted(keep), chunk_bytes]
    else:  # plain files are zstd chunks whatever the policy
        how = ["", [], chunk_bytes]
    text = json.dumps([STORAGE_VERSION, upload.sha256, upload.size, upload.kind, how], separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _entries(manifest: Manifest, upload: UploadFile) -> tuple[FileEntry, list[TensorEntry]] | None:
    """The entries of the file with ``upload``'s sha256, size and kind in ``manifest``."""
    for f in manifest.files:
        if f.sha256 == upload.sha256 and f.size == upload.size and f.kind == upload.kind:
            return f, manifest.tensors_of(f.path)
    return None


def _blobs(entry: FileEntry, tensors: list[TensorEntry]) -> set[str]:
    return {c.blob for c in entry.chunks} | {c.blob for t in tensors for c in t.chunks}


class KnownFiles:
    """Which files of a push the store already holds, and their entries (one per push, on the server)."""

    def __init__(self, store: Store, chunk_bytes: int) -> None:
        self.store = store
        self.chunk_bytes = chunk_bytes
        self._manifests: dict[str, Manifest | None] = {}

    def _manifest(self, digest: str) -> Manifest | None:
        if digest not in self._manifests:
            try:
                self._manifests[digest] = parse_manifest(self.store.get_manifest(digest))
            except (MzstoreError, OSError):
                self._manifests[digest] = None
        return self._manifests[digest]

    def find(self, begin: UploadBegin) -> dict[int, str]:
        """File index → the manifest digest holding it, for every file of ``begin`` the store can reuse."""
        found: dict[int, str] = {}
        for i, upload in enumerate(begin.files):
            if not upload.sha256:
                continue
            try:
                digest = self.store.indexed_file(file_key(upload, begin.storage_policy, begin.keep, self.chunk_bytes))
            except MzstoreError:
                continue
            manifest = self._manifest(digest) if digest else None
            entries = _entries(manifest, upload) if manifest is not None else None
            if digest is None or entries is None:
                continue
            if all(self.store.has_blob(b) for b in _blobs(*entries)):
                found[i] = digest
        return found

    def entries(self, upload: UploadFile, known: UploadKnown) -> tuple[FileEntry, list[TensorEntry], set[str]]:
        """The stored entries of a known file, renamed to ``upload.path``, and the blobs they use.

        Raises:
            MzstoreError: the manifest or the file in it is gone (the push fails; rerunning it uploads the file).
        """
        manifest = self._manifest(known.manifest)
        entries = _entries(manifest, upload) if manifest is not None else None
        if entries is None:
            raise MzstoreError(f"{upload.path}: the stored copy the server offered is gone; push again")
        entry, tensors = entries
        renamed = dataclasses.replace(entry, path=upload.path)
        moved = [dataclasses.replace(t, file=upload.path) for t in tensors]
        return renamed, moved, _blobs(entry, tensors)

    def remember(self, begin: UploadBegin, files: list[FileEntry], digest: str) -> None:
        """Index every file of a committed push under the manifest ``digest``, and its size (best effort)."""
        first = not self._sizes_complete()  # nothing indexed yet: this push's sizes start a complete index
        for upload, entry in zip(begin.files, files, strict=True):
            if entry.sha256:
                key = file_key(
                    dataclasses.replace(upload, sha256=entry.sha256), begin.storage_policy, begin.keep, self.chunk_bytes
                )
                self.store.index_file(key, digest)
                self.store.index_size(entry.size)
        if first:
            self._mark_sizes_complete()

    def held_sizes(self, sizes: list[int]) -> list[bool]:
        """Per size, whether the store may hold a file of it: only such files are worth hashing before a push.

        The size index is written beside the file index, and marked complete by a store's first
        indexed push. A store indexed before the size index existed gets it here, once, from the
        manifests its file index names.
        """
        self._sizes_complete()
        return [self.store.indexed_size(n) for n in sizes]

    def _sizes_complete(self) -> bool:
        """Whether the size index names every indexed file's size, filling it once from the manifests the
        file index names where that index predates it; ``False`` only while nothing is indexed at all."""
        if self.store.node.exists(SIZES_COMPLETE):
            return True
        with _BACKFILL:
            return self.store.node.exists(SIZES_COMPLETE) or self._backfill_sizes()

    def _backfill_sizes(self) -> bool:
        digests = set(self.store.file_index_digests())
        if not digests:
            return False  # nothing indexed yet (an empty store): nothing to fill, and nothing is written
        sizes: set[int] = set()
        for digest in digests:
            manifest = self._manifest(digest)
            if manifest is not None:
                sizes.update(f.size for f in manifest.files)
        for n in sorted(sizes):
            self.store.index_size(n)
        self._mark_sizes_complete()
        return True

    def _mark_sizes_complete(self) -> None:
        for node in self.store.nodes:
            try:
                node.write(SIZES_COMPLETE, [b""])
            except (MzstoreError, OSError) as exc:
                log.warning("could not mark the size index complete on %s: %s", node.url, exc)
