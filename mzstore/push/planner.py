"""Chunk planning (pure): how a tensor or a file is cut into chunks.

Large tensors are split along dim 0 into runs of whole rows of about
``chunk_bytes`` raw bytes, so that each chunk decodes on its own (parallel
decode, per-chunk resume, and tensor-parallel ranks reading only their rows).

A chunk never holds more than ``max(chunk_bytes, one element)`` bytes: that
is what bounds ingest memory, whatever the input claims. Tensors whose rows
cannot be used — a single row larger than ``chunk_bytes``, a scalar, or rows
that are not whole bytes (sub-byte dtypes) — are cut into element-aligned
byte ranges instead; such chunks record the rows they touch (adjacent chunks
may then share a row).
"""

from __future__ import annotations

from dataclasses import dataclass

from mzstore.format.dtypes import DType, row_bytes


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


def plan_tensor(dtype: DType, shape: tuple[int, ...] | list[int], nbytes: int, chunk_bytes: int) -> list[ChunkPlan]:
    """Cut a tensor of ``nbytes`` into chunks of at most ``max(chunk_bytes, element size)`` bytes."""
    rows = shape[0] if shape else 1
    if nbytes <= chunk_bytes:
        return [ChunkPlan(0, 0, rows, 0, nbytes)]
    rb = row_bytes(dtype, shape)
    if rb is not None and 0 < rb <= chunk_bytes:
        rows_per = chunk_bytes // rb
        return [
            ChunkPlan(i, start, min(rows, start + rows_per), start * rb, min(rows, start + rows_per) * rb)
            for i, start in enumerate(range(0, rows, rows_per))
        ]
    # Byte ranges aligned to whole elements (whole bytes for sub-byte dtypes).
    align = max(1, dtype.bits // 8) if dtype.bits % 8 == 0 else 1
    step = max(align, chunk_bytes - chunk_bytes % align)
    out = []
    for i, start in enumerate(range(0, nbytes, step)):
        end = min(nbytes, start + step)
        if rb:
            first, last = start // rb, -(-end // rb)
        else:
            first, last = 0, rows
        out.append(ChunkPlan(i, first, last, start, end))
    return out


def plan_file(size: int, chunk_bytes: int) -> list[ChunkPlan]:
    """Cut a plain file into byte chunks (rows are bytes here)."""
    if size == 0:
        return [ChunkPlan(0, 0, 0, 0, 0)]
    return [
        ChunkPlan(i, start, min(size, start + chunk_bytes), start, min(size, start + chunk_bytes))
        for i, start in enumerate(range(0, size, chunk_bytes))
    ]
