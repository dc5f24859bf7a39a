"""The offline transport: no server at all (``--offline``, ``MZSTORE_OFFLINE=1``).

A client that is told to stay offline works from its local cache alone, as
``HF_HUB_OFFLINE`` does for the Hub: a ref resolves through the cached
tag → digest mapping (:meth:`~mzstore.client.Client.manifest`), chunks come
from the chunk cache, and anything that would need the server fails at once
with a one-line :class:`~mzstore.errors.NotFound` or
:class:`~mzstore.errors.Unavailable` naming what is missing — never after
retries.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, NoReturn

from mzstore.errors import NotFound, Unavailable
from mzstore.transport.base import RefInfo, Topology, Transport

if TYPE_CHECKING:
    from mzstore.push.protocol import PushResult, UploadBegin, UploadEvent, UploadStatus
    from mzstore.transport.base import Payload


class OfflineTransport(Transport):
    """Reaches nothing; every call says so in one line."""

    def __init__(self, address: str) -> None:
        self.address = address

    def _refuse(self, what: str) -> NoReturn:
        raise Unavailable(f"offline (--offline / MZSTORE_OFFLINE=1): {what} needs the server at {self.address}")

    def close(self) -> None:
        pass

    def manifest(self, ref: str) -> tuple[str, str, bytes]:
        raise NotFound(f"offline (--offline / MZSTORE_OFFLINE=1): {ref} is not in the local cache")

    def list_refs(self, name: str | None = None) -> list[RefInfo]:
        self._refuse("listing models")

    def tag(self, source: str, target: str) -> tuple[str, str]:
        self._refuse("tagging")

    def delete(self, ref: str) -> tuple[str, str]:
        self._refuse("removing a tag")

    def topology(self) -> Topology:
        self._refuse("reading the storage nodes")

    def push(self, begin: UploadBegin, events: Iterable[UploadEvent]) -> PushResult:
        self._refuse("a push")

    def start_upload(self, session: str, begin: UploadBegin) -> UploadStatus:
        self._refuse("a push")

    def upload(self, session: str, events: Iterable[UploadEvent]) -> UploadStatus:
        self._refuse("a push")

    def commit_upload(self, session: str) -> PushResult:
        self._refuse("a push")

    def read_blob(self, digest: str, offset: int, length: int) -> Payload:
        raise NotFound(
            f"offline (--offline / MZSTORE_OFFLINE=1): {length} bytes of blob {digest} are not in the local cache"
        )

    def stream_blob(
        self, digest: str, offset: int = 0, timeout: float | None = None
    ) -> Iterator[tuple[int, memoryview]]:
        self._refuse(f"reading blob {digest}")
