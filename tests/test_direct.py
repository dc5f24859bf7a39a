"""pull --direct: the server hands out the manifest; blob bytes come straight from the nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CountingStore
from s3 import moto_server, s3_bucket_url, s3_client, s3_env  # noqa: F401
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import Unavailable
from mzstore.server.app import build_server
from mzstore.settings import Settings
from mzstore.storage.node import open_node
from mzstore.storage.store import blob_key

SMALL = Settings(chunk_bytes=64 * 1024, shard_bytes=512 * 1024)


def _model(path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    path.mkdir()
    save_file(
        {f"layers.{i}.weight": torch.randn(384, 256, generator=gen).to(torch.bfloat16) for i in range(6)},
        str(path / "model.safetensors"),
    )
    (path / "config.json").write_text('{"direct": true}')


def _same(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_direct_pull_from_a_local_node_bypasses_the_server(tmp_path: Path) -> None:
    _model(tmp_path / "src")
    store = CountingStore(tmp_path / "store")
    running = build_server(store, "127.0.0.1:0", SMALL)
    try:
        with Client(running.address, cache=False) as c:
            c.push(tmp_path / "src", "m:1")
        with Client(running.address, cache=False, direct=True) as c:
            info = c.pull("m:1", tmp_path / "out")
            sd = c.load_state_dict("m:1")
        assert info.bytes_transferred > 0
        assert store.bytes_read == 0, "a direct pull moved blob bytes through the server"
        _same(tmp_path / "src", tmp_path / "out")
        assert sd["layers.3.weight"].shape == (384, 256)
        env = {**os.environ, "MZSTORE_CACHE": "0"}
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "mzstore.cli",
                "pull",
                "m:1",
                "-o",
                str(tmp_path / "cli"),
                "--direct",
                "--json",
                "--server",
                running.address,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["bytes_transferred"] == info.bytes_transferred
        assert store.bytes_read == 0
        _same(tmp_path / "src", tmp_path / "cli")
    finally:
        running.stop(grace=1)


def test_direct_pull_from_s3_replicas_survives_a_corrupt_copy(s3_bucket_url: str, s3_env: str, tmp_path: Path) -> None:  # noqa: F811
    _model(tmp_path / "src")
    urls = [f"{s3_bucket_url}/node{i}" for i in range(3)]
    store = CountingStore([open_node(u) for u in urls], replicas=2)
    running = build_server(store, "127.0.0.1:0", SMALL)
    try:
        with Client(running.address, cache=False) as c:
            c.push(tmp_path / "src", "m:1")
            topo, replicas = c.topology()
            manifest = c.manifest("m:1")[2]
        assert [u for u, _ in topo] == store.urls and replicas == 2
        # Corrupt the first-ranked copy of the blob holding the first tensor, behind the server's back.
        digest = manifest.tensors[0].chunks[0].blob
        first = store.preference(digest)[0]
        bucket, _, prefix = first.url[len("s3://") :].partition("/")
        key = f"{prefix}/{blob_key(digest)}"
        s3 = s3_client(s3_env)
        body = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        off = manifest.tensors[0].chunks[0].offset + 10
        body[off] ^= 0xFF
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(body))
        with Client(running.address, direct=True) as c:
            c.pull("m:1", tmp_path / "out")
            chunks_dir = c.settings.cache_dir / "chunks"
        assert store.bytes_read == 0
        _same(tmp_path / "src", tmp_path / "out")
        # Bytes that crossed the network from S3 are kept in the client's cache.
        assert sum(p.stat().st_size for p in chunks_dir.rglob("*") if p.is_file()) == sum(
            c.length for c in manifest.chunks()
        )
    finally:
        running.stop(grace=1)


def test_direct_pull_from_local_directories_writes_no_second_copy(tmp_path: Path) -> None:
    _model(tmp_path / "src")
    running = build_server(tmp_path / "store", "127.0.0.1:0", SMALL)
    try:
        with Client(running.address) as c:
            c.push(tmp_path / "src", "m:1")
        with Client(running.address, direct=True) as c:
            c.pull("m:1", tmp_path / "out")
            c.load_state_dict("m:1")
            home = c.settings.cache_dir
        _same(tmp_path / "src", tmp_path / "out")
        assert not [p for p in (home / "chunks").rglob("*") if p.is_file()]
        with Client(running.address) as c:  # through the server, the same client caches
            c.pull("m:1", tmp_path / "out2")
        assert [p for p in (home / "chunks").rglob("*") if p.is_file()]
    finally:
        running.stop(grace=1)


def test_direct_pull_with_unreachable_nodes_is_a_clear_error(tmp_path: Path) -> None:
    _model(tmp_path / "src")
    running = build_server(tmp_path / "store", "127.0.0.1:0", SMALL)
    try:
        with Client(running.address, cache=False) as c:
            c.push(tmp_path / "src", "m:1")
        with Client(running.address, cache=False, direct=True) as c:
            # The client cannot see the server's disk: simulate by reading from an empty place.
            from mzstore.transport.direct import DirectReader, DirectTransport

            assert isinstance(c.transport, DirectTransport)
            c.transport = DirectTransport(c.transport.control, DirectReader([open_node(tmp_path / "elsewhere")]))
            with pytest.raises(FileNotFoundError, match="none of the storage nodes"):
                c.pull("m:1", tmp_path / "out")
        assert not (tmp_path / "out" / "model.safetensors").exists()
    finally:
        running.stop(grace=1)


def test_direct_reader_reports_unreachable_s3(s3_env: str) -> None:  # noqa: F811
    from s3 import dead_endpoint

    from mzstore.transport.direct import DirectReader

    reader = DirectReader.open([("s3://nowhere/prefix", dead_endpoint())])
    with pytest.raises(Unavailable, match="reachable"):
        reader.fetch("sha256:" + "0" * 64, 0, 10)
