"""Placement, replication, failover, repair and the admin jobs over real servers and local nodes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import IntegrityError, MzstoreError
from mzstore.server.app import build_server
from mzstore.settings import Settings
from mzstore.storage import Store, open_node
from mzstore.storage.admin import fsck, gc, rebalance
from mzstore.storage.placement import moved_fraction, place
from mzstore.storage.store import blob_key

SMALL = Settings(chunk_bytes=64 * 1024, shard_bytes=128 * 1024)


def _model(tmp_path: Path, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    path = tmp_path / f"m{seed}" / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"w{i}": torch.randn(128, 256, generator=gen) for i in range(8)}, str(path))
    return path


def _store(tmp_path: Path, n: int, replicas: int) -> Store:
    return Store([open_node(tmp_path / f"node{i}") for i in range(n)], replicas)


@pytest.fixture
def two_copy(tmp_path: Path):
    store = _store(tmp_path, 2, 2)
    server = build_server(store, "127.0.0.1:0", SMALL)
    with Client(server.address) as client:
        yield store, client
    server.stop(1)


def _blob_files(node_root: Path) -> list[Path]:
    return sorted(p for p in (node_root / "blobs").rglob("*") if p.is_file()) if (node_root / "blobs").exists() else []


def test_every_blob_has_r_copies_and_manifests_refs_are_everywhere(two_copy, tmp_path: Path) -> None:
    store, client = two_copy
    info = client.push(_model(tmp_path), "rep/m:v1")
    assert info.shards > 1
    _, _, manifest = client.manifest("rep/m:v1")
    for digest in manifest.blobs():
        for node in store.nodes:
            assert node.exists(blob_key(digest))
    for node in store.nodes:
        assert node.exists("refs/rep/m/v1")
        assert node.exists(f"manifests/sha256/{info.digest[7:9]}/{info.digest[7:]}")


def test_corrupt_or_missing_copy_fails_over_and_is_repaired(two_copy, tmp_path: Path) -> None:
    store, client = two_copy
    src = _model(tmp_path)
    client.push(src, "rep/m:v1")
    _, _, manifest = client.manifest("rep/m:v1")
    blobs = sorted(manifest.blobs())
    first = store.preference(blobs[0])[0]  # the copy reads try first
    path = Path(first.root) / blob_key(blobs[0])  # type: ignore[attr-defined]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    second = store.preference(blobs[1])[0]
    (Path(second.root) / blob_key(blobs[1])).unlink()  # type: ignore[attr-defined]

    out = tmp_path / "out"
    client.pull("rep/m:v1", out)
    assert (
        hashlib.sha256((out / "model.safetensors").read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    )
    # Both copies were repaired after the reads (in the background).
    assert store.wait_repairs(30)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == blobs[0][7:]
    assert (Path(second.root) / blob_key(blobs[1])).exists()  # type: ignore[attr-defined]
    assert fsck(store).ok


def test_a_read_does_not_wait_for_a_slow_repair(two_copy, tmp_path: Path, monkeypatch) -> None:
    import threading
    import time

    store, client = two_copy
    src = _model(tmp_path)
    client.push(src, "rep/m:v1")
    _, _, manifest = client.manifest("rep/m:v1")
    blob = sorted(manifest.blobs())[0]
    first = store.preference(blob)[0]
    (Path(first.root) / blob_key(blob)).unlink()  # type: ignore[attr-defined]
    release = threading.Event()
    writes: list[str] = []
    real_write = type(first).write

    def slow_write(self, key, chunks):  # the node being repaired takes its time
        writes.append(key)
        release.wait(30)
        return real_write(self, key, chunks)

    monkeypatch.setattr(type(first), "write", slow_write)
    start = time.monotonic()
    client.pull("rep/m:v1", tmp_path / "out")
    took = time.monotonic() - start
    try:
        assert took < 10, f"the pull waited {took:.1f} s for the repair"
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == src.read_bytes()
        assert not store.wait_repairs(0.2)  # the repair is still running, held by the slow node
    finally:
        release.set()
    assert store.wait_repairs(30)
    assert writes.count(blob_key(blob)) == 1  # many reads of the blob queued one repair
    assert (Path(first.root) / blob_key(blob)).exists()  # type: ignore[attr-defined]


def _concurrent_reads(store: Store, digest: str, n: int) -> list[bytes | MzstoreError]:
    """``n`` threads read the start of ``digest`` at the same moment."""
    import threading

    barrier = threading.Barrier(n)
    out: list[bytes | MzstoreError] = [b""] * n

    def read(i: int) -> None:
        barrier.wait()
        try:
            out[i] = store.read_blob(digest, 0, 100)
        except MzstoreError as exc:  # collected for the asserts
            out[i] = exc

    threads = [threading.Thread(target=read, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_concurrent_first_reads_of_a_blob_hash_it_once(tmp_path: Path, monkeypatch) -> None:
    """A fresh server verifies a blob on its first read; reads arriving meanwhile wait, not re-hash."""
    import time

    src = tmp_path / "blob.bin"
    src.write_bytes(
        torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
        .numpy()
        .tobytes()
    )
    digest, staged = Store(tmp_path / "node").stage_blob(src)
    Store(tmp_path / "node").publish_blob(staged)
    store = Store(tmp_path / "node")  # a new process's store: nothing verified yet
    node = store.nodes[0]
    read_bytes = 0
    real_read = type(node).read

    def slow_read(self, key, offset=0, length=None):  # a slow disk: every read overlaps the others
        nonlocal read_bytes
        time.sleep(0.02)
        data = real_read(self, key, offset, length)
        read_bytes += len(data)
        return data

    monkeypatch.setattr(type(node), "read", slow_read)
    results = _concurrent_reads(store, digest, 8)
    assert results == [src.read_bytes()[:100]] * 8
    size = src.stat().st_size
    assert read_bytes <= size + 8 * 100, f"read {read_bytes} bytes of a {size}-byte blob: it was hashed more than once"

    # A corrupt blob fails every concurrent reader, and is checked again by later reads.
    digest2, staged2 = store.stage_blob(tmp_path / "blob.bin", prefix=b"x")
    store.publish_blob(staged2)
    path = Path(node.root) / blob_key(digest2)  # type: ignore[attr-defined]
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    fresh = Store(tmp_path / "node")
    failed = _concurrent_reads(fresh, digest2, 4)
    assert all(isinstance(r, IntegrityError) and "data loss" in str(r) for r in failed), failed
    path.write_bytes(good)
    assert fresh.read_blob(digest2, 0, 5) == good[:5]


def test_all_copies_gone_is_a_clear_data_loss_error(two_copy, tmp_path: Path) -> None:
    store, client = two_copy
    client.push(_model(tmp_path), "rep/m:v1")
    _, _, manifest = client.manifest("rep/m:v1")
    digest = sorted(manifest.blobs())[0]
    for node in store.nodes:
        (Path(node.root) / blob_key(digest)).unlink()  # type: ignore[attr-defined]
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match="data loss"):
        client.pull("rep/m:v1", out)
    assert not (out / "model.safetensors").exists()
    report = fsck(store)
    assert not report.ok and digest in report.lost


def test_fsck_repairs_what_it_finds(tmp_path: Path) -> None:
    store = _store(tmp_path, 3, 2)
    server = build_server(store, "127.0.0.1:0", SMALL)
    try:
        with Client(server.address) as client:
            client.push(_model(tmp_path), "rep/m:v1")
            _, _, manifest = client.manifest("rep/m:v1")
    finally:
        server.stop(1)
    digest = sorted(manifest.blobs())[0]
    target = store.targets(digest)[1]
    blob = Path(target.root) / blob_key(digest)  # type: ignore[attr-defined]
    blob.write_bytes(b"garbage")
    fresh = _store(tmp_path, 3, 2)
    report = fsck(fresh)
    assert not report.ok and any(digest in c for c in report.corrupt)
    assert fsck(fresh, repair=True).repaired
    assert fsck(_store(tmp_path, 3, 2)).ok
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest[7:]


def test_rebalance_from_two_to_three_nodes_moves_about_a_third(tmp_path: Path) -> None:
    before = _store(tmp_path, 2, 1)
    server = build_server(before, "127.0.0.1:0", Settings(chunk_bytes=16 * 1024, shard_bytes=16 * 1024))
    sources = []
    try:
        with Client(server.address) as client:
            for seed in range(3):
                sources.append(_model(tmp_path, seed))
                client.push(sources[-1], f"rep/m:v{seed}")
    finally:
        server.stop(1)
    after = _store(tmp_path, 3, 1)
    report = rebalance(after)
    assert report.blobs >= 60
    share = report.moved / report.copies
    assert 0.2 < share < 0.47, share  # ideal 1/3
    assert moved_fraction(before.urls, after.urls, [], 1) == 0.0
    for digest_node in after.nodes:
        for blob in _blob_files(Path(digest_node.root)):  # type: ignore[attr-defined]
            digest = "sha256:" + blob.name
            assert after.targets(digest)[0] is digest_node
    assert fsck(after).ok
    server = build_server(after, "127.0.0.1:0")
    try:
        with Client(server.address) as client:
            for seed, src in enumerate(sources):
                out = tmp_path / f"out{seed}"
                client.pull(f"rep/m:v{seed}", out)
                assert (out / "model.safetensors").read_bytes() == src.read_bytes()
    finally:
        server.stop(1)


def test_gc_keeps_young_and_referenced_objects(tmp_path: Path) -> None:
    store = _store(tmp_path, 2, 1)
    server = build_server(store, "127.0.0.1:0", SMALL)
    try:
        with Client(server.address) as client:
            client.push(_model(tmp_path, 1), "rep/keep:v1")
            client.push(_model(tmp_path, 2), "rep/drop:v1")
            _, _, dropped = client.manifest("rep/drop:v1")
            client.rm("rep/drop:v1")
    finally:
        server.stop(1)
    young = gc(store, grace_s=3600)
    assert young.deleted == [] and young.kept_young > 0
    old = gc(store, grace_s=0)
    gone = {d.split()[-1] for d in old.deleted}
    assert dropped.blobs() <= gone
    assert fsck(store).ok  # what is still tagged is intact
    server = build_server(store, "127.0.0.1:0")
    try:
        with Client(server.address) as client:
            assert [n for n, _, _ in client.ls()] == ["rep/keep"]
            assert len(client.load_state_dict("rep/keep:v1")) == 8
    finally:
        server.stop(1)


def test_placement_is_stable_and_spread() -> None:
    urls = [f"file:///n{i}" for i in range(4)]
    digests = ["sha256:" + hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    counts = [0] * 4
    for d in digests:
        chosen = place(urls, d, 2)
        assert len(set(chosen)) == 2 and chosen == place(list(urls), d, 2)
        for i in chosen:
            counts[i] += 1
    assert max(counts) / min(counts) < 1.15
    for n in range(2, 6):
        old = [f"file:///n{i}" for i in range(n)]
        assert abs(moved_fraction(old, [*old, f"file:///n{n}"], digests[:2000], 1) - 1 / (n + 1)) < 0.04


def test_two_servers_over_the_same_nodes_serve_the_same_models(tmp_path: Path) -> None:
    a = build_server(_store(tmp_path, 3, 2), "127.0.0.1:0", SMALL)
    b = build_server(_store(tmp_path, 3, 2), "127.0.0.1:0", SMALL)
    try:
        with Client(a.address) as ca, Client(b.address) as cb:
            src = _model(tmp_path)
            info = ca.push(src, "rep/shared:v1")
            assert cb.ls() == [("rep/shared", "v1", info.digest)]
            out = tmp_path / "out"
            cb.pull("rep/shared:v1", out)
            assert (out / "model.safetensors").read_bytes() == src.read_bytes()
    finally:
        a.stop(1)
        b.stop(1)


def test_admin_commands_from_the_cli(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from conftest import start_serve, stop_serve

    nodes = [f"file://{tmp_path / f'node{i}'}" for i in range(3)]
    flags = [x for url in nodes[:2] for x in ("--node", url)] + ["--replicas", "2"]
    import os

    # Small shards: many blobs, so adding a node surely moves some (with one blob, a third of the time none).
    env = {**os.environ, "MZSTORE_SHARD_BYTES": str(128 * 1024), "MZSTORE_CHUNK_BYTES": str(32 * 1024)}
    address, proc = start_serve(None, env=env, args=tuple(flags))
    try:
        with Client(address) as client:
            client.push(_model(tmp_path), "cli/m:v1")
    finally:
        stop_serve(proc)

    def mz(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mzstore.cli", *args], capture_output=True, text=True, timeout=120)

    ok = mz("fsck", *flags, "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"] is True
    digest_file = next(p for p in (tmp_path / "node0" / "blobs").rglob("*") if p.is_file())
    digest_file.write_bytes(b"broken")
    bad = mz("fsck", *flags)
    assert bad.returncode == 1 and "corrupt" in bad.stdout and bad.stderr.startswith("error:")
    assert mz("fsck", *flags, "--repair").returncode == 0
    assert mz("fsck", *flags).returncode == 0
    three = [x for url in nodes for x in ("--node", url)] + ["--replicas", "2"]
    blobs = [p.name for p in (tmp_path / "node0" / "blobs").rglob("*") if p.is_file()]
    blobs += [p.name for p in (tmp_path / "node1" / "blobs").rglob("*") if p.is_file()]
    digests = {"sha256:" + name for name in blobs}
    assert len(digests) >= 6
    urls = [Path(u[len("file://") :]).as_uri() for u in nodes]
    expected = sum(2 in place(urls, d, 2) for d in digests)  # copies the new node must take
    moved = json.loads(mz("rebalance", *three, "--json").stdout)
    assert moved["moved"] == expected
    assert 0 < moved["moved"] < moved["copies"]
    assert mz("fsck", *three).returncode == 0
    gc_run = json.loads(mz("gc", *three, "--grace", "3600", "--json").stdout)
    assert gc_run["deleted"] == []
    assert mz("fsck", "--root", str(tmp_path / "x"), "--node", nodes[0]).returncode == 2
    assert mz("serve", *flags[:2], "--replicas", "3").returncode == 2
