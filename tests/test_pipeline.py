"""The pull pipeline: concurrent streams bounded by the in-flight byte budget."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mzstore.client import Client
from mzstore.pull.pipeline import SPAN_BYTES, coalesce, run_pull
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


def _pull_and_check(manifest, fetch, out: Path, src: Path, workers: int = 2, **kw):  # type: ignore[no-untyped-def]
    """Pull every chunk of ``manifest`` with ``fetch`` into ``out``; check it holds ``src``'s tensors."""
    sink = DirectorySink(out, manifest)
    sink.open()
    stats = run_pull(plan_pull(manifest), fetch, sink, workers=workers, **kw)
    sink.finish()
    got, want = load_file(str(out / "model.safetensors")), load_file(str(src / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    return stats


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

    # one chunk per fetch here (no coalescing), so the count above sees every chunk
    stats = _pull_and_check(
        manifest, slow_fetch, tmp_path / "out", pushed, workers=8, inflight_bytes=budget, coalesce_bytes=0
    )
    assert stats.chunks == len(tasks) > 8
    if budget_chunks <= 1:
        assert peak[0] <= biggest  # one chunk at a time (an oversized chunk runs alone)
    else:
        assert biggest < peak[0] <= budget  # several streams, never over the budget
    assert stats.peak_inflight <= max(budget, biggest)


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
    run_pull(tasks, fetch, sink, workers=4, coalesce_bytes=0)
    sink.finish()
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

    from mzstore import durable

    monkeypatch.setattr(durable, "FLUSH_BYTES", 64 * 1024)
    synced: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(durable.os, "fdatasync", counting)
    small_client.pull("p:1", tmp_path / "out")
    # 8 tensors of 256 KiB: several background syncs ran before the commit's fsync.
    assert len(synced) >= 3
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = load_file(str(pushed / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable.os, "fdatasync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        small_client.pull("p:1", tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    assert not list((tmp_path / "bad").glob(".mzstore-partial-*"))


@pytest.fixture
def many_small(small_client: Client, tmp_path: Path) -> Path:
    """Like a transformer checkpoint: many tensors of a few KiB (norms, biases) between large ones."""
    gen = torch.Generator().manual_seed(1)
    src = tmp_path / "small-src"
    src.mkdir()
    tensors = {}
    for i in range(4):
        tensors[f"layers.{i}.weight"] = torch.randn(256, 256, generator=gen)
        for part in ("bias", "norm.weight", "norm.bias", "scale"):
            tensors[f"layers.{i}.{part}"] = torch.randn(256, generator=gen)
    save_file(tensors, str(src / "model.safetensors"))
    small_client.push(src, "small:1")
    return src


def _counting(fetch):  # type: ignore[no-untyped-def]
    calls: list[tuple[str, int, int]] = []

    def counted(blob: str, offset: int, length: int) -> bytearray:
        calls.append((blob, offset, length))
        return fetch(blob, offset, length)

    return counted, calls


def test_small_adjacent_chunks_are_fetched_in_one_range_read(
    small_client: Client, many_small: Path, tmp_path: Path
) -> None:
    _, _, manifest = small_client.manifest("small:1")
    tasks = plan_pull(manifest)
    fetch, calls = _counting(small_client.fetch)
    stats = _pull_and_check(manifest, fetch, tmp_path / "a", many_small)
    groups = coalesce(tasks)
    assert len(calls) == len(groups) < len(tasks) // 2  # the 4-KiB tensors ride along with their neighbours
    assert stats.chunks == len(tasks)
    assert stats.bytes_transferred == sum(t.chunk.length for t in tasks) == sum(n for _, _, n in calls)
    # every group is adjacent chunks of one blob, within the limit
    for g in groups:
        assert all(b.chunk.offset == a.chunk.offset + a.chunk.length for a, b in itertools.pairwise(g))
        assert len(g) == 1 or sum(t.chunk.length + t.chunk.raw_length for t in g) <= 8 * 1024 * 1024

    fetch, calls = _counting(small_client.fetch)
    _pull_and_check(manifest, fetch, tmp_path / "b", many_small, coalesce_bytes=0)
    assert len(calls) == len(tasks)  # off: one fetch per chunk


def test_a_bad_chunk_in_a_range_read_is_fetched_again_alone(
    small_client: Client, many_small: Path, tmp_path: Path
) -> None:
    _, _, manifest = small_client.manifest("small:1")
    tasks = plan_pull(manifest)
    group = next(g for g in coalesce(tasks) if len(g) > 2)
    victim = group[1].chunk
    fetch, calls = _counting(small_client.fetch)

    def corrupting(blob: str, offset: int, length: int) -> bytearray:
        data = fetch(blob, offset, length)
        if blob == victim.blob and length > victim.length and offset <= victim.offset < offset + length:
            data[victim.offset - offset] ^= 0xFF  # in the group's range read only
        return data

    stats = _pull_and_check(manifest, corrupting, tmp_path / "out", many_small)
    assert calls.count((victim.blob, victim.offset, victim.length)) == 1  # refetched alone, once, and good
    assert stats.bytes_transferred == sum(n for _, _, n in calls)


def test_a_failed_range_read_falls_back_to_one_fetch_per_chunk(
    small_client: Client, many_small: Path, tmp_path: Path
) -> None:
    from mzstore.errors import Unavailable

    _, _, manifest = small_client.manifest("small:1")
    tasks = plan_pull(manifest)
    single = {(t.chunk.blob, t.chunk.offset, t.chunk.length) for t in tasks}
    fetch, calls = _counting(small_client.fetch)

    def no_ranges(blob: str, offset: int, length: int) -> bytearray:
        if (blob, offset, length) not in single:
            raise Unavailable("this node serves one chunk at a time")
        return fetch(blob, offset, length)

    stats = _pull_and_check(manifest, no_ranges, tmp_path / "out", many_small)
    assert sorted(calls) == sorted(single)
    assert stats.bytes_transferred == sum(t.chunk.length for t in tasks)


def _parts_of(fetch, fail_after: int | None = None, corrupt: int | None = None):  # type: ignore[no-untyped-def]
    """A ``parts`` reader over ``fetch`` (a transport's ``read_parts``, one ``fetch`` per part here), which
    breaks after ``fail_after`` parts of a run and flips a byte of part ``corrupt``; and its calls."""
    calls: list[tuple[str, int, list[int]]] = []

    def parts(blob: str, offset: int, lengths: list[int]):  # type: ignore[no-untyped-def]
        calls.append((blob, offset, list(lengths)))
        for i, n in enumerate(lengths):
            if fail_after is not None and i == fail_after:
                raise ConnectionResetError("the connection went away mid-body")
            data = fetch(blob, offset, n)
            if i == corrupt:
                data[0] ^= 0xFF
            yield data
            offset += n

    return parts, calls


@pytest.mark.parametrize(("fail_after", "corrupt"), [(None, None), (2, None), (0, None), (None, 1)])
def test_runs_of_chunks_stream_to_the_decoders_within_the_budget(
    small_client: Client, pushed: Path, tmp_path: Path, fail_after: int | None, corrupt: int | None
) -> None:
    """With ``parts``, a group's chunks reach the decoders one by one; a run that breaks part way leaves its
    remaining chunks to ``fetch`` alone, a part that fails its check is read again alone, and the budget holds."""
    _, _, manifest = small_client.manifest("p:1")
    tasks = plan_pull(manifest)
    fetch, singles = _counting(small_client.fetch)
    parts, runs = _parts_of(small_client.fetch, fail_after, corrupt)
    biggest = max(t.chunk.length + t.chunk.raw_length for t in tasks)
    stats = _pull_and_check(
        manifest, fetch, tmp_path / "out", pushed, workers=2, parts=parts, inflight_bytes=3 * biggest
    )
    assert stats.chunks == len(tasks)
    assert runs and all(len(lengths) > 1 for _, _, lengths in runs)
    per_run = sum(len(lengths) for _, _, lengths in runs)
    if fail_after is None and corrupt is None:
        assert per_run == len(tasks) and singles == []  # every chunk came through a run
    elif fail_after is not None:
        assert len(singles) == per_run - fail_after * len(runs)  # the rest of each run, alone
    else:
        assert len(singles) == len(runs)  # each run's bad part, read again alone
    assert stats.bytes_transferred == sum(t.chunk.length for t in tasks) + sum(n for _, _, n in singles) * (
        corrupt is not None
    )
    # A group is taken from the budget whole (up to SPAN_BYTES of chunks); one larger than it runs alone.
    largest = max(sum(t.chunk.length + t.chunk.raw_length for t in g) for g in coalesce(tasks, SPAN_BYTES))
    assert largest > 3 * biggest  # groups are bigger with parts than the budget here...
    assert stats.peak_inflight <= largest  # ...and still one at a time


def test_cached_chunks_of_a_run_are_not_read_again(small_client: Client, pushed: Path, tmp_path: Path) -> None:
    """Chunks of a group already in the cache are decoded from it; only the runs between them are read."""
    _, _, manifest = small_client.manifest("p:1")
    tasks = plan_pull(manifest)
    held = {(t.chunk.blob, t.chunk.offset): small_client.fetch(t.chunk.blob, t.chunk.offset, t.chunk.length)
            for t in tasks[::3]}  # fmt: skip

    class Cache:
        def get(self, chunk):  # type: ignore[no-untyped-def]
            data = held.get((chunk.blob, chunk.offset))
            return None if data is None else bytes(data)

        def put(self, chunk, payload):  # type: ignore[no-untyped-def]
            pass

        def evict(self, chunk):  # type: ignore[no-untyped-def]
            raise AssertionError("a good cached chunk was evicted")

    fetch, singles = _counting(small_client.fetch)
    parts, runs = _parts_of(small_client.fetch)
    stats = _pull_and_check(manifest, fetch, tmp_path / "out", pushed, parts=parts, cache=Cache())
    read = [(blob, offset + sum(lengths[:i])) for blob, offset, lengths in runs for i in range(len(lengths))]
    read += [(blob, offset) for blob, offset, _ in singles]
    assert sorted(read) == sorted(
        (t.chunk.blob, t.chunk.offset) for t in tasks if (t.chunk.blob, t.chunk.offset) not in held
    )
    assert stats.chunks_cached == len(held)


def test_a_cached_group_is_decoded_on_every_worker(small_client: Client, pushed: Path, tmp_path: Path) -> None:
    """A group is up to 64 MiB with ``parts``: when its chunks all come from the cache, they still go to
    the decoders one by one (one decode task for the whole group made warm loads 20-40 % slower)."""
    import numpy as np

    from mzstore.pull.sinks import Sink

    _, _, manifest = small_client.manifest("p:1")
    first = plan_pull(manifest)[0].chunk.blob
    tasks = [t for t in plan_pull(manifest) if t.chunk.blob == first]  # one blob: one group
    assert len(tasks) > 2 and len(coalesce(tasks, SPAN_BYTES)) == 1
    held = {t.chunk.offset: bytes(small_client.fetch(first, t.chunk.offset, t.chunk.length)) for t in tasks}

    class Cache:
        def get(self, chunk):  # type: ignore[no-untyped-def]
            return held[chunk.offset]

        def put(self, chunk, payload):  # type: ignore[no-untyped-def]
            pass

    threads: set[str] = set()
    started = threading.Barrier(2, timeout=5)
    together = threading.Event()
    decoded: dict[int, bytes] = {}

    class Recording(Sink[None]):
        def target(self, task):  # type: ignore[no-untyped-def]
            threads.add(threading.current_thread().name)
            if not together.is_set():
                with contextlib.suppress(threading.BrokenBarrierError):
                    started.wait()  # two decodes at once, if the pipeline lets them
                    together.set()
            return np.empty(task.chunk.raw_length, np.uint8)

        def write(self, task, data):  # type: ignore[no-untyped-def]
            decoded[task.chunk.offset] = data.tobytes()

        def finish(self) -> None:
            return None

    parts, runs = _parts_of(small_client.fetch)
    stats = run_pull(tasks, small_client.fetch, Recording(), workers=2, streams=1, parts=parts, cache=Cache())
    assert runs == [] and stats.chunks_cached == len(tasks) == len(decoded)  # nothing was read
    assert len(threads) == 2 and together.is_set()


def test_reads_go_on_while_the_decoders_are_busy(small_client: Client, pushed: Path, tmp_path: Path) -> None:
    """One decoder, four read streams: reads overlap each other and the slow decodes (issue 14)."""
    _, _, manifest = small_client.manifest("p:1")
    tasks = plan_pull(manifest)
    lock = threading.Lock()
    active, most, decoding_while_reading = [0], [0], [0]
    decoding = threading.Event()

    def fetch(blob: str, offset: int, length: int) -> bytearray:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            decoding_while_reading[0] += decoding.is_set()
        try:
            time.sleep(0.02)
            return small_client.fetch(blob, offset, length)
        finally:
            with lock:
                active[0] -= 1

    class SlowSink(DirectorySink):
        def write(self, task, data):  # type: ignore[no-untyped-def]
            decoding.set()
            time.sleep(0.02)
            decoding.clear()
            super().write(task, data)

    sink = SlowSink(tmp_path / "out", manifest)
    sink.open()
    stats = run_pull(tasks, fetch, sink, workers=1, streams=4, coalesce_bytes=0)
    sink.finish()
    assert stats.chunks == len(tasks)
    assert most[0] == 4  # with one pool doing both, one worker meant one read at a time
    assert decoding_while_reading[0] > 0


def test_a_chunk_that_fails_its_check_is_read_again_through_refetch(
    small_client: Client, pushed: Path, tmp_path: Path
) -> None:
    """The second read of a bad chunk goes through ``refetch`` (the origin, past a cache), never ``fetch``."""
    _, _, manifest = small_client.manifest("p:1")
    tasks = plan_pull(manifest)
    bad = tasks[0].chunk
    plain: list[tuple[str, int, int]] = []
    again: list[tuple[str, int, int]] = []

    def fetch(blob: str, offset: int, length: int) -> bytes | bytearray:
        plain.append((blob, offset, length))
        data = small_client.fetch(blob, offset, length)
        if (blob, offset) == (bad.blob, bad.offset):
            return b"\x00" * length  # what a corrupt site cache returns
        return data

    def refetch(blob: str, offset: int, length: int) -> bytes | bytearray:
        again.append((blob, offset, length))
        return small_client.fetch(blob, offset, length)

    stats = _pull_and_check(manifest, fetch, tmp_path / "out", pushed, refetch=refetch, coalesce_bytes=0)
    assert again == [(bad.blob, bad.offset, bad.length)]
    assert plain.count((bad.blob, bad.offset, bad.length)) == 1
    assert stats.chunks == len(tasks)
