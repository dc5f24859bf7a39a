"""The codec interface."""

from __future__ import annotations

import threading
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mzstore.format.dtypes import DType


@runtime_checkable
class Codec(Protocol):
    """Encode one chunk's raw bytes; decode them back.

    ``encode`` may pick parameters per chunk; it returns them so they can be
    recorded in the shard metadata and the manifest, but the stored payload
    is self-describing: ``decode`` needs only the payload, the dtype and the
    decoded length (which bounds every allocation it makes).
    """

    name: str

    def encode(self, raw: bytes | bytearray | memoryview, dtype: DType) -> tuple[bytes, dict[str, Any]]:
        """Return ``(payload, params)`` for the raw little-endian bytes of a chunk."""
        ...

    def decode(self, payload: bytes | bytearray | memoryview, dtype: DType, raw_len: int) -> np.ndarray:
        """Return the decoded bytes as a ``uint8`` array of exactly ``raw_len`` bytes.

        Raises:
            CodecError: if the payload is malformed or decodes to the wrong size.
        """
        ...

    def decode_into(self, payload: bytes | bytearray | memoryview, dtype: DType, out: np.ndarray) -> None:
        """Decode into ``out`` (a contiguous ``uint8`` array of the decoded length).

        The pull pipeline decodes straight into the destination buffer this way.
        On error ``out`` may hold partial data; the caller must not use it.

        Raises:
            CodecError: as :meth:`decode`.
        """
        ...


_local = threading.local()


def scratch(size: int, slot: int) -> np.ndarray:
    """A per-thread reusable ``uint8`` buffer of at least ``size`` bytes, valid until the next call with ``slot``.

    Reusing buffers keeps a pull's memory flat: freed multi-MiB buffers
    otherwise pile up in glibc's per-thread arenas, and fresh ones cost a
    page fault per 4 KiB. Slots: 0-9 the lossless decoder's planes and
    temporaries, 10 the quantized decoder's f32 block, 11-12 the bf16 cast's
    temporaries, 13 the lossless encoder's split planes, 15 the high nibbles of nibble-split int8 codes,
    16 and up the quantized decoder's sections.
    """
    buffers: dict[int, np.ndarray] | None = getattr(_local, "scratch", None)
    if buffers is None:
        buffers = _local.scratch = {}
    buf = buffers.get(slot)
    if buf is None or len(buf) < size:
        buf = buffers[slot] = np.empty(max(size, 1 << 20), dtype=np.uint8)
    return buf[:size]
