"""The pull pipeline: concurrent streams bounded by the in-flight byte budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mzstore.client import Client
from mzstore.pull.pipeline import run_pull
from mzstore.pull.plan import plan_pull
from mzstore.pull.sinks import DirectorySink


@pytest.fixture
def pushed(small_client: Client, tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    src = tmp_path / "src"
    src.mkdir()
    save_file({f"w{i}": torch.randn(256, 256, generator=gen) for i in range(8)}, str(src / "model.safetensors"))
    small_client.push(src, "p:1")
    return src


@pytest.mark.parametrize("budget_chunks", [0, 1, 3])
def test_inflight_budget_bounds_concurrent_chunks(
    small_client: Client, pushed: Path, tmp_path: Path, budget_chunks: int
) -> None:
    _, _, manifest = small_client.manifest("p:1")
    tasks = plan_pull(manifest)
    costs = {(t.chunk.blob, t.chunk.offset): t.chunk.length + t.chunk.raw_length for t in tasks}
    biggest = max(costs.values())
    budget = max(1, budget_chunks * biggest)
    lock = threading.Lock()
    inflight = [0]
    peak = [0]

    def slow_fetch(blob: str, offset: int, length: int) -> bytearray:
        with lock:
            inflight[0] += costs[(blob, offset)]
            peak[0] = max(peak[0], inflight[0])
        try:
            time.sleep(0.01)
            return small_client.fetch(blob, offset, length)
        finally:
            with lock:
                inflight[0] -= costs[(blob, offset)]

    sink = DirectorySink(tmp_path / "out", manifest)
    sink.open()
    stats = run_pull(tasks, slow_fetch, sink, workers=8, inflight_bytes=budget)
    sink.commit()
    assert stats.chunks == len(tasks) > 8
    if budget_chunks <= 1:
        assert peak[0] <= biggest  # one chunk at a time (an oversized chunk runs alone)
    else:
        assert biggest < peak[0] <= budget  # several streams, never over the budget
    assert stats.peak_inflight <= max(budget, biggest)
    got, want = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(pushed / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_workers_are_concurrent_streams(small_client: Client, pushed: Path, tmp_path: Path) -> None:
    _, _, manifest = small_client.manifest("p:1")
    tasks = plan_pull(manifest)
    lock = threading.Lock()
    active = [0]
    most = [0]

    def fetch(blob: str, offset: int, length: int) -> bytearray:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.02)
            return small_client.fetch(blob, offset, length)
        finally:
            with lock:
                active[0] -= 1

    sink = DirectorySink(tmp_path / "out", manifest)
    sink.open()
    run_pull(tasks, fetch, sink, workers=4)
    sink.commit()
    assert most[0] == 4


def test_busy_and_unavailable_fetches_are_retried_then_give_up() -> None:
    from mzstore.errors import ResourceExhausted, Unavailable
    from mzstore.format.manifest import Chunk
    from mzstore.pull.pipeline import fetch_checked

    chunk = Chunk(blob="sha256:" + "0" * 64, offset=0, length=3, rows=[0, 3], raw_length=3, sha256="x", codec="zstd")
    calls: list[int] = []

    def flaky(blob: str, offset: int, length: int) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise ResourceExhausted("the server is at its limit of concurrent calls")
        if len(calls) == 2:
            raise Unavailable("connection reset")
        return b"abc"

    assert fetch_checked(flaky, chunk, bytes, retries=3) == (b"abc", 3)
    assert len(calls) == 3

    def down(blob: str, offset: int, length: int) -> bytes:
        raise Unavailable("no server")

    with pytest.raises(Unavailable):
        fetch_checked(down, chunk, bytes, retries=1)


def test_pull_to_dir_syncs_in_the_background_and_a_sync_error_fails_it(
    small_client: Client, pushed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from mzstore.pull import sinks

    monkeypatch.setattr(sinks, "FLUSH_BYTES", 64 * 1024)
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(sinks.os, "fdatasync", counting)
    small_client.pull("p:1", tmp_path / "out")
    # 8 tensors of 256 KiB: several background syncs ran before the commit's fsync.
    assert len(synced) >= 3
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = load_file(str(pushed / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sinks.os, "fdatasync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        small_client.pull("p:1", tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    assert not list((tmp_path / "bad").glob(".mzstore-partial-*"))
