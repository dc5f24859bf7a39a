"""A fleet behind a site cache: real nginx caching the HTTP plane's blob ranges (issue 14).

nginx runs as a caching reverse proxy in front of the server's HTTP plane
(``proxy_cache`` with the ``slice`` module, so range requests are cached in
1 MiB slices), and clients are pointed at it with ``MZSTORE_BLOB_URL``. The
second client's pull must take no blob byte from the origin; a cache entry
corrupted on nginx's disk must be caught by the client's chunk verification
and read again from the origin, never returned.

nginx comes from Debian's package (``.ci/run`` installs it). Without it these
tests skip with a loud reason; with ``MZSTORE_REQUIRE_NGINX=1`` (set by CI)
the skip is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.server import metrics
from mzstore.server.app import RunningServer, build_server
from mzstore.settings import Settings

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _need_nginx() -> str:
    if NGINX is None:
        if os.environ.get("MZSTORE_REQUIRE_NGINX") == "1":
            pytest.fail("nginx is required here (MZSTORE_REQUIRE_NGINX=1) but not installed: apt-get install nginx")
        pytest.skip("NGINX IS NOT INSTALLED: the site-cache tests did not run (apt-get install nginx; CI installs it)")
    return NGINX


CONFIG = """
user root;
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    proxy_cache_path {tmp}/cache levels=1:2 keys_zone=blobs:10m max_size=2g inactive=1d use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location /blobs/ {{
            slice 1m;
            proxy_cache blobs;
            proxy_cache_key $uri$slice_range;
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 1y;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://127.0.0.1:{origin};
        }}
    }}
}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[RunningServer]:
    running = build_server(tmp_path / "store", "127.0.0.1:0", Settings(chunk_bytes=256 * 1024), http="127.0.0.1:0")
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def site_cache(origin: RunningServer, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """nginx caching the origin's HTTP plane; yields its URL and its cache directory."""
    binary = _need_nginx()
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    port = _free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(CONFIG.format(tmp=prefix, port=port, origin=origin.http.port))  # type: ignore[union-attr]
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(prefix)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert proc.poll() is None, f"nginx did not start: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, "nginx did not start listening"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", prefix / "cache"
    proc.terminate()
    proc.wait(timeout=20)


def _model(path: Path) -> Path:
    """About 6 MB of weights in several shards, so blobs span several 1 MiB slices."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(2)
    save_file({f"w{i}": torch.randn(512, 512, generator=gen) for i in range(6)}, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"n": 6}')
    return path


def _served(plane: str) -> float:
    return float(metrics.BLOB_BYTES.labels(plane)._value.get())


def test_a_second_client_behind_nginx_takes_nothing_from_the_origin(
    origin: RunningServer, site_cache: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = site_cache
    src = _model(tmp_path / "src")
    with Client(origin.address, cache=False, data_plane="grpc") as c:
        c.push(src, "site/m:v1")
    monkeypatch.setenv("MZSTORE_BLOB_URL", url)
    before = _served("http")
    with Client(origin.address, cache=False) as first:
        info = first.pull("site/m:v1", tmp_path / "one")
        assert type(first.transport).__name__ == "HttpTransport"
    assert _served("http") - before >= info.bytes_transferred > 0  # the cache filled from the origin
    middle, grpc_before = _served("http"), _served("grpc")
    with Client(origin.address, cache=False) as second:
        again = second.pull("site/m:v1", tmp_path / "two")
    assert again.bytes_transferred == info.bytes_transferred
    assert _served("http") == middle and _served("grpc") == grpc_before  # 0 blob bytes from the origin
    for out in ("one", "two"):
        assert (tmp_path / out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_a_corrupt_cache_entry_is_caught_and_read_from_the_origin(
    origin: RunningServer, site_cache: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, cache_dir = site_cache
    src = _model(tmp_path / "src")
    with Client(origin.address, cache=False, data_plane="grpc") as c:
        c.push(src, "site/m:v1")
    monkeypatch.setenv("MZSTORE_BLOB_URL", url)
    with Client(origin.address, cache=False) as warm:
        warm.pull("site/m:v1", tmp_path / "warm")
    entries = [p for p in cache_dir.rglob("*") if p.is_file()]
    assert entries, "nginx cached nothing"
    for entry in entries:  # flip the last byte of every cached slice: each is inside some chunk
        data = bytearray(entry.read_bytes())
        data[-1] ^= 0xFF
        entry.write_bytes(bytes(data))
    grpc_before = _served("grpc")
    with Client(origin.address, cache=False) as c:
        info = c.pull("site/m:v1", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert _served("grpc") - grpc_before > 0  # the bad ranges came again, from the origin
    assert info.bytes_transferred > 0
