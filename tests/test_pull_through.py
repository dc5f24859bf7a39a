"""A pull-through cache server (``serve --upstream``) in front of a real upstream, all on loopback.

The upstream's store counts the blob bytes it serves, so the tests can tell
what crossed the upstream link: the first pull through the cache fills it,
later pulls move nothing from upstream.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import CountingStore, start_serve, stop_serve, store_files
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import Conflict, IntegrityError, NotFound, Unavailable
from mzstore.format.manifest import parse_manifest
from mzstore.server.app import RunningServer, build_server
from mzstore.server.upstream import PullThroughStore
from mzstore.settings import Settings, load_settings
from mzstore.storage.store import Store, blob_key

#: 1 MiB chunks and 4 MiB shards: several shards per model, each streamed in several messages.
SETTINGS = Settings(chunk_bytes=1 << 20, shard_bytes=4 << 20)


class CorruptingStore(CountingStore):
    """An upstream whose disk or link flips the first byte of every blob it serves."""

    def read_blob(self, digest: str, offset: int = 0, length: int | None = None) -> bytes:
        data = super().read_blob(digest, offset, length)
        if offset == 0 and data:
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data


class FlakyStore(CountingStore):
    """An upstream whose node fails once in the middle of every blob's stream."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.failed: set[str] = set()

    def read_blob(self, digest: str, offset: int = 0, length: int | None = None) -> bytes:
        if offset > 0 and digest not in self.failed:
            self.failed.add(digest)
            raise Unavailable("storage node hiccup")
        return super().read_blob(digest, offset, length)


class GatedStore(CountingStore):
    """An upstream that holds every blob read until the test opens the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def read_blob(self, digest: str, offset: int = 0, length: int | None = None) -> bytes:
        self.entered.set()
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        return super().read_blob(digest, offset, length)


class ArrivalCountingCache(PullThroughStore):
    """A cache store that lets the test await the moment N blob reads have arrived."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.arrived = 0
        self.cond = threading.Condition()

    def blob_size(self, digest: str) -> int:  # the first thing a ReadBlob asks
        with self.cond:
            self.arrived += 1
            self.cond.notify_all()
        return super().blob_size(digest)


@pytest.fixture
def servers() -> Iterator[list[RunningServer]]:
    """Servers started by a test; stopped (and their upstream connections closed) afterwards."""
    started: list[RunningServer] = []
    yield started
    for running in reversed(started):
        running.stop(grace=0)
        if isinstance(running.store, PullThroughStore):
            running.store.close()


@pytest.fixture
def start_upstream(tmp_path: Path, servers: list[RunningServer]) -> Callable[..., RunningServer]:
    def start(store_cls: type[CountingStore] = CountingStore) -> RunningServer:
        running = build_server(store_cls(tmp_path / f"upstream-{len(servers)}"), settings=SETTINGS)
        servers.append(running)
        return running

    return start


@pytest.fixture
def start_cache(tmp_path: Path, servers: list[RunningServer]) -> Callable[..., RunningServer]:
    def start(upstream: RunningServer, ttl: float = 60.0, root: Path | None = None) -> RunningServer:
        running = build_server(root or tmp_path / "cache", upstream=upstream.address, upstream_ttl=ttl)
        servers.append(running)
        return running

    return start


def counted(server: RunningServer) -> CountingStore:
    assert isinstance(server.store, CountingStore)
    return server.store


def fresh_client(address: str, home: Path) -> Client:
    """A client with its own, empty client-side cache (another machine at the site)."""
    return Client(address, settings=dataclasses.replace(load_settings(), home=home))


def tree(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def make_model(directory: Path, seed: int, rows: int = 3 * 1024) -> Path:
    """A small HF-style directory: one safetensors file (about ``rows`` KiB) and a config."""
    directory.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {"w": torch.randn(rows, 256, generator=g), "b": torch.randn(256, generator=g)}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"seed": seed}))
    return directory


def blob_sizes(store: Store, digest: str) -> dict[str, int]:
    manifest = parse_manifest(store.get_manifest(digest))
    return {b: store.blob_size(b) for b in manifest.blobs()}


def test_first_pull_fills_the_cache_and_later_pulls_touch_no_upstream(
    start_upstream: Callable[..., RunningServer],
    start_cache: Callable[..., RunningServer],
    minilm_dir: Path,
    tmp_path: Path,
) -> None:
    upstream = start_upstream()
    with Client(upstream.address) as c:
        pushed = c.push(minilm_dir, "st/minilm:v1")
    sizes = blob_sizes(upstream.store, pushed.digest)
    assert len(sizes) > 1
    counted(upstream).bytes_read = 0
    cache = start_cache(upstream)

    with fresh_client(cache.address, tmp_path / "home-1") as c1:
        first = c1.pull("st/minilm:v1", tmp_path / "out-1")
    assert first.digest == pushed.digest
    assert tree(tmp_path / "out-1") == tree(minilm_dir)
    # Parallel pull workers read ranges of the same shards at once, yet each blob crossed once, whole.
    assert counted(upstream).bytes_read == sum(sizes.values())
    for digest, size in sizes.items():
        assert (tmp_path / "cache" / blob_key(digest)).stat().st_size == size

    with fresh_client(cache.address, tmp_path / "home-2") as c2:
        second = c2.pull("st/minilm:v1", tmp_path / "out-2")
    assert second.bytes_transferred > 0  # served by the cache server, not by a client-side cache
    assert counted(upstream).bytes_read == sum(sizes.values())  # zero bytes from upstream
    assert tree(tmp_path / "out-2") == tree(minilm_dir)


def test_the_cache_keeps_serving_by_tag_and_digest_when_upstream_is_gone(
    start_upstream: Callable[..., RunningServer],
    start_cache: Callable[..., RunningServer],
    tmp_path: Path,
) -> None:
    upstream = start_upstream()
    model = make_model(tmp_path / "model", seed=1)
    with Client(upstream.address) as c:
        pushed = c.push(model, "site/m:v1")
    cache = start_cache(upstream, ttl=0)  # every resolve asks upstream: the fallback is exercised
    with fresh_client(cache.address, tmp_path / "home-1") as c1:
        c1.pull("site/m:v1", tmp_path / "warm")
        assert c1.ls() == [("site/m", "v1", pushed.digest)]

    upstream.stop(grace=0)
    with fresh_client(cache.address, tmp_path / "home-2") as c2, fresh_client(cache.address, tmp_path / "home-3") as c3:
        by_tag = c2.pull("site/m:v1", tmp_path / "by-tag")
        by_digest = c3.pull(f"site/m@{pushed.digest}", tmp_path / "by-digest")
        listed = c2.ls()
        with pytest.raises(NotFound, match="unreachable"):
            c2.manifest("site/never-pulled:v1")
    assert by_tag.digest == by_digest.digest == pushed.digest
    assert by_tag.bytes_transferred > 0 and by_digest.bytes_transferred > 0
    assert tree(tmp_path / "by-tag") == tree(tmp_path / "by-digest") == tree(model)
    assert listed == [("site/m", "v1", pushed.digest)]


def test_a_new_version_upstream_is_seen_after_the_ttl(
    start_upstream: Callable[..., RunningServer],
    start_cache: Callable[..., RunningServer],
    tmp_path: Path,
) -> None:
    upstream = start_upstream()
    old, new = make_model(tmp_path / "old", seed=1), make_model(tmp_path / "new", seed=2)
    with Client(upstream.address) as c:
        v1 = c.push(old, "t/m")
    expired = start_cache(upstream, ttl=0, root=tmp_path / "cache-ttl0")
    trusting = start_cache(upstream, ttl=3600, root=tmp_path / "cache-ttl1h")
    with Client(expired.address) as ce, Client(trusting.address) as ct:
        assert ce.manifest("t/m")[1] == ct.manifest("t/m")[1] == v1.digest
        with Client(upstream.address) as c:
            v2 = c.push(new, "t/m")
        assert v2.digest != v1.digest
        assert ce.manifest("t/m:latest")[1] == v2.digest
        assert ct.manifest("t/m:latest")[1] == v1.digest  # within its TTL the tag is not asked again
    with fresh_client(expired.address, tmp_path / "home") as c2:
        info = c2.pull("t/m", tmp_path / "out")
    assert info.digest == v2.digest
    assert tree(tmp_path / "out") == tree(new)


def test_concurrent_reads_of_a_missing_blob_cross_the_upstream_once(
    start_upstream: Callable[..., RunningServer], servers: list[RunningServer], tmp_path: Path
) -> None:
    upstream = start_upstream(GatedStore)
    gated = upstream.store
    assert isinstance(gated, GatedStore)
    with Client(upstream.address) as c:
        pushed = c.push(make_model(tmp_path / "model", seed=3), "c/m:v1")
    sizes = blob_sizes(gated, pushed.digest)
    digest = max(sizes, key=lambda d: sizes[d])
    assert sizes[digest] > 2 << 20  # several messages per stream
    expected = (gated.node.root / blob_key(digest)).read_bytes()  # type: ignore[attr-defined]

    cache_store = ArrivalCountingCache(tmp_path / "cache", upstream.address)
    cache = build_server(cache_store)
    servers.append(cache)
    readers = 6
    try:
        with Client(cache.address) as client, ThreadPoolExecutor(readers) as pool:
            futures = [pool.submit(client.fetch, digest, 0, sizes[digest]) for _ in range(readers)]
            with cache_store.cond:
                assert cache_store.cond.wait_for(lambda: cache_store.arrived >= readers, timeout=30)
            assert gated.entered.wait(timeout=30)
            gated.gate.set()
            results = [f.result(timeout=60) for f in futures]
    finally:
        gated.gate.set()
    assert all(bytes(r) == expected for r in results)
    assert gated.bytes_read == sizes[digest]  # one transfer, not one per reader


def test_push_tag_and_rm_on_the_cache_are_refused(
    start_upstream: Callable[..., RunningServer],
    start_cache: Callable[..., RunningServer],
    tmp_path: Path,
) -> None:
    upstream = start_upstream()
    model = make_model(tmp_path / "model", seed=4, rows=64)
    with Client(upstream.address) as c:
        pushed = c.push(model, "ro/m:v1")
    cache = start_cache(upstream)
    with Client(cache.address) as c:
        calls: list[tuple[str, Callable[[], object]]] = [
            ("push", lambda: c.push(model, "ro/m:v2")),
            ("tag", lambda: c.tag("ro/m:v1", "ro/m:prod")),
            ("rm", lambda: c.rm("ro/m:v1")),
        ]
        for verb, call in calls:
            with pytest.raises(Conflict) as exc:
                call()
            message = str(exc.value)
            assert message.startswith(f"cannot {verb}: this server is a read-only pull-through cache of ")
            assert f"--server {upstream.address}" in message and "\n" not in message
        with pytest.raises(Conflict, match="pull without --direct"):
            c.topology()  # direct readers of the cache's nodes would miss what was never pulled
    assert store_files(tmp_path / "cache") == {}
    with Client(upstream.address) as c:
        assert c.ls() == [("ro/m", "v1", pushed.digest)]


def test_corrupt_bytes_from_upstream_are_never_stored(
    start_upstream: Callable[..., RunningServer],
    start_cache: Callable[..., RunningServer],
    tmp_path: Path,
) -> None:
    upstream = start_upstream(CorruptingStore)
    with Client(upstream.address) as c:
        pushed = c.push(make_model(tmp_path / "model", seed=5), "bad/m:v1")
    blob = next(iter(blob_sizes(upstream.store, pushed.digest)))
    cache = start_cache(upstream)
    with fresh_client(cache.address, tmp_path / "home") as c:
        with pytest.raises(IntegrityError):
            c.pull("bad/m:v1", tmp_path / "out")
        with pytest.raises(IntegrityError, match=f"upstream {upstream.address} sent blob {blob}"):
            c.fetch(blob, 0, 16)
    assert counted(upstream).bytes_read > 0
    cache_root = tmp_path / "cache"
    assert [p for p in (cache_root / "blobs").rglob("*") if p.is_file()] == []
    assert list((cache_root / "tmp").iterdir()) == []  # spool files are removed too
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_broken_upstream_stream_resumes_where_it_stopped(
    start_upstream: Callable[..., RunningServer],
    start_cache: Callable[..., RunningServer],
    tmp_path: Path,
) -> None:
    upstream = start_upstream(FlakyStore)
    model = make_model(tmp_path / "model", seed=7)
    with Client(upstream.address) as c:
        pushed = c.push(model, "flaky/m:v1")
    sizes = blob_sizes(upstream.store, pushed.digest)
    assert any(size > 1 << 20 for size in sizes.values())  # at least one stream breaks after its first message
    cache = start_cache(upstream)
    with fresh_client(cache.address, tmp_path / "home") as c:
        c.pull("flaky/m:v1", tmp_path / "out")
    assert tree(tmp_path / "out") == tree(model)
    flaky = upstream.store
    assert isinstance(flaky, FlakyStore)
    assert flaky.failed == {d for d, size in sizes.items() if size > 1 << 20}
    assert flaky.bytes_read == sum(sizes.values())  # resumed, not restarted


def test_a_corrupt_copy_in_the_cache_is_fetched_again(
    start_upstream: Callable[..., RunningServer],
    start_cache: Callable[..., RunningServer],
    tmp_path: Path,
) -> None:
    upstream = start_upstream()
    model = make_model(tmp_path / "model", seed=8)
    with Client(upstream.address) as c:
        pushed = c.push(model, "heal/m:v1")
    sizes = blob_sizes(upstream.store, pushed.digest)
    first = start_cache(upstream)
    with fresh_client(first.address, tmp_path / "home-1") as c:
        c.pull("heal/m:v1", tmp_path / "out-1")
    first.stop(grace=0)  # a server trusts a blob it verified; a new process checks again
    victim = max(sizes, key=lambda d: sizes[d])
    path = tmp_path / "cache" / blob_key(victim)
    good = path.read_bytes()
    path.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    counted(upstream).bytes_read = 0

    second = start_cache(upstream)
    with fresh_client(second.address, tmp_path / "home-2") as c:
        c.pull("heal/m:v1", tmp_path / "out-2")
    assert tree(tmp_path / "out-2") == tree(model)
    assert counted(upstream).bytes_read == sizes[victim]  # only the corrupt blob crossed again
    assert path.read_bytes() == good


def test_cli_serve_with_upstream(
    start_upstream: Callable[..., RunningServer],
    tmp_path: Path,
) -> None:
    upstream = start_upstream()
    model = make_model(tmp_path / "model", seed=6)
    with Client(upstream.address) as c:
        pushed = c.push(model, "cli/m:v1")
    cache_root = tmp_path / "cache"
    address, proc = start_serve(cache_root, args=("--upstream", upstream.address), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert f"as a pull-through cache of {upstream.address}" in proc.stdout.readline()
        with fresh_client(address, tmp_path / "home") as c:
            info = c.pull("cli/m:v1", tmp_path / "out")
        assert info.digest == pushed.digest
        assert tree(tmp_path / "out") == tree(model)
        assert counted(upstream).bytes_read == sum(blob_sizes(upstream.store, pushed.digest).values())
        assert all((cache_root / blob_key(b)).is_file() for b in blob_sizes(upstream.store, pushed.digest))
        refused = subprocess.run(
            [sys.executable, "-m", "mzstore.cli", "push", str(model), "cli/m:v2", "--server", address],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [
            f"error: cannot push: this server is a read-only pull-through cache of {upstream.address}; "
            f"run it against the upstream instead (--server {upstream.address})"
        ]
    finally:
        assert stop_serve(proc) == 0


def test_cli_serve_rejects_a_malformed_upstream(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mzstore.cli", "serve", "--root", str(tmp_path), "--upstream", "host:99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --upstream: ") and "port must be 1 to 65535" in proc.stderr
    assert proc.stderr.count("\n") == 1  # one line (a host with no port means port 50051, as --server does)
