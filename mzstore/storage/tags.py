"""Tags as a small replicated register: versioned ref objects that converge on every node (issue 16).

A tag (``refs/<name>/<tag>``) is written to every node. Each write carries a
version (:class:`~mzstore.format.refs.RefVersion`) from the writing server's
hybrid logical clock, and the rule is the same everywhere: **the highest
version wins**. Concretely:

* **Writes** read the tag from every node first and advance the clock past
  the highest version seen, so a write that starts after another was
  acknowledged gets a higher version, whatever the servers' clocks say.
  Each node then takes the new value only if it is newer than what it holds
  (:meth:`Node.write_if`: a rename under a lock on a local disk, a
  conditional ``PUT`` with ``If-Match``/``If-None-Match`` on S3), so a
  slower, older write can never overwrite a newer one. A write is
  acknowledged when every node holds it or something newer.
* **Reads** read every reachable node and take the highest version; nodes
  that hold an older value (or none) are repaired in the background with
  the winner, as blob copies are.
* **Deleting** a tag writes a versioned tombstone (digest ``null``), so a
  node that missed the deletion cannot bring the tag back; ``gc`` removes
  tombstones once they are older than its grace period and every node
  agrees on them.
* Refs written before versions existed (a bare ``sha256:<hex>`` line) are
  read as version zero: any versioned write supersedes them.

So concurrent tag moves through several servers leave every node on the
same value, and an acknowledged tag write is never replaced by one that was
acknowledged before it; losing a node cannot roll a tag back, because every
other node holds the acknowledged version too.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mzstore.errors import Conflict, FormatError, MzstoreError, NotFound
from mzstore.format.refs import RefValue, RefVersion, newest
from mzstore.storage.node import Node

log = logging.getLogger("mzstore.storage")


class HybridClock:
    """A hybrid logical clock: versions that follow wall time but never fall behind one already seen."""

    def __init__(self, writer: str | None = None, now: Callable[[], float] = time.time) -> None:
        self.writer = writer or uuid.uuid4().hex[:16]
        self._now = now
        self._lock = threading.Lock()
        self._time_ms = 0
        self._counter = 0

    def observe(self, version: RefVersion) -> None:
        """Remember a version read from a node: every later :meth:`tick` is above it."""
        with self._lock:
            if (version.time_ms, version.counter) > (self._time_ms, self._counter):
                self._time_ms, self._counter = version.time_ms, version.counter

    def tick(self) -> RefVersion:
        """A version above every one this clock made or observed."""
        with self._lock:
            now_ms = int(self._now() * 1000)
            if now_ms > self._time_ms:
                self._time_ms, self._counter = now_ms, 0
            else:
                self._counter += 1
            return RefVersion(self._time_ms, self._counter, self.writer)


@dataclass
class Held:
    """What one node answered for a tag: its value (``None``: it holds none), or why it could not answer."""

    node: Node
    value: RefValue | None = None
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.error is None


def read_everywhere(nodes: Sequence[Node], key: str) -> list[Held]:
    """The tag ``key`` as every node holds it; a garbled object counts as none (and is repaired)."""
    out = []
    for node in nodes:
        try:
            out.append(Held(node, RefValue.decode(node.read(key))))
        except (NotFound, Conflict):  # Conflict: the path is a folder (a model named like this tag's path)
            out.append(Held(node))
        except FormatError as exc:
            log.warning("%s on %s is unreadable (%s); it is rewritten from the other nodes", key, node.url, exc)
            out.append(Held(node))
        except (MzstoreError, OSError) as exc:
            out.append(Held(node, error=str(exc)))
    return out


def winner(held: Sequence[Held]) -> RefValue | None:
    return newest(h.value for h in held if h.answered)


def offer(node: Node, key: str, value: RefValue) -> bool:
    """Give ``node`` the value unless it holds a newer one; whether it took it."""

    def older(current: bytes | None) -> bool:
        if current is None:
            return True
        try:
            return value.newer_than(RefValue.decode(current))
        except FormatError:
            return True  # a garbled ref object is replaced

    return node.write_if(key, value.encode(), older)


def write_everywhere(nodes: Sequence[Node], key: str, value: RefValue) -> None:
    """Offer ``value`` to every node; raise the first failure after trying them all.

    A node that keeps a newer value counts as done: the tag is at least as new as this write there.
    """
    failures: list[BaseException] = []
    for node in nodes:
        try:
            offer(node, key, value)
        except (MzstoreError, OSError) as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


def lagging(held: Sequence[Held], best: RefValue) -> list[Node]:
    """The nodes that answered with an older value than ``best``, or with none."""
    return [h.node for h in held if h.answered and (h.value is None or best.newer_than(h.value))]
