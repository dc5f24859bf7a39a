"""The store: the design's layout, placed and replicated over storage nodes.

::

    blobs/sha256/<2 hex>/<hex>        immutable shards and file blobs
    manifests/sha256/<2 hex>/<hex>    immutable manifest JSON
    refs/<name>/<tag>                 {"digest": "sha256:<hex>" | null, "version": [...]}

How it works:

* **Blobs** go to the R nodes that rendezvous hashing ranks first for their
  digest (:mod:`mzstore.storage.placement`). A push succeeds only when every
  blob reached all R of its nodes; a write that fails on any of them fails
  the push (never acknowledge less).
* **Manifests and refs** go to every node; the write fails unless every node
  took it. Reads use the first node that has a manifest with the right
  digest. A tag is a small replicated register (:mod:`mzstore.storage.tags`):
  each write carries a version, a node keeps the higher one, reads take the
  highest over the reachable nodes and repair the others, and deleting a
  tag leaves a versioned tombstone. So concurrent tag moves converge on
  every node, and losing a node cannot roll a tag back.
* **Reads verify.** Before serving bytes of a blob from a node, the server
  checks the whole blob's sha256 on that node once (blobs are immutable, so
  the answer is cached per process). A missing, corrupt or unreachable copy
  makes the read fail over to the next node in preference order; the copies
  found missing or corrupt are then repaired from the good one, in a
  background thread (one repair per blob at a time), so the read is served
  at once rather than after a whole-blob copy: a 1 GiB copy to a slow node
  could otherwise outlast the client's deadline. When no
  intact copy is left the read fails with a data-loss error, never with
  wrong bytes.
* **Commit order** is blobs → manifest → ref (:meth:`Store.commit` checks
  every blob before the manifest and the manifest before the ref), so a
  reader that finds a ref finds what it points to. Names and tags are
  validated before any path is built from them.

A name may not also be a tag path of another name (``org/m:latest`` and
``org/m/latest:v1`` would need ``refs/org/m/latest`` to be both a file and a
directory); such a push is refused with :class:`~mzstore.errors.Conflict`.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mzstore.errors import Conflict, FormatError, IntegrityError, InvalidArgument, MzstoreError, NotFound, Unavailable
from mzstore.format.manifest import digest_of, parse_manifest
from mzstore.format.refs import Ref, RefValue, parse_ref, validate_digest, validate_name, validate_tag
from mzstore.storage import placement, tags
from mzstore.storage.node import LocalNode, Node, node_has, open_node, read_stream

log = logging.getLogger("mzstore.storage")
BLOCK = 8 * 1024 * 1024


def _hex(digest: str) -> str:
    return validate_digest(digest).split(":", 1)[1]


def blob_key(digest: str) -> str:
    h = _hex(digest)
    return f"blobs/sha256/{h[:2]}/{h}"


def manifest_key(digest: str) -> str:
    h = _hex(digest)
    return f"manifests/sha256/{h[:2]}/{h}"


def ref_key(name: str, tag: str) -> str:
    return f"refs/{validate_name(name)}/{validate_tag(tag)}"


_HEX64 = re.compile(r"[0-9a-f]{64}")


def file_index_key(key: str) -> str:
    """Where the file index entry ``key`` (64 hex digits, see :mod:`mzstore.push.reuse`) lives."""
    if not _HEX64.fullmatch(key):
        raise InvalidArgument("a file index key is 64 lowercase hex digits")
    return f"index/files/{key[:2]}/{key}"


#: The size index (:meth:`Store.index_size`) names every file size the file index holds once this exists.
SIZES_COMPLETE = "index/sizes/complete"


def size_index_key(size: int) -> str:
    """Where the size index entry of a ``size``-byte file lives."""
    if size < 0:
        raise InvalidArgument("a file size is not negative")
    return f"index/sizes/{size}"


def digest_from_key(key: str) -> str | None:
    """``sha256:<hex>`` for a ``blobs/…`` or ``manifests/…`` key, else ``None``."""
    parts = key.split("/")
    if len(parts) == 4 and parts[1] == "sha256" and len(parts[3]) == 64 and parts[2] == parts[3][:2]:
        return f"sha256:{parts[3]}"
    return None


@dataclass(frozen=True)
class RefEntry:
    """A tag, the manifest it points at, that model's sizes, and when the tag was last written."""

    name: str
    tag: str
    digest: str
    bytes_raw: int = 0
    bytes_stored: int = 0
    updated: float = 0.0


@dataclass
class Staged:
    """A blob written to its nodes but not yet visible on the local ones (see :meth:`Store.publish_blob`)."""

    digest: str
    pending: list[tuple[LocalNode, Path]] = field(default_factory=list)


class Store:
    """Blobs, manifests and refs over one or more nodes, blobs on ``replicas`` of them.

    Args:
        nodes: one node, URL or path, or a list of them.
        replicas: copies of every blob (at most the number of nodes).
    """

    def __init__(self, nodes: Node | str | Path | Sequence[Node | str | Path], replicas: int = 1) -> None:
        items: list[Node | str | Path] = list(nodes) if isinstance(nodes, (list, tuple)) else [nodes]  # type: ignore[list-item]
        if not items:
            raise InvalidArgument("a store needs at least one node")
        self.nodes: list[Node] = [open_node(n) if isinstance(n, (str, Path)) else n for n in items]
        urls = [n.url for n in self.nodes]
        if len(set(urls)) != len(urls):
            raise InvalidArgument("the same node is listed twice")
        if not 1 <= replicas <= len(self.nodes):
            raise InvalidArgument(f"--replicas {replicas} needs between 1 and {len(self.nodes)} nodes")
        self.replicas = replicas
        self._verified: set[tuple[str, str]] = set()
        self._verifying: dict[tuple[str, str], Future[None]] = {}  # (node url, digest) → its check in flight
        self._lock = threading.Lock()
        self._repairs: dict[str, Future[None]] = {}  # digest → its repair in flight
        self._repair_pool: ThreadPoolExecutor | None = None
        self._sizes: dict[str, tuple[int, int]] = {}  # manifest digest → (bytes_raw, bytes_stored)
        #: Versions of this process's tag writes (mzstore.storage.tags).
        self.clock = tags.HybridClock()
        #: Events a server exports as metrics: copies repaired, copies found corrupt (and, for a
        #: pull-through cache, blobs served from its nodes or fetched upstream).
        self.counts: Counter[str] = Counter()

    @property
    def node(self) -> Node:
        """The first node (the only one in the embedded default)."""
        return self.nodes[0]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    # -- placement ----------------------------------------------------------
    def targets(self, digest: str) -> list[Node]:
        """The nodes that must hold ``digest``."""
        return [self.nodes[i] for i in placement.place(self.urls, digest, self.replicas)]

    def preference(self, digest: str) -> list[Node]:
        """Every node, in the order reads try them for ``digest``."""
        return [self.nodes[i] for i in placement.rank(self.urls, digest)]

    # -- blobs ----------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        """True when every target node holds the blob (what a commit requires)."""
        key = blob_key(digest)
        return all(node_has(n, key) for n in self.targets(digest))

    def local_stage_dir(self) -> Path | None:
        """The temp directory of the only node when it is a local one (where :meth:`adopt_blob` takes files)."""
        only = self.nodes[0]
        return only.tempdir() if len(self.nodes) == 1 and isinstance(only, LocalNode) else None

    def adopt_blob(self, path: Path) -> tuple[str, Staged]:
        """A complete, fsynced blob file in :meth:`local_stage_dir` becomes a staged blob, its digest read here.

        The file is moved into ``blobs/`` by :meth:`publish_blob`; one the node holds already is removed.
        """
        with open(path, "rb", buffering=0) as fh:
            digest = "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()
        only = self.nodes[0]
        assert isinstance(only, LocalNode), "adopt_blob takes files from local_stage_dir()"
        if only.exists(blob_key(digest)):
            path.unlink(missing_ok=True)
            return digest, Staged(digest)
        return digest, Staged(digest, [(only, path)])

    def stage_blob(self, source: Path, prefix: bytes = b"", skip: int = 0) -> tuple[str, Staged]:
        """Store ``prefix`` + content of ``source`` (from byte ``skip`` on) on the blob's target nodes.

        Local nodes get a fsynced temp file on their own disk, made visible
        by :meth:`publish_blob` (a rename), so a failed push leaves no blob
        there; other nodes get the blob at once (an unreferenced blob there
        is reclaimed by garbage collection). With a single local node the
        copy and the digest are computed in one pass.

        Raises:
            MzstoreError: if any target node cannot take the blob.
        """

        def blocks() -> Iterator[bytes]:
            yield prefix
            with open(source, "rb") as fh:
                fh.seek(skip)
                while block := fh.read(BLOCK):
                    yield block

        only = self.nodes[0]
        if len(self.nodes) == 1 and isinstance(only, LocalNode):
            hasher = hashlib.sha256()

            def hashed() -> Iterator[bytes]:
                for block in blocks():
                    hasher.update(block)
                    yield block

            path = only.stage("blob", hashed())
            digest = "sha256:" + hasher.hexdigest()
            if only.exists(blob_key(digest)):
                path.unlink(missing_ok=True)
                return digest, Staged(digest)
            return digest, Staged(digest, [(only, path)])
        hasher = hashlib.sha256()
        for block in blocks():
            hasher.update(block)
        digest = "sha256:" + hasher.hexdigest()
        staged = Staged(digest)
        key = blob_key(digest)
        try:
            for node in self.targets(digest):
                if node_has(node, key):
                    continue
                if isinstance(node, LocalNode):
                    staged.pending.append((node, node.stage(key, blocks())))
                else:
                    node.write(key, blocks())
        except BaseException:
            self.discard_blob(staged)
            raise
        return digest, staged

    def publish_blob(self, staged: Staged) -> None:
        """Make a staged blob visible on its local nodes."""
        while staged.pending:
            node, path = staged.pending.pop()
            node.publish(path, blob_key(staged.digest))

    def discard_blob(self, staged: Staged) -> None:
        """Drop what a failed push staged (local temp files)."""
        while staged.pending:
            _, path = staged.pending.pop()
            path.unlink(missing_ok=True)

    def verify_on(self, node: Node, digest: str) -> None:
        """Check the whole blob's sha256 on ``node`` once per process.

        Reads that arrive while the check runs wait for it instead of hashing the
        blob again: a client pulling with 8 streams would otherwise make a fresh
        server hash a 1 GB shard 8 times before its first byte.

        Raises:
            NotFound, Unavailable, IntegrityError.
        """
        item = (node.url, digest)
        with self._lock:
            if item in self._verified:
                return
            running = self._verifying.get(item)
            if running is None:
                mine: Future[None] = Future()
                self._verifying[item] = mine
        if running is not None:
            running.result()  # the first reader's outcome: returns, or raises its error
            return
        try:
            self._hash_check(node, digest)
        except BaseException as exc:
            mine.set_exception(exc)
            raise
        else:
            mine.set_result(None)
        finally:
            with self._lock:
                del self._verifying[item]

    def _hash_check(self, node: Node, digest: str) -> None:
        key = blob_key(digest)
        size = node.size(key)
        hasher = hashlib.sha256()
        offset = 0
        while offset < size:
            block = node.read(key, offset, min(BLOCK, size - offset))
            if not block:
                break
            hasher.update(block)
            offset += len(block)
        if offset != size or "sha256:" + hasher.hexdigest() != digest:
            raise IntegrityError(f"blob {digest} on {node.url} is corrupt")
        with self._lock:
            self._verified.add((node.url, digest))

    def _good_node(self, digest: str) -> Node:
        """The first node (in preference order) holding an intact copy; repairs the targets it passed."""
        problems: list[tuple[Node, str]] = []
        for node in self.preference(digest):
            try:
                self.verify_on(node, digest)
            except NotFound:
                problems.append((node, "missing"))
                continue
            except IntegrityError:
                problems.append((node, "corrupt"))
                self.counts["corrupt"] += 1
                continue
            except (Unavailable, MzstoreError, OSError) as exc:
                problems.append((node, f"unreachable ({type(exc).__name__})"))
                continue
            broken = [n for n, why in problems if not why.startswith("unreachable")]
            if broken:
                self._repair_later(digest, node, broken)
            return node
        detail = "; ".join(f"{n.url}: {why}" for n, why in problems)
        if all(why.startswith("unreachable") for _, why in problems):
            raise Unavailable(f"no node holding blob {digest} is reachable ({detail})")
        raise IntegrityError(f"data loss: no intact copy of blob {digest} is left ({detail})")

    def _repair_later(self, digest: str, source: Node, broken: list[Node]) -> None:
        """Queue :meth:`_repair` on the background thread, unless this blob's repair is already queued."""
        self._queue_repair(digest, self._repair, digest, source, broken)

    def _queue_repair(self, job: str, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the repair thread, unless a repair named ``job`` is queued or running."""
        with self._lock:
            if job in self._repairs:
                return
            if self._repair_pool is None:
                self._repair_pool = ThreadPoolExecutor(1, thread_name_prefix="mzstore-repair")
            future = self._repair_pool.submit(fn, *args)
            self._repairs[job] = future
        future.add_done_callback(lambda _: self._repair_done(job, future))

    def _repair_done(self, job: str, future: Future[None]) -> None:
        with self._lock:
            if self._repairs.get(job) is future:
                del self._repairs[job]

    def wait_repairs(self, timeout: float | None = None) -> bool:
        """Wait for the repairs reads have queued; ``False`` if some are still running after ``timeout``."""
        with self._lock:
            pending = list(self._repairs.values())
        return not wait(pending, timeout=timeout).not_done

    def _repair(self, digest: str, source: Node, broken: list[Node]) -> None:
        """Rewrite missing or corrupt copies on target nodes from an intact one."""
        targets = {n.url for n in self.targets(digest)}
        key = blob_key(digest)
        for node in broken:
            with self._lock:
                self._verified.discard((node.url, digest))
            try:
                if node.url not in targets:
                    if node_has(node, key):
                        node.delete(key)  # a corrupt stray copy: drop it
                    continue
                node.write(key, read_stream(source, key))
                self.counts["repaired"] += 1
                log.warning("repaired blob %s on %s from %s", digest, node.url, source.url)
            except (MzstoreError, OSError) as exc:
                log.warning("could not repair blob %s on %s: %s", digest, node.url, exc)

    def read_blob(self, digest: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read from the first intact copy (failing over and repairing as needed)."""
        node = self._good_node(digest)
        try:
            return node.read(blob_key(digest), offset, length)
        except (NotFound, Unavailable):
            with self._lock:
                self._verified.discard((node.url, digest))
            return self._good_node(digest).read(blob_key(digest), offset, length)

    def blob_location(self, digest: str) -> tuple[Node, str]:
        """The node holding an intact copy of the blob (checked against its digest) and its key there.

        For servers that send the bytes themselves (the HTTP plane's ``sendfile``) or point at them
        (a presigned URL): failover and repair happen as for :meth:`read_blob`.
        """
        key = blob_key(digest)
        if not any(node_has(n, key) for n in self.nodes):
            raise NotFound(f"blob {digest} not found")
        return self._good_node(digest), key

    def blob_size(self, digest: str) -> int:
        """Size of the blob's first intact copy (a blob gone from every node is a data-loss error)."""
        return self._good_node(digest).size(blob_key(digest))

    # -- manifests -----------------------------------------------------------
    def put_manifest(self, data: bytes) -> str:
        """Write a manifest to every node (all must take it)."""
        digest = digest_of(data)
        key = manifest_key(digest)
        for node in self.nodes:
            if not node_has(node, key):
                node.write(key, [data])
        return digest

    def get_manifest(self, digest: str) -> bytes:
        """The manifest from the first node with an intact copy; repairs the others."""
        key = manifest_key(digest)
        broken: list[Node] = []
        errors: list[str] = []
        for node in self.nodes:
            try:
                data = node.read(key)
            except NotFound:
                broken.append(node)
                continue
            except (MzstoreError, OSError) as exc:
                errors.append(f"{node.url}: {exc}")
                continue
            if digest_of(data) != digest:
                broken.append(node)
                errors.append(f"{node.url}: corrupt")
                continue
            for other in broken:
                try:
                    other.write(key, [data])
                except (MzstoreError, OSError):
                    pass
            return data
        if any("corrupt" in e for e in errors):
            raise IntegrityError(f"data loss: no intact copy of manifest {digest} ({'; '.join(errors)})")
        if errors and not broken:
            raise Unavailable(f"manifest {digest}: no node reachable ({'; '.join(errors)})")
        raise NotFound(f"manifest {digest} not found")

    def has_manifest(self, digest: str) -> bool:
        return any(node_has(n, manifest_key(digest)) for n in self.nodes)

    # -- refs (a replicated register: mzstore.storage.tags) ------------------------
    def set_ref(self, name: str, tag: str, digest: str) -> RefValue:
        """Point ``name:tag`` at a manifest on every node (all must take it, or hold a newer write).

        The write's version is above every version of the tag any node holds now, so it supersedes
        every write acknowledged before it began. Returns the value written.
        """
        validate_digest(digest)
        if not self.has_manifest(digest):
            raise NotFound(f"manifest {digest} not found; refusing to point a tag at it")
        key = ref_key(name, tag)
        for node in self.nodes:
            if isinstance(node, LocalNode) and (node.root / key).is_dir():
                raise Conflict(f"{name}:{tag} clashes with the model name {name}/{tag}")
        return self._write_ref(key, digest)

    def _write_ref(self, key: str, digest: str | None) -> RefValue:
        for held in tags.read_everywhere(self.nodes, key):
            if held.value is not None:
                self.clock.observe(held.value.version)
        value = RefValue(digest, self.clock.tick())
        tags.write_everywhere(self.nodes, key, value)
        return value

    def ref_value(self, name: str, tag: str) -> RefValue:
        """The winning value of ``name:tag`` over the reachable nodes (a tombstone for a deleted tag).

        Nodes that hold an older value, or none, are repaired in the background.

        Raises:
            NotFound: no node holds the tag; Unavailable: no node answered.
        """
        key = ref_key(name, tag)
        held = tags.read_everywhere(self.nodes, key)
        best = tags.winner(held)
        if best is None:
            if not any(h.answered for h in held):
                raise Unavailable(f"{name}:{tag}: no storage node is reachable")
            raise NotFound(f"{name}:{tag} not found")
        self.clock.observe(best.version)
        behind = tags.lagging(held, best)
        if behind:
            self._repair_ref_later(key, best, behind)
        return best

    def get_ref(self, name: str, tag: str) -> str:
        """The manifest digest ``name:tag`` points at: the highest-versioned value over the reachable nodes."""
        value = self.ref_value(name, tag)
        if value.digest is None:
            raise NotFound(f"{name}:{tag} not found")
        return value.digest

    def _repair_ref_later(self, key: str, best: RefValue, behind: list[Node]) -> None:
        """Offer the winning value to the nodes behind, on the repair thread (one repair per tag at a time)."""
        self._queue_repair(f"ref:{key}", self._repair_ref, key, best, behind)

    def _repair_ref(self, key: str, best: RefValue, behind: list[Node]) -> None:
        for node in behind:
            try:
                if tags.offer(node, key, best):
                    self.counts["ref_repaired"] += 1
                    log.info("repaired %s on %s", key, node.url)
            except (MzstoreError, OSError) as exc:
                log.warning("could not repair %s on %s: %s", key, node.url, exc)

    # -- file index (re-pushes send only new files; mzstore.push.reuse) -----------
    def index_file(self, key: str, digest: str) -> None:
        """Remember that the manifest ``digest`` stores the file ``key`` (on every node; best effort).

        The index is a hint: a failed write costs a later push a re-upload, never correctness.
        """
        validate_digest(digest)
        path = file_index_key(key)
        for node in self.nodes:
            try:
                node.write(path, [f"{digest}\n".encode("ascii")])
            except (MzstoreError, OSError) as exc:
                log.warning("could not index a file on %s: %s", node.url, exc)

    def index_size(self, size: int) -> None:
        """Remember that the store holds a file of ``size`` bytes (on every node; best effort, as the file index)."""
        for node in self.nodes:
            try:
                node.write(size_index_key(size), [b""])
            except (MzstoreError, OSError) as exc:
                log.warning("could not index a file size on %s: %s", node.url, exc)

    def indexed_size(self, size: int) -> bool:
        """Whether a node's size index says the store holds a file of ``size`` bytes."""
        key = size_index_key(size)
        for node in self.nodes:
            try:
                if node.exists(key):
                    return True
            except (MzstoreError, OSError):
                continue
        return False

    def file_index_digests(self) -> Iterator[str]:
        """The manifest digests the file index names (the first node that can list it)."""
        for node in self.nodes:
            try:
                keys = list(node.walk("index/files/"))
            except (MzstoreError, OSError):
                continue
            for key in keys:
                try:
                    yield validate_digest(node.read(key).decode("ascii").strip())
                except (MzstoreError, OSError, UnicodeDecodeError, ValueError):
                    continue
            return

    def indexed_file(self, key: str) -> str | None:
        """The manifest digest the file index gives for ``key`` (the first node that answers), or ``None``."""
        path = file_index_key(key)
        for node in self.nodes:
            try:
                return validate_digest(node.read(path).decode("ascii").strip())
            except (MzstoreError, OSError, UnicodeDecodeError, ValueError):
                continue
        return None

    def resolve(self, ref: str | Ref) -> tuple[Ref, str]:
        """Return the parsed ref and the manifest digest it points to."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.digest:
            if not self.has_manifest(parsed.digest):
                raise NotFound(f"manifest {parsed.digest} not found")
            return parsed, parsed.digest
        return parsed, self.get_ref(parsed.name, parsed.tag)

    def delete_ref(self, name: str, tag: str) -> str:
        """Delete ``name:tag``: a versioned tombstone on every node, so a node that missed it cannot bring
        the tag back (``gc`` removes tombstones after its grace period). Returns the digest it pointed at."""
        digest = self.get_ref(name, tag)
        self._write_ref(ref_key(name, tag), None)
        return digest

    def list_refs(self, name: str | None = None) -> list[RefEntry]:
        prefix = f"refs/{validate_name(name)}" if name else "refs"
        seen: set[tuple[str, str]] = set()
        failures: list[str] = []
        for node in self.nodes:
            try:
                keys = list(node.walk(prefix))
            except (MzstoreError, OSError) as exc:  # an unreachable node: list what the others hold
                failures.append(f"{node.url}: {exc}")
                continue
            for key in keys:
                parts = key.split("/")
                if len(parts) < 3:
                    continue
                ref_name, tag = "/".join(parts[1:-1]), parts[-1]
                if not name or ref_name == name:
                    seen.add((ref_name, tag))
        if len(failures) == len(self.nodes):
            raise Unavailable(f"no storage node is reachable ({'; '.join(failures)})")
        out = []
        for ref_name, tag in sorted(seen):
            try:
                digest = self.get_ref(ref_name, tag)
            except (NotFound, FormatError, ValueError):
                continue
            raw, stored = self._model_sizes(digest)
            out.append(RefEntry(ref_name, tag, digest, raw, stored, self.written(ref_key(ref_name, tag))))
        return out

    def _model_sizes(self, digest: str) -> tuple[int, int]:
        """``(bytes_raw, bytes_stored)`` of a manifest (remembered: manifests never change); zeros if unreadable."""
        with self._lock:
            known = self._sizes.get(digest)
        if known is not None:
            return known
        try:
            manifest = parse_manifest(self.get_manifest(digest))
        except (MzstoreError, OSError):
            return 0, 0
        sizes = (manifest.bytes_raw, manifest.stored_total)
        with self._lock:
            self._sizes[digest] = sizes
        return sizes

    def written(self, key: str) -> float:
        """When ``key`` was last written on any node holding it (POSIX seconds; 0 if no node can say)."""
        times = []
        for node in self.nodes:
            try:
                times.append(node.mtime(key))
            except (MzstoreError, OSError):
                continue
        return max(times, default=0.0)

    # -- commit -----------------------------------------------------------------
    def commit(self, name: str, tag: str, manifest: bytes, blobs: Iterable[str]) -> str:
        """Write ``manifest`` and point ``name:tag`` at it, after checking every blob on every target.

        Returns:
            The manifest digest.

        Raises:
            IntegrityError: if a referenced blob is missing somewhere (never commit a dangling ref).
        """
        for digest in blobs:
            if not self.has_blob(digest):
                raise IntegrityError(f"blob {digest} is missing on a target node; refusing to commit {name}:{tag}")
        digest = self.put_manifest(manifest)
        self.set_ref(name, tag, digest)
        return digest
