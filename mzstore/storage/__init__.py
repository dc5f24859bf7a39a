"""Storage: nodes (where bytes live) and the store layout over them.

``node`` wraps one fsspec URL (``file:///data/a``, later ``s3://bucket/p``)
with the few operations mzstore needs, writing durably (temp name → fsync →
rename on local disks). ``store`` maps blobs, manifests and refs onto the
design's layout and enforces the commit order: blobs, then manifest, then ref.
"""

from mzstore.storage.node import LocalNode, Node, open_node
from mzstore.storage.store import Store

__all__ = ["LocalNode", "Node", "Store", "open_node"]
