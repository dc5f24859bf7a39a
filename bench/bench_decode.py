#!/usr/bin/env python3
"""Decode and verify speed of one chunk: what a pull spends its CPU on (issue #5).

For a 16 MiB chunk (the default chunk size) of Gaussian weights in bf16,
fp16 and fp32, and of the same weights quantized to int8 and ECSQ, it prints
the median time of ``decode_into`` on one thread and the rate on two
threads (and, for bf16 and fp32, of the lossless encode a push runs, with its
samples and without them, as before issue 15's sampling; for int8, the
codes nibble-split and, as before, in one zstd plane), beside same-run
baselines: a plain ``numpy.copyto`` of the chunk
(what reading an uncompressed file costs at best) and the decoded-chunk
hashes, BLAKE3 (what new manifests carry) and sha256 (older ones).

Usage::

    .venv/bin/python bench/bench_decode.py [--runs 15] [--mib 16]
    MZSTORE_NATIVE=0 .venv/bin/python bench/bench_decode.py    # the numpy reference, for the before
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import blake3
import numpy as np
import torch

from mzstore.codecs import native
from mzstore.codecs.lossless import LosslessCodec
from mzstore.codecs.policy import parse_policy
from mzstore.codecs.quant import QuantCodec, encode_spec, expand_into, unpack
from mzstore.format.dtypes import get_dtype


def median_seconds(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def two_thread_rate(fn: Callable[[int], object], nbytes: int, jobs: int) -> float:
    """Decoded bytes per second with two threads each running ``fn`` (one buffer per thread)."""
    fn(0)
    fn(1)
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(fn, [i % 2 for i in range(jobs)]))
    return jobs * nbytes / (time.perf_counter() - start)


@contextlib.contextmanager
def _codes_in_one_plane() -> Iterator[None]:
    """The quantized encoder as it was before issue 15 split int8 codes by nibble: one zstd plane of codes."""
    from mzstore.codecs import quant

    saved = quant.NIBBLES_MIN_BYTES
    quant.NIBBLES_MIN_BYTES = 1 << 62
    try:
        yield
    finally:
        quant.NIBBLES_MIN_BYTES = saved


@contextlib.contextmanager
def _whole_planes() -> Iterator[None]:
    """The lossless encoder as it was before it sampled: a full pair histogram, every plane compressed whole."""
    from mzstore.codecs import lossless

    saved = lossless.PROBE_MIN_BYTES, lossless.PAIRS_SAMPLE_BLOCKS
    lossless.PROBE_MIN_BYTES, lossless.PAIRS_SAMPLE_BLOCKS = 1 << 62, 1 << 40
    try:
        yield
    finally:
        lossless.PROBE_MIN_BYTES, lossless.PAIRS_SAMPLE_BLOCKS = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15, help="timed runs per figure (median reported)")
    p.add_argument("--mib", type=int, default=16, help="chunk size in MiB (decoded)")
    args = p.parse_args()
    size = args.mib << 20
    rows = size // (2048 * 2)
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(rows, 2048, generator=gen) * 0.02

    print(f"decode of one {args.mib} MiB chunk, median of {args.runs}; 2-thread rate over {4 * args.runs} chunks")
    header = f"{'what':34s} {'ms':>7s} {'GB/s 1 thread':>14s} {'GB/s 2 threads':>15s} {'x copyto':>9s}"
    print(header)
    print("-" * len(header))
    src = weights.to(torch.bfloat16).view(torch.uint8).numpy().reshape(-1)[:size].copy()
    outs = [np.empty(size, np.uint8), np.empty(size, np.uint8)]
    copy_s = median_seconds(lambda: np.copyto(outs[0], src), args.runs)

    def line(what: str, one: Callable[[], object], per_thread: Callable[[int], object], nbytes: int) -> None:
        s = median_seconds(one, args.runs)
        rate2 = two_thread_rate(per_thread, nbytes, 4 * args.runs)
        print(f"{what:34s} {s * 1e3:7.2f} {nbytes / s / 1e9:14.2f} {rate2 / 1e9:15.2f} {copy_s / s:9.2f}")

    line("baseline: numpy.copyto", lambda: np.copyto(outs[0], src), lambda i: np.copyto(outs[i], src), size)
    line("hash: blake3", lambda: blake3.blake3(src).digest(), lambda i: blake3.blake3(src).digest(), size)
    line("hash: sha256", lambda: hashlib.sha256(src).digest(), lambda i: hashlib.sha256(src).digest(), size)

    lossless = LosslessCodec()
    for name, tdtype in (("BF16", torch.bfloat16), ("F16", torch.float16), ("F32", torch.float32)):
        raw = weights.to(tdtype).view(torch.uint8).numpy().reshape(-1)[:size].copy()
        dtype = get_dtype(name)
        payload, _ = lossless.encode(raw.data, dtype)
        lossless.decode_into(payload, dtype, outs[0])
        assert np.array_equal(outs[0], raw), f"{name} did not round-trip"
        line(
            f"lossless {name} (stored {len(payload) / size:.3f})",
            lambda p=payload, d=dtype: lossless.decode_into(p, d, outs[0]),
            lambda i, p=payload, d=dtype: lossless.decode_into(p, d, outs[i]),
            size,
        )
        if name != "F16":  # what a push spends: the encode, with its samples and with every plane whole
            line(
                f"  encode {name}",
                lambda r=raw, d=dtype: lossless.encode(r.data, d),
                lambda i, r=raw, d=dtype: lossless.encode(r.data, d),
                size,
            )
            with _whole_planes():
                line(
                    f"  encode {name}, no samples (before)",
                    lambda r=raw, d=dtype: lossless.encode(r.data, d),
                    lambda i, r=raw, d=dtype: lossless.encode(r.data, d),
                    size,
                )

    quant = QuantCodec()
    dtype = get_dtype("BF16")
    enc = encode_spec(src.data, dtype, rows, parse_policy("int8").spec)
    quant.decode_into(enc.payload, dtype, outs[0])
    assert np.array_equal(outs[0], np.asarray(enc.decoded)), "int8 decode differs from what encode recorded"
    line(
        f"int8 -> BF16 (stored {len(enc.payload) / size:.3f})",
        lambda: quant.decode_into(enc.payload, dtype, outs[0]),
        lambda i: quant.decode_into(enc.payload, dtype, outs[i]),
        size,
    )
    with _codes_in_one_plane():
        before = encode_spec(src.data, dtype, rows, parse_policy("int8").spec).payload
    line(
        f"int8 -> BF16, one plane (before) ({len(before) / size:.3f})",
        lambda: quant.decode_into(before, dtype, outs[0]),
        lambda i: quant.decode_into(before, dtype, outs[i]),
        size,
    )
    compact = unpack(enc.payload, size, dtype)  # the codes, already out of zstd: the expansion alone
    line(
        "int8 -> BF16, expand only",
        lambda: expand_into(compact, dtype, outs[0]),
        lambda i: expand_into(compact, dtype, outs[i]),
        size,
    )
    # ECSQ at the steps ecsq:size=0.14 gives MiniLM's matrices (0.1-0.4), and one fine enough for two byte planes.
    for step, target in ((0.3, "BF16"), (0.3, "F32"), (0.1, "F32"), (0.01, "F32")):
        tdt = get_dtype(target)
        raw = weights.to(torch.bfloat16 if target == "BF16" else torch.float32).view(torch.uint8).numpy()
        raw = raw.reshape(-1)[:size].copy()
        nrows = size // (2048 * tdt.bits // 8)
        enc = encode_spec(raw.data, tdt, nrows, parse_policy(f"ecsq:step={step}").spec)
        quant.decode_into(enc.payload, tdt, outs[0])
        assert np.array_equal(outs[0], np.asarray(enc.decoded)), "ecsq decode differs from what encode recorded"
        line(
            f"ecsq:step={step} -> {target} (stored {len(enc.payload) / size:.3f})",
            lambda p=enc.payload, d=tdt: quant.decode_into(p, d, outs[0]),
            lambda i, p=enc.payload, d=tdt: quant.decode_into(p, d, outs[i]),
            size,
        )
        if step == 0.3:
            compact = unpack(enc.payload, size, tdt)
            line(
                f"ecsq:step={step} -> {target}, expand only",
                lambda c=compact, d=tdt: expand_into(c, d, outs[0]),
                lambda i, c=compact, d=tdt: expand_into(c, d, outs[i]),
                size,
            )
    print(f"codec core: {'native (mzstore/codecs/_native.c)' if native.enabled() else 'numpy (MZSTORE_NATIVE=0)'}")


if __name__ == "__main__":
    main()
