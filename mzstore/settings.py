"""Configuration, read once.

One :class:`Settings` is built from the ``MZSTORE_*`` environment (and, in the
CLI, from flags layered on top). No other module reads ``os.environ``;
explicit arguments always win over what is found here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_ROOT = "./mzstore-data"

#: Raw bytes per chunk when a tensor is split along dim 0 (design: about 16 MiB).
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
#: Target size of a shard blob (design: 1 GiB).
DEFAULT_SHARD_BYTES = 1024 * 1024 * 1024
#: Stored + decoded bytes of the chunks a pull holds in flight (several chunks per worker).
DEFAULT_PULL_INFLIGHT_BYTES = 256 * 1024 * 1024
#: Payload bytes per gRPC message for uploads and blob reads (about 1 MiB).
TRANSFER_BYTES = 1024 * 1024
#: gRPC message cap; payloads are ~1 MiB so 8 MiB leaves room for headers.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


def default_pull_workers() -> int:
    """Parallel fetch/decode workers: one per core, 2 to 8.

    Measured on 2 cores (bench_lossless): 2 workers pull as fast as 4, and
    every extra worker costs a chunk of memory in flight.
    """
    return max(2, min(8, os.cpu_count() or 2))


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with defaults.

    Attributes:
        server: ``HOST:PORT`` the client talks to (``MZSTORE_SERVER``).
        token: bearer token sent by clients (``MZSTORE_TOKEN``), if any.
        home: ``MZSTORE_HOME``; the server's default root is ``$MZSTORE_HOME/data``.
        chunk_bytes: raw bytes per chunk on ingest.
        shard_bytes: target shard size on ingest.
        pull_workers: parallel range reads / decoders on pull.
        pull_inflight_bytes: cap on stored + decoded bytes of chunks in flight on pull.
        cache: keep verified chunks in the local cache (``MZSTORE_CACHE=0`` turns it off).
        cache_home: the cache's directory when ``home`` is not set (``$XDG_CACHE_HOME/mzstore``).
    """

    server: str = DEFAULT_SERVER
    token: str | None = None
    home: Path | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    shard_bytes: int = DEFAULT_SHARD_BYTES
    pull_workers: int = field(default_factory=lambda: default_pull_workers())
    pull_inflight_bytes: int = DEFAULT_PULL_INFLIGHT_BYTES
    cache: bool = True
    cache_home: Path = field(default_factory=lambda: Path("~/.cache/mzstore").expanduser())

    @property
    def cache_dir(self) -> Path:
        """The client's chunk cache: ``$MZSTORE_HOME/cache``, else ``cache_home``."""
        return self.home / "cache" if self.home else self.cache_home

    @property
    def default_root(self) -> Path:
        """Where ``mzstore serve`` keeps data when no ``--root`` is given."""
        return self.home / "data" if self.home else Path(DEFAULT_ROOT)


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    value = env.get(key)
    if value is None or value == "":
        return default
    try:
        parsed = int(value)
    except ValueError:
        from mzstore.errors import InvalidArgument

        raise InvalidArgument(f"{key} must be an integer, got {value!r}") from None
    if parsed <= 0:
        from mzstore.errors import InvalidArgument

        raise InvalidArgument(f"{key} must be positive, got {value!r}")
    return parsed


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from an environment mapping (default ``os.environ``)."""
    env = os.environ if env is None else env
    home = env.get("MZSTORE_HOME")
    return Settings(
        server=env.get("MZSTORE_SERVER") or DEFAULT_SERVER,
        token=env.get("MZSTORE_TOKEN") or None,
        home=Path(home).expanduser() if home else None,
        chunk_bytes=_int(env, "MZSTORE_CHUNK_BYTES", DEFAULT_CHUNK_BYTES),
        shard_bytes=_int(env, "MZSTORE_SHARD_BYTES", DEFAULT_SHARD_BYTES),
        pull_workers=_int(env, "MZSTORE_PULL_WORKERS", default_pull_workers()),
        pull_inflight_bytes=_int(env, "MZSTORE_PULL_INFLIGHT", DEFAULT_PULL_INFLIGHT_BYTES),
        cache=(env.get("MZSTORE_CACHE") or "1").lower() not in ("0", "false", "no", "off"),
        cache_home=Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mzstore",
    )
