"""The pull pipeline: parallel fetch → decode → verify → sink (see :class:`~mzstore.pull.sinks.Sink`).

How it works: tasks (one per chunk) run on a pool of ``workers`` threads.
Each worker fetches the chunk's stored bytes with the ``fetch`` callable,
checks their length, decodes them with the chunk's codec straight into the
buffer the sink names (the tensor's own memory, or a reused per-thread
scratch buffer), checks the hash of the decoded bytes (BLAKE3; sha256 for
older manifests), and only then tells the sink the chunk is good. zstd, the
hashes, numpy copies and file
writes release the GIL, so workers overlap on several cores. Memory is
bounded by ``workers`` chunks in flight, independent of model size.

A transient fetch failure (server or node unavailable) is retried with
backoff; a chunk that fails verification is fetched once more, then the
pull fails with :class:`~mzstore.errors.IntegrityError`. Bad bytes are never
handed to the sink.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from mzstore.codecs import get_codec
from mzstore.errors import CodecError, DeadlineExceeded, IntegrityError, ResourceExhausted, Unavailable
from mzstore.format.dtypes import get_dtype
from mzstore.format.manifest import Chunk
from mzstore.pull.plan import ChunkTask
from mzstore.pull.sinks import Sink
from mzstore.settings import DEFAULT_PULL_COALESCE_BYTES

Fetch = Callable[[str, int, int], "bytes | bytearray"]
T = TypeVar("T")


class Cache(Protocol):
    """Where verified stored bytes are kept between pulls (see :mod:`mzstore.pull.cache`)."""

    def get(self, chunk: Chunk) -> bytes | None: ...

    def put(self, chunk: Chunk, payload: bytes | bytearray | memoryview) -> None: ...

    def evict(self, chunk: Chunk) -> None: ...


class ByteBudget:
    """At most ``limit`` bytes in flight; one request larger than the limit runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event | None = None) -> bool:
        """Wait for room for ``n`` bytes; ``False`` if ``stop`` was set meanwhile."""
        with self._cond:
            while self.used and self.used + n > self.limit:
                if stop is not None and stop.is_set():
                    return False
                self._cond.wait(0.1)
            self.used += n
            self.peak = max(self.peak, self.used)
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


@dataclass
class PullStats:
    """Counts of one pull: ``bytes_transferred`` came over the network, ``bytes_cached`` from the local cache."""

    chunks: int = 0
    chunks_cached: int = 0
    bytes_transferred: int = 0
    bytes_cached: int = 0
    bytes_decoded: int = 0
    peak_inflight: int = 0

    def plus(self, other: PullStats) -> PullStats:
        """The counts of two pulls together (peak: the larger)."""
        return PullStats(
            chunks=self.chunks + other.chunks,
            chunks_cached=self.chunks_cached + other.chunks_cached,
            bytes_transferred=self.bytes_transferred + other.bytes_transferred,
            bytes_cached=self.bytes_cached + other.bytes_cached,
            bytes_decoded=self.bytes_decoded + other.bytes_decoded,
            peak_inflight=max(self.peak_inflight, other.peak_inflight),
        )


def decode_verified(chunk: Chunk, dtype: str, what: str, payload: bytes | bytearray, out: np.ndarray) -> np.ndarray:
    """Decode a chunk's stored bytes into ``out`` and check the hash of the result.

    Raises:
        IntegrityError: wrong length, undecodable payload, or a hash mismatch.
    """
    if len(payload) != chunk.length:
        raise IntegrityError(f"chunk of {what}: got {len(payload)} bytes, expected {chunk.length}")
    if len(out) != chunk.raw_length:
        raise IntegrityError(f"chunk of {what} does not fit its destination")
    try:
        get_codec(chunk.codec).decode_into(payload, get_dtype(dtype), out)
    except CodecError as exc:
        raise IntegrityError(f"chunk of {what} does not decode: {exc}") from None
    if not chunk.matches(out.data):
        raise IntegrityError(f"chunk rows {chunk.rows} of {what}: decoded bytes fail their {chunk.hash_name} check")
    return out


def fetch_checked(
    fetch: Fetch,
    chunk: Chunk,
    use: Callable[[bytes | bytearray], T],
    *,
    retries: int = 3,
    stop: threading.Event | None = None,
) -> tuple[T, int]:
    """Fetch a chunk's stored bytes and hand them to ``use`` (which decodes and verifies them).

    A transient fetch failure (:class:`Unavailable`; :class:`DeadlineExceeded`
    while a pull-through cache fills a shard; :class:`ResourceExhausted` from a
    server at its concurrency limit) is retried with backoff up to ``retries``
    times; a chunk that ``use`` rejects with
    :class:`IntegrityError` is fetched once more before the error stands.

    Returns:
        ``use``'s result and the number of bytes fetched.
    """
    attempt = 0
    verify_failures = 0
    while True:
        try:
            payload = fetch(chunk.blob, chunk.offset, chunk.length)
            return use(payload), len(payload)
        except (Unavailable, DeadlineExceeded, ResourceExhausted):
            attempt += 1
            if attempt > retries or (stop is not None and stop.is_set()):
                raise
            time.sleep(min(2.0, 0.1 * 2**attempt))
        except IntegrityError:
            verify_failures += 1
            if verify_failures > 1:
                raise


#: Small chunks stored next to each other in one blob are fetched with one range read (a
#: layer norm or a bias is a few KiB, and one RPC or S3 GET each costs far more than its
#: bytes). A group holds at most this many stored plus decoded bytes, so it weighs on the
#: in-flight budget no more than one ordinary chunk; larger chunks are fetched alone.
COALESCE_BYTES = DEFAULT_PULL_COALESCE_BYTES


def coalesce(tasks: list[ChunkTask], limit: int = COALESCE_BYTES) -> list[list[ChunkTask]]:
    """Group consecutive tasks whose chunks are adjacent in the same blob, up to ``limit`` bytes.

    A task weighs its chunk's stored plus decoded bytes; the order of the tasks is kept,
    and ``limit`` 0 gives every task a group of its own.
    """
    groups: list[list[ChunkTask]] = []
    weight = 0
    for task in tasks:
        c = task.chunk
        w = c.length + c.raw_length
        last = groups[-1][-1].chunk if groups else None
        if last is not None and c.blob == last.blob and c.offset == last.offset + last.length and weight + w <= limit:
            groups[-1].append(task)
            weight += w
        else:
            groups.append([task])
            weight = w
    return groups


def run_pull(
    tasks: Iterable[ChunkTask],
    fetch: Fetch,
    sink: Sink[Any],
    *,
    workers: int = 4,
    retries: int = 3,
    on_bytes: Callable[[int], None] | None = None,
    cache: Cache | None = None,
    inflight_bytes: int | None = None,
    coalesce_bytes: int = COALESCE_BYTES,
) -> PullStats:
    """Fetch, decode, verify and place every task.

    With a ``cache``, a chunk found there is verified and used like fetched
    bytes (a bad entry is evicted and the chunk fetched); every fetched chunk
    is put there once verified.

    ``workers`` chunks are fetched and decoded concurrently (each worker is
    one fetch stream); ``inflight_bytes`` caps the stored plus decoded bytes
    of the chunks in flight, so memory stays bounded whatever the model size.
    Small adjacent chunks are fetched together, in groups of up to
    ``coalesce_bytes`` (:func:`coalesce`; 0: never); one that fails its check
    there is fetched again alone.

    Raises:
        IntegrityError: a chunk failed verification twice.
        Unavailable: fetching kept failing after ``retries`` attempts.
    """
    stats = PullStats()
    lock = threading.Lock()
    stop = threading.Event()
    budget = ByteBudget(inflight_bytes) if inflight_bytes else None

    def one(group: list[ChunkTask]) -> None:
        if stop.is_set():
            return
        cost = sum(t.chunk.length + t.chunk.raw_length for t in group)
        if budget is not None and not budget.acquire(cost, stop):
            return
        try:
            if len(group) == 1:
                place(group[0])
            else:
                place_group(group)
        finally:
            if budget is not None:
                budget.release(cost)

    def place_group(group: list[ChunkTask]) -> None:
        """Cache hits first, then one range read per run of the chunks still missing."""
        looked = [(t, cache.get(t.chunk) if cache is not None else None) for t in group]
        prefetched: dict[int, memoryview] = {}
        # runs of adjacent chunks among the missing ones (a group's runs already fit its limit)
        for run in coalesce([t for t, hit in looked if hit is None], sys.maxsize):
            start = run[0].chunk.offset
            end = run[-1].chunk.offset + run[-1].chunk.length
            try:
                data = fetch(run[0].chunk.blob, start, end - start)
            except (Unavailable, DeadlineExceeded, ResourceExhausted):
                continue  # each chunk is fetched alone, with retries
            if len(data) != end - start:
                continue
            view = memoryview(data)
            for t in run:
                prefetched[id(t)] = view[t.chunk.offset - start : t.chunk.offset - start + t.chunk.length]
        for t, hit in looked:
            if stop.is_set():
                return
            place(t, hit, prefetched.get(id(t)), looked_up=True)

    def place(
        task: ChunkTask,
        hit: bytes | None = None,
        prefetched: memoryview | None = None,
        *,
        looked_up: bool = False,
    ) -> None:
        what = task.tensor or task.file
        compact = sink.compact(task)

        def use(payload: bytes | bytearray) -> np.ndarray | None:
            if compact:
                # The sink verifies the stored bytes and uses them as they are (expanded on a device, exported).
                if len(payload) != task.chunk.length:
                    raise IntegrityError(f"chunk of {what}: got {len(payload)} bytes, expected {task.chunk.length}")
                sink.write_payload(task, payload)
                return None
            return decode_verified(task.chunk, task.dtype, what, payload, sink.target(task))

        data: np.ndarray | None = None
        cached = hit if looked_up else cache.get(task.chunk) if cache is not None else None
        if cached is not None:
            try:
                data = use(cached)
            except IntegrityError:
                assert cache is not None
                cache.evict(task.chunk)
                cached = None
        fetched = 0
        if cached is None:
            kept: list[bytes | bytearray] = []

            def use_and_keep(payload: bytes | bytearray) -> np.ndarray | None:
                result = use(payload)
                kept.append(payload)
                return result

            verified = False
            if prefetched is not None:  # this chunk's part of a range read for its group
                fetched = len(prefetched)
                try:
                    data, verified = use_and_keep(bytearray(prefetched)), True
                except IntegrityError:
                    pass  # fetched again alone below, as any chunk that fails its check
            if not verified:
                data, more = fetch_checked(fetch, task.chunk, use_and_keep, retries=retries, stop=stop)
                fetched += more
            if cache is not None:
                cache.put(task.chunk, kept[-1])
        if data is not None:
            sink.write(task, data)
        with lock:
            stats.chunks += 1
            stats.bytes_transferred += fetched
            if cached is not None:
                stats.chunks_cached += 1
                stats.bytes_cached += len(cached)
            stats.bytes_decoded += task.chunk.raw_length
        if on_bytes:
            on_bytes(task.chunk.raw_length)

    groups = coalesce(list(tasks), coalesce_bytes)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mzstore-pull") as pool:
        futures = [pool.submit(one, g) for g in groups]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                stop.set()
                for g in futures:
                    g.cancel()
                raise f.exception()  # type: ignore[misc]
    stats.peak_inflight = budget.peak if budget is not None else 0
    return stats
