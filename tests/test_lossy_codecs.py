"""Lossy codecs (pure, no server): policy grammar, keep rules, per-stage error bounds, payload robustness."""

from __future__ import annotations

import hashlib
import math
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mzstore.codecs.lossless import LosslessCodec
from mzstore.codecs.policy import (
    MIN_LOSSY_NUMEL,
    Prune,
    Quant,
    Spec,
    lossy_eligible,
    mode_name,
    parse_policy,
)
from mzstore.codecs.quant import (
    AUTO_CANDIDATES,
    AUTO_MARGIN,
    E4M3_TABLE,
    S_CODES,
    S_MASK,
    S_SCALES,
    S_SCALES16,
    S_VALUES,
    S_ZEROS,
    STATS_BLOCK,
    QuantCodec,
    Stats,
    auto_chunk_target,
    encode_auto,
    encode_spec,
    unpack,
)
from mzstore.errors import CodecError, InvalidArgument
from mzstore.format.dtypes import DTYPES, get_dtype

# Payload layout, written down from the format's documentation (not imported from the codec).
HEAD = struct.Struct("<4sBBHQQB3x")
SECTION = struct.Struct("<BBQQ")
RAW, ZSTD, NIBBLES = 0, 1, 2
#: A nibble-split section's body: u64 length of the zstd frame of the high nibbles, the frame, the low nibbles.
NIBBLE_HEAD = struct.Struct("<Q")
METHOD_ID = {"none": 0, "int8": 1, "int4": 2, "fp8": 3}

NP_DTYPE = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
TORCH_DTYPE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: Relative half-ulp of the final cast to the tensor's dtype, and its absolute floor (F16 subnormals).
CAST_REL = {"F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}
CAST_ABS = {"F32": 0.0, "F16": 2.0**-25, "BF16": 0.0}
#: Value scales per dtype: tiny and large included, within what the dtype holds without overflow.
SCALES = {
    "F32": (1e-30, 1e-6, 1e-2, 1.0, 3.0, 1e3, 1e30),
    "BF16": (1e-30, 1e-6, 1e-2, 1.0, 3.0, 1e3, 1e30),
    "F16": (1e-6, 1e-2, 1.0, 3.0, 1e2, 1e3),
}
PROPS = settings(max_examples=50, deadline=None)


# --- helpers -------------------------------------------------------------------------


@dataclass
class Matrix:
    dtype: str
    values: np.ndarray  # rows × cols, in the tensor's dtype

    @property
    def rows(self) -> int:
        return self.values.shape[0]

    @property
    def cols(self) -> int:
        return self.values.shape[1]

    @property
    def raw(self) -> bytes:
        return np.ascontiguousarray(self.values).tobytes()

    @property
    def x(self) -> np.ndarray:
        """Exact values as float64."""
        return self.values.astype(np.float32).astype(np.float64)

    @property
    def dt(self):
        return DTYPES[self.dtype]


def make(dtype: str, rows: int, cols: int, seed: int, scale: float = 1.0, zero_rows=()) -> Matrix:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * scale
    x[list(zero_rows)] = 0.0
    return Matrix(dtype, x.astype(np.float32).astype(NP_DTYPE[dtype]))


@st.composite
def matrices(draw, dtypes=("F32", "F16", "BF16"), max_rows=40, max_cols=300, scales=None) -> Matrix:
    dtype = draw(st.sampled_from(dtypes))
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    scale = draw(st.sampled_from(scales or SCALES[dtype]))
    seed = draw(st.integers(0, 2**32 - 1))
    zero_rows = draw(st.sets(st.integers(0, rows - 1), max_size=rows))
    return make(dtype, rows, cols, seed, scale, sorted(zero_rows))


def spec_of(text: str) -> Spec:
    return parse_policy(text).spec


def decoded_values(m: Matrix, decoded: np.ndarray) -> np.ndarray:
    """Decoded bytes → float64 rows × cols."""
    return decoded.view(NP_DTYPE[m.dtype]).astype(np.float32).astype(np.float64).reshape(m.rows, m.cols)


def check_consistent(m: Matrix, enc, spec_text: str) -> np.ndarray:
    """Properties every lossy encoding has; returns the decoded values (float64)."""
    assert enc.codec == "quant"
    assert enc.params == {"spec": spec_text}
    codec = QuantCodec()
    out = codec.decode(enc.payload, m.dt, len(m.raw))
    assert out.dtype == np.uint8 and out.shape == (len(m.raw),)
    # What a pull produces is exactly what ingest hashed.
    assert out.tobytes() == np.asarray(enc.decoded).tobytes()
    into = np.full(len(m.raw), 0xAB, dtype=np.uint8)
    codec.decode_into(enc.payload, m.dt, into)
    assert into.tobytes() == out.tobytes()
    y = decoded_values(m, out)
    assert np.isfinite(y).all()
    x = m.x
    # Exact zeros stay exactly zero under every quantizer and pruner.
    assert (y[x == 0] == 0).all()
    # The recorded statistics are those of the decoded bytes against the input.
    e = x - y
    sum_x2, sum_y2, sum_e2 = float((x * x).sum()), float((y * y).sum()), float((e * e).sum())
    stats = enc.stats
    assert stats.n == x.size
    if sum_e2 == 0:
        assert stats.snr_db == math.inf
    elif sum_x2 > 0:
        assert stats.snr_db == pytest.approx(10 * math.log10(sum_x2 / sum_e2), rel=1e-9, abs=1e-9)
    if sum_x2 > 0 and sum_y2 > 0:
        assert stats.cosine == pytest.approx(float((x * y).sum()) / math.sqrt(sum_x2 * sum_y2), rel=1e-9, abs=1e-12)
    assert stats.max_abs == pytest.approx(float(np.abs(e).max()), rel=1e-12, abs=0)
    assert -1.0 <= stats.cosine <= 1.0 + 1e-12
    return y


@pytest.mark.parametrize("n", [0, 1, STATS_BLOCK - 1, STATS_BLOCK, 3 * STATS_BLOCK + 17])
def test_stats_in_blocks_are_the_whole_arrays_statistics(n: int) -> None:
    """Block sums add up to the whole arrays' sums; the largest error is found in any block, the last one too."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 0.02).astype(np.float32)
    y = (x + rng.standard_normal(n).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
    if n:
        y[-1] = x[-1] + np.float32(0.5)  # the largest error sits in the last (short) block
    stats = Stats.of(x.reshape(-1, 1) if n else x, y)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    e = x64 - y64
    assert stats.n == n
    assert stats.sum_x2 == pytest.approx(float(x64 @ x64), rel=1e-12, abs=0)
    assert stats.sum_y2 == pytest.approx(float(y64 @ y64), rel=1e-12, abs=0)
    assert stats.sum_xy == pytest.approx(float(x64 @ y64), rel=1e-12, abs=0)
    assert stats.sum_e2 == pytest.approx(float(e @ e), rel=1e-12, abs=0)
    assert stats.max_abs == (float(np.abs(e).max()) if n else 0.0)


def cast_tol(m: Matrix, magnitude: np.ndarray) -> np.ndarray:
    return CAST_REL[m.dtype] * magnitude + CAST_ABS[m.dtype]


# --- policy grammar --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "prune", "quant", "auto"),
    [
        ("", "lossless", None, None, None),
        ("lossless", "lossless", None, None, None),
        ("  lossless ", "lossless", None, None, None),
        ("int8", "int8", None, Quant("int8"), None),
        (" int8 ", "int8", None, Quant("int8"), None),
        ("fp8", "fp8", None, Quant("fp8"), None),
        ("int4", "int4:g32", None, Quant("int4", 32), None),
        ("int4:g32", "int4:g32", None, Quant("int4", 32), None),
        ("int4:g64", "int4:g64", None, Quant("int4", 64), None),
        ("int4:g128", "int4:g128", None, Quant("int4", 128), None),
        ("prune:0.5", "prune:0.5", Prune(amount=0.5), None, None),
        ("prune:0.50", "prune:0.5", Prune(amount=0.5), None, None),
        ("prune:.25", "prune:0.25", Prune(amount=0.25), None, None),
        ("prune:2:4", "prune:2:4", Prune(n=2, m=4), None, None),
        ("prune:1:16", "prune:1:16", Prune(n=1, m=16), None, None),
        ("prune:2:4,int8", "prune:2:4,int8", Prune(n=2, m=4), Quant("int8"), None),
        ("prune:0.3, int4:g32", "prune:0.3,int4:g32", Prune(amount=0.3), Quant("int4", 32), None),
        ("prune:0.5,fp8", "prune:0.5,fp8", Prune(amount=0.5), Quant("fp8"), None),
        ("auto", "auto:cos=0.99", None, None, 0.99),
        ("auto:cos=0.995", "auto:cos=0.995", None, None, 0.995),
        ("auto:cos=0.9", "auto:cos=0.9", None, None, 0.9),
    ],
)
def test_valid_policies(text, canonical, prune, quant, auto):
    policy = parse_policy(text)
    assert policy.text == canonical
    assert policy.auto_cos == auto
    assert policy.spec.prune == prune
    assert policy.spec.quant == quant
    assert policy.lossy == (canonical != "lossless")
    # The canonical text parses to the same policy.
    again = parse_policy(canonical)
    assert (again.text, again.spec, again.auto_cos) == (policy.text, policy.spec, policy.auto_cos)


@pytest.mark.parametrize(
    "text",
    [
        "int4:g7",
        "int4:g0",
        "int4:g256",
        "int4:32",
        "int4:g32:g64",
        "int8:g32",
        "fp8:e5m2",
        "prune:1.5",
        "prune:1",
        "prune:0",
        "prune:-0.1",
        "prune:nan",
        "prune:inf",
        "prune:half",
        "prune",
        "prune:4:2",
        "prune:2:2",
        "prune:2:0",
        "prune:0:4",
        "prune:2:17",
        "prune:-2:4",
        "prune:2:4:8",
        "auto:cos=1.5",
        "auto:cos=1",
        "auto:cos=0",
        "auto:cos=nan",
        "auto:foo",
        "auto:cos=",
        "int8,fp8",
        "int8,int4",
        "int8,prune:0.5",
        "prune:0.5,prune:2:4",
        "lossless,int8",
        "int8,lossless",
        "auto,int8",
        "prune:0.5,auto",
        "bogus",
        "int8,",
        ",int8",
        "prune:0.5,,int8",
        ",",
        "int8," + "x" * 300,
    ],
)
def test_invalid_policies_are_invalid_argument(text):
    with pytest.raises(InvalidArgument):
        parse_policy(text)


def test_invalid_policy_error_is_a_value_error_with_a_message():
    with pytest.raises(ValueError, match="7"):
        parse_policy("int4:g7")


@pytest.mark.parametrize("pattern", ["re:(", "re:[a-", "re:*x"])
def test_bad_keep_regex_is_rejected(pattern):
    with pytest.raises(InvalidArgument, match="keep"):
        parse_policy("int8", [pattern])
    with pytest.raises(InvalidArgument):
        parse_policy("lossless", [pattern])


# --- keep rules ----------------------------------------------------------------------------

QUERY = "encoder.layer.0.attention.self.query.weight"


@pytest.mark.parametrize(
    ("name", "dtype", "shape", "eligible"),
    [
        (QUERY, "F32", (384, 384), True),
        (QUERY, "F16", (384, 384), True),
        (QUERY, "BF16", (384, 384), True),
        ("conv.weight", "F32", (64, 16, 3, 3), True),
        ("w", "F32", (64, 64), True),  # exactly MIN_LOSSY_NUMEL
        ("w", "F32", (63, 65), False),  # one short
        ("w", "F32", (4096,), False),  # 1-D
        ("w", "F32", (1, 4096), True),
        ("w", "F32", (), False),
        (QUERY, "F64", (384, 384), False),
        (QUERY, "I64", (384, 384), False),
        (QUERY, "I8", (384, 384), False),
        (QUERY, "U8", (384, 384), False),
        (QUERY, "F8_E4M3", (384, 384), False),
        ("embeddings.position_ids", "I64", (1, 512), False),
        ("encoder.layer.0.attention.self.query.bias", "F32", (384, 384), False),
        ("bias", "F32", (384, 384), False),
        ("encoder.layer.0.output.LayerNorm.weight", "F32", (384, 384), False),
        ("model.layers.0.input_layernorm.weight", "BF16", (4096, 4096), False),
        ("model.norm.weight", "BF16", (4096, 4096), False),
        ("transformer.ln_f.weight", "F32", (768, 768), False),
        ("transformer.h.0.ln_1.weight", "F32", (768, 768), False),
        ("layer1.0.bn1.weight", "F32", (256, 256), False),
        ("decoder.rmsnorm.weight", "F16", (256, 256), False),
        ("encoder.layer.0.intermediate.dense.weight", "F32", (1536, 384), True),
    ],
)
def test_lossy_eligible(name, dtype, shape, eligible):
    assert lossy_eligible(name, dtype, shape) is eligible
    policy = parse_policy("int8")
    mode = policy.mode_for(name, dtype, shape)
    if eligible:
        assert mode == Spec(quant=Quant("int8"))
        assert mode_name(mode) == "int8"
    else:
        assert mode == "lossless"


def test_min_lossy_numel_is_the_documented_threshold():
    assert lossy_eligible("w", "F32", (1, MIN_LOSSY_NUMEL))
    assert not lossy_eligible("w", "F32", (1, MIN_LOSSY_NUMEL - 1))


def test_lossless_policy_keeps_everything_exact():
    policy = parse_policy("lossless")
    assert not policy.lossy
    assert policy.mode_for(QUERY, "F32", (384, 384)) == "lossless"


@pytest.mark.parametrize(
    ("keep", "kept", "not_kept"),
    [
        (
            ["*.attention.*"],
            [QUERY, "encoder.layer.3.attention.output.dense.weight"],
            ["encoder.layer.0.output.dense.weight"],
        ),
        (["embeddings.*"], ["embeddings.word_embeddings.weight"], ["encoder.embeddings_proj.weight", QUERY]),
        (["*.query.weight", "*.key.weight"], [QUERY, "a.key.weight"], ["a.value.weight"]),
        (["re:\\.(query|key)\\."], [QUERY, "x.key.weight"], ["x.value.weight", "queryx.weight"]),
        (
            ["re:^encoder\\.layer\\.[0-2]\\."],
            [QUERY, "encoder.layer.2.output.dense.weight"],
            ["encoder.layer.3.output.dense.weight"],
        ),
        (["re:word_emb"], ["embeddings.word_embeddings.weight"], [QUERY]),
        (["query"], [], [QUERY]),  # a glob matches the whole name
    ],
)
def test_keep_patterns_force_lossless(keep, kept, not_kept):
    for text in ("int8", "prune:2:4,int4:g32", "auto:cos=0.98"):
        policy = parse_policy(text, keep)
        assert policy.keep == tuple(keep)
        for name in kept:
            assert policy.kept(name), name
            assert policy.mode_for(name, "F32", (384, 384)) == "lossless"
        for name in not_kept:
            assert not policy.kept(name), name
            assert policy.mode_for(name, "F32", (384, 384)) != "lossless"


def test_mode_for_auto_is_the_float_target():
    policy = parse_policy("auto:cos=0.98")
    mode = policy.mode_for(QUERY, "BF16", (384, 384))
    assert isinstance(mode, float) and mode == 0.98
    assert mode_name(mode) == "auto:cos=0.98"
    assert parse_policy("auto").mode_for(QUERY, "F32", (384, 384)) == 0.99
    assert policy.mode_for("encoder.layer.0.output.LayerNorm.weight", "F32", (384,)) == "lossless"
    assert policy.mode_for("embeddings.position_ids", "I64", (1, 8192)) == "lossless"


def test_auto_chunk_target_is_tighter_than_the_model_target():
    for cos in (0.9, 0.99, 0.995, 0.999):
        target = auto_chunk_target(cos)
        assert cos < target < 1.0
    assert auto_chunk_target(0.99) == pytest.approx(1 - 0.01 / AUTO_MARGIN)


# --- round-trip properties per stage ------------------------------------------------------


@PROPS
@given(m=matrices())
def test_int8_error_is_at_most_half_a_step(m):
    enc = encode_spec(m.raw, m.dt, m.rows, spec_of("int8"))
    y = check_consistent(m, enc, "int8")
    x = m.x
    scale = np.abs(x).max(axis=1, keepdims=True) / 127
    tol = scale * (0.5 + 1e-4) + cast_tol(m, np.abs(x) + scale)
    assert (np.abs(x - y) <= tol).all(), float((np.abs(x - y) / np.maximum(tol, 1e-300)).max())
    # One scale per row: at most 255 distinct values in a row.
    for row in y:
        assert len(np.unique(row)) <= 255


@PROPS
@given(m=matrices())
def test_fp8_relative_error(m):
    enc = encode_spec(m.raw, m.dt, m.rows, spec_of("fp8"))
    y = check_consistent(m, enc, "fp8")
    x = m.x
    scale = np.abs(x).max(axis=1, keepdims=True) / 448
    # e4m3 keeps 3 mantissa bits: half an ulp is <= 2^-4 of the value, 2^-10 of the scale below the normals.
    tol = np.maximum(np.abs(x) * 2.0**-4, scale * 2.0**-10) * (1 + 1e-4) + cast_tol(m, np.abs(x) + scale)
    assert (np.abs(x - y) <= tol).all(), float((np.abs(x - y) / np.maximum(tol, 1e-300)).max())
    if np.abs(x).max() > 0:
        assert enc.stats.cosine >= 0.99


def _minmax_int4_sse(x: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group squared error of plain min/max int4 rounding with an f16 scale; and whether the scale is usable."""
    rows, cols = x.shape
    ngroups = -(-cols // group)
    sse = np.zeros((rows, ngroups))
    usable = np.zeros((rows, ngroups), dtype=bool)
    for r in range(rows):
        for g in range(ngroups):
            v = x[r, g * group : (g + 1) * group].astype(np.float32)
            lo = min(float(v.min()), 0.0)
            hi = max(float(v.max()), 0.0)
            s = np.float32(np.float16((np.float32(hi) - np.float32(lo)) / np.float32(15)))
            if not (np.isfinite(s) and s >= np.finfo(np.float16).tiny):
                continue
            z = np.float32(np.clip(np.rint(-np.float32(lo) / s), 0, 15))
            q = np.clip(np.rint(v / s) + z, 0, 15)
            yv = ((q - z) * s).astype(np.float32)
            sse[r, g] = float(((yv.astype(np.float64) - v.astype(np.float64)) ** 2).sum())
            usable[r, g] = True
    return sse, usable


@PROPS
@given(m=matrices(max_rows=24, max_cols=300), group=st.sampled_from([32, 64, 128]))
def test_int4_roundtrip(m, group):
    text = f"int4:g{group}"
    enc = encode_spec(m.raw, m.dt, m.rows, spec_of(text))
    y = check_consistent(m, enc, text)
    ngroups = -(-m.cols // group)
    for g in range(ngroups):
        block = y[:, g * group : (g + 1) * group]
        for row in block:
            assert len(np.unique(row)) <= 16  # 4-bit codes: at most 16 values per group
    if m.dtype == "F32":
        # The searched clip range is never worse than plain min/max rounding (a = 1 is one of the candidates).
        x = m.x
        ours = ((x - y) ** 2).reshape(m.rows, -1)
        padded = np.zeros((m.rows, ngroups * group))
        padded[:, : m.cols] = ours
        sse = padded.reshape(m.rows, ngroups, group).sum(axis=-1)
        baseline, usable = _minmax_int4_sse(x, group)
        assert (sse[usable] <= baseline[usable] * (1 + 1e-4) + 1e-30).all()


@PROPS
@given(m=matrices(), amount=st.floats(0.01, 0.99), quant=st.sampled_from(["", "int8", "int4:g64", "fp8"]))
def test_unstructured_pruning(m, amount, quant):
    n = m.rows * m.cols
    assume(round(amount * n) < n)  # every weight pruned: see test_prune_only_everything_pruned
    spec = Spec(prune=Prune(amount=amount), quant=parse_policy(quant).spec.quant if quant else None)
    enc = encode_spec(m.raw, m.dt, m.rows, spec)
    y = check_consistent(m, enc, str(spec))
    mask = unpack(enc.payload, len(m.raw), m.dt).mask
    assert mask is not None and mask.shape == (m.rows, m.cols)
    assert int(mask.sum()) == n - round(amount * n)
    x = m.x
    # The smallest magnitudes are the ones dropped; dropped entries decode to +0.0 bytes.
    if mask.any() and (~mask).any():
        assert np.abs(x[~mask]).max() <= np.abs(x[mask]).min()
    width = m.dt.bits // 8
    out = np.asarray(enc.decoded).reshape(m.rows, m.cols, width)
    assert (out[~mask] == 0).all()
    if not quant:
        # Prune only: kept values are bit-exact.
        src = np.frombuffer(m.raw, np.uint8).reshape(m.rows, m.cols, width)
        assert (out[mask] == src[mask]).all()
        assert enc.stats.max_abs <= (np.abs(x[~mask]).max() if (~mask).any() else 0.0)
    else:
        # Pruning then quantizing drops the same weights as pruning alone.
        alone = encode_spec(m.raw, m.dt, m.rows, Spec(prune=spec.prune))
        assert (unpack(alone.payload, len(m.raw), m.dt).mask == mask).all()
    assert (y[~mask] == 0).all()


@PROPS
@given(m=matrices(max_cols=64), quant=st.sampled_from(["", "int8", "int4:g32", "fp8"]))
def test_two_of_four_pruning(m, quant):
    text = "prune:2:4" + (f",{quant}" if quant else "")
    enc = encode_spec(m.raw, m.dt, m.rows, spec_of(text))
    y = check_consistent(m, enc, text)
    mask = unpack(enc.payload, len(m.raw), m.dt).mask
    assert mask is not None
    x = m.x
    full = m.cols - m.cols % 4
    assert mask[:, full:].all()  # a partial trailing group is kept whole
    if full:
        groups = mask[:, :full].reshape(m.rows, -1, 4)
        assert (groups.sum(axis=-1) == 2).all()
        mag = np.abs(x[:, :full]).reshape(m.rows, -1, 4)
        kept_min = np.where(groups, mag, np.inf).min(axis=-1)
        dropped_max = np.where(groups, -np.inf, mag).max(axis=-1)
        assert (kept_min >= dropped_max).all()  # the 2 largest magnitudes are kept
        nonzero = (y[:, :full] != 0).reshape(m.rows, -1, 4).sum(axis=-1)
        assert (nonzero <= 2).all()
    assert (y[~mask] == 0).all()
    if not quant:
        width = m.dt.bits // 8
        out = np.asarray(enc.decoded).reshape(m.rows, m.cols, width)
        src = np.frombuffer(m.raw, np.uint8).reshape(m.rows, m.cols, width)
        assert (out[mask] == src[mask]).all()


def test_prune_only_everything_pruned():
    # prune:0.9999 on a (1, 4096) tensor, which the keep rules make eligible: round(0.9999 * 4096) == 4096.
    m = make("F32", 1, 4096, seed=2)
    enc = encode_spec(m.raw, m.dt, 1, Spec(prune=Prune(amount=0.9999)))
    assert np.asarray(enc.decoded).tobytes() == bytes(len(m.raw))
    assert QuantCodec().decode(enc.payload, m.dt, len(m.raw)).tobytes() == bytes(len(m.raw))


def test_everything_pruned_then_quantized_decodes_to_zeros():
    m = make("F32", 1, 4096, seed=2)
    for quant in ("int8", "int4:g32", "fp8"):
        spec = Spec(prune=Prune(amount=0.9999), quant=spec_of(quant).quant)
        enc = encode_spec(m.raw, m.dt, 1, spec)
        assert np.asarray(enc.decoded).tobytes() == bytes(len(m.raw))
        assert QuantCodec().decode(enc.payload, m.dt, len(m.raw)).tobytes() == bytes(len(m.raw))


def test_chunk_rows_that_do_not_divide_fall_back_to_one_row():
    m = make("F32", 6, 70, seed=1)
    enc = encode_spec(m.raw, m.dt, 8, spec_of("int8"))  # 420 elements are not 8 rows
    c = unpack(enc.payload, len(m.raw), m.dt)
    assert (c.rows, c.cols) == (1, 420)
    assert QuantCodec().decode(enc.payload, m.dt, len(m.raw)).tobytes() == np.asarray(enc.decoded).tobytes()


# --- determinism -----------------------------------------------------------------------------

DETERMINISM_SPECS = ["int8", "int4:g32", "int4:g128", "fp8", "prune:0.5", "prune:2:4,int8", "prune:0.3,int4:g64"]


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_decode_is_deterministic_across_calls_and_threads(dtype):
    m = make(dtype, 32, 200, seed=7, scale=0.05, zero_rows=[3])
    codec = QuantCodec()
    for text in DETERMINISM_SPECS:
        enc = encode_spec(m.raw, m.dt, m.rows, spec_of(text))
        first = codec.decode(enc.payload, m.dt, len(m.raw)).tobytes()
        assert codec.decode(enc.payload, m.dt, len(m.raw)).tobytes() == first
        assert hashlib.sha256(first).hexdigest() == hashlib.sha256(np.asarray(enc.decoded).data).hexdigest()
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda p: codec.decode(p, m.dt, len(m.raw)).tobytes(), [enc.payload] * 16))
        assert all(o == first for o in outs), text
        # Encoding is deterministic too: the same payload every time.
        assert encode_spec(m.raw, m.dt, m.rows, spec_of(text)).payload == enc.payload


# --- torch cross-check -------------------------------------------------------------------------


def _torch_expand(c, dtype: str) -> bytes:
    """Rebuild the decoded bytes from the compact form with torch ops: y = (q - z) * s, then cast."""
    rows, cols = c.rows, c.cols
    codes = torch.from_numpy(np.array(c.sections[S_CODES], dtype=np.uint8))
    scales = torch.from_numpy(np.array(c.sections[S_SCALES], dtype=np.float32))
    if c.method == "int8":
        q = codes.view(torch.int8).float().reshape(rows, cols)
        z = torch.zeros(rows, 1)
        s = scales.reshape(rows, 1)
    elif c.method == "fp8":
        q = codes.view(torch.float8_e4m3fn).float().reshape(rows, cols)
        # torch's own e4m3 decoding agrees with the codec's table.
        assert torch.equal(q, torch.from_numpy(E4M3_TABLE[c.sections[S_CODES]]).reshape(rows, cols))
        z = torch.zeros(rows, 1)
        s = scales.reshape(rows, 1)
    else:
        assert c.method == "int4"
        ngroups = -(-cols // c.group)
        gi = torch.arange(cols) // c.group
        q = codes.float().reshape(rows, cols)
        z = torch.from_numpy(np.array(c.sections[S_ZEROS], dtype=np.uint8)).float().reshape(rows, ngroups)[:, gi]
        s = scales.reshape(rows, ngroups)[:, gi]
    y = (q - z) * s
    return y.to(TORCH_DTYPE[dtype]).contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("text", ["int8", "int4:g32", "int4:g64", "int4:g128", "fp8"])
@pytest.mark.parametrize(("rows", "cols", "scale"), [(48, 384, 0.05), (7, 301, 1.0), (16, 130, 1e-3), (3, 1000, 20.0)])
def test_torch_formula_gives_the_same_bits(dtype, text, rows, cols, scale):
    m = make(dtype, rows, cols, seed=rows * cols, scale=scale, zero_rows=[1])
    enc = encode_spec(m.raw, m.dt, m.rows, spec_of(text))
    c = unpack(enc.payload, len(m.raw), m.dt)
    assert c.mask is None and (c.rows, c.cols) == (rows, cols)
    numpy_bytes = QuantCodec().decode(enc.payload, m.dt, len(m.raw)).tobytes()
    assert _torch_expand(c, dtype) == numpy_bytes


# --- malformed payloads -------------------------------------------------------------------------


def sections_of(payload: bytes) -> tuple[tuple, list[list]]:
    """Parse a payload per the documented layout: header fields and [id, coding, stored, raw, body] per section."""
    head = HEAD.unpack_from(payload, 0)
    nsec = head[6]
    pos = HEAD.size + nsec * SECTION.size
    out = []
    for i in range(nsec):
        sid, coding, stored, raw = SECTION.unpack_from(payload, HEAD.size + i * SECTION.size)
        out.append([sid, coding, stored, raw, payload[pos : pos + stored]])
        pos += stored
    assert pos == len(payload)
    return head, out


def build(head: tuple, sections: list[list]) -> bytes:
    """Reassemble a payload from header fields and sections (stored lengths as given)."""
    magic, method, pruned, group, rows, cols, _ = head
    table = b"".join(SECTION.pack(sid, coding, stored, raw) for sid, coding, stored, raw, _ in sections)
    bodies = b"".join(body for *_, body in sections)
    return HEAD.pack(magic, method, pruned, group, rows, cols, len(sections)) + table + bodies


def with_section(head: tuple, sections: list[list], which: int, **changes) -> bytes:
    """The payload with the fields of section ``which`` changed (``sid``, ``coding``, ``stored``, ``raw``, ``body``)."""
    fields = {"sid": 0, "coding": 1, "stored": 2, "raw": 3, "body": 4}
    new = []
    for s in sections:
        s = list(s)
        if s[0] == which:
            for key, value in changes.items():
                s[fields[key]] = value
            if "body" in changes and "stored" not in changes:
                s[2] = len(s[4])
        new.append(s)
    return build(head, new)


def raw_section(data: bytes, sid: int) -> list:
    return [sid, RAW, len(data), len(data), data]


def _frame_declaring(size: int) -> bytes:
    """A zstd frame whose header declares ``size`` content bytes but holds one 10-byte raw block."""
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", size) + bytes([0x51, 0x00, 0x00]) + bytes(10)


def assert_codec_error(payload: bytes, m: Matrix, raw_len: int | None = None) -> None:
    raw_len = len(m.raw) if raw_len is None else raw_len
    codec = QuantCodec()
    with pytest.raises(CodecError):
        codec.decode(payload, m.dt, raw_len)
    with pytest.raises(CodecError):
        codec.decode_into(payload, m.dt, np.zeros(raw_len, dtype=np.uint8))


@pytest.fixture(scope="module")
def samples() -> dict[str, tuple[Matrix, bytes]]:
    m32 = make("F32", 8, 70, seed=3, scale=0.1)
    mbf = make("BF16", 5, 70, seed=4, scale=0.1)
    out = {}
    for text, m in [
        ("int8", m32),
        ("fp8", m32),
        ("int4:g32", mbf),
        ("prune:0.5", m32),
        ("prune:2:4,int8", mbf),
        ("prune:0.3,int4:g64", m32),
    ]:
        out[text] = (m, encode_spec(m.raw, m.dt, m.rows, spec_of(text)).payload)
    big = make("BF16", 301, 256, seed=6, scale=0.02)  # 77,056 codes: stored nibble-split
    out["int8 split"] = (big, encode_spec(big.raw, big.dt, big.rows, spec_of("int8")).payload)
    return out


ALL_SAMPLES = ["int8", "fp8", "int4:g32", "prune:0.5", "prune:2:4,int8", "prune:0.3,int4:g64", "int8 split"]


@pytest.mark.parametrize("text", ALL_SAMPLES)
def test_sample_payloads_parse_per_the_documented_layout(samples, text):
    m, payload = samples[text]
    head, secs = sections_of(payload)
    assert head[0] == b"MZQ1"
    assert head[4:6] == (m.rows, m.cols)
    assert build(head, secs) == payload
    ids = {s[0] for s in secs}
    assert (S_MASK in ids) == text.startswith("prune")
    assert (S_VALUES in ids) == (text == "prune:0.5")


@pytest.mark.parametrize("text", ALL_SAMPLES)
def test_truncated_payload(samples, text):
    m, payload = samples[text]
    for cut in sorted({0, 1, 4, 27, 28, 29, 45, 46, len(payload) // 2, len(payload) - 1}):
        assert_codec_error(payload[:cut], m)


@pytest.mark.parametrize("text", ALL_SAMPLES)
def test_trailing_bytes(samples, text):
    m, payload = samples[text]
    for extra in (b"\x00", b"\xff", b"\x28\xb5\x2f\xfd"):
        assert_codec_error(payload + extra, m)


@pytest.mark.parametrize("text", ALL_SAMPLES)
def test_bad_magic_and_method(samples, text):
    m, payload = samples[text]
    for magic in (b"MZQ0", b"mzq1", b"MZL1", b"\x00\x00\x00\x00"):
        assert_codec_error(magic + payload[4:], m)
    head, secs = sections_of(payload)
    for method in (4, 9, 255):
        assert_codec_error(build((head[0], method, *head[2:]), secs), m)


@pytest.mark.parametrize("text", ALL_SAMPLES)
def test_wrong_raw_len(samples, text):
    m, payload = samples[text]
    k = m.dt.bits // 8
    n = len(m.raw)
    for raw_len in sorted({0, k, n - k, n + k, n - 1, n + 1, 2 * n, n // 2}):
        assert_codec_error(payload, m, raw_len)


@pytest.mark.parametrize("text", ALL_SAMPLES)
def test_header_shape_disagreeing_with_raw_len(samples, text):
    m, payload = samples[text]
    head, secs = sections_of(payload)
    magic, method, pruned, group, rows, cols, nsec = head
    for r, c in [(rows + 1, cols), (rows, cols - 1), (cols, rows + 1), (0, 0), (2**40, 2**20)]:
        assert_codec_error(build((magic, method, pruned, group, r, c, nsec), secs), m)


@pytest.mark.parametrize("text", ALL_SAMPLES)
def test_section_larger_than_allowed(samples, text):
    m, payload = samples[text]
    head, secs = sections_of(payload)
    n = m.rows * m.cols
    for sid, coding, stored, raw, _body in secs:
        # A declared decoded size beyond what the shape allows, and stored lengths past the end.
        for bad_raw in (raw + 1, n * 8 + 4096, 2**40, 2**64 - 1):
            assert_codec_error(with_section(head, secs, sid, raw=bad_raw), m)
        for bad_stored in (stored + 1, len(payload), 2**63):
            assert_codec_error(with_section(head, secs, sid, stored=bad_stored), m)
        if coding == RAW and raw > 1:
            assert_codec_error(with_section(head, secs, sid, raw=raw - 1), m)


def test_int4_code_out_of_range(samples):
    m, payload = samples["int4:g32"]
    head, secs = sections_of(payload)
    n = m.rows * m.cols
    codes = bytearray([7]) * n
    assert (
        QuantCodec()
        .decode(with_section(head, secs, S_CODES, coding=RAW, raw=n, body=bytes(codes)), m.dt, len(m.raw))
        .size
    )
    for bad in (16, 0xFF):
        codes[n // 2] = bad
        assert_codec_error(with_section(head, secs, S_CODES, coding=RAW, raw=n, body=bytes(codes)), m)


@pytest.mark.parametrize("text", ["int8", "int4:g32", "prune:0.5"])
def test_zstd_section_declaring_a_huge_size(samples, text):
    m, payload = samples[text]
    head, secs = sections_of(payload)
    for sid, _coding, _stored, raw, _body in secs:
        for declared in (2**62, raw + 1):
            frame = _frame_declaring(declared)
            assert_codec_error(with_section(head, secs, sid, coding=ZSTD, raw=raw, body=frame), m)
            assert_codec_error(with_section(head, secs, sid, coding=ZSTD, raw=declared, body=frame), m)


@pytest.mark.parametrize("text", ALL_SAMPLES)
def test_structural_errors(samples, text):
    m, payload = samples[text]
    head, secs = sections_of(payload)
    magic, method, pruned, group, rows, cols, nsec = head
    # Unknown section id or coding.
    for sid, *_ in secs:
        assert_codec_error(with_section(head, secs, sid, sid=99), m)
        assert_codec_error(with_section(head, secs, sid, coding=7), m)
    # Each section missing.
    for i in range(len(secs)):
        assert_codec_error(build(head, secs[:i] + secs[i + 1 :]), m)
    # The mask flag disagreeing with the sections.
    assert_codec_error(build((magic, method, 1 - pruned, group, rows, cols, nsec), secs), m)
    # More sections announced than present.
    assert_codec_error(build(head, secs)[: HEAD.size - 4] + bytes([nsec + 1]) + build(head, secs)[HEAD.size - 3 :], m)
    if method == METHOD_ID["int4"]:
        for g in (0, 16, 48, 256):
            assert_codec_error(build((magic, method, pruned, g, rows, cols, nsec), secs), m)


def test_wrong_number_of_codes():
    m = make("F32", 8, 70, seed=3, scale=0.1)
    head, secs = sections_of(encode_spec(m.raw, m.dt, m.rows, spec_of("int8")).payload)
    n = m.rows * m.cols
    for count in (n - 1, 0):
        assert_codec_error(build(head, [s if s[0] != S_CODES else raw_section(bytes(count), S_CODES) for s in secs]), m)
    # Pruned: one code per kept weight, no more, no less.
    head, secs = sections_of(encode_spec(m.raw, m.dt, m.rows, spec_of("prune:0.5,int8")).payload)
    kept = n - round(0.5 * n)
    for count in (kept - 1, kept + 1, n):
        assert_codec_error(build(head, [s if s[0] != S_CODES else raw_section(bytes(count), S_CODES) for s in secs]), m)


# --- nibble-split codes ----------------------------------------------------------------------


def coding_of(payload: bytes, sid: int) -> int:
    _, secs = sections_of(payload)
    return next(coding for s, coding, *_ in secs if s == sid)


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_int8_codes_of_gaussian_weights_are_stored_nibble_split(monkeypatch, dtype):
    """int8 codes of a 1 MiB chunk are nibble-split, no larger than one zstd plane (+0.5 %), and decode the same."""
    m = make(dtype, 1024, 512 if dtype == "BF16" else 256, seed=11, scale=0.02)
    enc = encode_spec(m.raw, m.dt, m.rows, spec_of("int8"))
    assert coding_of(enc.payload, S_CODES) == NIBBLES
    check_consistent(m, enc, "int8")
    from mzstore.codecs import quant

    monkeypatch.setattr(quant, "NIBBLES_MIN_BYTES", 1 << 62)  # as before: one zstd plane (and old payloads)
    plain = encode_spec(m.raw, m.dt, m.rows, spec_of("int8"))
    assert coding_of(plain.payload, S_CODES) == ZSTD
    assert len(enc.payload) <= len(plain.payload) * 1.005
    assert np.asarray(plain.decoded).tobytes() == np.asarray(enc.decoded).tobytes()
    monkeypatch.undo()
    # A payload written before the split (codes in one zstd frame) still decodes, both ways.
    assert QuantCodec().decode(plain.payload, m.dt, len(m.raw)).tobytes() == np.asarray(enc.decoded).tobytes()
    check_consistent(m, plain, "int8")


@pytest.mark.parametrize("text", ["fp8", "int4:g128", "ecsq:step=0.3"])
def test_codes_whose_low_nibble_carries_information_stay_in_one_plane(text):
    """fp8's low nibble is part exponent, int4's and coarse ECSQ's high nibble is empty: splitting would cost."""
    m = make("BF16", 1024, 512, seed=12, scale=0.02)
    enc = encode_spec(m.raw, m.dt, m.rows, spec_of(text))
    assert coding_of(enc.payload, S_CODES) in (RAW, ZSTD)


def test_a_malformed_nibble_split_section_is_codec_error(samples):
    m, payload = samples["int8 split"]
    head, secs = sections_of(payload)
    body = next(b for sid, _c, _s, _r, b in secs if sid == S_CODES)
    (packed,) = NIBBLE_HEAD.unpack_from(body)
    frame, low = body[8 : 8 + packed], body[8 + packed :]
    assert len(low) == (m.rows * m.cols + 1) // 2
    bad_bodies = [
        b"",
        body[:7],
        NIBBLE_HEAD.pack(packed + 1) + frame + low,  # the frame's length disagrees with the body
        NIBBLE_HEAD.pack(packed - 1) + frame + low,
        NIBBLE_HEAD.pack(2**64 - 1) + frame + low,
        body[:-1],  # one low-nibble byte short
        body + b"\x00",  # one too many
        NIBBLE_HEAD.pack(packed) + b"\x00" + frame[1:] + low,  # a damaged frame (its magic)
        NIBBLE_HEAD.pack(packed - 9) + frame[:-9] + low,  # a cut one
        NIBBLE_HEAD.pack(len(_frame_declaring(2**62))) + _frame_declaring(2**62) + low,
        NIBBLE_HEAD.pack(0) + low + low[:1],  # no frame at all
    ]
    for bad in bad_bodies:
        assert_codec_error(with_section(head, secs, S_CODES, body=bad), m)
    # The split is for codes only: scales marked nibble-split are refused.
    scales = next(b for sid, _c, _s, _r, b in secs if sid == S_SCALES)
    assert_codec_error(with_section(head, secs, S_SCALES, coding=NIBBLES, body=NIBBLE_HEAD.pack(0) + scales), m)


def test_nibble_split_codes_decode_the_same_on_two_threads(samples):
    """Decoding reuses per-thread scratch for the high nibbles: concurrent decodes do not mix."""
    m, payload = samples["int8 split"]
    other = make("BF16", 301, 256, seed=7, scale=0.05)
    other_payload = encode_spec(other.raw, other.dt, other.rows, spec_of("int8")).payload
    codec = QuantCodec()
    want = {0: codec.decode(payload, m.dt, len(m.raw)).tobytes(), 1: codec.decode(other_payload, m.dt, len(m.raw))}
    want[1] = want[1].tobytes()
    assert want[0] != want[1]

    def run(i: int) -> bool:
        out = np.empty(len(m.raw), np.uint8)
        codec.decode_into(payload if i % 2 == 0 else other_payload, m.dt, out)
        return out.tobytes() == want[i % 2]

    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(run, range(40)))


def test_prune_only_payload_without_mask_is_codec_error():
    m = make("F32", 8, 64, seed=5)
    values, _ = LosslessCodec().encode(m.raw, m.dt)
    payload = build((b"MZQ1", METHOD_ID["none"], 0, 0, m.rows, m.cols, 1), [raw_section(values, S_VALUES)])
    assert_codec_error(payload, m)


def test_section_of_partial_elements_is_codec_error():
    m = make("F32", 8, 70, seed=3, scale=0.1)
    head, secs = sections_of(encode_spec(m.raw, m.dt, m.rows, spec_of("int8")).payload)
    # f32 scales: 4 * rows bytes expected; 4 * rows - 2 is under the limit but not whole floats.
    assert_codec_error(
        with_section(head, secs, S_SCALES, coding=RAW, raw=4 * m.rows - 2, body=bytes(4 * m.rows - 2)), m
    )
    mb = make("BF16", 5, 70, seed=4, scale=0.1)
    head, secs = sections_of(encode_spec(mb.raw, mb.dt, mb.rows, spec_of("int4:g32")).payload)
    ngroups = 5 * 3
    # An odd-length f16 scales section, and a zero-point section relabelled as f32 scales.
    assert_codec_error(
        with_section(head, secs, S_SCALES16, coding=RAW, raw=2 * ngroups - 1, body=bytes(2 * ngroups - 1)), mb
    )
    assert_codec_error(with_section(head, secs, S_ZEROS, sid=S_SCALES), mb)


def _flip_fuzz(m: Matrix, payload: bytes) -> None:
    """Every single-byte change either raises CodecError or decodes to exactly raw_len bytes."""
    codec = QuantCodec()
    for i in range(len(payload)):
        for bit in (0x01, 0x80, 0xFF):
            bad = bytearray(payload)
            bad[i] ^= bit
            try:
                out = codec.decode(bytes(bad), m.dt, len(m.raw))
            except CodecError:
                continue
            assert out.dtype == np.uint8 and out.shape == (len(m.raw),), (i, bit)


@pytest.mark.parametrize(
    "text",
    [
        "int8",
        "fp8",
        "prune:0.5",
        "prune:2:4,int8",
        "int4:g32",
    ],
)
def test_single_byte_corruption_is_codec_error_or_right_size(samples, text):
    m, payload = samples[text]
    _flip_fuzz(m, payload)


# --- non-finite input and auto ---------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_non_finite_input_is_codec_error(bad, dtype):
    m = make(dtype, 16, 64, seed=9)
    values = m.values.copy()
    values[5, 17] = bad
    bad_m = Matrix(dtype, values)
    for text in ("int8", "int4:g32", "fp8", "prune:0.5", "prune:2:4,int8"):
        with pytest.raises(CodecError):
            encode_spec(bad_m.raw, bad_m.dt, bad_m.rows, spec_of(text))
    with pytest.raises(CodecError):
        encode_auto(bad_m.raw, bad_m.dt, bad_m.rows, 0.99)


def test_lossy_codecs_refuse_non_float_dtypes():
    raw = np.arange(4096, dtype=np.int32).tobytes()
    with pytest.raises(CodecError):
        encode_spec(raw, DTYPES["I32"], 64, spec_of("int8"))
    with pytest.raises(CodecError):
        QuantCodec().encode(raw, DTYPES["F32"])


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_auto_falls_back_to_lossless_when_the_target_is_impossible(dtype):
    m = make(dtype, 64, 128, seed=11)
    enc = encode_auto(m.raw, m.dt, m.rows, 0.9999999)
    assert enc.codec == "lossless"
    assert np.asarray(enc.decoded).tobytes() == m.raw
    assert LosslessCodec().decode(enc.payload, m.dt, len(m.raw)).tobytes() == m.raw
    assert enc.stats.cosine == 1.0 and enc.stats.snr_db == math.inf and enc.stats.max_abs == 0


@pytest.mark.parametrize("cos", [0.9, 0.99, 0.995])
def test_auto_picks_the_smallest_candidate_meeting_the_target(cos):
    m = make("F32", 64, 256, seed=12, scale=0.05)
    enc = encode_auto(m.raw, m.dt, m.rows, cos, servable=True)
    target = auto_chunk_target(cos)
    meeting = []
    for spec in AUTO_CANDIDATES:
        cand = encode_spec(m.raw, m.dt, m.rows, spec)
        if cand.stats.cosine >= target:
            meeting.append((len(cand.payload), str(spec)))
    assert meeting, "some candidate meets the target on Gaussian data"
    assert enc.codec == "quant"
    assert enc.stats.cosine >= target
    assert len(enc.payload) == min(size for size, _ in meeting)
    assert enc.params["spec"] in {name for size, name in meeting if size == len(enc.payload)}
    assert len(enc.payload) < len(LosslessCodec().encode(m.raw, m.dt)[0])
    check_consistent(m, enc, enc.params["spec"])
    # Without servable, ECSQ competes: it lands on the target where the grids overshoot, so it is smaller.
    full = encode_auto(m.raw, m.dt, m.rows, cos)
    assert full.stats.cosine >= target
    assert full.params["spec"].startswith("ecsq:step=") and len(full.payload) < len(enc.payload)
    check_consistent(m, full, full.params["spec"])


# --- what sparsity costs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_512() -> Matrix:
    return make("F32", 512, 512, seed=0)


def test_half_pruned_costs_about_half(gaussian_512):
    m = gaussian_512
    lossless = len(LosslessCodec().encode(m.raw, m.dt)[0])
    pruned = encode_spec(m.raw, m.dt, m.rows, spec_of("prune:0.5"))
    assert 0.4 * lossless <= len(pruned.payload) <= 0.65 * lossless


def test_pruning_before_int8_makes_it_smaller(gaussian_512):
    m = gaussian_512
    int8 = encode_spec(m.raw, m.dt, m.rows, spec_of("int8"))
    both = encode_spec(m.raw, m.dt, m.rows, spec_of("prune:0.5,int8"))
    assert len(both.payload) < len(int8.payload)
    # int8 is about a quarter of F32, pruned int8 less.
    assert len(int8.payload) < 0.3 * len(m.raw)
    assert int8.stats.cosine > 0.9999


@pytest.mark.parametrize("scale", [1e-8, 1e6])
def test_int4_keeps_precision_for_weights_f16_scales_cannot_hold(scale):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((16, 256)) * scale).astype(np.float32)
    enc = encode_spec(x.tobytes(), DTYPES["F32"], 16, Spec(quant=Quant("int4", 128)))
    assert enc.stats.cosine > 0.99
    assert QuantCodec().decode(enc.payload, DTYPES["F32"], x.nbytes).tobytes() == np.asarray(enc.decoded).tobytes()


# --- the fast decode paths give the reference bits ------------------------------------------------


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_cast_into_rounds_like_numpy_and_ml_dtypes(dtype: str) -> None:
    from mzstore.codecs.quant import _cast_into

    rng = np.random.default_rng(5)
    # Random bit patterns cover ties, subnormals and the largest finite values; NaN and inf are excluded
    # (a quantized chunk never decodes to them: encode refuses non-finite tensors).
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    y = bits.view(np.float32)
    y = y[np.isfinite(y)]
    ties = (np.arange(1, 5000, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly half-way for bf16
    y = np.concatenate([y, ties, -ties, np.float32([0.0, -0.0, 3.4e38, -3.4e38, 1e-45])])
    ref = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}[dtype]
    with np.errstate(over="ignore"):
        want = y.astype(ref).view(np.uint8)
    out = np.empty(len(want), np.uint8)
    _cast_into(y, get_dtype(dtype), out)
    assert np.array_equal(out, want)


def test_bf16_cast_of_nan_inf_and_overflow_matches_ml_dtypes() -> None:
    """The numpy cast keeps IEEE's answers where a payload's scales could lead: inf, NaN, overflow."""
    from mzstore.codecs.floats import BLOCK, f32_to_bf16_into

    rng = np.random.default_rng(6)
    specials = np.uint32([0x7F800000, 0xFF800000, 0x7F800001, 0x7FFFFFFF, 0xFFC00001, 0xFFFF8000, 0x7F7FFFFF])
    specials = np.concatenate([specials, np.uint32([0x7F7F8000, 0xFF7F8000, 0x7FBFFFFF])])
    noise = rng.integers(0, 2**32, BLOCK + 1000, dtype=np.uint64).astype(np.uint32)  # spans two blocks
    bits = np.concatenate([noise, specials, noise[:5] | 0x7F800000])
    out = np.empty(len(bits), np.uint16)
    f32_to_bf16_into(bits.view(np.float32), out)
    with np.errstate(all="ignore"):
        want = bits.view(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(out, want)


def test_e4m3_table_is_ml_dtypes_widening() -> None:
    from mzstore.codecs.floats import E4M3_TABLE

    want = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(E4M3_TABLE.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("rows,cols", [(1, 10), (7, 3), (300, 513), (3, 200_000)])
@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
def test_blocked_int8_expand_matches_the_reference_dequantize(rows: int, cols: int, dtype: str) -> None:
    from mzstore.codecs.quant import _cast_into, dequantize, expand, unpack

    rng = np.random.default_rng(rows * cols)
    x = (rng.standard_normal((rows, cols)) * rng.lognormal(0, 1, (rows, 1)) * 0.02).astype(np.float32)
    dt = get_dtype(dtype)
    raw = np.ascontiguousarray(x.astype({"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}[dtype]))
    enc = encode_spec(raw.reshape(-1).view(np.uint8).data, dt, rows, parse_policy("int8").spec)
    c = unpack(enc.payload, raw.nbytes, dt)
    # Reference: the whole-chunk dequantize, then the cast, in one pass each.
    y = dequantize(c.method, c.sections, c.rows, c.cols, c.group, c.mask)
    want = np.empty(raw.nbytes, np.uint8)
    _cast_into(y.reshape(-1), dt, want)
    assert np.array_equal(expand(c, dt), want)
    assert np.array_equal(np.asarray(enc.decoded), want)


def _whole_encodes(monkeypatch, m) -> list[str]:
    """The specs ``encode_spec`` is called with on all of ``m``'s rows from now on (not on a sample)."""
    import mzstore.codecs.quant as quant

    whole: list[str] = []
    real = quant.encode_spec

    def counted(raw, dt, rows, spec):
        if rows == m.rows:
            whole.append(str(spec))
        return real(raw, dt, rows, spec)

    monkeypatch.setattr(quant, "encode_spec", counted)
    return whole


@pytest.mark.parametrize("cos,dtype", [(0.9, "F32"), (0.99, "BF16"), (0.995, "F32"), (0.9995, "BF16")])
def test_auto_on_a_sample_skips_hopeless_candidates_and_still_picks_the_smallest(monkeypatch, cos, dtype):
    """With many rows, auto tries candidates on 64 of them first: fewer whole-chunk encodes, same choice."""

    m = make(dtype, 512, 256, seed=13, scale=0.05)
    target = auto_chunk_target(cos)
    meeting = [
        (len(c.payload), str(spec))
        for spec in AUTO_CANDIDATES
        if (c := encode_spec(m.raw, m.dt, m.rows, spec)).stats.cosine >= target
    ]
    whole = _whole_encodes(monkeypatch, m)
    enc = encode_auto(m.raw, m.dt, m.rows, cos, servable=True)
    assert len(whole) < len(AUTO_CANDIDATES), f"every candidate was encoded whole: {whole}"
    if meeting:
        assert enc.codec == "quant" and enc.stats.cosine >= target
        assert len(enc.payload) == min(size for size, _ in meeting)
        check_consistent(m, enc, enc.params["spec"])
    else:
        assert enc.codec == "lossless"


@PROPS
@given(m=matrices(), step=st.sampled_from([0.01, 0.1, 0.5, 2.0]))
def test_ecsq_error_is_within_a_step_of_each_rows_rms(m, step):
    """Each value comes back within one step of its row's RMS (its bin's mean is in the bin; the zero bin
    gives 0), plus the f16 rounding of the table and scale and the cast to the dtype."""
    text = f"ecsq:step={step:g}"
    enc = encode_spec(m.raw, m.dt, m.rows, Spec(quant=Quant("ecsq", step=step)))
    y = check_consistent(m, enc, text)
    x = m.x
    rms = np.sqrt((x * x).mean(axis=1, keepdims=True))
    tol = rms * step * (1 + 2e-3) + np.abs(x) * 2e-3 + cast_tol(m, np.abs(x) + rms * step)
    assert (np.abs(x - y) <= tol).all(), float((np.abs(x - y) / np.maximum(tol, 1e-300)).max())


@pytest.mark.parametrize("cos,dtype", [(0.99, "F32"), (0.995, "BF16"), (0.9995, "F32")])
def test_auto_encodes_whole_only_what_its_samples_rank_near_the_best(monkeypatch, cos, dtype):
    """The samples rank the candidates; only those within AUTO_SIZE_SLACK of the best so far are encoded whole
    (the ECSQ winner, and none of the grids it beats by more): the same choice as encoding every candidate."""
    import mzstore.codecs.quant as quant

    m = make(dtype, 512, 256, seed=14, scale=0.05)
    exhaustive = quant._auto_every(m.raw, m.dt, m.rows, auto_chunk_target(cos), False)
    whole = _whole_encodes(monkeypatch, m)
    enc = encode_auto(m.raw, m.dt, m.rows, cos)
    assert enc.params.get("spec") == exhaustive.params.get("spec") and enc.payload == exhaustive.payload
    assert enc.stats.cosine >= auto_chunk_target(cos)
    grids = [s for s in whole if not s.startswith("ecsq")]
    assert len(grids) <= 1, f"grids encoded whole although their samples were larger: {whole}"
