"""The pull pipeline: parallel fetch → decode → verify → sink.

How it works: tasks (one per chunk) run on a pool of ``workers`` threads.
Each worker fetches the chunk's stored bytes with the ``fetch`` callable,
checks their length, decodes them with the chunk's codec straight into the
buffer the sink names (the tensor's own memory, or a reused per-thread
scratch buffer), checks the sha256 of the decoded bytes, and only then tells
the sink the chunk is good. zstd, hashlib, numpy copies and file
writes release the GIL, so workers overlap on several cores. Memory is
bounded by ``workers`` chunks in flight, independent of model size.

A transient fetch failure (server or node unavailable) is retried with
backoff; a chunk that fails verification is fetched once more, then the
pull fails with :class:`~mzstore.errors.IntegrityError`. Bad bytes are never
handed to the sink.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from mzstore.codecs import get_codec
from mzstore.errors import CodecError, IntegrityError, Unavailable
from mzstore.format.dtypes import get_dtype
from mzstore.pull.plan import ChunkTask

Fetch = Callable[[str, int, int], "bytes | bytearray"]


class Sink(Protocol):
    """Where decoded chunks go.

    ``target`` returns the ``uint8`` array a chunk is decoded into (its final
    place in a tensor buffer, or a per-thread scratch buffer); ``write`` is
    called with that array once its sha256 has been checked.
    """

    def target(self, task: ChunkTask) -> np.ndarray: ...

    def write(self, task: ChunkTask, data: np.ndarray) -> None: ...


@dataclass
class PullStats:
    chunks: int = 0
    bytes_transferred: int = 0
    bytes_decoded: int = 0


def _decode_verified(task: ChunkTask, payload: bytes | bytearray, out: np.ndarray) -> np.ndarray:
    """Decode ``payload`` into ``out`` and check the sha256 of the result."""
    c = task.chunk
    if len(payload) != c.length:
        raise IntegrityError(f"chunk of {task.tensor or task.file}: got {len(payload)} bytes, expected {c.length}")
    if len(out) != c.raw_length:
        raise IntegrityError(f"chunk of {task.tensor or task.file} does not fit its destination")
    data = out
    try:
        get_codec(c.codec).decode_into(payload, get_dtype(task.dtype), out)
    except CodecError as exc:
        raise IntegrityError(f"chunk of {task.tensor or task.file} does not decode: {exc}") from None
    if hashlib.sha256(data.data).hexdigest() != c.sha256:
        raise IntegrityError(
            f"chunk rows {c.rows} of {task.tensor or task.file}: decoded bytes fail their sha256 check"
        )
    return data


def run_pull(
    tasks: Iterable[ChunkTask],
    fetch: Fetch,
    sink: Sink,
    *,
    workers: int = 4,
    retries: int = 3,
    on_bytes: Callable[[int], None] | None = None,
) -> PullStats:
    """Fetch, decode, verify and place every task.

    Raises:
        IntegrityError: a chunk failed verification twice.
        Unavailable: fetching kept failing after ``retries`` attempts.
    """
    stats = PullStats()
    lock = threading.Lock()
    stop = threading.Event()

    def one(task: ChunkTask) -> None:
        if stop.is_set():
            return
        attempt = 0
        verify_failures = 0
        compact = task.chunk.codec in getattr(sink, "compact_codecs", ())
        while True:
            try:
                payload = fetch(task.chunk.blob, task.chunk.offset, task.chunk.length)
                if compact:
                    # The sink verifies the stored bytes and expands them itself (on a device).
                    if len(payload) != task.chunk.length:
                        raise IntegrityError(f"chunk of {task.tensor}: got {len(payload)} bytes")
                    sink.write_payload(task, payload)  # type: ignore[attr-defined]
                    data = None
                else:
                    data = _decode_verified(task, payload, sink.target(task))
                break
            except Unavailable:
                attempt += 1
                if attempt > retries or stop.is_set():
                    raise
                time.sleep(min(2.0, 0.1 * 2**attempt))
            except IntegrityError:
                verify_failures += 1
                if verify_failures > 1:
                    raise
        if data is not None:
            sink.write(task, data)
        with lock:
            stats.chunks += 1
            stats.bytes_transferred += len(payload)
            stats.bytes_decoded += task.chunk.raw_length
        if on_bytes:
            on_bytes(task.chunk.raw_length)

    task_list = list(tasks)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mzstore-pull") as pool:
        futures = [pool.submit(one, t) for t in task_list]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                stop.set()
                for g in futures:
                    g.cancel()
                raise f.exception()  # type: ignore[misc]
    return stats
