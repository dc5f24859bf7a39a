"""The client's local chunk cache: content-addressed, shared by concurrent processes.

Why chunks: a chunk is the unit the pull pipeline fetches and verifies, and
its identity does not depend on which shard or version holds it. Keying the
cache by what a chunk *is* (codec, codec parameters, sha256 and length of
the decoded bytes, stored length) rather than where it lives gives three
things from one mechanism:

* a repeat pull moves no chunk bytes;
* a pull of a new version moves only the chunks that changed (a fine-tune
  that touched two tensors fetches those two tensors' chunks);
* an interrupted pull (killed process, dropped connection) resumes: every
  chunk verified before the interruption is already here.

What is stored is the chunk's *stored* (compressed) bytes, so the cache
costs the compressed size, not the model size. Entries are never trusted:
a cached payload goes through the same decode + hash check as fetched
bytes, and one that fails is evicted and fetched again.

Layout under ``root`` (``$MZSTORE_HOME/cache``, else ``~/.cache/mzstore``)::

    chunks/ab/abcdef…          stored bytes of one chunk, named by its key
    manifests/<hex>.json       manifests seen, by digest (checked on read)
    manifests/<hex>.ref        last ref and server that resolved to it
    tmp/                       writes in progress (renamed into place)

Writes: :meth:`ChunkCache.put` returns at once; one thread writes the
entries behind the pull (:mod:`mzstore.behind`, at most 64 MiB queued) and
around the page cache (``O_DIRECT``, :class:`~mzstore.durable.DirectAppender`):
an entry is read back only by a later pull, usually after the page cache
has let it go, and filling the cache was most of a cold pull's extra cost
(on the 2-core test VM, a cold 1 GB ``load_state_dict`` with the cache on
took 1.8-2.3 s and 2.7 CPU-s with buffered writes on the workers, 0.9-1.0 s
and 1.5 CPU-s now). A pull waits for its entries before it returns
(:meth:`ChunkCache.flush`); a killed one loses the queued few, which a
rerun fetches.

Concurrency: every entry is written to ``tmp/`` and renamed into place
(atomic on POSIX), so readers see a whole entry or none; two processes
writing the same key write the same bytes. A reader that loses an entry to
``prune`` mid-pull simply misses and fetches it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mzstore.behind import Behind
from mzstore.durable import write_file
from mzstore.errors import IntegrityError
from mzstore.format.manifest import Chunk, Manifest, digest_of, parse_manifest

log = logging.getLogger("mzstore.cache")

#: Temp files older than this are leftovers of dead processes.
STALE_TMP_SECONDS = 3600.0


def chunk_key(chunk: Chunk) -> str:
    """The content key of a chunk: what its stored bytes decode to, and how."""
    ident = json.dumps(
        [
            chunk.codec,
            chunk.params,
            chunk.decoded_hash if chunk.blake3 else chunk.sha256,
            chunk.raw_length,
            chunk.length,
        ],
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()


@dataclass
class CachedModel:
    """A manifest in the cache and how much of it is present."""

    ref: str
    server: str
    digest: str
    bytes_raw: int
    chunks: int
    chunks_present: int
    bytes_stored: int
    bytes_present: int
    last_used: float


@dataclass
class CacheReport:
    """What ``verify`` or ``prune`` did."""

    checked: int = 0
    removed: list[str] = field(default_factory=list)
    bytes_removed: int = 0
    problems: list[str] = field(default_factory=list)


class ChunkCache:
    """Content-addressed store of verified chunk payloads and manifests."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.chunks = self.root / "chunks"
        self.manifests = self.root / "manifests"
        self.tmp = self.root / "tmp"
        self._lock = threading.Lock()
        self._behind: Behind[tuple[Path, bytes | bytearray | memoryview]] | None = None

    # -- chunks ---------------------------------------------------------
    def path(self, chunk: Chunk) -> Path:
        key = chunk_key(chunk)
        return self.chunks / key[:2] / key

    def get(self, chunk: Chunk) -> bytes | None:
        """The cached stored bytes of ``chunk``, or ``None``. The caller verifies them."""
        path = self.path(chunk)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.warning("cache entry %s unreadable: %s", path, exc)
            return None
        if len(data) != chunk.length:
            self.evict(chunk)
            return None
        try:
            os.utime(path)  # last use, for LRU pruning
        except OSError:
            pass
        return data

    def put(self, chunk: Chunk, payload: bytes | bytearray | memoryview) -> None:
        """Keep a verified payload. Best effort: a full or read-only disk only logs a warning."""
        path = self.path(chunk)
        if path.exists():
            return
        with self._lock:  # written behind the pull (see the module docstring)
            if self._behind is None:
                self._behind = Behind(self._write_chunk, "mzstore-cache-io")
            try:
                self._behind.put((path, payload), len(payload))
            except Exception as exc:  # noqa: BLE001 - an earlier write failed in an unexpected way
                log.warning("could not cache a chunk in %s: %s", self.root, exc)
                self._behind.close()
                self._behind = None

    def _write_chunk(self, item: tuple[Path, bytes | bytearray | memoryview]) -> None:
        path, payload = item
        try:
            self._write(path, payload, direct=True)
        except OSError as exc:
            log.warning("could not cache a chunk in %s: %s", self.root, exc)

    def flush(self) -> None:
        """Wait for the chunks :meth:`put` is still writing (a pull calls it before it returns)."""
        with self._lock:
            if self._behind is not None:
                self._behind.close()
                self._behind = None

    def evict(self, chunk: Chunk) -> None:
        self.path(chunk).unlink(missing_ok=True)

    def _write(self, path: Path, data: bytes | bytearray | memoryview, direct: bool = False) -> None:
        # Atomic, not flushed: every entry is checked when read, and a lost one is fetched again.
        write_file(path, data, durable=False, tmp_dir=self.tmp, direct=direct)

    # -- manifests --------------------------------------------------------
    def put_manifest(self, ref: str, server: str, digest: str, data: bytes) -> None:
        hexd = digest.split(":", 1)[-1]
        path = self.manifests / f"{hexd}.json"
        try:
            if not path.exists():
                self._write(path, data)
            self._write(self.manifests / f"{hexd}.ref", json.dumps({"ref": ref, "server": server}).encode())
        except OSError as exc:
            log.warning("could not cache the manifest of %s: %s", ref, exc)

    def cached_tag(self, ref: str, server: str) -> str | None:
        """The digest ``ref`` (``name:tag``) last resolved to on ``server``, as this cache remembers it, or ``None``."""
        found: tuple[float, str] | None = None
        for path in self.manifests.glob("*.ref") if self.manifests.exists() else []:
            try:
                info = json.loads(path.read_text())
                when = path.stat().st_mtime
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and info.get("ref") == ref and info.get("server") == server:
                if found is None or when > found[0]:
                    found = (when, "sha256:" + path.stem)
        return found[1] if found else None

    def get_manifest(self, digest: str) -> Manifest | None:
        """A cached manifest by digest (checked against it), or ``None``."""
        path = self.manifests / f"{digest.split(':', 1)[-1]}.json"
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if digest_of(data) != digest:
            path.unlink(missing_ok=True)
            return None
        return parse_manifest(data)

    def _manifests(self) -> list[tuple[str, Manifest, dict[str, str], float]]:
        out = []
        for path in sorted(self.manifests.glob("*.json")):
            digest = "sha256:" + path.stem
            manifest = self.get_manifest(digest)
            if manifest is None:
                continue
            try:
                info = json.loads((path.with_suffix(".ref")).read_text())
                used = path.with_suffix(".ref").stat().st_mtime
            except (OSError, ValueError):
                info, used = {}, path.stat().st_mtime
            out.append((digest, manifest, info, used))
        return out

    # -- inspection and upkeep ----------------------------------------------
    def ls(self) -> list[CachedModel]:
        """Every cached manifest with how many of its chunks are here."""
        out = []
        for digest, manifest, info, used in self._manifests():
            chunks = manifest.chunks()
            present = [c for c in chunks if self.path(c).exists()]
            out.append(
                CachedModel(
                    ref=info.get("ref", "?"),
                    server=info.get("server", "?"),
                    digest=digest,
                    bytes_raw=manifest.bytes_raw,
                    chunks=len(chunks),
                    chunks_present=len(present),
                    bytes_stored=sum(c.length for c in chunks),
                    bytes_present=sum(c.length for c in present),
                    last_used=used,
                )
            )
        return out

    def size(self) -> int:
        """Bytes of chunk payloads held."""
        return sum(p.stat().st_size for p in self.chunks.glob("*/*") if p.is_file())

    @staticmethod
    def _cached_only(blob: str, offset: int, length: int) -> bytes:
        """The fetch of :meth:`verify`: a delta's base is checked from the cache only."""
        raise IntegrityError(f"the base chunk at {blob[:19]}… +{offset} is not cached")

    def verify(self) -> CacheReport:
        """Decode and check every chunk a cached manifest names; remove the bad ones."""
        import numpy as np

        from mzstore.pull.pipeline import base_reader, decode_verified
        from mzstore.pull.plan import plan_pull

        report = CacheReport()
        seen: set[str] = set()
        for _, manifest, info, _ in self._manifests():
            for task in plan_pull(manifest):
                path = self.path(task.chunk)
                if path.name in seen or not path.exists():
                    continue
                bases = task.chunk.chain()[1:]
                if any(not self.path(b).exists() for b in bases):
                    continue  # a delta whose base is not cached: nothing to check it against here
                seen.add(path.name)
                report.checked += 1
                try:
                    payload = path.read_bytes()
                    out = np.empty(task.chunk.raw_length, dtype=np.uint8)
                    base_of = base_reader(self._cached_only, task.dtype, task.tensor or task.file, cache=self)
                    decode_verified(task.chunk, task.dtype, task.tensor or task.file, payload, out, base_of)
                except (IntegrityError, OSError) as exc:
                    report.problems.append(f"{path.name[:16]} ({info.get('ref', '?')}): {exc}")
                    report.bytes_removed += path.stat().st_size if path.exists() else 0
                    path.unlink(missing_ok=True)
                    report.removed.append(path.name)
        return report

    def prune(
        self,
        *,
        max_bytes: int | None = None,
        older_than: float | None = None,
        everything: bool = False,
        dry_run: bool = False,
    ) -> CacheReport:
        """Free space.

        Always removes stale temp files and chunks no cached manifest names.
        ``older_than`` (seconds) removes manifests and chunks unused for that
        long; ``max_bytes`` then drops least recently used chunks until the
        chunk payloads fit; ``everything`` empties the cache. With ``dry_run``
        nothing is removed: the report says what would be.
        """
        report = CacheReport()
        now = time.time()

        def unlink(path: Path) -> None:
            if not dry_run:
                path.unlink(missing_ok=True)

        for tmp in self.tmp.glob("*") if self.tmp.exists() else []:
            try:
                if everything or now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                    unlink(tmp)
            except OSError:
                pass
        kept_manifests = []
        for digest, manifest, _, used in self._manifests():
            if everything or (older_than is not None and now - used > older_than):
                hexd = digest.split(":", 1)[-1]
                for suffix in (".json", ".ref"):
                    unlink(self.manifests / f"{hexd}{suffix}")
                report.removed.append(digest)
            else:
                kept_manifests.append(manifest)
        wanted = {chunk_key(c) for m in kept_manifests for c in m.chunks()}
        entries = []
        for path in self.chunks.glob("*/*") if self.chunks.exists() else []:
            try:
                st = path.stat()
            except OSError:
                continue
            report.checked += 1
            stale = older_than is not None and now - st.st_mtime > older_than
            if everything or path.name not in wanted or stale:
                unlink(path)
                report.removed.append(path.name)
                report.bytes_removed += st.st_size
            else:
                entries.append((st.st_mtime, st.st_size, path))
        if max_bytes is not None:
            total = sum(size for _, size, _ in entries)
            for _, size, path in sorted(entries):  # least recently used first
                if total <= max_bytes:
                    break
                unlink(path)
                report.removed.append(path.name)
                report.bytes_removed += size
                total -= size
        return report
