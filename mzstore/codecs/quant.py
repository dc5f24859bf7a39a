"""Lossy codecs: magnitude / N:M pruning and int8, int4, fp8 quantization (pure numpy).

How it works, per chunk (a run of rows of one weight matrix, viewed as
``rows × cols`` with rows = output channels):

1. **prune** (optional): unstructured magnitude pruning sets the ``amount``
   smallest-magnitude weights of the chunk to zero; N:M keeps the N largest
   of every M consecutive weights of a row. Kept positions are stored as a
   bitmask and only kept values are coded, so a 50 % sparse chunk costs
   about half.
2. **quantize** (optional), on the kept values:
   - ``int8``: symmetric, one f32 scale per row, ``q = round(x / s)`` in ±127;
   - ``int4:gN``: asymmetric, one f16 scale and a 4-bit zero point per group
     of N along the row. The clip range is searched per group: the range
     ``[a·min, a·max]`` with the least squared error over a grid of ``a``
     in [0.55, 1] (plain min/max rounding is ``a = 1``), then refined by
     least squares (see :func:`_int4_params`);
   - ``fp8``: e4m3 codes with one f32 scale per row (``absmax / 448``);
   - ``ecsq:step=D``: entropy-coded uniform scalar quantization. Each row
     is divided by its RMS ``s`` (stored as f16), then ``q = round(x / s / D)``
     with no clipping; each symbol's reconstruction value is the mean of the
     normalized values that fell in it (an f16 table per chunk, indexed by
     the zigzag code ``z = 2q`` or ``-2q - 1``), except ``q = 0``, which is 0. Codes are stored as a byte
     plane of ``z & 255`` and, only when some ``|q| >= 128``, a second plane
     of ``z >> 8``. Group scales, clip search and outlier handling are not
     needed: the entropy coder spends bits where values are. The step of
     each tensor comes from the push's bit allocation
     (:mod:`mzstore.codecs.allocation`).
3. **entropy**: each section (mask, scales, zero points, codes) is zstd-coded
   or kept raw, whichever is smaller; codes use literal-heavy parameters
   (:data:`CODES_PARAMS`), and int4 codes are coded one per byte, which gets
   within 0.03 bit of their entropy (3.70 bits for g128 on MiniLM). Codes
   whose low nibble is close to uniform (int8 codes of Gaussian-like
   weights: 7.3 bits, of which the high nibble carries 3.3) are stored
   *nibble-split* (:func:`nibble_body`): the high nibbles of two codes per
   byte, zstd-coded, then their low nibbles packed alike, raw. The size is
   the same within 0.5 % (:data:`NIBBLES_SLACK`; on MiniLM's int8 codes
   0.9995 of one zstd plane), and zstd decodes half as many Huffman
   symbols: a 16 MiB bf16 chunk's int8 codes decode in about half the time.

Decoding reconstructs ``y = (q - z) · s`` (ecsq: ``y = table[z] · s``) in f32
(one exact subtraction, one correctly rounded multiply) and casts to the original dtype with
round-to-nearest-even. The same formula gives the same bits in numpy and in
torch on any device, so the hash of the decoded bytes recorded in the
manifest holds wherever the chunk is expanded.

Payload (little-endian)::

    b"MZQ1" | u8 method | u8 pruned | u16 group | u64 rows | u64 cols | u8 nsections | 3 × u8 0
    nsections × (u8 id, u8 coding, u64 stored_len, u64 raw_len)
    section bodies, in order

A section's coding is 0 (raw), 1 (one zstd frame) or 2 (codes only,
nibble-split: ``u64 zstd_len | zstd frame of the (raw_len + 1) // 2 high-nibble
bytes | (raw_len + 1) // 2 low-nibble bytes``; in both, code ``2j`` is the
high nibble of byte ``j`` and code ``2j + 1`` the low one). Coding 2 came
with issue 15: older readers refuse it as an unknown coding.
"""

from __future__ import annotations

import math
import re
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

from mzstore.codecs import native
from mzstore.codecs.base import scratch
from mzstore.codecs.floats import E4M3_TABLE, bf16_to_f32, f32_to_bf16_into, f32_to_e4m3
from mzstore.codecs.lossless import (
    EXPONENT_PARAMS,
    LosslessCodec,
    fast_cctx,
    huffman_bits,
    pair_counts,
    pair_sample,
    zstd_decompress,
    zstd_read_into,
)
from mzstore.codecs.policy import ECSQ_STEP_RANGE, LowRank, Prune, Quant, Spec
from mzstore.errors import CodecError
from mzstore.format.dtypes import DType, get_dtype

MAGIC = b"MZQ1"
_HEAD = struct.Struct("<4sBBHQQB3x")
_SECTION = struct.Struct("<BBQQ")
METHODS = {"none": 0, "int8": 1, "int4": 2, "fp8": 3, "ecsq": 4, "lowrank": 5}
METHOD_NAMES = {v: k for k, v in METHODS.items()}
S_MASK, S_SCALES, S_ZEROS, S_CODES, S_VALUES, S_SCALES16, S_HIGH, S_TABLE = 1, 2, 3, 4, 5, 6, 7, 8
#: lowrank: the factors A (rows x rank) and B (rank x cols), lossless-coded f32 or int8 codes with row scales.
S_LR_A, S_LR_B, S_LR_ASCALE, S_LR_BSCALE = 9, 10, 11, 12
#: ECSQ symbols are zigzag codes below this (|q| <= 32767); the table holds 256 entries per high byte in use.
ECSQ_MAX_CODE = 1 << 16
_RAW, _ZSTD, _NIBBLES = 0, 1, 2
#: Code sections at least this long are tried nibble-split (:func:`nibbles_pay`); shorter ones decode fast anyway.
NIBBLES_MIN_BYTES = 64 * 1024
#: How much larger (in Huffman-coded bits, estimated on a sample) the nibble split may be than one zstd plane:
#: it decodes about twice as fast, which is worth half a percent.
NIBBLES_SLACK = 0.005
_NIBBLES_HEAD = struct.Struct("<Q")
#: Scratch slot of a nibble-split section's high nibbles while it is decoded (see :func:`scratch`).
_HIGH_SLOT = 15
#: Clip-range shrink factors tried per int4 group (1.0 = plain min/max).
INT4_SEARCH = tuple(1.0 - 0.05 * i for i in range(10))
#: Least-squares refinement steps after the grid search.
INT4_REFINE_STEPS = 3
FP8_MAX = 448.0
_local = threading.local()
_lossless = LosslessCodec()
DTYPE_F32 = get_dtype("F32")


#: zstd parameters for quantized codes: the exponent planes' (7-byte minimum matches), with the smallest
#: hash table (64 entries), which finds fewer of the short matches that split literal runs. ECSQ codes of
#: MiniLM's word embeddings (2.25 bits of Huffman code): 3.36 MB instead of 3.69 MB with the exponent
#: planes' table (a pure Huffman code: 3.30 MB; zstd level 19: 3.30 MB at 1/20 the speed), encoded at
#: 450 instead of 320 MB/s, decoded at 1.06 instead of 0.78 GB/s. (The exponent planes of the lossless
#: codec gain nothing from it.)
CODES_PARAMS = {**EXPONENT_PARAMS, "hash_log": 6, "chain_log": 6}


def _cctx() -> zstandard.ZstdCompressor:
    ctx = getattr(_local, "cctx", None)
    if ctx is None:
        ctx = _local.cctx = zstandard.ZstdCompressor(level=3)
    return ctx


# --- float views -----------------------------------------------------------


def to_f32(raw: bytes | bytearray | memoryview | np.ndarray, dtype: DType) -> np.ndarray:
    """The chunk's values as f32 (exact for F32, F16 and BF16)."""
    buf = np.frombuffer(raw, dtype=np.uint8)
    if dtype.name == "F32":
        return buf.view(np.float32).copy()
    if dtype.name == "F16":
        return buf.view(np.float16).astype(np.float32)
    if dtype.name == "BF16":
        return bf16_to_f32(buf.view(np.uint16))
    raise CodecError(f"lossy codecs take F32, F16 or BF16 tensors, not {dtype.name}")


# --- fidelity ----------------------------------------------------------------


#: Values per block of :meth:`Stats.of` (of 16 Ki, 32 Ki and 64 Ki, the fastest on the test VM).
STATS_BLOCK = 65536


@dataclass
class Stats:
    """Running error statistics of decoded vs original values."""

    n: int = 0
    sum_x2: float = 0.0
    sum_y2: float = 0.0
    sum_xy: float = 0.0
    sum_e2: float = 0.0
    max_abs: float = 0.0

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> Stats:
        """The statistics of ``y`` against ``x``, summed in float64 over blocks of :data:`STATS_BLOCK` values.

        Why blocks: whole-chunk float64 temporaries are fresh memory (glibc maps arrays this large anew
        and unmaps them on free), and a BLAS ``dot`` wakes its threads on every call. Both cost far more
        than the arithmetic: 590 K values took 7.5 ms whole, 1.7 ms in blocks (``auto`` computes this for
        every candidate it encodes). ``einsum`` keeps the sums on the calling thread and deterministic.
        """
        xs, ys = x.ravel(), y.ravel()
        out = cls(n=xs.size)
        for i in range(0, xs.size, STATS_BLOCK):
            a = xs[i : i + STATS_BLOCK].astype(np.float64)
            b = ys[i : i + STATS_BLOCK].astype(np.float64)
            e = a - b
            out.sum_x2 += float(np.einsum("i,i->", a, a))
            out.sum_y2 += float(np.einsum("i,i->", b, b))
            out.sum_xy += float(np.einsum("i,i->", a, b))
            out.sum_e2 += float(np.einsum("i,i->", e, e))
            out.max_abs = max(out.max_abs, float(np.abs(e, out=e).max()))
        return out

    def merge(self, other: Stats) -> None:
        self.n += other.n
        self.sum_x2 += other.sum_x2
        self.sum_y2 += other.sum_y2
        self.sum_xy += other.sum_xy
        self.sum_e2 += other.sum_e2
        self.max_abs = max(self.max_abs, other.max_abs)

    @property
    def cosine(self) -> float:
        if self.sum_x2 == 0 and self.sum_y2 == 0:
            return 1.0
        if self.sum_x2 == 0 or self.sum_y2 == 0:
            return 0.0
        return self.sum_xy / math.sqrt(self.sum_x2 * self.sum_y2)

    @property
    def snr_db(self) -> float:
        if self.sum_e2 == 0:
            return math.inf
        if self.sum_x2 == 0:
            return -math.inf
        return 10 * math.log10(self.sum_x2 / self.sum_e2)

    def report(self) -> dict[str, float | None]:
        """JSON-safe metrics (an exact result has SNR ``None`` = infinite)."""
        snr = self.snr_db
        return {
            "cosine": round(self.cosine, 7),
            "snr_db": None if math.isinf(snr) else round(snr, 3),
            "max_abs_err": float(f"{self.max_abs:.6g}"),
        }


# --- pruning -------------------------------------------------------------------


def prune_mask(x: np.ndarray, prune: Prune) -> np.ndarray:
    """Boolean mask of kept weights for a ``rows × cols`` chunk."""
    rows, cols = x.shape
    mag = np.abs(x)
    if prune.m:
        mask = np.ones_like(x, dtype=bool)
        full = cols - cols % prune.m
        if full:
            groups = mag[:, :full].reshape(rows, full // prune.m, prune.m)
            order = np.argsort(groups, axis=-1, kind="stable")
            drop = order[..., : prune.m - prune.n]
            gmask = np.ones_like(groups, dtype=bool)
            np.put_along_axis(gmask, drop, False, axis=-1)
            mask[:, :full] = gmask.reshape(rows, full)
        return mask
    k = round(prune.amount * x.size)
    mask = np.ones(x.size, dtype=bool)
    if k > 0:
        drop = np.argpartition(mag.ravel(), k - 1)[:k]
        mask[drop] = False
    return mask.reshape(rows, cols)


# --- quantizers (values are the kept entries; rows/cols give their positions) ---


def _row_absmax(x: np.ndarray) -> np.ndarray:
    return np.abs(x).max(axis=1) if x.shape[1] else np.zeros(x.shape[0], np.float32)


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def quantize(x: np.ndarray, mask: np.ndarray | None, quant: Quant) -> dict[int, np.ndarray]:
    """Quantize a ``rows × cols`` f32 chunk; pruned entries (``mask`` False) are ignored.

    Returns the sections: scales, zero points (int4) and codes of kept entries in row-major order.
    """
    xm = x if mask is None else np.where(mask, x, np.float32(0))
    if quant.kind == "int8":
        q, scale = _int8_rows(xm)
        codes = q if mask is None else q[mask]
        return {S_SCALES: scale, S_CODES: codes.reshape(-1)}
    if quant.kind == "fp8":
        scale = _safe_scale(_row_absmax(xm) / np.float32(FP8_MAX))
        q = f32_to_e4m3(xm / scale[:, None])
        codes = q if mask is None else q[mask]
        return {S_SCALES: scale, S_CODES: codes.reshape(-1)}
    if quant.kind == "int4":
        g = _grouped(xm, quant.group, 0.0)
        span = (np.maximum(g.max(axis=-1), 0) - np.minimum(g.min(axis=-1), 0)) / np.float32(15)
        span = span[span > 0]
        # f16 scales unless the weights are so tiny or huge that f16 cannot hold their scales.
        f16 = bool(((span >= F16_SCALE_RANGE[0]) & (span <= F16_SCALE_RANGE[1])).all())
        scale, zero, q = _int4_encode(xm, mask, quant.group, f16)
        codes = q if mask is None else q[mask]
        scales = {S_SCALES16: scale.astype(np.float16)} if f16 else {S_SCALES: scale}
        return {**scales, S_ZEROS: zero, S_CODES: codes.reshape(-1)}
    if quant.kind == "ecsq":
        if mask is not None:
            raise CodecError("ecsq does not combine with pruning")
        return ecsq_quantize(x, quant.step)
    raise CodecError(f"unknown quantizer {quant.kind}")


def row_rms(x: np.ndarray) -> np.ndarray:
    """Each row's root mean square, in f32 (accumulated in f64)."""
    cols = max(1, x.shape[1])
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64) / cols).astype(np.float32)


def ecsq_normalize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Each row of a ``rows × cols`` f32 matrix divided by its stored scale (its RMS, rounded to f16 when
    every nonzero one fits; an all-zero row stays zero), the scales, and whether they are f16."""
    rms = row_rms(x)
    nonzero = rms[rms > 0]
    f16 = bool(((nonzero >= F16_SCALE_RANGE[0]) & (nonzero <= F16_SCALE_RANGE[1])).all())
    scale = rms.astype(np.float16).astype(np.float32) if f16 else rms
    return x / np.where(scale > 0, scale, np.float32(1))[:, None], scale, f16


def zigzag(q: np.ndarray) -> np.ndarray:
    """Signed symbols → non-negative codes: 0, -1, 1, -2 … → 0, 1, 2, 3 …"""
    return np.where(q >= 0, q * 2, -q * 2 - 1)


def ecsq_quantize(x: np.ndarray, step: float) -> dict[int, np.ndarray]:
    """ECSQ sections of a ``rows × cols`` f32 chunk: row scales, code planes and the reconstruction table."""
    if not ECSQ_STEP_RANGE[0] <= step <= ECSQ_STEP_RANGE[1]:
        raise CodecError(f"ecsq step {step!r} is outside [{ECSQ_STEP_RANGE[0]:g}, {ECSQ_STEP_RANGE[1]:g}]")
    normalized, scale, f16 = ecsq_normalize(x)
    xn = normalized.reshape(-1)
    if not np.isfinite(xn).all():
        raise CodecError("ecsq: the chunk has NaN or infinite values")
    limit = ECSQ_MAX_CODE // 2 - 1
    inv = np.float32(1.0 / step)
    core = native.core
    count: np.ndarray
    total: np.ndarray
    if core is not None:  # the same codes, and the same sums (numpy's bincount adds in this order too)
        codes, high = np.empty(xn.size, np.uint8), np.empty(xn.size, np.uint8)
        count_all, total_all = np.zeros(ECSQ_MAX_CODE, np.int64), np.zeros(ECSQ_MAX_CODE, np.float64)
        zmax = core.ecsq_codes(xn, float(inv), float(limit), codes, high, count_all, total_all)
        planes = zmax // 256 + 1
        count, total = count_all[: 256 * planes], total_all[: 256 * planes]
    else:
        z = zigzag(np.clip(np.rint(xn * inv), -limit, limit).astype(np.int32))
        planes = int(z.max()) // 256 + 1 if z.size else 1
        count = np.bincount(z, minlength=256 * planes)
        total = np.bincount(z, weights=xn, minlength=256 * planes)
        codes = (z & 255).astype(np.uint8)
        high = (z >> 8).astype(np.uint8) if planes > 1 else codes
    table = np.where(count > 0, total / np.maximum(count, 1), 0).astype(np.float16)
    table[0] = 0  # the zero bin gives exactly 0: exact zeros (pruned weights, padding) stay zero
    out: dict[int, np.ndarray] = {S_SCALES16 if f16 else S_SCALES: scale.astype(np.float16) if f16 else scale}
    out[S_CODES] = codes
    if planes > 1:
        out[S_HIGH] = high
    out[S_TABLE] = table
    return out


def lowrank_rank(singular: np.ndarray, lowrank: LowRank) -> int:
    """The rank a chunk keeps: the fixed one (at most the chunk's), or the smallest keeping the energy."""
    if lowrank.rank:
        return max(1, min(lowrank.rank, len(singular)))
    energy = np.cumsum(singular.astype(np.float64) ** 2)
    if not len(energy) or energy[-1] == 0:
        return 1
    return int(min(len(singular), np.searchsorted(energy, lowrank.energy * energy[-1]) + 1))


def _int8_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes with one f32 scale per row (``absmax / 127``): the int8 quantizer."""
    scale = _safe_scale(_row_absmax(a) / np.float32(127))
    return np.clip(np.rint(a / scale[:, None]), -127, 127).astype(np.int8), scale


def lowrank_factors(x: np.ndarray, lowrank: LowRank, int8: bool) -> tuple[int, dict[int, np.ndarray | bytes]]:
    """The rank and the sections of a truncated SVD of a ``rows × cols`` chunk: ``A = U·S`` and ``B = Vᵀ``,
    lossless-coded f32, or int8 with one scale per row of each (``int8``)."""
    u, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
    rank = lowrank_rank(s, lowrank)
    a = np.ascontiguousarray((u[:, :rank] * s[:rank]).astype(np.float32))
    b = np.ascontiguousarray(vt[:rank].astype(np.float32))
    if int8:
        qa, sa = _int8_rows(a)
        qb, sb = _int8_rows(b)
        return rank, {S_LR_A: qa.view(np.uint8), S_LR_ASCALE: sa, S_LR_B: qb.view(np.uint8), S_LR_BSCALE: sb}
    f32 = DTYPE_F32
    return rank, {S_LR_A: _lossless.encode(a.tobytes(), f32)[0], S_LR_B: _lossless.encode(b.tobytes(), f32)[0]}


def lowrank_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``A·B`` in f32, summed over the rank in order, one rounded multiply and one rounded add per term:
    the same bits in numpy and in torch on any device (a BLAS matmul's summation order is not fixed)."""
    y = np.zeros((a.shape[0], b.shape[1]), dtype=np.float32)
    term = np.empty_like(y)
    for k in range(a.shape[1]):
        np.multiply(a[:, k : k + 1], b[k : k + 1, :], out=term)
        np.add(y, term, out=y)
    return y


def ecsq_reconstruct(x: np.ndarray, step: float) -> np.ndarray:
    """The f32 values a pull gets back for a ``rows × cols`` f32 matrix quantized as one ECSQ chunk."""
    sections = ecsq_quantize(x, step)
    decoded: dict[int, np.ndarray] = {k: v for k, v in sections.items() if k not in (S_SCALES16, S_TABLE)}
    decoded[S_SCALES] = sections.get(S_SCALES16, sections.get(S_SCALES)).astype(np.float32)  # type: ignore[union-attr]
    decoded[S_TABLE] = sections[S_TABLE].astype(np.float32)
    return dequantize("ecsq", decoded, x.shape[0], x.shape[1], 0, None)


def _grouped(a: np.ndarray, group: int, fill: float | bool) -> np.ndarray:
    rows, cols = a.shape
    groups = -(-cols // group)
    pad = groups * group - cols
    if pad:
        a = np.concatenate([a, np.full((rows, pad), fill, dtype=a.dtype)], axis=1)
    return a.reshape(rows, groups, group)


#: int4 scales are stored as f16 when every scale of the chunk lies in this range
#: (normal f16 numbers, with headroom for the clip search); otherwise as f32.
F16_SCALE_RANGE = (float(np.finfo(np.float16).tiny) * 4, float(np.finfo(np.float16).max) / 4)


def _f16_scale(scale: np.ndarray) -> np.ndarray:
    """Round scales to f16 (how int4 scales are stored), keeping them positive and finite."""
    rounded = scale.astype(np.float16).astype(np.float32)
    return np.where((rounded > 0) & np.isfinite(rounded), rounded, np.float32(np.finfo(np.float16).tiny))


def _f32_scale(scale: np.ndarray) -> np.ndarray:
    return scale.astype(np.float32)


def _int4_params(x: np.ndarray, mask: np.ndarray | None, group: int, f16: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-group scale and zero point minimising squared error.

    First a grid search over clip ranges ``[a·min, a·max]``, then a few
    least-squares refinements: with the codes fixed, the best scale for an
    integer zero point has a closed form; the zero point is then re-fitted.
    A step is kept only where it lowers the error. Scales are rounded to f16
    throughout, since that is how they are stored.
    """
    rounding = _f16_scale if f16 else _f32_scale
    g = _grouped(x, group, 0.0)
    w = _grouped(mask, group, False) if mask is not None else _grouped(np.ones(x.shape, bool), group, False)
    wf = w.astype(np.float32)
    lo = np.minimum(np.where(w, g, np.inf).min(axis=-1), 0).astype(np.float32)
    hi = np.maximum(np.where(w, g, -np.inf).max(axis=-1), 0).astype(np.float32)
    lo = np.where(np.isfinite(lo), lo, 0).astype(np.float32)
    hi = np.where(np.isfinite(hi), hi, 0).astype(np.float32)

    def error(scale: np.ndarray, zero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, 15)
        return (((q - zero[..., None]) * scale[..., None] - g) ** 2 * wf).sum(axis=-1), q

    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best_scale = np.ones(lo.shape, dtype=np.float32)
    best_zero = np.zeros(lo.shape, dtype=np.float32)
    for a in INT4_SEARCH:
        a32 = np.float32(a)
        scale = rounding(_safe_scale((hi * a32 - lo * a32) / np.float32(15)))
        zero = np.clip(np.rint(-(lo * a32) / scale), 0, 15).astype(np.float32)
        err, _ = error(scale, zero)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    _, q = error(best_scale, best_zero)
    for _ in range(INT4_REFINE_STEPS):
        d = (q - best_zero[..., None]) * wf
        den = (d * d).sum(axis=-1)
        fit = (g * d).sum(axis=-1) / np.where(den > 0, den, 1)
        scale = rounding(np.where((den > 0) & (fit > 0), fit, best_scale).astype(np.float32))
        zero = np.clip(np.rint(((q * scale[..., None] - g) * wf).sum(-1) / np.maximum(wf.sum(-1), 1) / scale), 0, 15)
        err, q_new = error(scale, zero.astype(np.float32))
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
        q = np.where(better[..., None], q_new, q)
    return best_scale.astype(np.float32), best_zero.astype(np.uint8)


def _int4_encode(
    xm: np.ndarray, mask: np.ndarray | None, group: int, f16: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scales, zero points and codes of a ``rows x cols`` chunk: on the native core when it is there."""
    core = native.core
    if core is None:
        scale, zero = _int4_params(xm, mask, group, f16=f16)
        return scale, zero, _int4_codes(xm, scale, zero, group)
    rows, cols = xm.shape
    groups = -(-cols // group)
    scale = np.empty((rows, groups), np.float32)
    zero = np.empty((rows, groups), np.uint8)
    codes = np.empty((rows, cols), np.uint8)
    m = b"" if mask is None else np.ascontiguousarray(mask).view(np.uint8)
    x = np.ascontiguousarray(xm, dtype=np.float32)
    core.int4_params(x, m, rows, cols, group, _INT4_SEARCH32, INT4_REFINE_STEPS, f16, scale, zero, codes)
    return scale, zero, codes


_INT4_SEARCH32 = np.array(INT4_SEARCH, dtype=np.float32)


def _int4_codes(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, group: int) -> np.ndarray:
    rows, cols = x.shape
    g = _grouped(x, group, 0.0)
    q = np.clip(np.rint(g / scale[..., None]) + zero[..., None].astype(np.float32), 0, 15).astype(np.uint8)
    return q.reshape(rows, -1)[:, :cols]


def dequantize(
    method: str,
    sections: dict[int, np.ndarray],
    rows: int,
    cols: int,
    group: int,
    mask: np.ndarray | None,
) -> np.ndarray:
    """Rebuild the dense ``rows × cols`` f32 chunk (pruned entries are 0)."""
    if method == "lowrank":
        return lowrank_product(sections[S_LR_A].reshape(rows, group), sections[S_LR_B].reshape(group, cols))
    codes = sections[S_CODES]
    scale = sections[S_SCALES]
    row_idx: np.ndarray | None = None
    col_idx = np.empty(0, dtype=np.intp)
    if mask is not None:
        row_idx, col_idx = np.nonzero(mask)
    if method == "int8":
        vals = codes.view(np.int8).astype(np.float32)
        s = scale[:, None] if row_idx is None else scale[row_idx]
        y = (vals.reshape(rows, cols) if row_idx is None else vals) * s
    elif method == "fp8":
        vals = E4M3_TABLE[codes]
        s = scale[:, None] if row_idx is None else scale[row_idx]
        y = (vals.reshape(rows, cols) if row_idx is None else vals) * s
    elif method == "ecsq":
        z = codes.astype(np.intp)
        if S_HIGH in sections:
            z |= sections[S_HIGH].astype(np.intp) << 8
        table = sections[S_TABLE]
        s = scale[:, None] if row_idx is None else scale[row_idx]
        y = (table[z].reshape(rows, cols) if row_idx is None else table[z]) * s
    elif method == "int4":
        groups = -(-cols // group)
        scale = scale.reshape(rows, groups)
        zero = sections[S_ZEROS].reshape(rows, groups).astype(np.float32)
        vals = codes.astype(np.float32)
        if row_idx is None:
            gi = np.arange(cols) // group
            y = (vals.reshape(rows, cols) - zero[:, gi]) * scale[:, gi]
        else:
            gi = col_idx // group
            y = (vals - zero[row_idx, gi]) * scale[row_idx, gi]
    else:
        raise CodecError(f"unknown quantization method {method}")
    y = y.astype(np.float32, copy=False)
    if mask is None:
        return y.reshape(rows, cols)
    dense = np.zeros((rows, cols), dtype=np.float32)
    dense[mask] = y
    return dense


# --- payload ---------------------------------------------------------------


def split_nibbles(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-byte codes → (high, low): the high (low) nibbles of codes ``2j`` and ``2j + 1`` in byte ``j``."""
    half = (len(codes) + 1) // 2
    high, low = np.empty(half, np.uint8), np.empty(half, np.uint8)
    core = native.core
    if core is not None:
        core.split_nibbles(codes, high, low)
        return high, low
    padded = np.zeros(2 * half, np.uint8)
    padded[: len(codes)] = codes
    a, b = padded[0::2], padded[1::2]
    np.bitwise_or(a & 0xF0, b >> 4, out=high)
    np.bitwise_or(a << 4, b & 0x0F, out=low)
    return high, low


def merge_nibbles(high: np.ndarray, low: np.ndarray, out: np.ndarray) -> None:
    """The inverse of :func:`split_nibbles`, into ``out`` (its length says how many codes; a pad nibble is ignored)."""
    n = len(out)
    if len(high) != (n + 1) // 2 or len(low) != len(high):
        raise CodecError(f"nibble halves of {len(high)} and {len(low)} bytes cannot hold {n} codes")
    core = native.core
    if core is not None:
        core.merge_nibbles(high, low, out)
        return
    np.bitwise_or(high & 0xF0, low >> 4, out=out[0::2])
    np.bitwise_or(high[: n // 2] << 4, low[: n // 2] & 0x0F, out=out[1::2])


def nibbles_pay(codes: np.ndarray) -> bool:
    """Whether ``codes`` (one byte each) cost at most :data:`NIBBLES_SLACK` more nibble-split than as one plane.

    Estimated on a sample (:func:`~mzstore.codecs.lossless.pair_sample`) from the Huffman-coded size
    of the bytes against that of the high-nibble bytes plus 4 raw bits per code: the split gives up
    whatever the low nibble holds beyond 4 bits of noise. int8 codes of Gaussian-like weights pass
    (0.2 % more on MiniLM); fp8's (2.9 % more) and ECSQ's and int4's (a nearly empty high nibble) do not.
    """
    if len(codes) < NIBBLES_MIN_BYTES:
        return False
    sample = pair_sample(codes)
    grid = pair_counts(sample).reshape(16, 16, 16, 16)  # (high a, low a, high b, low b)
    single = grid.sum(axis=(2, 3)).ravel() + grid.sum(axis=(0, 1)).ravel()
    plain = huffman_bits([int(c) for c in single if c])
    split = huffman_bits([int(c) for c in grid.sum(axis=(1, 3)).ravel() if c]) + 4 * 2 * int(grid.sum())
    return split <= plain * (1 + NIBBLES_SLACK)


def nibble_body(codes: np.ndarray, coder: zstandard.ZstdCompressor) -> bytes | None:
    """A nibble-split section body (see the module's payload layout), or ``None`` where zstd gains nothing."""
    high, low = split_nibbles(codes)
    packed = coder.compress(high.data)
    if len(packed) >= len(high):
        return None
    return b"".join([_NIBBLES_HEAD.pack(len(packed)), packed, low.data])


def _read_nibbles(body: memoryview, n: int, slot: int | None) -> memoryview:
    """A nibble-split section's ``n`` codes, in this thread's scratch ``slot`` (or new memory for ``None``)."""
    half = (n + 1) // 2
    if len(body) < _NIBBLES_HEAD.size:
        raise CodecError("nibble-split codes are truncated")
    (packed,) = _NIBBLES_HEAD.unpack_from(body)
    if _NIBBLES_HEAD.size + packed + half != len(body):
        raise CodecError("nibble-split codes have the wrong size")
    start = _NIBBLES_HEAD.size
    high = scratch(half, _HIGH_SLOT)[:half] if slot is not None else np.empty(half, np.uint8)
    zstd_read_into(body[start : start + packed], high.data)
    out = scratch(n, slot)[:n] if slot is not None else np.empty(n, np.uint8)
    merge_nibbles(high, np.frombuffer(body[start + packed :], np.uint8), out)
    return out.data


def _pack(
    method: str, pruned: bool, group: int, rows: int, cols: int, sections: dict[int, np.ndarray | bytes]
) -> bytes:
    heads = []
    bodies: list[bytes] = []
    for sid, data in sections.items():
        if sid == S_CODES and isinstance(data, np.ndarray) and data.itemsize == 1:
            codes = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            body = nibble_body(codes, fast_cctx(CODES_PARAMS)) if nibbles_pay(codes) else None
            if body is not None:
                heads.append(_SECTION.pack(sid, _NIBBLES, len(body), len(codes)))
                bodies.append(body)
                continue
        raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
        # Codes take few values and rarely repeat in runs: literal-heavy parameters
        # code them near their entropy (int4 g128: 3.70 bits vs 4.08 at level 3).
        coder = fast_cctx(CODES_PARAMS) if sid == S_CODES else _cctx()
        packed = coder.compress(raw) if raw else b""
        if len(packed) < len(raw):
            heads.append(_SECTION.pack(sid, _ZSTD, len(packed), len(raw)))
            bodies.append(packed)
        else:
            heads.append(_SECTION.pack(sid, _RAW, len(raw), len(raw)))
            bodies.append(raw)
    head = _HEAD.pack(MAGIC, METHODS[method], int(pruned), group, rows, cols, len(sections))
    return b"".join([head, *heads, *bodies])


@dataclass
class Compact:
    """A decoded payload before expansion: what crosses PCIe for a GPU target."""

    method: str
    rows: int
    cols: int
    group: int
    mask: np.ndarray | None
    sections: dict[int, np.ndarray] = field(default_factory=dict)
    values: bytes | bytearray | memoryview | None = None  # prune-only: lossless payload of kept values


_SECTION_DTYPES = {S_SCALES: np.float32, S_ZEROS: np.uint8, S_CODES: np.uint8, S_HIGH: np.uint8}
#: Scratch slots of transiently unpacked sections: this plus the section id (see :func:`unpack`).
_SECTION_SLOT = 16


def _zstd_read_scratch(body: memoryview, size: int, slot: int) -> memoryview:
    out = scratch(size, slot)
    zstd_read_into(body, out.data)
    return out.data


def unpack(payload: bytes | bytearray | memoryview, raw_len: int, dtype: DType, *, transient: bool = False) -> Compact:
    """Parse and bounds-check a payload; every size is checked against ``raw_len``.

    With ``transient``, zstd-coded sections are decoded into per-thread
    scratch buffers (no fresh zero-filled allocation per chunk): the result
    is valid only until the next transient unpack on this thread, as in
    :meth:`QuantCodec.decode_into`, which expands it at once.
    """
    view = memoryview(payload)
    if len(view) < _HEAD.size:
        raise CodecError("quantized payload is shorter than its header")
    magic, method_id, pruned, group, rows, cols, nsec = _HEAD.unpack_from(view, 0)
    if magic != MAGIC or method_id not in METHOD_NAMES:
        raise CodecError("quantized payload has a bad header")
    if rows * cols * (dtype.bits // 8) != raw_len or dtype.bits % 8:
        raise CodecError(f"quantized payload is {rows}x{cols} {dtype.name}, which is not {raw_len} bytes")
    method = METHOD_NAMES[method_id]
    if method == "int4" and group not in (32, 64, 128):
        raise CodecError(f"bad int4 group size {group}")
    if method == "lowrank" and not 1 <= group <= min(rows, cols):
        raise CodecError(f"lowrank payload has rank {group}, outside [1, {min(rows, cols)}]")
    n = rows * cols
    ecsq = method == "ecsq"
    n_scales = rows * (-(-cols // group) if method == "int4" else 1)
    limits = {
        S_MASK: (n + 7) // 8,
        S_SCALES: 4 * n_scales,
        S_SCALES16: 2 * n_scales if method in ("int4", "ecsq") else 0,
        S_ZEROS: rows * (-(-cols // group) if method == "int4" else 0),
        S_CODES: n,
        S_VALUES: raw_len + 64 + 32 * 16,
        S_HIGH: n if ecsq else 0,
        S_TABLE: 2 * ECSQ_MAX_CODE if ecsq else 0,
    }
    if method == "lowrank":  # only the factors: lossless-coded f32 (a little over 4 bytes each at worst), or int8
        limits = {
            S_LR_A: 4 * rows * group + 64 + 32 * 16,
            S_LR_B: 4 * group * cols + 64 + 32 * 16,
            S_LR_ASCALE: 4 * rows,
            S_LR_BSCALE: 4 * group,
        }
    pos = _HEAD.size + nsec * _SECTION.size
    if len(view) < pos:
        raise CodecError("quantized payload is truncated in its section table")
    out = Compact(method, rows, cols, group, None)
    factors: dict[int, bytes | bytearray | memoryview] = {}
    for i in range(nsec):
        sid, coding, stored, raw = _SECTION.unpack_from(view, _HEAD.size + i * _SECTION.size)
        if sid not in limits or raw > limits[sid]:
            raise CodecError(f"quantized payload section {sid} is malformed or too large")
        body = view[pos : pos + stored]
        if len(body) != stored:
            raise CodecError("quantized payload is truncated")
        pos += stored
        if coding == _ZSTD:
            # Bounded by the section's recorded size, itself bounded by raw_len above; a frame that
            # claims or produces more (a zstd bomb), or carries a second frame, is a CodecError.
            data: bytes | bytearray | memoryview = (
                _zstd_read_scratch(body, raw, _SECTION_SLOT + sid) if transient else zstd_decompress(body, raw)
            )
        elif coding == _RAW:
            data = body
        elif coding == _NIBBLES and sid == S_CODES:
            data = _read_nibbles(body, raw, _SECTION_SLOT + sid if transient else None)
        else:
            raise CodecError(f"unknown section coding {coding}")
        if len(data) != raw:
            raise CodecError("quantized payload section has the wrong size")
        if sid in (S_LR_A, S_LR_B, S_LR_ASCALE, S_LR_BSCALE):
            factors[sid] = data
        elif sid == S_MASK:
            out.mask = np.unpackbits(np.frombuffer(data, np.uint8), count=n).astype(bool).reshape(rows, cols)
        elif sid == S_VALUES:
            out.values = data
        elif sid in (S_SCALES16, S_TABLE):
            if len(data) % 2:
                raise CodecError("quantized payload has a partial f16 value")
            out.sections[S_SCALES if sid == S_SCALES16 else S_TABLE] = np.frombuffer(data, np.float16).astype(
                np.float32
            )
        else:
            itemsize = np.dtype(_SECTION_DTYPES[sid]).itemsize
            if len(data) % itemsize:
                raise CodecError(f"quantized payload section {sid} holds a partial element")
            out.sections[sid] = np.frombuffer(data, dtype=_SECTION_DTYPES[sid])
    if pos != len(view):
        raise CodecError("quantized payload has trailing bytes")
    if method == "lowrank":
        if pruned:
            raise CodecError("a lowrank payload is not pruned")
        out.sections[S_LR_A] = _factor(factors, S_LR_A, S_LR_ASCALE, rows, group)
        out.sections[S_LR_B] = _factor(factors, S_LR_B, S_LR_BSCALE, group, cols)
        return out
    if bool(pruned) != (out.mask is not None):
        raise CodecError("quantized payload mask flag does not match its sections")
    kept = n if out.mask is None else int(out.mask.sum())
    need = {S_CODES} | ({S_SCALES} if method != "none" else set()) | ({S_ZEROS} if method == "int4" else set())
    need |= {S_TABLE} if ecsq else set()
    if method == "none":
        need = set()
        if out.values is None or out.mask is None:
            raise CodecError("pruned payload lacks its values or its mask")
    if not need <= set(out.sections):
        raise CodecError("quantized payload lacks a section")
    if method != "none":
        if len(out.sections[S_CODES]) != kept:
            raise CodecError("quantized payload has the wrong number of codes")
        if len(out.sections[S_SCALES]) != n_scales or (
            method == "int4" and len(out.sections[S_ZEROS]) != limits[S_ZEROS]
        ):
            raise CodecError("quantized payload has the wrong number of scales")
        if method == "int4" and (out.sections[S_CODES] > 15).any():
            raise CodecError("int4 codes out of range")
    if ecsq:
        _check_ecsq(out, kept)
    return out


def _factor(
    sections: dict[int, bytes | bytearray | memoryview], sid: int, scale_sid: int, rows: int, cols: int
) -> np.ndarray:
    """A lowrank factor as f32 ``rows × cols``: int8 codes times their row scales (one rounded multiply),
    or the lossless-coded f32 values."""
    data = sections.get(sid)
    if data is None:
        raise CodecError("lowrank payload lacks a factor")
    scale = sections.get(scale_sid)
    if scale is None:
        if (S_LR_ASCALE in sections) != (S_LR_BSCALE in sections):
            raise CodecError("lowrank payload has int8 scales for one factor only")
        return _lossless.decode(data, DTYPE_F32, 4 * rows * cols).view(np.float32).reshape(rows, cols)
    if len(data) != rows * cols or len(scale) != 4 * rows:
        raise CodecError("lowrank int8 factor has the wrong size")
    codes = np.frombuffer(data, np.int8).reshape(rows, cols)
    return codes.astype(np.float32) * np.frombuffer(scale, np.float32)[:, None]


def _check_ecsq(c: Compact, kept: int) -> None:
    """Every ECSQ code indexes the table: 256 entries without a high plane, else 256 per high byte in use."""
    table = c.sections[S_TABLE]
    high = c.sections.get(S_HIGH)
    if len(table) % 256 or not table.size:
        raise CodecError("ecsq table is not a whole number of 256-entry pages")
    if not np.isfinite(table).all():
        raise CodecError("ecsq table holds a value that is not finite")
    if high is None:
        if len(table) != 256:
            raise CodecError("ecsq table has pages no code can reach")
        return
    if len(high) != kept:
        raise CodecError("ecsq payload has the wrong number of high bytes")
    if kept and int(high.max()) >= len(table) // 256:
        raise CodecError("ecsq code out of the table's range")


def expand(c: Compact, dtype: DType) -> np.ndarray:
    """Compact form → decoded bytes (uint8) of the original dtype."""
    out = np.empty(c.rows * c.cols * (dtype.bits // 8), dtype=np.uint8)
    expand_into(c, dtype, out)
    return out


#: f32 elements dequantized per block by :func:`expand_into` (its temporary stays in L2).
_EXPAND_BLOCK = 512 * 1024
#: Scratch slot of that block (see :func:`~mzstore.codecs.base.scratch`).
_F32_SLOT = 10
#: The native core's method and output codes (``_native.c``: Q_INT8.., OUT_F32..). F16 targets keep
#: numpy's cast, which may round through the CPU's F16C instructions.
_NATIVE_METHODS = {"int8": 0, "fp8": 1, "int4": 2, "ecsq": 3}
_NATIVE_OUT = {"F32": 0, "BF16": 1}


def expand_into(c: Compact, dtype: DType, out: np.ndarray) -> None:
    """Compact form → decoded bytes of the original dtype, written into ``out`` (uint8).

    Encode computes a chunk's decoded bytes (whose hash goes in the manifest)
    with this same function, so a pull reproduces them bit for bit. Plain int8
    runs block by block: ``codes · scale`` into a cache-sized f32 temporary,
    cast into ``out`` (measured 2.4x faster than whole-chunk passes).
    """
    if c.method == "none":
        assert c.values is not None
        assert c.mask is not None  # unpack guarantees a mask for prune-only payloads
        itemsize = dtype.bits // 8
        kept = int(c.mask.sum())
        vals = _lossless.decode(c.values, dtype, kept * itemsize)
        dense = out.reshape(c.rows, c.cols, itemsize)
        dense[...] = 0
        if kept:
            dense[c.mask] = vals.reshape(kept, itemsize)
        return
    core = native.core
    if core is not None and c.mask is None and dtype.name in _NATIVE_OUT and c.method in _NATIVE_METHODS:
        # One pass on the native core: codes x scale, rounded to the dtype, written into ``out``.
        core.expand(
            _NATIVE_METHODS[c.method],
            c.sections[S_CODES],
            c.sections[S_SCALES],
            c.sections[S_ZEROS] if c.method == "int4" else c.sections.get(S_HIGH, b""),
            E4M3_TABLE if c.method == "fp8" else c.sections.get(S_TABLE, b""),
            c.rows,
            c.cols,
            c.group if c.method == "int4" else 1,
            out,
            _NATIVE_OUT[dtype.name],
        )
        return
    if c.method == "int8" and c.mask is None:
        codes = c.sections[S_CODES].view(np.int8).reshape(c.rows, c.cols)
        scale = c.sections[S_SCALES][:, None]
        itemsize = dtype.bits // 8
        step = max(1, _EXPAND_BLOCK // max(1, c.cols))
        tmp = scratch(4 * min(c.rows, step) * c.cols, _F32_SLOT).view(np.float32)
        for r0 in range(0, c.rows, step):
            r1 = min(c.rows, r0 + step)
            y = tmp[: (r1 - r0) * c.cols].reshape(r1 - r0, c.cols)
            np.multiply(codes[r0:r1], scale[r0:r1], out=y)  # int8 → f32 exactly, then one f32 multiply
            _cast_into(y.reshape(-1), dtype, out[r0 * c.cols * itemsize : r1 * c.cols * itemsize])
        return
    y = dequantize(c.method, c.sections, c.rows, c.cols, c.group, c.mask)
    _cast_into(y.reshape(-1), dtype, out)


def _cast_into(y: np.ndarray, dtype: DType, out: np.ndarray) -> None:
    """Cast f32 values to ``dtype`` (round to nearest even) into the bytes ``out``.

    bf16 rounds with :func:`~mzstore.codecs.floats.f32_to_bf16_into`; the tests
    check it gives ml_dtypes' bits.
    """
    if dtype.name == "F32":
        out.view(np.float32)[:] = y
    elif dtype.name == "F16":
        out.view(np.float16)[:] = y
    elif dtype.name == "BF16":
        f32_to_bf16_into(y, out.view(np.uint16))
    else:
        raise CodecError(f"lossy codecs take F32, F16 or BF16 tensors, not {dtype.name}")


# --- the codec ---------------------------------------------------------------


def chunk_matrix(raw_len: int, dtype: DType, rows: int) -> tuple[int, int]:
    """``rows × cols`` of a chunk of ``raw_len`` bytes spanning ``rows`` rows."""
    n = raw_len * 8 // dtype.bits
    if rows <= 0 or n % rows:
        return 1, n
    return rows, n // rows


@dataclass
class Encoded:
    """A lossy-encoded chunk.

    Attributes:
        codec: ``quant`` (or ``lossless`` when auto found nothing smaller that meets its target).
        payload: the stored bytes.
        params: recorded in the manifest (``{"spec": "int4:g128"}``).
        stats: decoded vs original values.
        decoded: the decoded bytes, exactly what a pull produces (their BLAKE3 goes in the manifest).
    """

    codec: str
    payload: bytes
    params: dict[str, Any]
    stats: Stats
    decoded: np.ndarray


def encode_spec(raw: bytes | bytearray | memoryview, dtype: DType, rows: int, spec: Spec) -> Encoded:
    """Encode one chunk with a prune/quantize spec; ``rows`` is how many matrix rows it holds.

    Raises:
        CodecError: ``spec`` neither prunes nor quantizes, or the chunk holds NaN or infinite values.
    """
    if spec.lossless:
        raise CodecError("encode_spec needs a prune or quantize stage (lossless chunks use the lossless codec)")
    x = to_f32(raw, dtype)
    r, c = chunk_matrix(len(x) * (dtype.bits // 8), dtype, rows)
    x = x.reshape(r, c)
    if not np.isfinite(x).all():
        raise CodecError("tensor has NaN or infinite values; keep it exact (--keep)")
    params: dict[str, Any] = {"spec": str(spec)}
    mask = prune_mask(x, spec.prune) if spec.prune else None
    sections: dict[int, np.ndarray | bytes] = {}
    if mask is not None:
        sections[S_MASK] = np.packbits(mask.reshape(-1))
    if spec.lowrank is not None:
        params["rank"], factors = lowrank_factors(x, spec.lowrank, int8=spec.quant is not None)
        payload = _pack("lowrank", False, params["rank"], r, c, factors)
    elif spec.quant is None:
        kept = np.frombuffer(raw, np.uint8).reshape(r, c, -1)[mask]
        sections[S_VALUES] = _lossless.encode(kept.tobytes(), dtype)[0]
        payload = _pack("none", True, 0, r, c, sections)
    else:
        q = quantize(x, mask, spec.quant)
        sections.update(q)
        payload = _pack(spec.quant.kind, mask is not None, spec.quant.group, r, c, sections)
    decoded = expand(unpack(payload, len(x.reshape(-1)) * (dtype.bits // 8), dtype), dtype)
    y = to_f32(decoded, dtype)
    return Encoded("quant", payload, params, Stats.of(x.reshape(-1), y), decoded)


AUTO_CANDIDATES = (
    Spec(quant=Quant("int4", 128)),
    Spec(quant=Quant("int4", 64)),
    Spec(quant=Quant("int4", 32)),
    Spec(quant=Quant("fp8")),
    Spec(quant=Quant("int8")),
)


#: ``auto:cos=C`` aims at a model whose outputs keep cosine C; each chunk must
#: keep ``1 - (1 - C) / AUTO_MARGIN`` on its own. Measured on MiniLM, the error
#: of the sentence embeddings is 2 (int8) to 8 (int4) times the error of the
#: weights of the matrices that multiply activations, and the errors of all
#: tensors add up. Margins 10 and 1 sufficed while every candidate was a fixed
#: grid that overshot its chunk's target; the ECSQ candidate lands on the
#: target, and with those margins MiniLM ended at 0.9888 for ``cos=0.99``.
#: 15 and 2 give 0.9937 at 0.138 of the raw size (bench/bench_lossy.py).
AUTO_MARGIN = 15.0
#: Embedding tables are looked up, not multiplied: their error reaches the
#: output without that amplification (MiniLM: int4 word embeddings alone give
#: embedding cosine 0.998 for a weight cosine of 0.995), so their margin is 2.
AUTO_EMBEDDING_MARGIN = 2.0
EMBEDDING_PATTERN = re.compile(r"(^|[._])(embed_tokens|word_embeddings|wte|tok_embeddings|embeddings?)([._]|$)", re.I)


def auto_margin(name: str) -> float:
    """How much tighter than the model target a tensor's chunks must be."""
    if EMBEDDING_PATTERN.search(name) and "position" not in name.lower():
        return AUTO_EMBEDDING_MARGIN
    return AUTO_MARGIN


def auto_chunk_target(cos: float, margin: float = AUTO_MARGIN) -> float:
    """The per-chunk cosine that ``auto:cos=cos`` requires."""
    return 1.0 - (1.0 - cos) / margin


#: ``auto`` first tries each candidate on this many rows of the chunk, evenly spaced (scales are per
#: row or per row group, so a row quantizes the same alone as in the whole chunk).
AUTO_SAMPLE_ROWS = 64
#: A candidate is encoded in full when its sample keeps at least ``1 - (1 - target) * slack``: the
#: sample only skips the hopeless ones; the decision is made on the whole chunk's measured error.
AUTO_SAMPLE_SLACK = 2.0


#: ``auto`` encodes in full, besides the candidate its sample rows make the smallest, every one whose
#: sample's payload is within this factor of the sample payload of the best whole encoding found so far:
#: the samples rank the candidates, the whole chunk decides. (On MiniLM the sample payloads, scaled to the
#: chunk, came within 1-2.5 % of the whole ones, all a little over; between candidates they differed by
#: 6 % or more.)
AUTO_SIZE_SLACK = 1.05


def encode_auto(
    raw: bytes | bytearray | memoryview,
    dtype: DType,
    rows: int,
    cos: float,
    margin: float = AUTO_MARGIN,
    servable: bool = False,
) -> Encoded:
    """The smallest candidate that keeps :func:`auto_chunk_target` of ``cos``, else lossless.

    Candidates: ECSQ at the step predicted for the target (:func:`auto_ecsq_step`; not when
    ``servable``), a low-rank split, then :data:`AUTO_CANDIDATES`. With enough rows, every
    candidate is first encoded on a sample of them: one whose sample falls clearly short is
    not encoded in full, and the others are encoded in full in the order of their sample's
    payload size, while that size, scaled to the chunk, stays within :data:`AUTO_SIZE_SLACK`
    of the smallest whole payload that met the target (lossless too); once one has met it,
    only candidates whose sample meets the target too are tried. The chosen encoding's
    error is always measured on the whole chunk, decoded exactly as a pull decodes it.
    """
    target = auto_chunk_target(cos, margin)
    lenient = 1.0 - (1.0 - target) * AUTO_SAMPLE_SLACK
    sample = _row_sample(raw, dtype, rows)
    if sample is None:  # a few rows: every candidate in full
        return _auto_every(raw, dtype, rows, target, servable)
    scale = chunk_matrix(len(raw), dtype, rows)[0] / sample[1]

    cosines: dict[str, float] = {}
    sizes: dict[str, float] = {}

    def estimate(spec: Spec) -> float | None:
        """The payload a spec would give the chunk, from the sample; ``None`` when it falls clearly short."""
        key = str(spec)
        if key not in sizes:
            enc = encode_spec(sample[0], dtype, sample[1], spec)
            cosines[key], sizes[key] = enc.stats.cosine, len(enc.payload) * scale
        return sizes[key] if cosines[key] >= lenient else None

    best: Encoded | None = None
    best_estimate = math.inf  # the best's payload as its sample gave it (its whole payload if none did)

    def take(enc: Encoded, estimated: float | None) -> None:
        nonlocal best, best_estimate
        if enc.stats.cosine >= target and (best is None or len(enc.payload) < len(best.payload)):
            best, best_estimate = enc, len(enc.payload) if estimated is None else estimated

    if not servable:
        ecsq = _auto_ecsq(raw, dtype, rows, target, estimate)
        if ecsq is not None:
            take(ecsq, sizes.get(ecsq.params["spec"]))
        low = _auto_lowrank(raw, dtype, rows, target, best)
        if low is not None:
            take(low, None)
    ranked = sorted((size, i) for i, spec in enumerate(AUTO_CANDIDATES) if (size := estimate(spec)) is not None)
    for size, i in ranked:
        if size > AUTO_SIZE_SLACK * best_estimate:
            break
        if best is not None and cosines[str(AUTO_CANDIDATES[i])] < target:
            continue  # something meets the target already: only a sample that meets it too may beat it
        take(encode_spec(raw, dtype, rows, AUTO_CANDIDATES[i]), size)
    if best is not None and len(_lossless.encode(sample[0], dtype)[0]) * scale > AUTO_SIZE_SLACK * best_estimate:
        return best
    return _or_lossless(raw, dtype, best)


def _auto_every(raw: bytes | bytearray | memoryview, dtype: DType, rows: int, target: float, servable: bool) -> Encoded:
    """``auto`` on a chunk too short to sample: every candidate in full (a 4-bit one that passes ends it)."""
    best = None if servable else _auto_ecsq(raw, dtype, rows, target, None)
    if not servable:
        low = _auto_lowrank(raw, dtype, rows, target, best)
        best = low if low is not None else best
    for spec in AUTO_CANDIDATES:
        enc = encode_spec(raw, dtype, rows, spec)
        if enc.stats.cosine >= target and (best is None or len(enc.payload) < len(best.payload)):
            best = enc
            if spec.quant is not None and spec.quant.kind == "int4":
                break
    return _or_lossless(raw, dtype, best)


def _or_lossless(raw: bytes | bytearray | memoryview, dtype: DType, best: Encoded | None) -> Encoded:
    """``best``, unless the lossless encoding is no larger (or there is no ``best``)."""
    lossless_payload, lossless_params = _lossless.encode(raw, dtype)
    if best is None or len(lossless_payload) <= len(best.payload):
        x = to_f32(raw, dtype)
        return Encoded("lossless", lossless_payload, lossless_params, Stats.of(x, x), np.frombuffer(raw, np.uint8))
    return best


#: ``auto``'s ECSQ candidate: the step whose error keeps the chunk's cosine target, from high-rate theory
#: (relative error ``step² / 12``, cosine ``1 - error / 2``), tightened by this factor up to
#: :data:`AUTO_ECSQ_TRIES` times while the measured cosine falls short.
AUTO_ECSQ_TIGHTEN = 0.8
AUTO_ECSQ_TRIES = 3


def auto_ecsq_step(target: float) -> float:
    """The ECSQ step predicted to keep a chunk's cosine at ``target``."""
    lo, hi = ECSQ_STEP_RANGE
    return float(f"{min(hi, max(lo, math.sqrt(24.0 * max(1.0 - target, 0.0)))):.6g}")


def _auto_ecsq(
    raw: bytes | bytearray | memoryview,
    dtype: DType,
    rows: int,
    target: float,
    estimate: Callable[[Spec], float | None] | None,
) -> Encoded | None:
    """``auto``'s ECSQ candidate: the coarsest of a few steps that meets ``target``, or ``None``. With
    ``estimate`` (the sample's), a step whose sample falls clearly short is not encoded in full."""
    step = auto_ecsq_step(target)
    for _ in range(AUTO_ECSQ_TRIES):
        spec = Spec(quant=Quant("ecsq", step=step))
        if estimate is None or estimate(spec) is not None:
            enc = encode_spec(raw, dtype, rows, spec)
            if enc.stats.cosine >= target:
                return enc
        step = float(f"{max(ECSQ_STEP_RANGE[0], step * AUTO_ECSQ_TIGHTEN):.6g}")
    return None


#: ``auto`` tries a low-rank split only on chunks of at most this many values (an SVD per chunk: 0.1 s at 1 Mi).
AUTO_LOWRANK_MAX_VALUES = 1 << 20


def _auto_lowrank(
    raw: bytes | bytearray | memoryview, dtype: DType, rows: int, target: float, best: Encoded | None
) -> Encoded | None:
    """``auto``'s low-rank candidate (int8 factors), when its rank for ``target`` makes it smaller than ``best``.

    The rank keeps ``target²`` of the singular values' energy (the cosine of a truncation is the square root
    of the energy it keeps) plus a quarter of the rest for the int8 error; it is encoded only when its
    factors' bytes undercut ``best``'s payload, and kept only when its measured cosine meets ``target``.
    Trained weight matrices are rarely low-rank: on MiniLM it never pays (see docs/architecture.md).
    """
    r, c = chunk_matrix(len(raw), dtype, rows)
    if r < 2 or c < 2 or r * c > AUTO_LOWRANK_MAX_VALUES:
        return None
    x = to_f32(raw, dtype).reshape(r, c)
    if not np.isfinite(x).all():
        return None
    # The singular values from the eigenvalues of the smaller Gram matrix: a third of an SVD's time.
    x64 = x.astype(np.float64)
    gram = x64 @ x64.T if r <= c else x64.T @ x64
    energy = min(target**2 + (1 - target**2) * 0.75, 1 - 1e-12)
    if best is not None and not _top_energy_may_reach(gram, (len(best.payload) - 4 * r) // (r + c + 4), energy):
        return None  # no rank small enough to undercut best can keep the energy: skip the eigenvalues
    s = np.sqrt(np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None))
    rank = lowrank_rank(s, LowRank(energy=energy))
    if best is not None and (r + c) * rank + 4 * (r + rank) >= len(best.payload):
        return None
    enc = encode_spec(raw, dtype, rows, Spec(quant=Quant("int8"), lowrank=LowRank(rank=rank)))
    return enc if enc.stats.cosine >= target and (best is None or len(enc.payload) < len(best.payload)) else None


def _top_energy_may_reach(gram: np.ndarray, k: int, energy: float) -> bool:
    """Whether the ``k`` largest eigenvalues of ``gram`` (symmetric, positive semi-definite) may sum to
    ``energy`` of its trace, judged from the trace ``T`` and the Frobenius norm ``F`` alone: ``False``
    only when they cannot.

    Of all spectra with ``m`` eigenvalues summing to ``T`` with squares summing to ``F²``, the largest
    top-``k`` sum ``S`` has the top ``k`` equal and the rest equal, so ``S²/k + (T - S)²/(m - k) = F²``;
    the larger root bounds every spectrum's. On MiniLM's matrices this rules out the low-rank candidate
    for 24 of 40 without the eigendecomposition (5 of its 8 ms per 384 × 1536 chunk).
    """
    m = gram.shape[0]
    if k <= 0:
        return False
    if k >= m:
        return True
    trace = float(np.trace(gram))
    if trace <= 0:
        return True
    fro2 = float(np.einsum("ij,ij->", gram, gram)) * (1 + 1e-9)  # rounding may only widen the bound
    a, b, c = 1 / k + 1 / (m - k), -2 * trace / (m - k), trace * trace / (m - k) - fro2
    top = (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
    return top >= energy * trace * (1 - 1e-9)


def _row_sample(raw: bytes | bytearray | memoryview, dtype: DType, rows: int) -> tuple[bytes, int] | None:
    """:data:`AUTO_SAMPLE_ROWS` rows of the chunk, evenly spaced, and their count; ``None`` when it has few rows."""
    r, c = chunk_matrix(len(raw), dtype, rows)
    if r <= 2 * AUTO_SAMPLE_ROWS:
        return None
    width = c * (dtype.bits // 8)
    matrix = np.frombuffer(raw, dtype=np.uint8).reshape(r, width)
    picked = np.linspace(0, r - 1, AUTO_SAMPLE_ROWS).astype(np.intp)
    return matrix[picked].tobytes(), AUTO_SAMPLE_ROWS


class QuantCodec:
    """Decoder of pruned and/or quantized chunks (the ``quant`` codec)."""

    name = "quant"

    def encode(self, raw: bytes | bytearray | memoryview, dtype: DType) -> tuple[bytes, dict[str, Any]]:
        raise CodecError("the quant codec encodes through encode_spec (it needs a policy and the chunk's rows)")

    def decode(self, payload: bytes | bytearray | memoryview, dtype: DType, raw_len: int) -> np.ndarray:
        return expand(unpack(payload, raw_len, dtype), dtype)

    def decode_into(self, payload: bytes | bytearray | memoryview, dtype: DType, out: np.ndarray) -> None:
        expand_into(unpack(payload, len(out), dtype, transient=True), dtype, out)


__all__ = ["Compact", "Encoded", "QuantCodec", "Stats", "encode_auto", "encode_spec", "expand", "expand_into", "unpack"]
