"""Configuration, read once.

One :class:`Settings` is built from the ``MZSTORE_*`` environment (and, in the
CLI, from flags layered on top). No other module reads ``os.environ``;
explicit arguments always win over what is found here.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mzstore.errors import InvalidArgument
from mzstore.limits import (
    DEFAULT_MAX_FILES,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_TENSORS,
    DEFAULT_MAX_UPLOAD_BYTES,
    MAX_HEADER_BYTES,
    MAX_MANIFEST_FILES,
    MAX_TENSORS,
)

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_ROOT = "./mzstore-data"

#: Raw bytes per chunk when a tensor is split along dim 0 (design: about 16 MiB).
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024
#: Target size of a shard blob (design: 1 GiB).
DEFAULT_SHARD_BYTES = 1024 * 1024 * 1024
#: Stored + decoded bytes of the chunks a pull holds in flight (several chunks per worker).
DEFAULT_PULL_INFLIGHT_BYTES = 256 * 1024 * 1024
#: pull: small adjacent chunks are fetched with one range read of up to this many stored +
#: decoded bytes (``MZSTORE_PULL_COALESCE``; 0 fetches every chunk alone)
DEFAULT_PULL_COALESCE_BYTES = 8 * 1024 * 1024

#: Deadlines, keepalive and concurrency (issue #6; see docs/architecture.md, "Deadlines and faults").
#: Short calls (manifest, ls, tag, rm, topology), in seconds (``MZSTORE_TIMEOUT``).
DEFAULT_TIMEOUT_S = 30.0
#: A whole push, in seconds (``MZSTORE_PUSH_TIMEOUT``): a hang guard, generous enough for 100s of GB.
DEFAULT_PUSH_TIMEOUT_S = 6 * 3600.0
#: One ranged blob read (a chunk, ≤ 16 MiB decoded) on pull, in seconds (``MZSTORE_FETCH_TIMEOUT``); retried.
DEFAULT_FETCH_TIMEOUT_S = 300.0
#: Idle seconds before a keepalive ping, client and server (``MZSTORE_KEEPALIVE``); a peer must answer in
#: :data:`KEEPALIVE_TIMEOUT_S` or the connection is dropped and its calls fail with UNAVAILABLE.
DEFAULT_KEEPALIVE_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0
#: Calls a server runs or queues at once; more get RESOURCE_EXHAUSTED (``MZSTORE_MAX_CONCURRENT_RPCS``).
DEFAULT_MAX_CONCURRENT_RPCS = 256
#: The longest any call may run on a server, whatever deadline the client sent (``MZSTORE_MAX_DEADLINE``).
DEFAULT_MAX_DEADLINE_S = 24 * 3600.0
#: Server: bytes of files kept decoded on disk for the Hugging Face and S3 faces (``MZSTORE_FILES_CACHE``).
DEFAULT_FILES_CACHE_BYTES = 16 * 1024**3


@dataclass(frozen=True)
class Limits:
    """What one push may declare; the server refuses more before storing anything.

    Attributes:
        header_bytes: safetensors JSON header (``MZSTORE_MAX_HEADER_BYTES``; the reference crate's 100 MB).
        tensors: tensors per file and per push (``MZSTORE_MAX_TENSORS``).
        files: files per push (``MZSTORE_MAX_FILES``).
        upload_bytes: sum of the declared file sizes of a push (``MZSTORE_MAX_UPLOAD_BYTES``).
    """

    header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    tensors: int = DEFAULT_MAX_TENSORS
    files: int = DEFAULT_MAX_FILES
    upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES


def default_pull_workers() -> int:
    """Parallel fetch/decode workers: one per core, 2 to 8.

    Measured on 2 cores (bench_lossless): 2 workers pull as fast as 4, and
    every extra worker costs a chunk of memory in flight.
    """
    return max(2, min(8, os.cpu_count() or 2))


def default_pull_streams() -> int:
    """Range reads a pull keeps going at once, apart from the decoders: twice the workers, 4 to 16.

    Reads wait on the network, not the CPU; measured over a 1 Gbit/s link on 2 cores
    (bench/bench_link.py), 4 reads ahead keep it busy where 2 decoding workers left it idle a fifth
    of the time.
    """
    return max(4, min(16, 2 * default_pull_workers()))


@dataclass(frozen=True)
class Settings:
    """Everything configurable, with defaults.

    Attributes:
        server: ``HOST:PORT`` the client talks to (``MZSTORE_SERVER``).
        token: bearer token sent by clients (``MZSTORE_TOKEN``), if any.
        home: ``MZSTORE_HOME``; the server's default root is ``$MZSTORE_HOME/data``.
        chunk_bytes: raw bytes per chunk on ingest.
        shard_bytes: target shard size on ingest.
        pull_workers: decoder threads on pull (``MZSTORE_PULL_WORKERS``).
        pull_streams: range reads in flight on pull, ahead of the decoders (``MZSTORE_PULL_STREAMS``).
        pull_inflight_bytes: cap on stored + decoded bytes of chunks in flight on pull.
        pull_coalesce_bytes: small adjacent chunks are fetched together, up to this many stored +
            decoded bytes per range read (``MZSTORE_PULL_COALESCE``; 0: each chunk alone).
        cache: keep verified chunks in the local cache (``MZSTORE_CACHE=0`` turns it off).
        pull_fsync: a pull into a directory fsyncs its files before moving them into place
            (``MZSTORE_PULL_FSYNC=0`` or ``pull --no-fsync`` skips it: for scratch disks, where the
            write-back of a crash-safe pull costs more than the link).
        offline: work from the local cache alone, never contacting a server (``MZSTORE_OFFLINE=1``).
        transport: where blob bytes come from (``MZSTORE_TRANSPORT``): ``auto`` (the server's HTTP plane
            when it has one, else gRPC), ``http``, ``grpc`` or ``direct`` (the storage nodes).
        blob_url: read blobs from this HTTP base URL instead of the one the server advertises
            (``MZSTORE_BLOB_URL``: a site cache, a CDN).
        blob_proxy: an HTTP forward proxy for blob range reads only (``MZSTORE_BLOB_PROXY``, e.g. a
            Dragonfly ``dfdaemon``); gRPC does not use it.
        cache_home: the cache's directory when ``home`` is not set (``$XDG_CACHE_HOME/mzstore``).
        tls_ca: PEM CA bundle the client trusts; set means the client speaks TLS (``MZSTORE_TLS_CA``).
        tls_cert: client certificate (PEM) for mutual TLS (``MZSTORE_TLS_CERT``).
        tls_key: its private key (PEM) (``MZSTORE_TLS_KEY``).
        timeout: client deadline in seconds for short calls (``MZSTORE_TIMEOUT``).
        push_timeout: client deadline in seconds for a whole push (``MZSTORE_PUSH_TIMEOUT``).
        fetch_timeout: client deadline in seconds for one blob range read on pull (``MZSTORE_FETCH_TIMEOUT``).
        keepalive_s: idle seconds between keepalive pings, client and server (``MZSTORE_KEEPALIVE``).
        max_concurrent_rpcs: server: calls at once before RESOURCE_EXHAUSTED (``MZSTORE_MAX_CONCURRENT_RPCS``).
        max_deadline_s: server: the longest a call may run, whatever the client asked (``MZSTORE_MAX_DEADLINE``).
        files_cache_bytes: server: bytes of model files the Hugging Face and S3 faces keep decoded on
            disk and send with ``sendfile`` on later reads (``MZSTORE_FILES_CACHE``; 0 decodes every read).
    """

    server: str = DEFAULT_SERVER
    token: str | None = None
    home: Path | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    shard_bytes: int = DEFAULT_SHARD_BYTES
    pull_workers: int = field(default_factory=lambda: default_pull_workers())
    pull_streams: int = field(default_factory=lambda: default_pull_streams())
    pull_inflight_bytes: int = DEFAULT_PULL_INFLIGHT_BYTES
    pull_coalesce_bytes: int = DEFAULT_PULL_COALESCE_BYTES
    cache: bool = True
    pull_fsync: bool = True
    offline: bool = False
    transport: str = "auto"
    blob_url: str | None = None
    blob_proxy: str | None = None
    cache_home: Path = field(default_factory=lambda: Path("~/.cache/mzstore").expanduser())
    limits: Limits = field(default_factory=Limits)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    timeout: float = DEFAULT_TIMEOUT_S
    push_timeout: float = DEFAULT_PUSH_TIMEOUT_S
    fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_S
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    max_deadline_s: float = DEFAULT_MAX_DEADLINE_S
    files_cache_bytes: int = DEFAULT_FILES_CACHE_BYTES

    @property
    def cache_dir(self) -> Path:
        """The client's chunk cache: ``$MZSTORE_HOME/cache``, else ``cache_home``."""
        return self.home / "cache" if self.home else self.cache_home

    @property
    def default_root(self) -> Path:
        """Where ``mzstore serve`` keeps data when no ``--root`` is given."""
        return self.home / "data" if self.home else Path(DEFAULT_ROOT)


#: The port a server address without one means (``mzstore serve``'s default).
DEFAULT_PORT = 50051


def server_address(text: str) -> str:
    """A server address as gRPC wants it: ``HOST:PORT``, port :data:`DEFAULT_PORT` when none is given.

    Accepts ``host``, ``host:port``, ``[v6]``, ``[v6]:port``, ``unix:/path``, and the URL forms
    ``grpc://`` and ``http://`` of the same (gRPC's own default for a bare host would be port 443).

    Raises:
        InvalidArgument: a path or query after the host, a port out of range, or a TLS URL
            (``https://``, ``grpcs://``: TLS is chosen with ``--tls-ca`` / ``MZSTORE_TLS_CA``).
    """
    address = text.strip()
    if address.startswith(("unix:", "unix-abstract:")):
        return address
    scheme, sep, rest = address.partition("://")
    if sep:
        if scheme.lower() in ("https", "grpcs"):
            raise InvalidArgument(
                f"server {text!r}: for TLS give HOST:PORT and a CA bundle (--tls-ca / MZSTORE_TLS_CA)"
            )
        if scheme.lower() not in ("http", "grpc"):
            raise InvalidArgument(f"server {text!r}: give HOST[:PORT] (or grpc://HOST:PORT)")
        address = rest.rstrip("/")
    if not address or "/" in address or "?" in address or "#" in address:
        raise InvalidArgument(f"server {text!r}: give HOST[:PORT], without a path")
    if address.startswith("["):  # [v6] or [v6]:port
        host, _, port = address.partition("]")
        host += "]"
        port = port.removeprefix(":")
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    elif ":" in address:  # a bare IPv6 address
        host, port = f"[{address}]", ""
    else:
        host, port = address, ""
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise InvalidArgument(f"server {text!r}: the port must be 1 to 65535")
    return f"{host}:{port or DEFAULT_PORT}"


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` (or ``unix:…``) only reaches this machine (tokens may travel there in plaintext)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _int(env: Mapping[str, str], key: str, default: int, *, allow_zero: bool = False) -> int:
    value = env.get(key)
    if value is None or value == "":
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise InvalidArgument(f"{key} must be an integer, got {value!r}") from None
    if parsed < 0 or (parsed == 0 and not allow_zero):
        raise InvalidArgument(f"{key} must be {'0 or more' if allow_zero else 'positive'}, got {value!r}")
    return parsed


def _seconds(env: Mapping[str, str], key: str, default: float) -> float:
    """A positive, finite number of seconds (``2.5`` allowed)."""
    value = env.get(key)
    if value is None or value == "":
        return default
    try:
        parsed = float(value)
    except ValueError:
        parsed = float("nan")
    if not 0 < parsed < float("inf"):
        raise InvalidArgument(f"{key} must be a positive number of seconds, got {value!r}")
    return parsed


#: Where a client's blob bytes come from (``MZSTORE_TRANSPORT``, ``--transport``).
TRANSPORTS = ("auto", "http", "grpc", "direct")


def _choice(env: Mapping[str, str], key: str, choices: tuple[str, ...], default: str) -> str:
    value = (env.get(key) or default).lower()
    if value not in choices:
        raise InvalidArgument(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _path(env: Mapping[str, str], key: str) -> Path | None:
    value = env.get(key)
    return Path(value).expanduser() if value else None


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
        pull_streams=_int(env, "MZSTORE_PULL_STREAMS", default_pull_streams()),
        pull_inflight_bytes=_int(env, "MZSTORE_PULL_INFLIGHT", DEFAULT_PULL_INFLIGHT_BYTES),
        pull_coalesce_bytes=_int(env, "MZSTORE_PULL_COALESCE", DEFAULT_PULL_COALESCE_BYTES, allow_zero=True),
        cache=(env.get("MZSTORE_CACHE") or "1").lower() not in ("0", "false", "no", "off"),
        pull_fsync=(env.get("MZSTORE_PULL_FSYNC") or "1").lower() not in ("0", "false", "no", "off"),
        offline=(env.get("MZSTORE_OFFLINE") or "0").lower() in ("1", "true", "yes", "on"),
        transport=_choice(env, "MZSTORE_TRANSPORT", TRANSPORTS, "auto"),
        blob_url=env.get("MZSTORE_BLOB_URL") or None,
        blob_proxy=env.get("MZSTORE_BLOB_PROXY") or None,
        cache_home=Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "mzstore",
        limits=load_limits(env),
        tls_ca=_path(env, "MZSTORE_TLS_CA"),
        tls_cert=_path(env, "MZSTORE_TLS_CERT"),
        tls_key=_path(env, "MZSTORE_TLS_KEY"),
        timeout=_seconds(env, "MZSTORE_TIMEOUT", DEFAULT_TIMEOUT_S),
        push_timeout=_seconds(env, "MZSTORE_PUSH_TIMEOUT", DEFAULT_PUSH_TIMEOUT_S),
        fetch_timeout=_seconds(env, "MZSTORE_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT_S),
        keepalive_s=_seconds(env, "MZSTORE_KEEPALIVE", DEFAULT_KEEPALIVE_S),
        max_concurrent_rpcs=_int(env, "MZSTORE_MAX_CONCURRENT_RPCS", DEFAULT_MAX_CONCURRENT_RPCS),
        max_deadline_s=_seconds(env, "MZSTORE_MAX_DEADLINE", DEFAULT_MAX_DEADLINE_S),
        files_cache_bytes=_int(env, "MZSTORE_FILES_CACHE", DEFAULT_FILES_CACHE_BYTES, allow_zero=True),
    )


def _at_most(env: Mapping[str, str], key: str, default: int, ceiling: int) -> int:
    """A positive integer no larger than the parsers' hard ``ceiling`` (see :mod:`mzstore.limits`)."""
    value = _int(env, key, default)
    if value > ceiling:
        raise InvalidArgument(f"{key} must be at most {ceiling} (what every client can parse), got {value}")
    return value


def load_limits(env: Mapping[str, str]) -> Limits:
    """:class:`Limits` from ``MZSTORE_MAX_*`` (positive integers, within the hard ceilings of :mod:`mzstore.limits`)."""
    return Limits(
        header_bytes=_at_most(env, "MZSTORE_MAX_HEADER_BYTES", DEFAULT_MAX_HEADER_BYTES, MAX_HEADER_BYTES),
        tensors=_at_most(env, "MZSTORE_MAX_TENSORS", DEFAULT_MAX_TENSORS, MAX_TENSORS),
        files=_at_most(env, "MZSTORE_MAX_FILES", DEFAULT_MAX_FILES, MAX_MANIFEST_FILES),
        upload_bytes=_int(env, "MZSTORE_MAX_UPLOAD_BYTES", DEFAULT_MAX_UPLOAD_BYTES),
    )
