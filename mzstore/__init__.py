"""mzstore: a compressed, sharded model store.

Public API::

    from mzstore import Client, load_state_dict
    Client("127.0.0.1:50051").push("./ckpt", "org/model:v1")
    sd = load_state_dict("org/model:v1", device="cpu")

Architecture (see docs/architecture.md): ``mzstore.push`` (source → upload →
ingest → shards), ``mzstore.pull`` (manifest → plan → fetch/decode/verify →
sink), ``mzstore.codecs`` and ``mzstore.format`` (pure), ``mzstore.storage``
(nodes and layout), ``mzstore.server`` and ``mzstore.client`` (gRPC glue),
``mzstore.cli``.
"""

from mzstore.client import Client, PullInfo, PushInfo, load_into, load_state_dict, pull, push
from mzstore.errors import MzstoreError

__version__ = "0.1.0"
__all__ = [
    "Client",
    "MzstoreError",
    "PullInfo",
    "PushInfo",
    "__version__",
    "load_into",
    "load_state_dict",
    "pull",
    "push",
]
