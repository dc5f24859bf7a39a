"""Receive buffers for range reads: page-aligned, reused, never zero-filled.

Why: a pull reads hundreds of multi-MiB ranges. A new ``bytearray(length)``
per read is zero-filled, and when its memory is fresh (glibc hands out
buffers this large with a new ``mmap``, and returns them on ``free``) every
4 KiB page of it is a page fault; on a VM whose host takes freed memory
back, a host fault. Measured on the test VM: a lossless 1 GB pull's HTTP
reads faulted in 240 MiB of buffers for 0.45 GB received, and a fresh page
costs 11 times a reused one (``bench/bench_floor.py``).

How: :meth:`ReceiveBuffers.take` hands out a ``memoryview`` of exactly the
bytes asked for, over an anonymous ``mmap`` from a pool. A pooled buffer is
free again once nothing refers to it: no view of it, no array made from a
view, no cache write queued with it. CPython counts those references for us
(every view of a buffer shares one reference to it), so a buffer still
held by a slow consumer is simply not reused; nothing has to be given back.
The pool keeps at most ``keep_bytes`` (the pull's in-flight budget) and
makes an unpooled buffer beyond that. Where reference counts do not say
that (no ``sys.getrefcount``, or a free-threaded build), every read gets a
new buffer, as before.

A second gain: the buffers are page-aligned, so the chunk cache writes them
to its files with ``O_DIRECT`` straight from here
(:class:`~mzstore.durable.DirectAppender`), with no copy.
"""

from __future__ import annotations

import mmap
import sys
import threading

#: Reads smaller than this get a plain ``bytearray`` (malloc serves those from warm memory).
POOL_MIN_BYTES = 256 * 1024
#: Pooled buffers are sized in steps of this many bytes.
GRAIN = 1024 * 1024

_COUNTS_REFERENCES = hasattr(sys, "getrefcount") and getattr(sys, "_is_gil_enabled", lambda: True)()


class ReceiveBuffers:
    """A pool of page-aligned receive buffers (see the module's docstring).

    Args:
        keep_bytes: the most the pool keeps; 0 keeps none (every read gets a new buffer).
    """

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes if _COUNTS_REFERENCES else 0
        self._bufs: list[mmap.mmap] = []
        self._kept = 0
        self._lock = threading.Lock()
        self.reused = 0  # reads served from a buffer used before (for tests and benchmarks)

    def take(self, n: int) -> memoryview | bytearray:
        """A writable buffer of exactly ``n`` bytes; its contents are whatever it held before."""
        if n < POOL_MIN_BYTES:
            return bytearray(n)
        with self._lock:
            i = self._free_fit(n)
            if i is not None:
                self.reused += 1
                return memoryview(self._bufs[i])[:n]
            size = -(-n // GRAIN) * GRAIN
            buf = mmap.mmap(-1, size)
            self._evict_for(size)
            if self._kept + size <= self.keep_bytes:
                self._bufs.append(buf)
                self._kept += size
            return memoryview(buf)[:n]

    def _is_free(self, i: int) -> bool:
        # Two references when only the pool holds it: the list's, and getrefcount's argument.
        return sys.getrefcount(self._bufs[i]) == 2

    def _free_fit(self, n: int) -> int | None:
        """The smallest free buffer that holds ``n`` bytes without wasting more than half of it."""
        best: int | None = None
        for i in range(len(self._bufs)):  # by index: a loop variable would count as a holder
            size = len(self._bufs[i])
            if n <= size <= 2 * n + GRAIN and (best is None or size < len(self._bufs[best])) and self._is_free(i):
                best = i
        return best

    def _evict_for(self, size: int) -> None:
        """Drop free buffers (largest first) until ``size`` more bytes fit under ``keep_bytes``."""
        if self._kept + size <= self.keep_bytes:
            return
        order = sorted(range(len(self._bufs)), key=lambda i: -len(self._bufs[i]))
        drop = set()
        for i in order:
            if self._kept + size <= self.keep_bytes:
                break
            if self._is_free(i):
                drop.add(i)
                self._kept -= len(self._bufs[i])
        if drop:
            self._bufs = [b for i, b in enumerate(self._bufs) if i not in drop]

    def clear(self) -> None:
        """Let go of every pooled buffer (those still in use live on until their last view goes)."""
        with self._lock:
            self._bufs = []
            self._kept = 0
