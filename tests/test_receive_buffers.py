"""Receive buffers: reused once nothing refers to them, never while anything does, and what a pull
built on them writes (files, cache entries) is byte-exact."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mzstore import durable
from mzstore.client import Client
from mzstore.durable import DIRECT_ALIGN, DirectAppender, buffer_address
from mzstore.pull.cache import ChunkCache
from mzstore.server.app import RunningServer, build_server
from mzstore.settings import Settings
from mzstore.transport.buffers import GRAIN, POOL_MIN_BYTES, ReceiveBuffers

MIB = 1 << 20


def test_a_buffer_is_reused_only_once_every_view_of_it_is_gone() -> None:
    pool = ReceiveBuffers(64 * MIB)
    first = pool.take(3 * MIB)
    assert isinstance(first, memoryview) and len(first) == 3 * MIB and not first.readonly
    assert buffer_address(first) is not None and buffer_address(first) % DIRECT_ALIGN == 0  # type: ignore[operator]
    first[:4] = b"abcd"
    held = np.frombuffer(first[1:], dtype=np.uint8)  # an array made from a slice of the view
    del first
    second = pool.take(3 * MIB)
    assert pool.reused == 0 and bytes(held[:3]) == b"bcd"  # still held: a new buffer, the old bytes intact
    second[:4] = b"wxyz"
    assert bytes(held[:3]) == b"bcd"
    del held, second
    third = pool.take(2 * MIB)  # fits either freed buffer without wasting more than half
    assert pool.reused == 1 and len(third) == 2 * MIB


def test_sizes_small_reads_and_the_bound() -> None:
    pool = ReceiveBuffers(4 * MIB)
    small = pool.take(POOL_MIN_BYTES - 1)
    assert isinstance(small, bytearray) and len(small) == POOL_MIN_BYTES - 1
    big = pool.take(3 * MIB + 5)  # a 4 MiB buffer, kept
    assert len(big) == 3 * MIB + 5
    other = pool.take(3 * MIB)  # over the bound while the first is in use: made, not kept
    del big, other
    again = pool.take(3 * MIB + 100)
    assert pool.reused == 1 and len(again) == 3 * MIB + 100
    del again
    tiny = pool.take(GRAIN)  # the free 4 MiB buffer would waste over half: a new one, the big one let go
    assert pool.reused == 1 and pool._kept <= pool.keep_bytes
    del tiny
    pool.clear()
    pool.take(GRAIN)
    assert pool.reused == 1  # nothing was kept after clear()


def test_threads_never_get_the_same_buffer_at_once() -> None:
    pool = ReceiveBuffers(32 * MIB)
    errors: list[str] = []

    def work(tag: int) -> None:
        for i in range(200):
            buf = pool.take(MIB + (i % 7) * 4096)
            mark = bytes([tag]) * 64
            buf[:64] = mark
            buf[-64:] = mark
            time.sleep(0)
            if bytes(buf[:64]) != mark or bytes(buf[-64:]) != mark:
                errors.append(f"thread {tag}: its buffer was handed to another thread")
            del buf

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and pool.reused > 0


def test_an_aligned_block_goes_to_the_disk_from_where_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DirectAppender: a page-aligned piece at an aligned position is not copied into its buffer first."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    if durable.open_direct(probe) is None:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    pool = ReceiveBuffers(16 * MIB)
    piece = pool.take(MIB + 123)
    piece[:] = os.urandom(len(piece))
    written: list[int] = []
    real = os.pwrite

    def spy(fd: int, data: memoryview, offset: int) -> int:
        written.append(buffer_address(memoryview(data)) or -1)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    path = tmp_path / "entry"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        app = DirectAppender(path, fd, 0)
        app.write(piece)
        app.finish()
    finally:
        os.close(fd)
    assert written[0] == buffer_address(piece)  # straight from the receive buffer
    assert path.read_bytes() == bytes(piece)


# --- a pull on pooled buffers ------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RunningServer]:
    running = build_server(tmp_path / "store", "127.0.0.1:0", Settings(chunk_bytes=2 * MIB), http="127.0.0.1:0")
    yield running
    running.stop(grace=0.5)


def _model(path: Path) -> Path:
    gen = torch.Generator().manual_seed(3)
    path.mkdir(parents=True)
    tensors = {f"w{i}": torch.randn(1024, 1024, generator=gen).to(torch.bfloat16) for i in range(12)}
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("plane", ["http", "grpc"])
def test_a_pull_reuses_its_buffers_and_its_cache_entries_hold_the_right_bytes(
    served: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plane: str
) -> None:
    """The cache's writer stalls on its first entry while the pull reads on: the payloads queued behind
    it must keep their buffers (a later read reusing one would put another chunk's bytes in an entry),
    and once they are written their buffers serve later reads."""
    src = _model(tmp_path / "src")
    real_write = ChunkCache._write_chunk
    writes: list[int] = []

    def stalling(self: ChunkCache, item: tuple[Path, bytes | bytearray | memoryview]) -> None:
        writes.append(1)
        if len(writes) == 1:
            time.sleep(0.3)
        real_write(self, item)

    monkeypatch.setattr(ChunkCache, "_write_chunk", stalling)
    monkeypatch.setenv("MZSTORE_HOME", str(tmp_path / "home"))
    with Client(served.address, data_plane=plane) as c:
        c.push(src, "rb/m:v1", codec="lossless")
        c.settings = dataclasses.replace(c.settings, pull_inflight_bytes=4 * MIB, pull_coalesce_bytes=0)
        real_fetch = c.fetch

        def slow_fetch(digest: str, offset: int, length: int) -> bytes | bytearray | memoryview:
            time.sleep(0.03)  # 12 reads: 0.36 s, past the stall
            return real_fetch(digest, offset, length)

        c.fetch = slow_fetch  # type: ignore[method-assign]
        info = c.pull("rb/m:v1", tmp_path / "out", workers=1)
        assert type(c.transport).__name__ == {"http": "HttpTransport", "grpc": "GrpcTransport"}[plane]
        assert info.bytes_transferred > 0 and c.transport.buffers.reused > 0  # type: ignore[attr-defined]
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
        assert c.cache is not None
        report = c.cache.verify()
        assert report.checked == len(c.manifest("rb/m:v1")[2].chunks()) and not report.removed, report.problems


@pytest.mark.parametrize("codec", ["lossless", "int8"])
def test_a_push_assembles_its_chunks_in_reused_buffers(
    served: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str
) -> None:
    """The ingest fills each chunk in a pooled buffer. While a chunk is queued for encoding (and, int8,
    until its decoded bytes are hashed for the pulled file) its buffer is not reused; the first encode
    stalls so that several are held at once. The pushed model pulls back as it was pushed."""
    from mzstore.push import ingest

    src = _model(tmp_path / "src")
    real_encode = ingest._encode
    calls: list[int] = []

    def stalling(*args: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)
        return real_encode(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(ingest, "_encode", stalling)
    before = ingest.CHUNK_BUFFERS.reused
    with Client(served.address) as c:
        c.push(src, "rb/p:v1", codec=codec)
        assert len(calls) == 12 and ingest.CHUNK_BUFFERS.reused > before
        c.pull("rb/p:v1", tmp_path / "out")
    pulled = (tmp_path / "out" / "model.safetensors").read_bytes()
    if codec == "lossless":
        assert pulled == (src / "model.safetensors").read_bytes()
    else:  # each tensor within int8's error of its own: no chunk got another chunk's bytes
        want = load_file(str(src / "model.safetensors"))
        back = load_file(str(tmp_path / "out" / "model.safetensors"))
        for name, t in want.items():
            err = (back[name].float() - t.float()).abs().max().item()
            assert err <= t.float().abs().max().item() / 100, name
