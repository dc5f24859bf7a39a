"""Codec registry: names → codec classes, imported lazily.

A codec turns the raw bytes of one chunk (a run of rows of one tensor) into
stored bytes and back. Codecs are pure: bytes/numpy in, bytes/numpy out; no
grpc, fsspec, boto3 or torch. Every failure is a
:class:`mzstore.errors.CodecError`.

Built-ins are listed in :data:`KNOWN_CODECS` as ``"module:Class"`` and only
imported when first used (as fsspec's ``known_implementations``). Third-party
codecs register through the ``mzstore.codecs`` entry-point group.
"""

from __future__ import annotations

import importlib
import threading

from mzstore.codecs.base import Codec
from mzstore.errors import CodecError

__all__ = ["KNOWN_CODECS", "Codec", "available_codecs", "get_codec"]

#: Built-in codecs: name → (import path, install hint if it needs extras).
KNOWN_CODECS: dict[str, dict[str, str]] = {
    "lossless": {"class": "mzstore.codecs.lossless:LosslessCodec"},
    "quant": {"class": "mzstore.codecs.quant:QuantCodec"},
    "zstd": {"class": "mzstore.codecs.lossless:ZstdCodec"},
    "delta": {"class": "mzstore.codecs.delta:DeltaCodec"},
}

_cache: dict[str, Codec] = {}
_lock = threading.Lock()


def available_codecs() -> list[str]:
    """Names of built-in and entry-point codecs."""
    from importlib.metadata import entry_points  # 20 ms: only when a name is not a built-in

    names = set(KNOWN_CODECS)
    names.update(ep.name for ep in entry_points(group="mzstore.codecs"))
    return sorted(names)


def get_codec(name: str) -> Codec:
    """Return the (shared, thread-safe) codec instance called ``name``.

    Raises:
        CodecError: if no codec has that name or its import fails.
    """
    codec = _cache.get(name)
    if codec is not None:
        return codec
    with _lock:
        if name in _cache:
            return _cache[name]
        spec = KNOWN_CODECS.get(name)
        try:
            if spec is not None:
                module, _, attr = spec["class"].partition(":")
                cls = getattr(importlib.import_module(module), attr)
            else:
                from importlib.metadata import entry_points

                matches = [ep for ep in entry_points(group="mzstore.codecs") if ep.name == name]
                if not matches:
                    raise CodecError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}")
                cls = matches[0].load()
        except ImportError as exc:
            hint = (spec or {}).get("err", "")
            raise CodecError(f"codec {name!r} cannot be imported: {exc}. {hint}".strip()) from exc
        _cache[name] = codec = cls()
        return codec
