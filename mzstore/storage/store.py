"""The store: the design's layout over a storage node.

::

    blobs/sha256/<2 hex>/<hex>        immutable shards and file blobs
    manifests/sha256/<2 hex>/<hex>    immutable manifest JSON
    refs/<name>/<tag>                 "sha256:<hex>" of the manifest

Commit order is blobs → manifest → ref (:meth:`Store.commit` checks every
blob exists before writing the manifest, and the manifest before the ref),
so a reader that finds a ref always finds what it points to. Manifests are
verified against their digest on every read. Names and tags are validated
before any path is built from them.

A name may not also be a tag path of another name (``org/m:latest`` and
``org/m/latest:v1`` would need ``refs/org/m/latest`` to be both a file and a
directory); such a push is refused with :class:`~mzstore.errors.Conflict`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mzstore.errors import Conflict, FormatError, IntegrityError, NotFound
from mzstore.format.manifest import digest_of
from mzstore.format.refs import Ref, parse_ref, validate_digest, validate_name, validate_tag
from mzstore.storage.node import LocalNode, Node, open_node


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


@dataclass(frozen=True)
class RefEntry:
    name: str
    tag: str
    digest: str


class Store:
    """Blobs, manifests and refs on one node (replication comes with more nodes)."""

    def __init__(self, node: Node | str | Path) -> None:
        self.node: Node = open_node(node) if isinstance(node, (str, Path)) else node

    # -- blobs ------------------------------------------------------------
    def has_blob(self, digest: str) -> bool:
        return self.node.exists(blob_key(digest))

    def stage_blob(self, source: Path, prefix: bytes = b"") -> tuple[str, Path | None]:
        """Store ``prefix`` + content of ``source`` as a blob that becomes visible at :meth:`publish_blob`.

        On a local node the bytes are copied to a temp file on the same disk
        in one pass that also computes the digest, and publishing is a
        rename, so a push that fails leaves no blob behind. Other nodes need
        the digest first (it is the key), then get the blob at once (an
        unreferenced blob there is reclaimed by garbage collection).

        Returns:
            ``(digest, staged path)``; the path is ``None`` when there is
            nothing left to publish (already stored, or written directly).
        """

        def blocks() -> Iterator[bytes]:
            yield prefix
            with open(source, "rb") as fh:
                while block := fh.read(8 * 1024 * 1024):
                    yield block

        if isinstance(self.node, LocalNode):
            hasher = hashlib.sha256()

            def hashed() -> Iterator[bytes]:
                for block in blocks():
                    hasher.update(block)
                    yield block

            staged = self.node.stage("blob", hashed())
            digest = "sha256:" + hasher.hexdigest()
            if self.node.exists(blob_key(digest)):
                staged.unlink(missing_ok=True)
                return digest, None
            return digest, staged
        hasher = hashlib.sha256()
        for block in blocks():
            hasher.update(block)
        digest = "sha256:" + hasher.hexdigest()
        if not self.node.exists(blob_key(digest)):
            self.node.write(blob_key(digest), blocks())
        return digest, None

    def publish_blob(self, digest: str, staged: Path | None) -> None:
        """Make a staged blob visible (no-op when it was written directly)."""
        if staged is not None:
            assert isinstance(self.node, LocalNode)
            self.node.publish(staged, blob_key(digest))

    def put_blob(self, digest: str, data: bytes) -> None:
        if digest_of(data) != digest:
            raise IntegrityError(f"blob content does not match {digest}")
        key = blob_key(digest)
        if not self.node.exists(key):
            self.node.write(key, [data])

    def read_blob(self, digest: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            return self.node.read(blob_key(digest), offset, length)
        except NotFound:
            raise NotFound(f"blob {digest} not found") from None

    def blob_size(self, digest: str) -> int:
        try:
            return self.node.size(blob_key(digest))
        except NotFound:
            raise NotFound(f"blob {digest} not found") from None

    # -- manifests --------------------------------------------------------
    def put_manifest(self, data: bytes) -> str:
        digest = digest_of(data)
        key = manifest_key(digest)
        if not self.node.exists(key):
            self.node.write(key, [data])
        return digest

    def get_manifest(self, digest: str) -> bytes:
        try:
            data = self.node.read(manifest_key(digest))
        except NotFound:
            raise NotFound(f"manifest {digest} not found") from None
        if digest_of(data) != digest:
            raise IntegrityError(f"stored manifest {digest} is corrupt (its bytes hash differently)")
        return data

    # -- refs -------------------------------------------------------------
    def set_ref(self, name: str, tag: str, digest: str) -> None:
        validate_digest(digest)
        if not self.node.exists(manifest_key(digest)):
            raise NotFound(f"manifest {digest} not found; refusing to point a tag at it")
        key = ref_key(name, tag)
        if isinstance(self.node, LocalNode) and (self.node.root / key).is_dir():
            raise Conflict(f"{name}:{tag} clashes with the model name {name}/{tag}")
        self.node.write(key, [f"{digest}\n".encode("ascii")])

    def get_ref(self, name: str, tag: str) -> str:
        try:
            text = self.node.read(ref_key(name, tag))
        except NotFound:
            raise NotFound(f"{name}:{tag} not found") from None
        except Conflict:
            raise NotFound(f"{name}:{tag} not found") from None
        try:
            return validate_digest(text.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise FormatError(f"ref {name}:{tag} is corrupt") from None

    def resolve(self, ref: str | Ref) -> tuple[Ref, str]:
        """Return the parsed ref and the manifest digest it points to."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        if parsed.digest:
            if not self.node.exists(manifest_key(parsed.digest)):
                raise NotFound(f"manifest {parsed.digest} not found")
            return parsed, parsed.digest
        return parsed, self.get_ref(parsed.name, parsed.tag)

    def delete_ref(self, name: str, tag: str) -> str:
        digest = self.get_ref(name, tag)
        self.node.delete(ref_key(name, tag))
        return digest

    def list_refs(self, name: str | None = None) -> list[RefEntry]:
        prefix = f"refs/{validate_name(name)}" if name else "refs"
        out = []
        for key in self.node.walk(prefix):
            parts = key.split("/")
            if len(parts) < 3:
                continue
            ref_name, tag = "/".join(parts[1:-1]), parts[-1]
            if name and ref_name != name:
                continue
            try:
                out.append(RefEntry(ref_name, tag, self.get_ref(ref_name, tag)))
            except (NotFound, FormatError, ValueError):
                continue
        return sorted(out, key=lambda e: (e.name, e.tag))

    # -- commit -----------------------------------------------------------
    def commit(self, name: str, tag: str, manifest: bytes, blobs: Iterable[str]) -> str:
        """Write ``manifest`` and point ``name:tag`` at it, after checking every blob.

        Returns:
            The manifest digest.

        Raises:
            IntegrityError: if a referenced blob is missing (never commit a dangling ref).
        """
        for digest in blobs:
            if not self.has_blob(digest):
                raise IntegrityError(f"blob {digest} is missing; refusing to commit {name}:{tag}")
        digest = self.put_manifest(manifest)
        self.set_ref(name, tag, digest)
        return digest
