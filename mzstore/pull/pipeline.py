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

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ALL_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mzstore.errors import CodecError, DeadlineExceeded, IntegrityError, ResourceExhausted, Unavailable
from mzstore.format.dtypes import get_dtype
from mzstore.format.manifest import Chunk
from mzstore.pull.plan import ChunkTask
from mzstore.pull.sinks import Payload, Sink
from mzstore.settings import DEFAULT_PULL_COALESCE_BYTES

if TYPE_CHECKING:
    import numpy as np

Fetch = Callable[[str, int, int], Payload]
#: ``parts(blob, offset, lengths)``: adjacent ranges of a blob read in one request, each yielded as it
#: arrives (a transport's ``read_parts``; see :func:`run_pull`).
Parts = Callable[[str, int, list[int]], Iterator[Payload]]
log = logging.getLogger("mzstore.pull")
T = TypeVar("T")


class Cache(Protocol):
    """Where verified stored bytes are kept between pulls (see :mod:`mzstore.pull.cache`)."""

    def get(self, chunk: Chunk) -> bytes | None: ...

    def put(self, chunk: Chunk, payload: Payload) -> None: ...

    def evict(self, chunk: Chunk) -> None: ...

    def flush(self) -> None: ...


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


#: Reads a delta's base chunk: its decoded, verified bytes (see :func:`base_reader`).
BaseOf = Callable[[Chunk], "np.ndarray"]


def decode_verified(
    chunk: Chunk,
    dtype: str,
    what: str,
    payload: Payload,
    out: np.ndarray,
    base_of: BaseOf | None = None,
) -> np.ndarray:
    """Decode a chunk's stored bytes into ``out`` and check the hash of the result.

    A delta chunk (``push --base``) is decoded against its base chunk's bytes, which ``base_of`` reads,
    decodes and verifies first.

    Raises:
        IntegrityError: wrong length, undecodable payload, a hash mismatch, or a delta with no way to read
            its base.
    """
    if len(payload) != chunk.length:
        raise IntegrityError(f"chunk of {what}: got {len(payload)} bytes, expected {chunk.length}")
    if len(out) != chunk.raw_length:
        raise IntegrityError(f"chunk of {what} does not fit its destination")
    from mzstore.codecs import get_codec  # numpy and the codecs: loaded by the first decoder, while reads go on

    try:
        if chunk.base is not None:
            if base_of is None:
                raise IntegrityError(f"chunk of {what} is a delta, and its base cannot be read here")
            from mzstore.codecs.delta import DeltaCodec

            DeltaCodec().apply_into(payload, get_dtype(dtype), base_of(chunk.base), out)
        else:
            get_codec(chunk.codec).decode_into(payload, get_dtype(dtype), out)
    except CodecError as exc:
        raise IntegrityError(f"chunk of {what} does not decode: {exc}") from None
    if not chunk.matches(out.data):
        raise IntegrityError(f"chunk rows {chunk.rows} of {what}: decoded bytes fail their {chunk.hash_name} check")
    return out


def base_reader(
    fetch: Fetch,
    dtype: str,
    what: str,
    *,
    cache: Cache | None = None,
    on_fetched: Callable[[int], None] | None = None,
    retries: int = 3,
    stop: threading.Event | None = None,
) -> BaseOf:
    """How a delta chunk's base is read: from ``cache`` when it holds it (an edge device that has the base
    model), else fetched (and then cached); decoded, against its own base if it is a delta too, and verified.
    ``on_fetched`` is told the bytes each fetch moved."""
    import numpy as np

    def base_of(c: Chunk) -> np.ndarray:
        out = np.empty(c.raw_length, dtype=np.uint8)
        label = f"{what} (its base)"
        decoded, n = obtain(
            c,
            lambda data: decode_verified(c, dtype, label, data, out, base_of),
            cache.get(c) if cache is not None else None,
            fetch,
            cache=cache,
            retries=retries,
            stop=stop,
        )
        if on_fetched is not None and n:
            on_fetched(n)
        return decoded

    return base_of


def obtain(
    chunk: Chunk,
    use: Callable[[Payload], T],
    cached: Payload | None,
    fetch: Fetch,
    *,
    payload: Payload | None = None,
    refetch: Fetch | None = None,
    cache: Cache | None = None,
    retries: int = 3,
    stop: threading.Event | None = None,
) -> tuple[T, int]:
    """A chunk's stored bytes handed to ``use`` (which decodes and verifies them, or raises
    :class:`IntegrityError`), from the first source that passes: ``cached`` (the cache's copy; evicted
    when it fails), ``payload`` (read already, by a pull's first stage), then ``fetch``. A fetched chunk
    that fails is read once more, through ``refetch`` (default ``fetch``) when ``payload`` failed
    already, before the error stands. What passed is put in ``cache`` unless it came from there.

    Returns:
        ``use``'s result and the number of bytes read over the network (0 for a cache hit).
    """
    if cached is not None:
        try:
            return use(cached), 0
        except IntegrityError:
            assert cache is not None
            cache.evict(chunk)
    kept: list[Payload] = []

    def use_and_keep(data: Payload) -> T:
        result = use(data)
        kept.append(data)
        return result

    fetched = 0
    prior = 0
    if payload is not None:
        fetched = len(payload)
        try:
            result = use_and_keep(payload)
        except IntegrityError:
            prior = 1  # read once more below, from the origin where the transport can tell
    if payload is None or prior:
        result, more = fetch_checked(
            (refetch or fetch) if prior else fetch, chunk, use_and_keep, retries=retries, stop=stop, failed=prior
        )
        fetched += more
    if cache is not None:
        cache.put(chunk, kept[-1])
    return result, fetched


def fetch_checked(
    fetch: Fetch,
    chunk: Chunk,
    use: Callable[[Payload], T],
    *,
    retries: int = 3,
    stop: threading.Event | None = None,
    failed: int = 0,
) -> tuple[T, int]:
    """Fetch a chunk's stored bytes and hand them to ``use`` (which decodes and verifies them).

    A transient fetch failure (:class:`Unavailable`; :class:`DeadlineExceeded`
    while a pull-through cache fills a shard; :class:`ResourceExhausted` from a
    server at its concurrency limit) is retried with backoff up to ``retries``
    times; a chunk that ``use`` rejects with
    :class:`IntegrityError` is fetched once more before the error stands
    (``failed=1``: the caller's copy failed already, the first rejection stands).

    Returns:
        ``use``'s result and the number of bytes fetched.
    """
    verify_failures = failed
    while True:
        payload = read_retrying(fetch, chunk.blob, chunk.offset, chunk.length, retries=retries, stop=stop)
        try:
            return use(payload), len(payload)
        except IntegrityError:
            verify_failures += 1
            if verify_failures > 1:
                raise


def read_retrying(
    fetch: Fetch, blob: str, offset: int, length: int, *, retries: int = 3, stop: threading.Event | None = None
) -> Payload:
    """One range read; transient failures are retried with backoff (0.2, 0.4, 0.8 … s) up to ``retries`` times."""
    attempt = 0
    while True:
        try:
            return fetch(blob, offset, length)
        except (Unavailable, DeadlineExceeded, ResourceExhausted):
            attempt += 1
            if attempt > retries or (stop is not None and stop.is_set()):
                raise
            time.sleep(min(2.0, 0.1 * 2**attempt))


#: Small chunks stored next to each other in one blob are fetched with one range read (a
#: layer norm or a bias is a few KiB, and one RPC or S3 GET each costs far more than its
#: bytes). A group holds at most this many stored plus decoded bytes, so it weighs on the
#: in-flight budget no more than one ordinary chunk; larger chunks are fetched alone.
COALESCE_BYTES = DEFAULT_PULL_COALESCE_BYTES
#: Where the transport streams the parts of one range read (``parts``), a group of adjacent chunks holds up
#: to this many stored plus decoded bytes: each chunk still decodes as soon as its own bytes are in, and
#: the server answers far fewer requests (1 GB int8 load over 10 Gbit/s: server CPU per stored GB
#: 0.54-0.62 -> 0.35 s, the load 1.07-1.13 -> 0.98-1.00 s; ``bench/bench_link.py``).
SPAN_BYTES = 64 * 1024 * 1024


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
    streams: int | None = None,
    retries: int = 3,
    on_bytes: Callable[[int], None] | None = None,
    cache: Cache | None = None,
    inflight_bytes: int | None = None,
    coalesce_bytes: int = COALESCE_BYTES,
    refetch: Fetch | None = None,
    parts: Parts | None = None,
) -> PullStats:
    """Fetch, decode, verify and place every task.

    Two stages. ``streams`` reader threads go through the tasks in plan order:
    each takes a group of chunks (:func:`coalesce`) once its stored plus
    decoded bytes fit ``inflight_bytes``, looks its chunks up in the ``cache``
    and range-reads the rest (transient failures retried). ``workers`` decoder
    threads then decode, verify and hand each chunk to the sink. Reads wait on
    the network and decodes on the CPU, so apart the link stays busy while
    chunks decode: with one pool doing both, 2 workers on a 1 Gbit/s link kept
    it 81 % busy on an int8 pull (``bench/bench_link.py``). Memory stays bounded
    by ``inflight_bytes`` whatever the model size.

    With ``parts`` (the HTTP transport's ``read_parts``), groups of adjacent
    chunks grow to :data:`SPAN_BYTES` and each run of them is one request
    whose chunks go to the decoders one by one as their bytes arrive; a run
    that fails part way leaves its remaining chunks to be fetched alone, by
    ``fetch``, with retries. ``coalesce_bytes`` 0 turns grouping off either way.

    A cached chunk that fails its check is evicted and fetched; a fetched chunk
    that fails is fetched once more through ``refetch`` (default ``fetch``; the
    HTTP transport sends it to the origin server, past any cache in between),
    then :class:`~mzstore.errors.IntegrityError` stands. Every fetched chunk is
    put in the cache once verified.

    Raises:
        IntegrityError: a chunk failed verification twice.
        Unavailable: fetching kept failing after ``retries`` attempts.
    """
    stats = PullStats()
    lock = threading.Lock()
    stop = threading.Event()
    budget = ByteBudget(inflight_bytes) if inflight_bytes else None
    again = refetch or fetch
    failures: list[BaseException] = []
    decoding: list[Future[None]] = []

    def failed(exc: BaseException) -> None:
        with lock:
            failures.append(exc)
        stop.set()

    def read(group: list[ChunkTask]) -> None:
        """Stage 1 (a reader thread): the group's bytes, from the cache or one range read per run."""
        if stop.is_set():
            return
        cost = sum(t.chunk.length + t.chunk.raw_length for t in group)
        if budget is not None and not budget.acquire(cost, stop):
            return
        handed = False
        try:
            looked = [(t, cache.get(t.chunk) if cache is not None else None) for t in group]
            payloads: dict[int, Payload] = {}
            missing = [t for t, hit in looked if hit is None]
            if parts is not None and len(group) > 1:  # chunk by chunk to the decoders, cached ones too
                tally = [0]
                try:
                    stream(looked, missing, tally)
                finally:
                    handed = True  # each decoder releases its chunk's share; the rest is released here
                    if budget is not None and cost > tally[0]:
                        budget.release(cost - tally[0])
                return
            if len(group) == 1 and missing:
                c = missing[0].chunk
                payloads[id(missing[0])] = read_retrying(fetch, c.blob, c.offset, c.length, retries=retries, stop=stop)
            elif missing:  # runs of adjacent chunks among the missing ones (a group's runs already fit its limit)
                for run in coalesce(missing, sys.maxsize):
                    start = run[0].chunk.offset
                    end = run[-1].chunk.offset + run[-1].chunk.length
                    try:
                        data = read_retrying(fetch, run[0].chunk.blob, start, end - start, retries=retries, stop=stop)
                    except (Unavailable, DeadlineExceeded, ResourceExhausted):
                        continue  # each chunk is fetched alone by its decoder, with retries
                    if len(data) != end - start:
                        continue
                    view = memoryview(data)
                    for t in run:
                        payloads[id(t)] = view[t.chunk.offset - start : t.chunk.offset - start + t.chunk.length]
            if stop.is_set():
                return
            future = decoders.submit(decode, looked, payloads, cost)
            handed = True
            with lock:
                decoding.append(future)
        finally:
            if not handed and budget is not None:
                budget.release(cost)

    def stream(looked: list[tuple[ChunkTask, bytes | None]], missing: list[ChunkTask], tally: list[int]) -> None:
        """Hand each chunk of a group to a decoder, the missing ones as their bytes arrive; ``tally[0]``: the
        stored plus decoded bytes handed (each decoder releases its chunk's share of the budget)."""
        assert parts is not None

        def hand(task: ChunkTask, hit: bytes | None, payload: Payload | None) -> None:
            weight = task.chunk.length + task.chunk.raw_length
            future = decoders.submit(decode, [(task, hit)], {id(task): payload} if payload is not None else {}, weight)
            tally[0] += weight
            with lock:
                decoding.append(future)

        for task, hit in looked:
            if hit is not None:
                hand(task, hit, None)
        for run in coalesce(missing, sys.maxsize):
            if len(run) == 1:  # read here as any lone chunk is, so the decoders do not wait on the network
                c = run[0].chunk
                try:
                    data = read_retrying(fetch, c.blob, c.offset, c.length, retries=retries, stop=stop)
                except (Unavailable, DeadlineExceeded, ResourceExhausted):
                    data = None  # fetched again by its decoder, which has the last word on failing
                hand(run[0], None, data)
                continue
            done = 0
            reader = parts(run[0].chunk.blob, run[0].chunk.offset, [t.chunk.length for t in run])
            try:
                for data in reader:
                    if stop.is_set():
                        return
                    hand(run[done], None, data)
                    done += 1
            except Exception as exc:  # noqa: BLE001 - whatever broke the stream, the rest is read alone
                log.debug("read of %d chunks of %s stopped after %d: %s", len(run), run[0].chunk.blob, done, exc)
            finally:
                close = getattr(reader, "close", None)
                if close is not None:
                    close()
            for task in run[done:]:  # each fetched alone by its decoder, with retries
                if stop.is_set():
                    return
                hand(task, None, None)

    def decode(looked: list[tuple[ChunkTask, bytes | None]], payloads: dict[int, Payload], cost: int) -> None:
        """Stage 2 (a decoder thread): decode, verify and place each chunk of a group."""
        try:
            for task, hit in looked:
                if stop.is_set():
                    return
                place(task, hit, payloads.get(id(task)))
        except BaseException as exc:
            failed(exc)
            raise
        finally:
            if budget is not None:
                budget.release(cost)

    def place(task: ChunkTask, cached: bytes | None, payload: Payload | None) -> None:
        what = task.tensor or task.file
        compact = sink.compact(task)
        fetched_bases: list[int] = []
        base_of = (
            base_reader(
                fetch, task.dtype, what, cache=cache, on_fetched=fetched_bases.append, retries=retries, stop=stop
            )
            if task.chunk.base is not None
            else None
        )

        def use(data: Payload) -> np.ndarray | None:
            if compact:
                # The sink verifies the stored bytes and uses them as they are (expanded on a device, exported).
                if len(data) != task.chunk.length:
                    raise IntegrityError(f"chunk of {what}: got {len(data)} bytes, expected {task.chunk.length}")
                sink.write_payload(task, data)
                return None
            return decode_verified(task.chunk, task.dtype, what, data, sink.target(task), base_of)

        out, fetched = obtain(
            task.chunk,
            use,
            cached,
            fetch,
            payload=payload,
            refetch=again,
            cache=cache,
            retries=retries,
            stop=stop,
        )
        if fetched:
            cached = None  # the cached copy failed its check (and was evicted): this one came over the network
        if out is not None:
            sink.write(task, out)
        with lock:
            stats.chunks += 1
            stats.bytes_transferred += fetched + sum(fetched_bases)
            if cached is not None:
                stats.chunks_cached += 1
                stats.bytes_cached += len(cached)
            stats.bytes_decoded += task.chunk.raw_length
        if on_bytes:
            on_bytes(task.chunk.raw_length)

    def note_failure(future: Future[None]) -> None:
        exc = future.exception()
        if exc is not None:
            failed(exc)

    groups = coalesce(
        list(tasks), max(coalesce_bytes, SPAN_BYTES) if parts is not None and coalesce_bytes else coalesce_bytes
    )
    # Largest first: the reads still in flight when the link goes quiet are small ones, so little
    # is left to decode after the last byte (with plan order, four ~16 MiB chunks were: 90 ms).
    groups.sort(key=lambda g: -sum(t.chunk.length + t.chunk.raw_length for t in g))
    n_readers = max(1, streams if streams is not None else workers)
    with (
        ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mzstore-decode") as decoders,
        ThreadPoolExecutor(max_workers=n_readers, thread_name_prefix="mzstore-read") as readers,
    ):
        reads = [readers.submit(read, g) for g in groups]
        for f in reads:
            f.add_done_callback(note_failure)
        wait(reads, return_when=ALL_COMPLETED)
        with lock:
            started = list(decoding)
        wait(started, return_when=ALL_COMPLETED)
    if failures:
        raise failures[0]
    stats.peak_inflight = budget.peak if budget is not None else 0
    return stats
