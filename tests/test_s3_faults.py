"""Faults with R=2 over a local node and an S3 node (moto's S3 server on loopback, used through s3fs).

Each test starts its own moto server so it can stop it: the "S3 is down"
case is a real refused connection, not a mock.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from s3 import CREDENTIALS, s3_client
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import IntegrityError, MzstoreError
from mzstore.server.app import build_server
from mzstore.settings import Settings
from mzstore.storage import Store, open_node
from mzstore.storage.admin import fsck
from mzstore.storage.store import blob_key

SMALL = Settings(chunk_bytes=64 * 1024, shard_bytes=128 * 1024)


@pytest.fixture
def own_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, object]]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = f"mzstore-faults-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    yield endpoint, (server, bucket)
    try:
        server.stop()
    except Exception:  # noqa: BLE001 - already stopped by the test
        pass


@pytest.fixture
def mixed(own_s3, tmp_path: Path):
    endpoint, (moto, bucket) = own_s3
    local = open_node(tmp_path / "local")
    remote = open_node(f"s3://{bucket}/nodes/a", endpoint_url=endpoint)
    store = Store([local, remote], replicas=2)
    server = build_server(store, "127.0.0.1:0", SMALL)
    client = Client(server.address)
    yield store, client, local, remote, moto, endpoint, bucket
    client.close()
    server.stop(1)


def _model(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    save_file({f"w{i}": torch.randn(128, 256, generator=gen) for i in range(4)}, str(path))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_lands_on_both_nodes(mixed, tmp_path: Path) -> None:
    _, client, local, remote, *_ = mixed
    client.push(_model(tmp_path), "s3/m:v1")
    _, _, manifest = client.manifest("s3/m:v1")
    for digest in manifest.blobs():
        assert local.exists(blob_key(digest)) and remote.exists(blob_key(digest))
    assert remote.exists("refs/s3/m/v1")


def _tamper(node, digest: str, endpoint: str, bucket: str, *, delete: bool = False) -> None:
    """Flip a byte of (or delete) one copy, on disk or in the bucket, behind the store's back."""
    if node.url.startswith("s3://"):
        s3 = s3_client(endpoint)
        key = f"nodes/a/{blob_key(digest)}"
        if delete:
            s3.delete_object(Bucket=bucket, Key=key)
            return
        data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    else:
        path = Path(node.root) / blob_key(digest)
        if delete:
            path.unlink()
            return
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def test_flipped_byte_and_lost_copy_are_read_around_and_repaired(mixed, tmp_path: Path) -> None:
    store, client, local, remote, _, endpoint, bucket = mixed
    src = _model(tmp_path)
    client.push(src, "s3/m:v1")
    _, _, manifest = client.manifest("s3/m:v1")
    blobs = sorted(manifest.blobs())
    # Damage the copy each read tries first: a flipped byte on one blob, a deleted copy of another.
    flipped, lost = blobs[0], blobs[1]
    _tamper(store.preference(flipped)[0], flipped, endpoint, bucket)
    _tamper(store.preference(lost)[0], lost, endpoint, bucket, delete=True)
    assert not fsck(Store([local, remote], 2)).ok

    out = tmp_path / "out"
    client.pull("s3/m:v1", out)
    assert _sha(out / "model.safetensors") == _sha(src)
    assert store.wait_repairs(60)
    assert fsck(Store([local, remote], 2)).ok  # the reads repaired both copies (in the background)


def test_s3_down_pulls_from_local_and_pushes_fail_clearly(mixed, tmp_path: Path) -> None:
    _, client, local, _, moto, *_ = mixed
    src = _model(tmp_path)
    client.push(src, "s3/m:v1")
    moto.stop()
    out = tmp_path / "out"
    client.pull("s3/m:v1", out)
    assert _sha(out / "model.safetensors") == _sha(src)
    before = sorted(p.relative_to(local.root) for p in Path(local.root).rglob("*") if p.is_file())  # type: ignore[attr-defined]
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.randn(64, 64)}, str(other))
    with pytest.raises(MzstoreError) as exc:
        client.push(other, "s3/other:v1")
    assert "s3://" in str(exc.value) and "\n" not in str(exc.value)
    after = sorted(p.relative_to(local.root) for p in Path(local.root).rglob("*") if p.is_file())  # type: ignore[attr-defined]
    assert [p for p in after if p.parts[0] != "tmp"] == [p for p in before if p.parts[0] != "tmp"]
    assert ("s3/other", "v1") not in [(n, t) for n, t, _ in client.ls()]


def test_both_copies_gone_is_data_loss_with_no_output(mixed, tmp_path: Path) -> None:
    _, client, local, _, _, endpoint, bucket = mixed
    client.push(_model(tmp_path), "s3/m:v1")
    _, _, manifest = client.manifest("s3/m:v1")
    digest = sorted(manifest.blobs())[0]
    (Path(local.root) / blob_key(digest)).unlink()  # type: ignore[attr-defined]
    s3_client(endpoint).delete_object(Bucket=bucket, Key=f"nodes/a/{blob_key(digest)}")
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match="data loss"):
        client.pull("s3/m:v1", out)
    assert not (out / "model.safetensors").exists()
