"""mzstore: a compressed, sharded model store.

Public API::

    import mzstore
    mzstore.push("./ckpt", "org/model:v1", codec="int8")
    sd = mzstore.load_state_dict("org/model:v1", device="cuda:0")
    with mzstore.Client("127.0.0.1:50051") as client:
        client.pull("org/model:v1", "./model")

Where things are (see docs/architecture.md): ``mzstore.push`` (source →
upload → ingest → shards), ``mzstore.pull`` (manifest → plan → fetch →
decode → verify → sink), ``mzstore.transport`` (gRPC, direct node reads),
``mzstore.codecs`` and ``mzstore.format`` (pure), ``mzstore.storage`` (nodes
and layout), ``mzstore.server`` (the gRPC service), ``mzstore.client`` and
``mzstore.api`` (the Python client), ``mzstore.cli``.

The top level is lazy (names resolve on first use, as in huggingface_hub), so
``import mzstore`` and ``mzstore --version`` load no grpc, numpy or torch.
``mzstore.pull`` and ``mzstore.push`` are the functions of :mod:`mzstore.api`;
the subpackages of the same names are imported first, so importing one of
their modules later never replaces the function.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mzstore.pull as _pull_package  # noqa: F401  (docstring-only packages: see above)
import mzstore.push as _push_package  # noqa: F401
from mzstore.api import load_into, load_state_dict, pull, push
from mzstore.errors import MzstoreError

if TYPE_CHECKING:
    from mzstore.client import Client, PullInfo, PushInfo

__version__ = "0.1.0"

_LAZY = {"Client": "mzstore.client", "PullInfo": "mzstore.client", "PushInfo": "mzstore.client"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mzstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


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
