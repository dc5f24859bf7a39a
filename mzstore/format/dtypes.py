"""Safetensors dtypes: bit widths and how the lossless codec treats them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mzstore.errors import FormatError


@dataclass(frozen=True)
class DType:
    """One safetensors dtype.

    Attributes:
        name: the safetensors spelling (``"BF16"``).
        bits: bits per element.
        is_float: floating point (its sign bit is rotated next to the
            mantissa before the byte-plane split, so exponent bytes stand apart).
    """

    name: str
    bits: int
    is_float: bool

    @property
    def itemsize(self) -> int:
        """Bytes per element for whole-byte dtypes, 1 for sub-byte ones."""
        return max(1, self.bits // 8)


_ALL = [
    DType("BOOL", 8, False),
    DType("U8", 8, False),
    DType("I8", 8, False),
    DType("F8_E5M2", 8, True),
    DType("F8_E4M3", 8, True),
    DType("F8_E8M0", 8, True),
    DType("F4", 4, True),
    DType("F6_E2M3", 6, True),
    DType("F6_E3M2", 6, True),
    DType("I16", 16, False),
    DType("U16", 16, False),
    DType("F16", 16, True),
    DType("BF16", 16, True),
    DType("I32", 32, False),
    DType("U32", 32, False),
    DType("F32", 32, True),
    DType("C64", 64, True),
    DType("I64", 64, False),
    DType("U64", 64, False),
    DType("F64", 64, True),
]

DTYPES: dict[str, DType] = {d.name: d for d in _ALL}


def get_dtype(name: str) -> DType:
    """Look up a safetensors dtype by name.

    Raises:
        FormatError: for an unknown dtype.
    """
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise FormatError(f"unknown dtype {str(name)[:40]!r}") from None


def row_bytes(dtype: DType, shape: tuple[int, ...] | list[int]) -> int | None:
    """Bytes per dim-0 row, or ``None`` if rows are not whole bytes or there are no rows."""
    if not shape:
        return None
    bits = dtype.bits * math.prod(shape[1:])
    return bits // 8 if bits % 8 == 0 else None


def nbytes_for(dtype: DType, numel: int) -> int:
    """Bytes taken by ``numel`` elements, or raise if that is not a whole number."""
    bits = dtype.bits * numel
    if bits % 8:
        raise FormatError(f"{numel} elements of {dtype.name} do not fill whole bytes")
    return bits // 8
