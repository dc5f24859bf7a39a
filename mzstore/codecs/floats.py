"""Float conversions the codecs need, in plain numpy (no torch, no ml_dtypes on the decode path).

* bfloat16 is the top half of an f32: widening is a 16-bit shift, exact.
* f32 → bfloat16 rounds to nearest, ties to even, as every framework does
  (torch, ml_dtypes, the hardware's ``cvt`` instructions): add ``0x7FFF``
  plus the lowest kept bit, keep the top 16 bits. Values that round past the
  largest bf16 become ±inf, as IEEE rounding says; a NaN becomes the quiet
  NaN of its sign (ml_dtypes' rule). Tests check every
  case against ml_dtypes bit for bit.
* float8 e4m3fn (no infinities, one NaN pattern per sign) widens through a
  256-entry table computed from its definition.

The cast works in cache-sized blocks with per-thread scratch temporaries,
so a 16 MiB chunk costs no large allocation.
"""

from __future__ import annotations

import numpy as np

from mzstore.codecs.base import scratch

#: f32 elements converted per block (two u32 temporaries of this size stay in L2).
BLOCK = 256 * 1024
#: Scratch slots of those temporaries (see :func:`~mzstore.codecs.base.scratch`).
_SLOT_A, _SLOT_B = 11, 12


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values (as ``uint16`` bit patterns) → a new f32 array, exactly."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16_into(y: np.ndarray, out: np.ndarray) -> None:
    """Round f32 ``y`` to bfloat16 (nearest, ties to even) into ``out`` (``uint16`` bit patterns, same length)."""
    u = np.ascontiguousarray(y, dtype=np.float32).reshape(-1).view(np.uint32)
    dest = out.reshape(-1)
    n = len(u)
    if len(dest) != n:
        raise ValueError(f"bf16 cast: {n} values into {len(dest)} slots")
    step = min(BLOCK, max(n, 1))
    lsb = scratch(4 * step, _SLOT_A).view(np.uint32)
    tmp = scratch(4 * step, _SLOT_B).view(np.uint32)
    for i in range(0, n, step):
        block = u[i : i + step]
        k = len(block)
        a, t = lsb[:k], tmp[:k]
        np.right_shift(block, 16, out=a)
        np.bitwise_and(a, 1, out=a)
        np.add(a, 0x7FFF, out=a)
        np.add(block, a, out=t)  # wraps only for NaN patterns, fixed below
        np.right_shift(t, 16, out=t)
        dest[i : i + k] = t
        # NaN (exponent all ones, mantissa not zero): the quiet NaN of its sign, as ml_dtypes gives.
        # max() propagates NaN: one pass tells whether the block has any (a decoded chunk never does).
        values = block.view(np.float32)
        if np.isnan(values.max()):
            nan = np.isnan(values)
            dest[i : i + k][nan] = ((block[nan] >> 16) & 0x8000) | 0x7FC0


def _e4m3_table() -> np.ndarray:
    """The 256 float8 e4m3fn bit patterns as f32: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = (codes & 0x7).astype(np.float64)
    normal = (1.0 + man / 8.0) * np.exp2(exp.astype(np.float64) - 7.0)
    subnormal = (man / 8.0) * 2.0**-6
    values = sign * np.where(exp == 0, subnormal, normal)
    table = values.astype(np.float32)
    nan = (codes & 0x7F) == 0x7F
    table.view(np.uint32)[nan] = np.where(codes[nan] & 0x80, 0xFFC00000, 0x7FC00000).astype(np.uint32)
    return table


#: float8 e4m3fn code → value as f32.
E4M3_TABLE = _e4m3_table()


def f32_to_e4m3(x: np.ndarray) -> np.ndarray:
    """Round f32 values to float8 e4m3fn codes (``uint8``), as ml_dtypes does (encode side only)."""
    import ml_dtypes  # imported here: 0.6 s, and only a push with fp8 needs it

    return np.asarray(x, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
