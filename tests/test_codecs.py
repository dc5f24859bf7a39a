"""Codecs: bit-exact round trips for every dtype, compression of real floats, corruption handling, registry."""

from __future__ import annotations

import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mzstore.codecs import Codec, available_codecs, get_codec
from mzstore.codecs.lossless import _HEAD, _PAIRS, _PLANE, _RAW, _ZSTD, MAGIC, PAIRS_MIN_BYTES, word_bytes
from mzstore.errors import CodecError
from mzstore.format.dtypes import DTYPES

ALL_DTYPES = sorted(DTYPES)


@pytest.fixture(scope="module")
def lossless():
    return get_codec("lossless")


@pytest.fixture(scope="module")
def zstd():
    return get_codec("zstd")


def planes_of(payload: bytes) -> list[tuple[int, int, int]]:
    """(method, start, end) of each plane body in a lossless payload, parsed independently of the codec."""
    magic, k, _rotate, nplanes, _ = _HEAD.unpack_from(payload, 0)
    assert magic == MAGIC
    assert nplanes == k
    pos = _HEAD.size + nplanes * _PLANE.size
    out = []
    for i in range(nplanes):
        method, length = _PLANE.unpack_from(payload, _HEAD.size + i * _PLANE.size)
        out.append((method, pos, pos + length))
        pos += length
    assert pos == len(payload)
    return out


def check_decoded(out: np.ndarray, raw: bytes) -> None:
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8
    assert out.ndim == 1
    assert out.shape == (len(raw),)
    assert out.tobytes() == raw


# --- round trips ---------------------------------------------------------------


def test_word_bytes():
    for name, dt in DTYPES.items():
        k = word_bytes(dt)
        if dt.bits < 8 or dt.bits % 8:
            assert k == 1, name
        elif name == "C64":
            assert k == 4
        else:
            assert k == dt.bits // 8, name


@pytest.mark.parametrize("name", ALL_DTYPES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_lossless_round_trip_random_bytes(lossless, name, data):
    dtype = DTYPES[name]
    k = word_bytes(dtype)
    n_words = data.draw(st.integers(0, 300), label="n_words")
    raw = data.draw(st.binary(min_size=n_words * k, max_size=n_words * k), label="raw")
    payload, params = lossless.encode(raw, dtype)
    assert isinstance(payload, bytes)
    assert params["word"] == k
    check_decoded(lossless.decode(payload, dtype, len(raw)), raw)
    # memoryview input works the same.
    check_decoded(lossless.decode(memoryview(payload), dtype, len(raw)), raw)
    payload2, _ = lossless.encode(memoryview(raw), dtype)
    assert payload2 == payload


@pytest.mark.parametrize("name", ALL_DTYPES)
def test_lossless_round_trip_structured(lossless, name):
    """Empty input, constant input, all byte values, and float-like patterns with sign bits set."""
    dtype = DTYPES[name]
    k = word_bytes(dtype)
    rng = np.random.default_rng(7)
    cases = [
        b"",
        bytes(k),
        b"\xff" * (k * 513),
        bytes(range(256)) * k,
        rng.integers(0, 256, size=k * 4099, dtype=np.uint8).tobytes(),
        (np.arange(2048, dtype=np.uint64) * 0x0101010101010101).astype(np.uint8).tobytes()[: (2048 // k) * k],
        np.tile(np.array([0x80] * k, dtype=np.uint8), 1000).tobytes(),
    ]
    for raw in cases:
        payload, _ = lossless.encode(raw, dtype)
        check_decoded(lossless.decode(payload, dtype, len(raw)), raw)


def test_lossless_rejects_partial_words(lossless):
    with pytest.raises(CodecError):
        lossless.encode(b"\x00" * 5, DTYPES["F32"])
    with pytest.raises(CodecError):
        lossless.encode(b"\x00" * 6, DTYPES["C64"])


@pytest.mark.parametrize("name", ALL_DTYPES)
@settings(max_examples=20, deadline=None)
@given(raw=st.binary(max_size=2000))
def test_zstd_round_trip(zstd, name, raw):
    payload, _ = zstd.encode(raw, DTYPES[name])
    check_decoded(zstd.decode(payload, DTYPES[name], len(raw)), raw)


def test_zstd_empty(zstd):
    check_decoded(zstd.decode(b"", DTYPES["U8"], 0), b"")
    payload, _ = zstd.encode(b"", DTYPES["U8"])
    check_decoded(zstd.decode(payload, DTYPES["U8"], 0), b"")


# --- real floats -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "tdtype", "limit"),
    [
        ("F32", torch.float32, 1.0),
        ("BF16", torch.bfloat16, 0.85),
        ("F16", torch.float16, 1.0),
        ("F64", torch.float64, 1.0),
    ],
)
def test_lossless_compresses_gaussian_floats(lossless, name, tdtype, limit):
    gen = torch.Generator().manual_seed(1234)
    t = torch.randn(256, 512, generator=gen, dtype=tdtype)
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    dtype = DTYPES[name]
    payload, params = lossless.encode(raw, dtype)
    ratio = len(payload) / len(raw)
    assert ratio < limit, f"{name}: ratio {ratio:.3f}"
    assert params["rotate"] is True
    # At least the exponent plane was compressed.
    assert any(method in (_ZSTD, _PAIRS) for method, _, _ in planes_of(payload))
    out = lossless.decode(payload, dtype, len(raw))
    check_decoded(out, raw)
    back = torch.frombuffer(bytearray(out.tobytes()), dtype=tdtype).reshape(t.shape)
    assert torch.equal(back, t)


def test_lossless_beats_plain_zstd_on_bf16(lossless, zstd):
    gen = torch.Generator().manual_seed(99)
    raw = torch.randn(1 << 16, generator=gen).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    a, _ = lossless.encode(raw, DTYPES["BF16"])
    b, _ = zstd.encode(raw, DTYPES["BF16"])
    assert len(a) < len(b)


# --- corruption ------------------------------------------------------------------


@pytest.fixture(scope="module")
def payloads(lossless):
    """Encoded payloads with at least one zstd plane; I32 ramps also have several zstd planes."""
    gen = torch.Generator().manual_seed(5)
    out = {}
    for name, raw in [
        ("BF16", torch.randn(4096, generator=gen).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()),
        ("F32", torch.randn(4096, generator=gen).view(torch.uint8).numpy().tobytes()),
        ("I32", np.arange(4096, dtype=np.int32).tobytes()),
        ("U8", (np.arange(4096) % 7).astype(np.uint8).tobytes()),
    ]:
        payload, _ = lossless.encode(raw, DTYPES[name])
        out[name] = (raw, payload)
    return out


def decode_or_codec_error(codec: Codec, payload: bytes, name: str, raw_len: int) -> np.ndarray | None:
    """Decode; CodecError → None; anything else propagates and fails the test."""
    try:
        return codec.decode(payload, DTYPES[name], raw_len)
    except CodecError:
        return None


@pytest.mark.parametrize("name", ["BF16", "F32", "I32", "U8"])
def test_flip_in_zstd_region_never_returns_wrong_length(lossless, payloads, name):
    """Whatever a flipped zstd byte does, the result is a CodecError or exactly raw_len bytes.

    The frame header descriptor byte is skipped: flipping it can turn a 2-byte content size into an
    8-byte one read from the block bytes, i.e. a huge declared size (see
    test_zstd_frame_declaring_huge_size_is_codec_error).
    """
    raw, payload = payloads[name]
    zstd_planes = [(s, e) for m, s, e in planes_of(payload) if m == _ZSTD]
    assert zstd_planes
    for start, end in zstd_planes:
        for pos in range(start, end):
            if pos == start + 4:
                continue
            for mask in (0x01, 0x80):
                bad = bytearray(payload)
                bad[pos] ^= mask
                out = decode_or_codec_error(lossless, bytes(bad), name, len(raw))
                if out is not None:
                    assert out.dtype == np.uint8 and out.shape == (len(raw),)


@pytest.mark.parametrize("name", ["BF16", "F32"])
def test_flip_in_raw_plane(lossless, payloads, name):
    """A flip inside a RAW plane is undetectable by the codec (the sha256 in the pipeline catches it)."""
    raw, payload = payloads[name]
    raw_planes = [(s, e) for m, s, e in planes_of(payload) if m == _RAW]
    assert raw_planes, "random mantissa planes should be stored raw"
    for start, end in raw_planes:
        for pos in (start, (start + end) // 2, end - 1):
            bad = bytearray(payload)
            bad[pos] ^= 0x40
            out = decode_or_codec_error(lossless, bytes(bad), name, len(raw))
            if out is not None:
                assert out.dtype == np.uint8 and out.shape == (len(raw),)
                assert out.tobytes() != raw
                # Exactly one decoded byte differs: the flip stays local.
                assert np.count_nonzero(out != np.frombuffer(raw, dtype=np.uint8)) == 1


@pytest.mark.parametrize("name", ["BF16", "F32", "I32", "U8"])
def test_truncated_payload(lossless, payloads, name):
    raw, payload = payloads[name]
    for cut in sorted({0, 1, 4, _HEAD.size - 1, _HEAD.size, _HEAD.size + 3, len(payload) // 2, len(payload) - 1}):
        with pytest.raises(CodecError):
            lossless.decode(payload[:cut], DTYPES[name], len(raw))


@pytest.mark.parametrize("name", ["BF16", "F32", "I32", "U8"])
def test_appended_byte(lossless, payloads, name):
    raw, payload = payloads[name]
    for extra in (b"\x00", b"\xff", b"\x28\xb5\x2f\xfd"):
        with pytest.raises(CodecError, match="trailing"):
            lossless.decode(payload + extra, DTYPES[name], len(raw))


@pytest.mark.parametrize("magic", [b"MZL0", b"mzl1", b"\x00\x00\x00\x00", b"\x28\xb5\x2f\xfd"])
def test_wrong_magic(lossless, payloads, magic):
    raw, payload = payloads["F32"]
    with pytest.raises(CodecError, match="magic"):
        lossless.decode(magic + payload[4:], DTYPES["F32"], len(raw))


@pytest.mark.parametrize("name", ["BF16", "F32", "I32", "U8"])
def test_wrong_raw_len(lossless, payloads, name):
    raw, payload = payloads[name]
    k = word_bytes(DTYPES[name])
    for raw_len in {0, k, len(raw) - k, len(raw) + k, len(raw) + 1, len(raw) * 2, len(raw) // 2}:
        if raw_len == len(raw):
            continue
        with pytest.raises(CodecError):
            lossless.decode(payload, DTYPES[name], raw_len)


@pytest.mark.parametrize(
    ("encoded_as", "decoded_as"),
    [("F32", "F16"), ("F32", "U8"), ("F32", "F64"), ("BF16", "F32"), ("U8", "I16"), ("I32", "I16"), ("I32", "I64")],
)
def test_wrong_dtype_word_size(lossless, payloads, encoded_as, decoded_as):
    assert word_bytes(DTYPES[encoded_as]) != word_bytes(DTYPES[decoded_as])
    raw, payload = payloads[encoded_as]
    with pytest.raises(CodecError, match="dtype"):
        lossless.decode(payload, DTYPES[decoded_as], len(raw))


def test_corrupted_plane_table(lossless, payloads):
    raw, payload = payloads["F32"]
    k = 4
    # nplanes disagreeing with the word size.
    bad = bytearray(payload)
    bad[6] = 3
    with pytest.raises(CodecError):
        lossless.decode(bytes(bad), DTYPES["F32"], len(raw))
    # Unknown rotate flag.
    bad = bytearray(payload)
    bad[5] = 2
    with pytest.raises(CodecError):
        lossless.decode(bytes(bad), DTYPES["F32"], len(raw))
    # Unknown plane method.
    bad = bytearray(payload)
    bad[_HEAD.size] = 7
    with pytest.raises(CodecError):
        lossless.decode(bytes(bad), DTYPES["F32"], len(raw))
    # Plane lengths that overrun the payload, or are huge.
    for i in range(k):
        for length in (2**63, 2**64 - 1, len(payload)):
            bad = bytearray(payload)
            method, _ = _PLANE.unpack_from(payload, _HEAD.size + i * _PLANE.size)
            _PLANE.pack_into(bad, _HEAD.size + i * _PLANE.size, method, length)
            with pytest.raises(CodecError):
                lossless.decode(bytes(bad), DTYPES["F32"], len(raw))
    # A method switched from raw to zstd (or back) makes the plane undecodable.
    for i in range(k):
        bad = bytearray(payload)
        method, length = _PLANE.unpack_from(payload, _HEAD.size + i * _PLANE.size)
        _PLANE.pack_into(bad, _HEAD.size + i * _PLANE.size, _ZSTD if method == _RAW else _RAW, length)
        with pytest.raises(CodecError):
            lossless.decode(bytes(bad), DTYPES["F32"], len(raw))


def test_zstd_codec_corruption(zstd):
    raw = (np.arange(10000) % 251).astype(np.uint8).tobytes()
    payload, _ = zstd.encode(raw, DTYPES["U8"])
    for bad in (payload[:-1], payload[: len(payload) // 2], b"", b"garbage!", payload + b"\x00"):
        out = decode_or_codec_error(zstd, bad, "U8", len(raw))
        assert out is None or out.tobytes() == raw
    for raw_len in (0, 1, len(raw) - 1, len(raw) + 1):
        with pytest.raises(CodecError):
            zstd.decode(payload, DTYPES["U8"], raw_len)
    with pytest.raises(CodecError):
        zstd.decode(b"garbage!", DTYPES["U8"], 8)
    with pytest.raises(CodecError):
        zstd.decode(payload[:-1], DTYPES["U8"], len(raw))


def _frame_declaring(size: int) -> bytes:
    """A zstd frame whose header declares ``size`` content bytes but holds one 10-byte raw block."""
    magic = b"\x28\xb5\x2f\xfd"
    descriptor = bytes([0xE0])  # single segment, 8-byte frame content size
    block = bytes([0x51, 0x00, 0x00]) + bytes(10)  # last block, raw, 10 bytes
    return magic + descriptor + struct.pack("<Q", size) + block


def test_zstd_frame_declaring_wrong_size_is_codec_error(lossless, zstd):
    # Sanity check of the hand-built frame: declaring the true size decodes.
    check_decoded(zstd.decode(_frame_declaring(10), DTYPES["U8"], 10), bytes(10))
    for size in (9, 11, 4096):
        with pytest.raises(CodecError):
            zstd.decode(_frame_declaring(size), DTYPES["U8"], 10)
        frame = _frame_declaring(size)
        payload = _HEAD.pack(MAGIC, 1, 0, 1, 0) + _PLANE.pack(_ZSTD, len(frame)) + frame
        with pytest.raises(CodecError):
            lossless.decode(payload, DTYPES["U8"], 10)


@pytest.mark.parametrize("codec_name", ["zstd", "lossless"])
def test_zstd_frame_declaring_huge_size_is_codec_error(codec_name):
    frame = _frame_declaring(2**62)
    if codec_name == "lossless":
        payload = _HEAD.pack(MAGIC, 1, 0, 1, 0) + _PLANE.pack(_ZSTD, len(frame)) + frame
    else:
        payload = frame
    with pytest.raises(CodecError):
        get_codec(codec_name).decode(payload, DTYPES["U8"], 10)


# --- registry ----------------------------------------------------------------------


def test_unknown_codec_lists_available():
    with pytest.raises(CodecError) as info:
        get_codec("nope")
    msg = str(info.value)
    assert "nope" in msg
    for name in available_codecs():
        assert name in msg


def test_get_codec_returns_shared_instance():
    for name in ("lossless", "zstd"):
        a = get_codec(name)
        b = get_codec(name)
        assert a is b
        assert a.name == name
        assert isinstance(a, Codec)
    assert get_codec("lossless") is not get_codec("zstd")


def test_available_codecs():
    names = available_codecs()
    assert "lossless" in names and "zstd" in names
    assert names == sorted(set(names))


def test_codec_error_is_value_error():
    assert issubclass(CodecError, ValueError)


# --- threads -------------------------------------------------------------------------


def test_concurrent_encode_decode_matches_single_thread(lossless, zstd):
    rng = np.random.default_rng(11)
    gen = torch.Generator().manual_seed(11)
    inputs = []
    for name in ALL_DTYPES:
        k = word_bytes(DTYPES[name])
        inputs.append((name, rng.integers(0, 256, size=k * 3000, dtype=np.uint8).tobytes()))
    inputs.append(("BF16", torch.randn(20000, generator=gen).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()))
    inputs.append(("F32", torch.randn(20000, generator=gen).view(torch.uint8).numpy().tobytes()))
    inputs.append(("I64", np.arange(5000, dtype=np.int64).tobytes()))

    def run_all() -> list[tuple[bytes, bytes, bytes, bytes]]:
        out = []
        for name, raw in inputs:
            dt = DTYPES[name]
            p1, _ = lossless.encode(raw, dt)
            p2, _ = zstd.encode(raw, dt)
            d1 = lossless.decode(p1, dt, len(raw)).tobytes()
            d2 = zstd.decode(p2, dt, len(raw)).tobytes()
            out.append((p1, p2, d1, d2))
        return out

    expected = run_all()
    for (_, raw), (_, _, d1, d2) in zip(inputs, expected, strict=True):
        assert d1 == raw and d2 == raw

    barrier = threading.Barrier(4)

    def worker(_: int) -> list[list[tuple[bytes, bytes, bytes, bytes]]]:
        barrier.wait()
        return [run_all() for _ in range(3)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(worker, range(4)))
    for per_thread in results:
        for got in per_thread:
            assert got == expected


# --- the pair coder for exponent planes ------------------------------------------------


def _pair_payload(lossless, words: np.ndarray) -> tuple[bytes, bytes]:
    raw = words.astype(np.uint16).tobytes()
    payload, _ = lossless.encode(raw, DTYPES["BF16"])
    return raw, payload


def test_pair_coder_is_used_on_skewed_exponents_and_round_trips(lossless):
    gen = torch.Generator().manual_seed(3)
    t = (torch.randn(PAIRS_MIN_BYTES + 1, generator=gen) * 0.02).to(torch.bfloat16)  # odd length too
    raw = t.view(torch.uint8).numpy().tobytes()
    payload, _ = lossless.encode(raw, DTYPES["BF16"])
    assert _PAIRS in [m for m, _, _ in planes_of(payload)]
    assert lossless.decode(payload, DTYPES["BF16"], len(raw)).tobytes() == raw


def test_pair_coder_escapes_rare_pairs(lossless):
    # Exponents drawn from 40 values: 1600 possible pairs, far more than the 255-entry table.
    rng = np.random.default_rng(0)
    exps = rng.choice(np.arange(100, 140), size=2 * PAIRS_MIN_BYTES, p=np.r_[np.full(8, 0.1), np.full(32, 0.2 / 32)])
    words = (exps.astype(np.uint16) << 7) | rng.integers(0, 128, size=len(exps), dtype=np.uint16)
    raw, payload = _pair_payload(lossless, words)
    assert lossless.decode(payload, DTYPES["BF16"], len(raw)).tobytes() == raw


def test_corrupt_pair_plane_is_a_codec_error(lossless):
    gen = torch.Generator().manual_seed(4)
    raw = (
        (torch.randn(2 * PAIRS_MIN_BYTES, generator=gen) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes()
    )
    payload, _ = lossless.encode(raw, DTYPES["BF16"])
    planes = planes_of(payload)
    _, start, end = next(p for p in planes if p[0] == _PAIRS)
    for cut in (start + 3, start + 20, end - 1):
        bad = payload[:cut] + payload[end:]
        with pytest.raises(CodecError):
            lossless.decode(bad, DTYPES["BF16"], len(raw))


# --- the fused bf16/f16 decode (pair-coded exponents straight into the output) --------------------


def _planes(payload: bytes) -> list[tuple[int, memoryview]]:
    view = memoryview(payload)
    pos = _HEAD.size + 2 * _PLANE.size
    out = []
    for i in range(2):
        method, length = _PLANE.unpack_from(view, _HEAD.size + i * _PLANE.size)
        out.append((method, view[pos : pos + length]))
        pos += length
    return out


@pytest.mark.parametrize("name,tdtype", [("BF16", torch.bfloat16), ("F16", torch.float16)])
@pytest.mark.parametrize("n", [PAIRS_MIN_BYTES * 2, PAIRS_MIN_BYTES * 2 + 1, 300_001])
@pytest.mark.parametrize("escapes", [False, True])
def test_fused_half_float_decode_matches_the_generic_path(
    lossless, name: str, tdtype: torch.dtype, n: int, escapes: bool
) -> None:
    from mzstore.codecs.lossless import _assemble, _decode_pairs, _pair_parts

    # Bit patterns with few distinct top bytes, so the pair coder wins; with ``escapes``, 3 % of the
    # exponents are uniform, which makes more than 255 distinct pairs (the rare ones are escaped).
    rng = np.random.default_rng(n + escapes)
    exp_bits, exp_shift, mant_bits = (8, 7, 7) if name == "BF16" else (5, 10, 7)
    centre = (1 << (exp_bits - 1)) - 4
    exps = np.clip(centre - rng.geometric(0.5, n), 1, (1 << exp_bits) - 2)
    if escapes:
        wild = rng.random(n) < 0.03
        exps[wild] = rng.integers(1, (1 << exp_bits) - 1, int(wild.sum()))
    bits = (rng.integers(0, 2, n) << 15) | (exps << exp_shift) | rng.integers(0, 1 << mant_bits, n)
    bits[-1] = 0xBFC0 if name == "BF16" else 0xBE00  # -1.5: the last element's sign and exponent are checked
    raw = bits.astype(np.uint16).tobytes()
    dtype = DTYPES[name]
    payload, _ = lossless.encode(raw, dtype)
    (m0, low_body), (m1, pair_body) = _planes(payload)
    assert m0 == _RAW and m1 == _PAIRS, "the exponent plane must be pair-coded for this test to mean anything"
    escaped = _pair_parts(pair_body, n)[2]
    assert (len(escaped) > 0) == escapes

    got = lossless.decode(payload, dtype, len(raw))
    assert got.tobytes() == raw
    generic = np.empty(len(raw), np.uint8)
    high = _decode_pairs(pair_body, n).copy()
    _assemble([np.frombuffer(low_body, np.uint8), high], generic.view(np.uint16), True)
    assert np.array_equal(got, generic)


@pytest.mark.parametrize("name,tdtype,want", [("BF16", torch.bfloat16, _PAIRS), ("F16", torch.float16, _ZSTD)])
def test_the_exponent_coder_is_chosen_by_estimate_and_the_choice_is_the_smaller(
    lossless, monkeypatch, name: str, tdtype: torch.dtype, want: int
) -> None:
    """bf16 exponents code smaller as pairs, fp16's (3 mantissa bits in the byte) plainly; the encoder
    estimates which from the pair counts and runs one coder, and the estimate agrees with both run."""
    from mzstore.codecs import lossless as module

    gen = torch.Generator().manual_seed(11)
    raw = (torch.randn(4 * PAIRS_MIN_BYTES, generator=gen) * 0.02).to(tdtype).view(torch.uint8).numpy().tobytes()
    dtype = DTYPES[name]
    calls = {"plain": 0, "pairs": 0}
    real_pairs = module._encode_pairs
    monkeypatch.setattr(
        module, "_encode_pairs", lambda *a: (calls.__setitem__("pairs", calls["pairs"] + 1), real_pairs(*a))[1]
    )
    payload, _ = lossless.encode(raw, dtype)
    exponent_method = planes_of(payload)[-1][0]
    assert exponent_method == want
    assert calls["pairs"] == (1 if want == _PAIRS else 0), "one coder ran, not both"
    monkeypatch.setattr(module, "PAIRS_SURE", -1.0)
    monkeypatch.setattr(module, "BYTES_SURE", 1e9)
    both, _ = lossless.encode(raw, dtype)
    assert len(both) == len(payload), "running both coders would not have found a smaller payload"
    assert lossless.decode(payload, dtype, len(raw)).tobytes() == raw


def test_a_corrupt_zstd_frame_leaves_no_state_behind() -> None:
    """A frame that fails mid-way drops the thread's decompressor: the next frame's outcome (its error message,
    too) is what it would be on a fresh thread (fuzz/fuzz_native.py found messages that depended on the
    previous failure)."""
    import zstandard

    from mzstore.codecs import lossless

    raw = bytes(range(256)) * 400
    frame = zstandard.ZstdCompressor(level=3).compress(raw)
    lossless.zstd_read_into(zstandard.ZstdCompressor().compress(b"x" * 10), memoryview(bytearray(10)))
    used = lossless._dctx()
    for broken in (frame[: len(frame) // 2], frame[:12] + bytes(reversed(frame[12:]))):  # cut short; garbled blocks
        with pytest.raises(CodecError):
            lossless.zstd_read_into(broken, memoryview(bytearray(len(raw))))
        assert lossless._dctx() is not used, "a new decompressor after a failure"
        used = lossless._dctx()
    out = bytearray(len(raw))
    lossless.zstd_read_into(zstandard.ZstdCompressor().compress(raw), memoryview(out))
    assert out == raw


def _bf16_planes_case(mantissa: np.ndarray, exponent: np.ndarray) -> bytes:
    """bf16 bytes whose split planes (rotated: the sign moves to the low byte's bit 0) are these."""
    low, high = mantissa.astype(np.uint16), exponent.astype(np.uint16)
    rotated = (high << 8) | low
    words = (rotated >> 1) | ((rotated & 1) << 15)  # undo the rotation the encoder applies
    return words.astype("<u2").tobytes()


def test_a_plane_is_probed_before_it_is_compressed(lossless) -> None:
    """A mantissa plane zstd cannot shrink is stored raw after a look at samples of it; one it can shrink
    (here: compressible only in its samples' places and between them alike) is still compressed."""
    from mzstore.codecs.lossless import PROBE_MIN_BYTES, _cctx, _incompressible

    n = 2 * PROBE_MIN_BYTES  # planes of 2 MiB
    rng = np.random.default_rng(0)
    exponent = rng.choice(np.arange(118, 124, dtype=np.uint8), n)
    noise = rng.integers(0, 256, n, dtype=np.uint8)
    runs = np.repeat(rng.integers(0, 256, n // 64, dtype=np.uint8), 64)
    bf16 = DTYPES["BF16"]
    for mantissa, method in ((noise, _RAW), (runs, _ZSTD)):
        raw = _bf16_planes_case(mantissa, exponent)
        payload, _ = lossless.encode(raw, bf16)
        assert planes_of(payload)[0][0] == method
        assert bytes(lossless.decode(payload, bf16, len(raw))) == raw
    raw = _bf16_planes_case(runs, exponent)
    assert len(lossless.encode(raw, bf16)[0]) < 0.5 * len(raw)
    # The noise plane was judged on samples, not compressed whole; a short plane is always compressed.
    coder = _cctx()
    assert _incompressible(noise, coder) and not _incompressible(runs, coder)
    assert not _incompressible(noise[: PROBE_MIN_BYTES - 1], coder)


def test_the_pair_table_from_a_sample_still_codes_every_pair(lossless) -> None:
    """A long exponent plane's pair table comes from a sample: pairs the sample missed are escaped, exactly."""
    from mzstore.codecs.lossless import PAIRS_SAMPLE_BLOCK, PAIRS_SAMPLE_BLOCKS, pair_sample

    n = 8 * PAIRS_SAMPLE_BLOCK * PAIRS_SAMPLE_BLOCKS
    rng = np.random.default_rng(1)
    exponent = rng.choice(np.array([120, 121, 122], dtype=np.uint8), n)
    sample = pair_sample(exponent)
    assert len(sample) == PAIRS_SAMPLE_BLOCK * PAIRS_SAMPLE_BLOCKS
    # Values the sample cannot have seen: placed in the gaps between its blocks.
    step = (n - PAIRS_SAMPLE_BLOCK) // (PAIRS_SAMPLE_BLOCKS - 1) // 2 * 2
    for i in range(PAIRS_SAMPLE_BLOCKS - 1):
        exponent[i * step + PAIRS_SAMPLE_BLOCK : i * step + PAIRS_SAMPLE_BLOCK + 300] = rng.integers(0, 256, 300)
    assert np.array_equal(pair_sample(exponent), sample)
    raw = _bf16_planes_case(rng.integers(0, 256, n, dtype=np.uint8), exponent)
    payload, _ = lossless.encode(raw, DTYPES["BF16"])
    assert planes_of(payload)[1][0] == _PAIRS
    assert bytes(lossless.decode(payload, DTYPES["BF16"], len(raw))) == raw
