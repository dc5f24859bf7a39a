"""Placement (pure): which nodes hold a blob.

Rendezvous (highest-random-weight) hashing: every node gets the score
``sha256(node_url + "\\0" + digest)`` for a blob, and the blob lives on the R
nodes with the highest scores. Every server computes the same answer from
the node list alone (no placement table to store or agree on), the load
spreads evenly, and adding or removing a node moves only the blobs whose top
R changes: about R/(N+1) of them when going from N to N+1 nodes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def score(node_url: str, digest: str) -> int:
    """The rendezvous weight of ``node_url`` for ``digest``."""
    return int.from_bytes(hashlib.sha256(f"{node_url}\0{digest}".encode()).digest()[:8], "big")


def rank(node_urls: Sequence[str], digest: str) -> list[int]:
    """Indices of ``node_urls`` in preference order for ``digest`` (highest score first)."""
    return sorted(range(len(node_urls)), key=lambda i: (-score(node_urls[i], digest), node_urls[i]))


def place(node_urls: Sequence[str], digest: str, replicas: int) -> list[int]:
    """Indices of the ``replicas`` nodes that must hold ``digest``."""
    return rank(node_urls, digest)[: max(1, min(replicas, len(node_urls)))]


def moved_fraction(old: Sequence[str], new: Sequence[str], digests: Sequence[str], replicas: int) -> float:
    """Fraction of ``digests`` whose replica set changes from ``old`` to ``new`` nodes."""
    if not digests:
        return 0.0
    moved = 0
    for d in digests:
        before = {old[i] for i in place(old, d, replicas)}
        after = {new[i] for i in place(new, d, replicas)}
        moved += before != after
    return moved / len(digests)
