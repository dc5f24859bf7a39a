"""Admin jobs over a store's nodes: fsck (verify, repair), rebalance, gc.

They run against the storage directly, with the same node list and replica
count as the servers (``mzstore fsck --node … --replicas R``), so they need
no server and see exactly what the servers see.

* :func:`fsck` checks that every blob referenced by a manifest is intact on
  each of its R target nodes (sha256 of the whole blob) and every manifest
  on every node; with ``repair`` it rewrites missing or corrupt copies from
  an intact one and removes corrupt copies elsewhere.
* :func:`rebalance` moves blobs after nodes were added or removed: each blob
  is copied (from a verified copy) to the targets that lack it, then
  deleted from nodes that are no longer targets. Rendezvous placement means
  only the blobs whose target set changed move: about 1/(N+1) of the copies
  when going from N to N+1 nodes.
  It also reads every tag on every node and reports those whose nodes
  disagree (a node that missed a tag move or a deletion); with ``repair`` it
  gives every node the winning, highest-versioned value
  (:mod:`mzstore.storage.tags`).
* :func:`gc` deletes blobs that no manifest references and manifests that no
  ref points at (a manifest that is the ``base`` of a live one, ``push --base``,
  is live, and a delta's base chunks are among its manifest's blobs), but only when they are older than a grace period, so a push
  in flight (blobs written, manifest not yet) is never collected. Tombstones
  of deleted tags go too, once they are older than the grace period and every
  node holds the same one (a node that was away longer than the grace period
  should be checked with ``fsck --repair`` before it rejoins).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from mzstore.errors import IntegrityError, MzstoreError, NotFound
from mzstore.format.manifest import parse_manifest
from mzstore.storage import tags
from mzstore.storage.node import Node, node_has, read_stream
from mzstore.storage.store import Store, blob_key, digest_from_key, manifest_key

DEFAULT_GRACE_S = 24 * 3600


@dataclass
class Report:
    """What an admin job found and did; ``ok`` is False when data is missing or corrupt."""

    blobs: int = 0
    manifests: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    moved: int = 0
    copies: int = 0
    deleted: list[str] = field(default_factory=list)
    kept_young: int = 0
    tags: int = 0
    diverged: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.lost or self.diverged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.ok}


def _digests(node: Node, prefix: str) -> Iterator[str]:
    for key in node.walk(prefix):
        digest = digest_from_key(key)
        if digest:
            yield digest


def _intact(store: Store, node: Node, digest: str) -> bool | None:
    """True/False for intact/corrupt, None when missing."""
    try:
        store.verify_on(node, digest)
    except NotFound:
        return None
    except IntegrityError:
        return False
    return True


def live_sets(store: Store) -> tuple[set[str], set[str]]:
    """Manifests referenced by refs (and the bases of those, ``push --base``, transitively), and blobs
    referenced by any stored manifest (a delta's base chunks included)."""
    manifests: set[str] = set()
    for node in store.nodes:
        manifests.update(_digests(node, "manifests"))
    blobs: set[str] = set()
    bases: dict[str, str] = {}
    for digest in manifests:
        try:
            manifest = parse_manifest(store.get_manifest(digest))
        except MzstoreError:
            continue
        blobs.update(manifest.blobs())
        if manifest.base is not None:
            bases[digest] = manifest.base
    live = {e.digest for e in store.list_refs()}
    todo = list(live)
    while todo:  # a delta keeps its base manifest: the lineage `inspect` shows, and fsck checks
        base = bases.get(todo.pop())
        if base is not None and base not in live:
            live.add(base)
            todo.append(base)
    return live, blobs


def _tag_keys(store: Store) -> list[str]:
    """Every ``refs/<name>/<tag>`` key any reachable node holds."""
    keys: set[str] = set()
    for node in store.nodes:
        try:
            keys.update(k for k in node.walk("refs") if k.count("/") >= 2)
        except (MzstoreError, OSError):
            continue
    return sorted(keys)


def _describe(held: list[tags.Held]) -> str:
    def one(h: tags.Held) -> str:
        if h.error is not None:
            return f"{h.node.url}: unreachable"
        if h.value is None:
            return f"{h.node.url}: none"
        v = h.value.version
        return f"{h.node.url}: {h.value.digest or 'deleted'} (version {v.time_ms}.{v.counter}.{v.writer or '-'})"

    return "; ".join(one(h) for h in held)


def check_tags(store: Store, report: Report, repair: bool = False) -> None:
    """Report the tags whose nodes disagree; with ``repair``, give every node the winning value."""
    for key in _tag_keys(store):
        report.tags += 1
        held = tags.read_everywhere(store.nodes, key)
        best = tags.winner(held)
        if best is None:
            continue
        behind = tags.lagging(held, best)
        if not behind:
            continue
        label = key[len("refs/") :]
        name, tag = label.rsplit("/", 1)
        report.diverged.append(f"{name}:{tag}: {_describe(held)}")
        if repair:
            for node in behind:
                tags.offer(node, key, best)
                report.repaired.append(f"{node.url} tag {name}:{tag} → {best.digest or 'deleted'}")


def fsck(store: Store, repair: bool = False) -> Report:
    """Verify every referenced blob on its targets, every manifest, and that every node agrees on every tag;
    repair if asked."""
    report = Report()
    check_tags(store, report, repair)
    store._verified.clear()  # fsck re-reads everything
    manifests: set[str] = set()
    for node in store.nodes:
        manifests.update(_digests(node, "manifests"))
    referenced: set[str] = set()
    for digest in sorted(manifests):
        report.manifests += 1
        try:
            data = store.get_manifest(digest)  # verifies and repairs manifests across nodes
        except MzstoreError:
            report.lost.append(digest)
            continue
        for node in store.nodes:
            if not node_has(node, manifest_key(digest)):
                report.missing.append(f"{node.url} manifest {digest}")
                if repair:
                    node.write(manifest_key(digest), [data])
                    report.repaired.append(f"{node.url} manifest {digest}")
        manifest = parse_manifest(data)
        referenced.update(manifest.blobs())
        if manifest.base is not None and manifest.base not in manifests:
            # Its chunks carry their base chunks, so it still pulls; the lineage is what is gone.
            report.missing.append(f"manifest {digest}: its base manifest {manifest.base}")
    for digest in sorted(referenced):
        report.blobs += 1
        states = {node.url: _intact(store, node, digest) for node in store.nodes}
        good = [n for n in store.nodes if states[n.url]]
        if not good:
            report.lost.append(digest)
            continue
        for node in store.targets(digest):
            state = states[node.url]
            if state:
                continue
            (report.missing if state is None else report.corrupt).append(f"{node.url} {digest}")
            if repair:
                node.write(blob_key(digest), read_stream(good[0], blob_key(digest)))
                report.repaired.append(f"{node.url} {digest}")
        if repair:
            for node in store.nodes:
                if states[node.url] is False and node not in store.targets(digest):
                    node.delete(blob_key(digest))
                    report.repaired.append(f"{node.url} {digest} (corrupt stray copy deleted)")
    return report


def rebalance(store: Store) -> Report:
    """Put every blob on exactly its target nodes (manifests and refs on every node); count the copies moved."""
    report = Report()
    manifests: set[str] = set()
    for node in store.nodes:
        manifests.update(_digests(node, "manifests"))
    for digest in sorted(manifests):
        report.manifests += 1
        data = store.get_manifest(digest)
        for node in store.nodes:
            if not node_has(node, manifest_key(digest)):
                node.write(manifest_key(digest), [data])
    for key in _tag_keys(store):  # tags (and tombstones) as they are, with their versions
        held = tags.read_everywhere(store.nodes, key)
        best = tags.winner(held)
        if best is not None:
            tags.write_everywhere(store.nodes, key, best)
    holders: dict[str, list[Node]] = {}
    for node in store.nodes:
        for digest in _digests(node, "blobs"):
            holders.setdefault(digest, []).append(node)
    for digest, nodes in sorted(holders.items()):
        report.blobs += 1
        targets = store.targets(digest)
        report.copies += len(targets)
        source = next((n for n in nodes if _intact(store, n, digest)), None)
        if source is None:
            report.lost.append(digest)
            continue
        for node in targets:
            if node not in nodes:
                node.write(blob_key(digest), read_stream(source, blob_key(digest)))
                report.moved += 1
        for node in nodes:
            if node not in targets:
                node.delete(blob_key(digest))
    return report


def gc(store: Store, grace_s: float = DEFAULT_GRACE_S, now: float | None = None) -> Report:
    """Delete unreferenced manifests and blobs older than ``grace_s``."""
    report = Report()
    now = time.time() if now is None else now
    tagged, _ = live_sets(store)
    report.manifests = _sweep(store, "manifests", manifest_key, tagged, grace_s, now, report, "manifest ")
    _, live_blobs = live_sets(store)  # after the sweep: blobs of deleted manifests are no longer live
    report.blobs = _sweep(store, "blobs", blob_key, live_blobs, grace_s, now, report, "")
    _sweep_tombstones(store, grace_s, now, report)
    return report


def _sweep_tombstones(store: Store, grace_s: float, now: float, report: Report) -> None:
    """Delete the tombstones of tags deleted more than ``grace_s`` ago that every node agrees on.

    A tag on which a node is unreachable, or holds anything else, keeps its tombstone: removing it
    there could let the other value come back.
    """
    for key in _tag_keys(store):
        held = tags.read_everywhere(store.nodes, key)
        best = tags.winner(held)
        if best is None or not best.deleted or not all(h.answered for h in held):
            continue
        if any(h.value is not None and h.value != best for h in held):
            continue
        if now - best.version.time_ms / 1000 < grace_s:
            report.kept_young += 1
            continue
        for h in held:
            if h.value is not None:
                try:
                    h.node.delete(key)
                except NotFound:
                    pass
                report.deleted.append(f"{h.node.url} tombstone {key[len('refs/') :]}")


def _sweep(
    store: Store,
    prefix: str,
    key_of: Callable[[str], str],
    live: set[str],
    grace_s: float,
    now: float,
    report: Report,
    label: str,
) -> int:
    """Delete the objects under ``prefix`` that are not ``live`` and older than ``grace_s``; return how many were seen."""
    seen = 0
    for node in store.nodes:
        for digest in list(_digests(node, prefix)):
            seen += 1
            if digest in live:
                continue
            if now - node.mtime(key_of(digest)) < grace_s:
                report.kept_young += 1
                continue
            node.delete(key_of(digest))
            report.deleted.append(f"{node.url} {label}{digest}")
    return seen
