"""Chunk planning (pure): how a tensor or a file is cut into chunks.

Large tensors are split along dim 0 into runs of whole rows of about
``chunk_bytes`` raw bytes, so that each chunk decodes on its own (parallel
decode, per-chunk resume, and tensor-parallel ranks reading only their rows).
Scalars, empty tensors and tensors whose rows are not whole bytes (sub-byte
dtypes with odd row lengths) form one chunk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mzstore.format.dtypes import DType


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk: rows ``[row_start, row_end)`` = bytes ``[byte_start, byte_end)`` of the tensor."""

    index: int
    row_start: int
    row_end: int
    byte_start: int
    byte_end: int

    @property
    def nbytes(self) -> int:
        return self.byte_end - self.byte_start


def row_bytes(dtype: DType, shape: tuple[int, ...] | list[int]) -> int | None:
    """Bytes per dim-0 row, or ``None`` if rows are not whole bytes or there are no rows."""
    if not shape:
        return None
    bits = dtype.bits * math.prod(shape[1:])
    return bits // 8 if bits % 8 == 0 else None


def plan_tensor(dtype: DType, shape: tuple[int, ...] | list[int], nbytes: int, chunk_bytes: int) -> list[ChunkPlan]:
    """Cut a tensor of ``nbytes`` into row chunks of at most about ``chunk_bytes``.

    A single row larger than ``chunk_bytes`` still makes one chunk.
    """
    rb = row_bytes(dtype, shape)
    if rb is None or rb == 0 or nbytes <= chunk_bytes:
        rows = shape[0] if shape else 1
        return [ChunkPlan(0, 0, rows, 0, nbytes)]
    rows_per = max(1, chunk_bytes // rb)
    n_rows = shape[0]
    out = []
    for i, start in enumerate(range(0, n_rows, rows_per)):
        end = min(n_rows, start + rows_per)
        out.append(ChunkPlan(i, start, end, start * rb, end * rb))
    return out


def plan_file(size: int, chunk_bytes: int) -> list[ChunkPlan]:
    """Cut a plain file into byte chunks (rows are bytes here)."""
    if size == 0:
        return [ChunkPlan(0, 0, 0, 0, 0)]
    return [
        ChunkPlan(i, start, min(size, start + chunk_bytes), start, min(size, start + chunk_bytes))
        for i, start in enumerate(range(0, size, chunk_bytes))
    ]
