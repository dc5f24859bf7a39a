"""Work that follows a hot thread on a thread of its own, a bounded number of bytes behind.

The thread that receives a push is its critical path: every byte passes
through it once (parse, assemble chunks, hand them to the encode pool). What
must see every byte *in order* but need not hold that thread up runs
:class:`Behind` it instead: the sha256 of each uploaded file (hashlib
releases the GIL), a resumable upload's copy of the raw bytes on disk, and a
written-once shard's writes. A pull's decoder threads hand the chunk cache's
writes to one the same way. Each gets a thread; the caller queues the bytes
(a reference, not a copy: they must not change afterwards) and goes on,
waiting only when more than ``limit`` bytes are queued, so memory stays
bounded. The first error of the work is raised by the next
:meth:`Behind.put` or :meth:`Behind.wait`, and the items queued after the
one that failed are skipped (they would follow a gap: a spool written past a
failed write would record bytes that are not there). One caller thread at a
time (the chunk cache locks around it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Bytes queued before :meth:`Behind.put` waits (a few gRPC messages' worth per worker).
DEFAULT_LIMIT = 64 * 1024 * 1024


class Behind(Generic[T]):
    """``fn(item)`` for every :meth:`put` item, in order, on one thread of its own."""

    def __init__(self, fn: Callable[[T], None], name: str, limit: int = DEFAULT_LIMIT) -> None:
        self.fn = fn
        self.limit = limit
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._queued: deque[tuple[Future[None], int]] = deque()
        self._ahead = 0
        self._failed = False  # set on the worker thread by the first error of fn

    def _run(self, item: T) -> None:
        if self._failed:
            raise RuntimeError("skipped: an earlier item failed")
        try:
            self.fn(item)
        except BaseException:
            self._failed = True
            raise

    def put(self, item: T, nbytes: int) -> None:
        """Queue ``item`` (``nbytes`` counts against the limit); wait while more than the limit is queued."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._queued.append((self._pool.submit(self._run, item), nbytes))
        self._ahead += nbytes
        while self._ahead > self.limit:
            self._retire()

    def _retire(self) -> None:
        future, n = self._queued.popleft()
        self._ahead -= n
        future.result()

    def call(self, fn: Callable[[], R]) -> Future[R]:
        """Run ``fn()`` on the same thread once the items queued so far are done (not counted in the limit)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        return self._pool.submit(fn)

    def wait(self) -> None:
        """Until every queued item is done; the first error of ``fn`` is raised here."""
        while self._queued:
            self._retire()

    def close(self) -> None:
        """Let queued items finish, ignoring their errors (a failed push's clean-up), and end the thread."""
        while self._queued:
            try:
                self._retire()
            except Exception:  # noqa: BLE001 - already failing; the first error was raised elsewhere
                pass
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class BehindSha256:
    """A sha256 computed :class:`Behind` the caller: ``update`` queues, ``hexdigest`` waits."""

    def __init__(self, name: str = "mzstore-sha256", limit: int = DEFAULT_LIMIT) -> None:
        import hashlib

        self._hasher = hashlib.sha256()
        self._behind: Behind[bytes | bytearray | memoryview] = Behind(self._hasher.update, name, limit)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._behind.put(data, len(data))

    def hexdigest(self) -> str:
        try:
            self._behind.wait()
            return self._hasher.hexdigest()
        finally:
            self._behind.close()

    def close(self) -> None:
        self._behind.close()
