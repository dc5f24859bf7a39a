"""Incremental (chunked, streaming) encoding gives what one-shot encoding gives.

Ingest encodes a tensor chunk by chunk as it streams in. Quantization is
row-local (per-row or per-group-along-the-row scales) and N:M pruning works
within rows, so any split into runs of whole rows must decode to exactly the
bytes of encoding the whole tensor at once. Lossless coding is exact either
way. (Unstructured magnitude pruning is chunk-local by design: it is not in
this list.)
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mzstore.codecs import get_codec
from mzstore.codecs.policy import parse_policy
from mzstore.codecs.quant import encode_spec
from mzstore.format.dtypes import DTYPES

ROW_LOCAL = ["int8", "fp8", "int4", "int4:g32", "int4:g64", "prune:2:4", "prune:2:4,int8", "prune:2:4,int4:g32"]
FLOAT_VIEWS = {"F32": np.float32, "F16": np.float16}


def _matrix(rows: int, cols: int, dtype: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * rng.uniform(0.001, 1.0, size=(rows, 1))
    if dtype == "BF16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16).tobytes()
    return x.astype(FLOAT_VIEWS[dtype]).tobytes()


@settings(max_examples=25, deadline=None)
@given(
    policy=st.sampled_from(ROW_LOCAL),
    dtype=st.sampled_from(["F32", "F16", "BF16"]),
    rows=st.integers(2, 24),
    cols=st.sampled_from([16, 64, 100, 256, 300]),
    cuts=st.lists(st.integers(1, 23), max_size=4),
    seed=st.integers(0, 1000),
)
def test_chunked_encoding_equals_one_shot(
    policy: str, dtype: str, rows: int, cols: int, cuts: list[int], seed: int
) -> None:
    dt = DTYPES[dtype]
    raw = _matrix(rows, cols, dtype, seed)
    row_bytes = cols * dt.bits // 8
    spec = parse_policy(policy).spec
    whole = encode_spec(raw, dt, rows, spec)
    bounds = sorted({0, rows, *(c for c in cuts if c < rows)})
    pieces = []
    for start, end in itertools.pairwise(bounds):
        part = encode_spec(raw[start * row_bytes : end * row_bytes], dt, end - start, spec)
        pieces.append(get_codec("quant").decode(part.payload, dt, (end - start) * row_bytes).tobytes())
    assert b"".join(pieces) == get_codec("quant").decode(whole.payload, dt, len(raw)).tobytes()


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "I64", "U8"])
def test_lossless_chunked_equals_one_shot(dtype: str) -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=8 * 4096, dtype=np.uint8).tobytes()
    codec = get_codec("lossless")
    dt = DTYPES[dtype]
    whole = codec.decode(codec.encode(raw, dt)[0], dt, len(raw)).tobytes()
    step = 8 * 512
    parts = b"".join(
        codec.decode(codec.encode(raw[i : i + step], dt)[0], dt, len(raw[i : i + step])).tobytes()
        for i in range(0, len(raw), step)
    )
    assert parts == whole == raw


@pytest.mark.parametrize("codec_name", ["lossless", "quant"])
def test_decode_into_equals_decode(codec_name: str) -> None:
    dt = DTYPES["BF16"]
    raw = _matrix(32, 128, "BF16", 3)
    if codec_name == "lossless":
        payload = get_codec("lossless").encode(raw, dt)[0]
    else:
        payload = encode_spec(raw, dt, 32, parse_policy("int4:g32").spec).payload
    codec = get_codec(codec_name)
    out = np.full(len(raw), 0xAB, dtype=np.uint8)
    codec.decode_into(payload, dt, out)
    assert out.tobytes() == codec.decode(payload, dt, len(raw)).tobytes()
