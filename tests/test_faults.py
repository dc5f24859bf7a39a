"""Deadlines, cancellation and concurrency limits; pushes and pulls through a faulty network (issue #6).

A real server (``build_server``) and a real :class:`Client` talk through
:class:`tests.faultproxy.FaultProxy`. Every pull runs with the chunk cache
off, so it really crosses the proxy. The outcome under every fault is either
exact bytes or a clear error inside the call's deadline, never a hang, a
partial output or a half-stored push.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from faultproxy import FaultProxy
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import DeadlineExceeded, MzstoreError, ResourceExhausted, Unavailable
from mzstore.push.source import open_source
from mzstore.push.upload import begin_for, iter_events
from mzstore.server.app import RunningServer, build_server
from mzstore.settings import Settings, load_settings
from mzstore.storage.store import Store
from mzstore.transport.grpc import push_requests, rpc_errors
from mzstore.v1 import store_pb2 as pb

SERVER = Settings(chunk_bytes=64 * 1024, shard_bytes=512 * 1024)
#: Client deadlines short enough that a stalled call fails within a test's time.
FETCH_S, PUSH_S = 0.75, 2.0
CLIENT = Settings(timeout=3.0, fetch_timeout=FETCH_S, push_timeout=PUSH_S, pull_workers=2)
#: fetch_checked's retry schedule: 3 retries, sleeping 0.2 + 0.4 + 0.8 s.
PULL_BOUND_S = 4 * FETCH_S + 1.4


def _model(path: Path, seed: int, n: int = 8) -> None:
    """``n`` bf16 tensors of 256 KiB (as in test_cache) and a config file."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.weight": torch.randn(512, 256, generator=gen).to(torch.bfloat16) for i in range(n)}
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"n": n}))


def _same_files(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


class SlowStore(Store):
    """Blob reads take ``delay`` seconds each, so a streamed read lasts as long as a test needs."""

    delay = 0.0

    def read_blob(self, digest: str, offset: int = 0, length: int | None = None) -> bytes:
        time.sleep(self.delay)
        return super().read_blob(digest, offset, length)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningServer]:
    server = build_server(tmp_path / "store", "127.0.0.1:0", SERVER)
    yield server
    server.stop(grace=0.5)


@pytest.fixture
def proxy(running: RunningServer) -> Iterator[FaultProxy]:
    p = FaultProxy(running.port).start()
    yield p
    p.stop()


@pytest.fixture
def src(tmp_path: Path) -> Path:
    _model(tmp_path / "src", 0, n=8)  # 2 MiB of bf16, 1 MiB of shards or so
    return tmp_path / "src"


@pytest.fixture
def big(tmp_path: Path) -> Path:
    _model(tmp_path / "big", 1, n=32)  # 8 MiB: one shard that streams as 6+ messages of 1 MiB
    return tmp_path / "big"


def _client(address: str, settings: Settings = CLIENT) -> Client:
    return Client(address, settings=settings, cache=False)


def _spool_empty(store_root: Path, within: float = 3.0) -> bool:
    """Whether the server's spool/temp area is (or becomes, within ``within`` s) empty."""
    deadline = time.monotonic() + within
    while True:
        tmp = store_root / "tmp"
        try:
            if not tmp.exists() or not any(p.is_file() for p in tmp.rglob("*")):
                return True
        except FileNotFoundError:  # removed under the scan: look again
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _finals(out: Path) -> list[str]:
    """Names in ``out`` other than the pull's own staging folders."""
    return sorted(p.name for p in out.iterdir() if not p.name.startswith(".mzstore-partial")) if out.exists() else []


def _blobs(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())


def test_settings_from_env() -> None:
    s = load_settings(
        {
            "MZSTORE_TIMEOUT": "2.5",
            "MZSTORE_PUSH_TIMEOUT": "60",
            "MZSTORE_FETCH_TIMEOUT": "9",
            "MZSTORE_KEEPALIVE": "20",
            "MZSTORE_MAX_CONCURRENT_RPCS": "7",
            "MZSTORE_MAX_DEADLINE": "100",
        }
    )
    assert (s.timeout, s.push_timeout, s.fetch_timeout, s.keepalive_s) == (2.5, 60, 9, 20)
    assert (s.max_concurrent_rpcs, s.max_deadline_s) == (7, 100)
    for bad in ("0", "-1", "inf", "nan", "soon"):
        with pytest.raises(MzstoreError, match="MZSTORE_PUSH_TIMEOUT"):
            load_settings({"MZSTORE_PUSH_TIMEOUT": bad})


def test_latency_and_bandwidth_cap(proxy: FaultProxy, src: Path, tmp_path: Path) -> None:
    proxy.latency_s = 0.002
    proxy.bandwidth = 4 * 1024 * 1024
    with _client(proxy.address, Settings(pull_workers=2)) as c:
        pushed = c.push(src, "org/m:v1")
        start = time.monotonic()
        info = c.pull("org/m:v1", tmp_path / "out")
    assert info.digest == pushed.digest and info.bytes_transferred > 0
    assert time.monotonic() - start >= info.bytes_transferred / proxy.bandwidth / 2  # the cap did slow it
    _same_files(src, tmp_path / "out")


def test_reset_mid_pull(running: RunningServer, proxy: FaultProxy, src: Path, tmp_path: Path) -> None:
    with _client(running.address) as direct:
        direct.push(src, "org/m:v1")
    out = tmp_path / "out"
    proxy.reset_after(300_000)  # one-shot: the pipeline's retry then finds a healthy path
    with _client(proxy.address) as c:
        try:
            c.pull("org/m:v1", out)
        except Unavailable:
            assert _finals(out) == []
        else:
            _same_files(src, out)
        assert proxy.resets == 1
        proxy.heal()
        c.pull("org/m:v1", out)
    _same_files(src, out)


def test_byte_limit_mid_pull(running: RunningServer, proxy: FaultProxy, src: Path, tmp_path: Path) -> None:
    with _client(running.address) as direct:
        direct.push(src, "org/m:v1")
    out = tmp_path / "out"
    with _client(proxy.address) as c:
        proxy.byte_limit = proxy.forwarded + 400_000  # stays exhausted: retries are reset too
        start = time.monotonic()
        with pytest.raises(Unavailable) as err:
            c.pull("org/m:v1", out)
        assert time.monotonic() - start < PULL_BOUND_S + 2
        assert "\n" not in str(err.value)
        assert proxy.forwarded == proxy.byte_limit  # not one byte more
        assert _finals(out) == []
        proxy.heal()
        grpc.channel_ready_future(c.transport.channel).result(timeout=5)  # gRPC's reconnect backoff
        c.pull("org/m:v1", out)
    _same_files(src, out)


def test_reset_mid_push_then_repush_is_idempotent(
    running: RunningServer, proxy: FaultProxy, src: Path, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    with _client(proxy.address) as c:
        proxy.byte_limit = proxy.forwarded + 500_000
        with pytest.raises(Unavailable) as err:
            c.push(src, "org/m:v1", resumable=False)
        assert "\n" not in str(err.value)
        proxy.heal()
        assert c.ls() == []  # no ref, and the server dropped what it had spooled
        assert _spool_empty(root)
        pushed = c.push(src, "org/m:v1")
    blobs = _blobs(root)
    with _client(running.address) as direct:
        again = direct.push(src, "org/m:v1")
    assert again.digest == pushed.digest
    assert _blobs(root) == blobs  # nothing duplicated, nothing new
    assert _spool_empty(root)


def test_reset_mid_resumable_push_resumes_and_sends_little_twice(
    running: RunningServer, proxy: FaultProxy, src: Path, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    src = tmp_path / "big"
    _model(src, 1, n=64)  # 16 MiB: the upload is many 1 MiB messages
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    healed = threading.Timer(0.3, proxy.heal)
    with _client(proxy.address) as c:
        start = proxy.forwarded
        proxy.byte_limit = start + 3 * size // 4  # the connection dies three quarters into the upload
        healed.start()
        pushed = c.push(src, "org/m:v1")
    healed.join()
    # Counted where it matters, on the wire: 3/4 of the file before the cut, then what the server had not
    # recorded yet. Starting over would cross 1.75x the file. (The client's own count also includes what
    # it had queued when the connection died.)
    delivered = proxy.forwarded - start
    assert size <= pushed.bytes_transferred
    assert delivered < 1.6 * size, (delivered, size)
    with _client(running.address) as direct:
        assert direct.push(src, "org/m:v1", resumable=False).digest == pushed.digest
    assert _spool_empty(root)  # the committed session is gone


def test_blackhole_mid_pull_fails_within_its_deadline(
    running: RunningServer, proxy: FaultProxy, src: Path, tmp_path: Path
) -> None:
    with _client(running.address) as direct:
        direct.push(src, "org/m:v1")
    out = tmp_path / "out"
    # one range read at a time, one chunk each: the link goes dark after the first chunk has come
    one_by_one = dataclasses.replace(CLIENT, pull_streams=1, pull_coalesce_bytes=0)

    with _client(proxy.address, one_by_one) as c:
        real = c.fetch

        def fetch(digest: str, offset: int, length: int) -> bytes | bytearray:
            data = real(digest, offset, length)
            proxy.blackhole = True
            return data

        c.fetch = fetch  # type: ignore[method-assign]
        start = time.monotonic()
        with pytest.raises((DeadlineExceeded, Unavailable)) as err:
            c.pull("org/m:v1", out)
        elapsed = time.monotonic() - start
    assert elapsed < PULL_BOUND_S + 2, elapsed
    assert "ReadBlob" in str(err.value) or isinstance(err.value, Unavailable)
    assert _finals(out) == []
    with _client(running.address) as direct:  # the server is fine
        assert [r[0] for r in direct.ls()] == ["org/m"]
        direct.pull("org/m:v1", tmp_path / "direct")
    _same_files(src, tmp_path / "direct")


def test_blackhole_mid_push_fails_within_its_deadline(
    running: RunningServer, proxy: FaultProxy, src: Path, tmp_path: Path
) -> None:
    sent = [0]

    def progress(n: int) -> None:
        sent[0] += n
        if sent[0] > 300_000:
            proxy.blackhole = True

    with _client(proxy.address) as c:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=f"Push did not finish within its deadline of {PUSH_S:g} s"):
            c.push(src, "org/m:v1", progress=progress, resumable=False)
        assert time.monotonic() - start < PUSH_S + 1.5
    with _client(running.address) as direct:
        assert direct.ls() == []
    assert _spool_empty(tmp_path / "store")  # the server's side of the deadline ended the ingest


def _stalled_push(src: Path, stall: threading.Event, after: int = 3) -> Iterator[bytes]:
    """Push messages for ``src`` that stop after ``after`` messages until ``stall`` is set."""
    source = open_source(src)
    for i, msg in enumerate(push_requests(begin_for(source, "org/m:v1", "lossless", None, ()), iter_events(source))):
        if i == after:
            stall.wait(30)
        yield msg


def _read_one(c: Client, digest: str) -> Any:
    call = c.transport.stub.ReadBlob(pb.ReadBlobRequest(digest=digest, offset=0, length=0), timeout=30)
    next(call)
    return call


def test_concurrency_limit_and_cancelled_calls_free_their_handlers(src: Path, big: Path, tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "store")
    running = build_server(store, "127.0.0.1:0", Settings(chunk_bytes=64 * 1024, max_concurrent_rpcs=2))
    try:
        with _client(running.address) as c:
            digest = c.push(big, "org/big:v1").digest
            blob = c.manifest(f"org/big@{digest}")[2].tensors[0].chunks[0].blob
            store.delay = 0.5  # each message of the stream takes 0.5 s to read: 3+ s in all
            streams = [_read_one(c, blob) for _ in range(2)]
            with pytest.raises(ResourceExhausted, match="limit of concurrent calls; List was refused"):
                c.ls()
            for call in streams:
                call.cancel()
            # the handlers finish the read they are in (≤ 0.5 s), then see the cancellation and stop,
            # well before the 3+ s the streams would take (slack for a loaded 2-core machine)
            deadline = time.monotonic() + 2.0
            while True:
                try:
                    c.ls()
                    break
                except ResourceExhausted:
                    assert time.monotonic() < deadline, "cancelled ReadBlob handlers still running"
                    time.sleep(0.05)
            store.delay = 0.0
            # a push cancelled mid-stream stops its ingest and leaves nothing behind
            stall = threading.Event()
            future = c.transport.push_call.future(_stalled_push(src, stall), timeout=30)
            time.sleep(0.3)
            future.cancel()
            stall.set()
            assert _spool_empty(tmp_path / "store")
            assert [r[0] for r in c.ls()] == ["org/big"]
    finally:
        running.stop(grace=0.5)


def test_server_caps_call_duration(src: Path, big: Path, tmp_path: Path) -> None:
    store = SlowStore(tmp_path / "store")
    running = build_server(store, "127.0.0.1:0", Settings(chunk_bytes=64 * 1024, max_deadline_s=1.0))
    patient = Settings(push_timeout=30, fetch_timeout=30)
    try:
        with _client(running.address, patient) as c:
            digest = c.push(big, "org/big:v1").digest
            # a stream that keeps going is ended by its handler, with DEADLINE_EXCEEDED and a message
            blob = c.manifest(f"org/big@{digest}")[2].tensors[0].chunks[0].blob
            store.delay = 0.6
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="maximum call time of 1 s"), rpc_errors("ReadBlob", 30):
                list(c.transport.stub.ReadBlob(pb.ReadBlobRequest(digest=blob), timeout=30))
            assert time.monotonic() - start < 2.5
            store.delay = 0.0
            # a push stalled by its client is cancelled by the server
            stall = threading.Event()
            start = time.monotonic()
            with pytest.raises(Exception) as err:
                c.transport.push_call(_stalled_push(src, stall), timeout=30)
            stall.set()
            assert time.monotonic() - start < 1.0 + 1.0 + 1.0  # max + grace + slack
            assert err.value.code().name in ("CANCELLED", "DEADLINE_EXCEEDED")
            assert _spool_empty(tmp_path / "store")
            assert [r[0] for r in c.ls()] == ["org/big"]
    finally:
        running.stop(grace=0.5)


CALLS = ("Push", "StartUpload", "Upload", "CommitUpload", "GetManifest", "ReadBlob", "List", "Tag", "Delete")
CALLS += ("GetTopology", "FindFileSizes")


def test_every_client_call_has_a_deadline(monkeypatch: pytest.MonkeyPatch, src: Path, tmp_path: Path) -> None:
    """No stub call goes out with ``timeout=None``."""
    seen: list[tuple[str, Any]] = []
    server = build_server(tmp_path / "store", "127.0.0.1:0", SERVER)
    try:
        with _client(server.address) as c:
            stub = c.transport.stub
            # ReadBlob, Push and Upload go through the transport's raw callables (see mzstore.transport.wire).
            raw = {"read_blob_call": "ReadBlob", "push_call": "Push", "upload_call": "Upload"}
            targets = [(stub, name) for name in CALLS if name not in raw.values()]
            targets += [(c.transport, attr) for attr in raw]
            for obj, attr in targets:
                real = getattr(obj, attr)
                name = raw.get(attr, attr)

                def spy(*args: Any, _name: str = name, _real: Any = real, **kw: Any) -> Any:
                    seen.append((_name, kw.get("timeout")))
                    return _real(*args, **kw)

                monkeypatch.setattr(obj, attr, spy)
            c.push(src, "org/m:v1")
            c.push(src, "org/m:v1", resumable=False)
            c.pull("org/m:v1", tmp_path / "out")
            c.tag("org/m:v1", "org/m:v2")
            c.ls()
            c.topology()
            c.rm("org/m:v2")
    finally:
        server.stop(grace=0.5)
    assert {n for n, _ in seen} == set(CALLS)
    assert all(t is not None and 0 < t < float("inf") for _, t in seen), seen


def test_push_to_no_server_is_unavailable(tmp_path: Path, src: Path) -> None:
    from conftest import free_port

    with _client(f"127.0.0.1:{free_port()}") as c, pytest.raises(Unavailable):
        c.push(src, "org/m:v1")
