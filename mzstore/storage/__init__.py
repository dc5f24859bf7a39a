"""Storage: nodes (where bytes live) and the store layout over them.

``node`` wraps one fsspec URL (``file:///data/a``, ``s3://bucket/p``) with
the few operations mzstore needs, writing durably on local disks
(:mod:`mzstore.durable`: temp name → fsync → rename). ``store`` maps blobs,
manifests and refs onto the design's layout and enforces the commit order:
blobs, then manifest, then ref. ``placement`` (pure) ranks nodes per blob;
``admin`` is fsck, rebalance and gc.
"""

from mzstore.storage.node import LocalNode, Node, open_node
from mzstore.storage.store import Store

__all__ = ["LocalNode", "Node", "Store", "open_node"]
