"""Work behind the receiving thread of a push (:mod:`mzstore.behind`): order, bound, errors."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from mzstore.behind import Behind, BehindSha256


def test_items_run_in_order_on_another_thread_within_the_bound() -> None:
    seen: list[int] = []
    threads: set[int] = set()
    release = threading.Event()

    def fn(item: int) -> None:
        release.wait(10)
        threads.add(threading.get_ident())
        seen.append(item)

    behind: Behind[int] = Behind(fn, "test-behind", limit=3)
    for i in range(3):
        behind.put(i, 1)  # within the limit: returns at once although nothing ran yet
    assert seen == []
    blocked = threading.Thread(target=behind.put, args=(3, 1))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # a 4th byte queued waits for the oldest item
    release.set()
    blocked.join(10)
    for i in range(4, 50):
        behind.put(i, 1)
    behind.wait()
    behind.close()
    assert seen == list(range(50)) and threading.get_ident() not in threads and len(threads) == 1


def test_the_first_error_is_raised_and_later_items_are_skipped() -> None:
    done: list[int] = []

    def fn(item: int) -> None:
        if item == 2:
            raise OSError(28, "No space left on device")
        done.append(item)

    behind: Behind[int] = Behind(fn, "test-behind", limit=1 << 30)
    for i in range(6):
        behind.put(i, 1)
    with pytest.raises(OSError, match="No space"):
        behind.wait()
    behind.close()
    assert done == [0, 1]


def test_behind_sha256_is_hashlibs() -> None:
    blocks = [os.urandom(n) for n in (0, 1, 4095, 1 << 20, 3 << 20, 7)]
    h = BehindSha256(limit=2 << 20)
    for b in blocks:
        h.update(b)
    assert h.hexdigest() == hashlib.sha256(b"".join(blocks)).hexdigest()
