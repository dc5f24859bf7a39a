"""The gRPC server: thin handlers over :mod:`mzstore.push` (ingest, upload sessions) and :class:`~mzstore.storage.Store`.

``app`` builds and runs the server (health, reflection, TLS, tokens,
graceful shutdown); ``service`` is the ``mzstore.v1.Store`` servicer and the
one domain error → gRPC status translation; ``auth`` checks tokens;
``upstream`` makes a server a read-only pull-through cache of another,
reached through a :class:`~mzstore.transport.base.Transport`.
"""

from mzstore.server.app import build_server, serve

__all__ = ["build_server", "serve"]
