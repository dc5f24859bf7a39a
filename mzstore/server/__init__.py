"""The gRPC server: thin handlers over :mod:`mzstore.push.ingest` and :class:`~mzstore.storage.Store`."""

from mzstore.server.app import build_server, serve

__all__ = ["build_server", "serve"]
