"""Strict safetensors header parser: agreement with the reference reader, and rejection of malformed input."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from mzstore.errors import FormatError
from mzstore.format.dtypes import DTYPES
from mzstore.format.safetensors import (
    MAX_HEADER_BYTES,
    METADATA_KEY,
    Header,
    build_header,
    parse_header,
    read_header_len,
)

# --- helpers -----------------------------------------------------------------


def parse_file(blob: bytes) -> Header:
    """Parse a whole safetensors file held in memory, as a reader would."""
    n = read_header_len(blob[:8], len(blob))
    return parse_header(blob[8 : 8 + n], len(blob))


def make_file(header: bytes | str | dict, data: bytes = b"") -> bytes:
    """Prefix + header + data; a dict header is dumped as JSON."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header)) + header + data


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_matches_reference(blob: bytes, path, framework: str) -> Header:
    """parse_header and safetensors.safe_open agree on names, dtypes, shapes, metadata and bytes."""
    header = parse_file(blob)
    path.write_bytes(blob)
    with safe_open(str(path), framework=framework) as f:
        assert sorted(t.name for t in header.tensors) == sorted(f.keys())
        assert header.metadata == f.metadata()
        for t in header.tensors:
            sl = f.get_slice(t.name)
            assert t.dtype.name == sl.get_dtype()
            assert list(t.shape) == list(sl.get_shape())
            ref = f.get_tensor(t.name)
            ref_bytes = tensor_bytes(ref) if framework == "pt" else np.ascontiguousarray(ref).tobytes()
            # The offsets point at exactly the bytes the reference reader returns.
            start = header.data_start
            assert blob[start + t.begin : start + t.end] == ref_bytes
            assert t.nbytes == len(ref_bytes)
    # Tensors are reported in data order and tile the data section.
    assert header.data_start + header.data_len == len(blob)
    cursor = 0
    for t in header.tensors:
        assert t.begin == cursor
        cursor = t.end
    assert cursor == header.data_len
    return header


def expect_error(blob: bytes, *fragments: str) -> FormatError:
    with pytest.raises(FormatError) as info:
        parse_file(blob)
    msg = str(info.value).lower()
    for frag in fragments:
        assert frag.lower() in msg, f"{frag!r} not in {msg!r}"
    return info.value


# --- valid files -------------------------------------------------------------


def test_torch_file_agrees_with_safe_open(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "model.embed.weight": torch.randn(7, 5, dtype=torch.bfloat16),
        "model.norm.weight": torch.randn(5, dtype=torch.float16),
        "lm_head.weight": torch.randn(3, 5),
        "model.layers.0.mlp.bias": torch.randn(4, dtype=torch.float64),
        "ids": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "mask": torch.tensor([True, False, True]),
        "i8": torch.tensor([-1, 2, -3], dtype=torch.int8),
        "u8": torch.tensor([1, 2, 250], dtype=torch.uint8),
        "i16": torch.tensor([[-300, 5]], dtype=torch.int16),
        "i32": torch.tensor([1 << 30], dtype=torch.int32),
        "fp8": torch.zeros(6, dtype=torch.float8_e4m3fn),
        "fp8b": torch.ones(2, 3, dtype=torch.float8_e5m2),
    }
    blob = safetensors.torch.save(tensors, metadata={"format": "pt", "note": "ünïcode"})
    header = assert_matches_reference(blob, tmp_path / "m.safetensors", "pt")
    assert len(header.tensors) == len(tensors)
    by_name = {t.name: t for t in header.tensors}
    for name, t in tensors.items():
        assert by_name[name].shape == tuple(t.shape)
        assert by_name[name].numel == t.numel()
    assert header.metadata == {"format": "pt", "note": "ünïcode"}


def test_numpy_file_agrees_with_safe_open(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        "a": rng.standard_normal((4, 3)).astype(np.float32),
        "b": rng.integers(0, 2**16, size=(2, 2, 2), dtype=np.uint16),
        "c": rng.integers(-(2**40), 2**40, size=(5,), dtype=np.int64),
        "d": rng.integers(0, 2**32, size=(3,), dtype=np.uint32),
        "e": rng.integers(0, 2**63, size=(2,), dtype=np.uint64),
        "f": (rng.standard_normal(3) + 1j * rng.standard_normal(3)).astype(np.complex64),
        "g": rng.standard_normal((1, 1, 1, 2)).astype(np.float16),
    }
    blob = safetensors.numpy.save(arrays)
    header = assert_matches_reference(blob, tmp_path / "n.safetensors", "numpy")
    assert {t.name: t.dtype.name for t in header.tensors} == {
        "a": "F32",
        "b": "U16",
        "c": "I64",
        "d": "U32",
        "e": "U64",
        "f": "C64",
        "g": "F16",
    }
    assert header.metadata is None


def test_zero_size_tensors_and_scalars_parse(tmp_path):
    tensors = {
        "scalar": torch.tensor(3.5),
        "scalar_i": torch.tensor(7, dtype=torch.int64),
        "empty_rows": torch.zeros(0, 4),
        "empty_cols": torch.zeros(4, 0, dtype=torch.bfloat16),
        "empty_1d": torch.zeros(0, dtype=torch.int8),
        "w": torch.ones(2, 2),
    }
    blob = safetensors.torch.save(tensors)
    header = assert_matches_reference(blob, tmp_path / "z.safetensors", "pt")
    by_name = {t.name: t for t in header.tensors}
    assert by_name["scalar"].shape == () and by_name["scalar"].nbytes == 4 and by_name["scalar"].numel == 1
    assert by_name["scalar_i"].nbytes == 8
    for name in ("empty_rows", "empty_cols", "empty_1d"):
        assert by_name[name].nbytes == 0 and by_name[name].numel == 0


def test_only_zero_size_tensors_and_empty_header():
    blob = make_file({"a": entry("F32", [0], 0, 0), "b": entry("BF16", [3, 0], 0, 0)})
    header = parse_file(blob)
    assert header.data_len == 0 and {t.name for t in header.tensors} == {"a", "b"}
    header = parse_file(make_file("{}"))
    assert header.tensors == () and header.data_len == 0 and header.metadata is None


def test_trailing_space_padding_is_accepted():
    text = json.dumps({"a": entry("U8", [4], 0, 4)}) + " " * 13
    blob = make_file(text, b"\x01\x02\x03\x04")
    header = parse_file(blob)
    assert header.header_len == len(text)
    assert header.data_start == 8 + len(text)
    assert header.data_len == 4
    assert [(t.name, t.begin, t.end) for t in header.tensors] == [("a", 0, 4)]


def test_sub_byte_dtypes_with_whole_bytes():
    # 6 F4 values are 3 bytes; 4 F6 values are 3 bytes.
    blob = make_file({"f4": entry("F4", [2, 3], 0, 3), "f6": entry("F6_E2M3", [4], 3, 6)}, bytes(6))
    header = parse_file(blob)
    assert [(t.name, t.nbytes) for t in header.tensors] == [("f4", 3), ("f6", 3)]


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt", "k": "v", "ü": "ß"}])
def test_build_header_round_trips(tmp_path, metadata):
    torch.manual_seed(2)
    tensors = [
        ("b.weight", torch.randn(3, 4, dtype=torch.bfloat16)),
        ("a.scalar", torch.tensor(2.0, dtype=torch.float64)),
        ("c.empty", torch.zeros(0, 2, dtype=torch.float16)),
        ("d.ids", torch.arange(5, dtype=torch.int32)),
        ("e.ünï", torch.ones(1, dtype=torch.uint8)),
    ]
    dt_name = {
        torch.bfloat16: "BF16",
        torch.float64: "F64",
        torch.float16: "F16",
        torch.int32: "I32",
        torch.uint8: "U8",
    }
    entries = []
    data = b""
    for name, t in tensors:
        raw = tensor_bytes(t)
        entries.append((name, dt_name[t.dtype], tuple(t.shape), len(data), len(data) + len(raw)))
        data += raw
    prefix_and_header = build_header(entries, metadata)
    assert len(prefix_and_header) % 8 == 0
    blob = prefix_and_header + data

    header = parse_file(blob)
    assert header.data_start == len(prefix_and_header)
    assert [(t.name, t.dtype.name, t.shape, t.begin, t.end) for t in header.tensors] == entries
    assert header.metadata == metadata

    path = tmp_path / "built.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(name for name, _ in tensors)
        if metadata:
            assert f.metadata() == metadata
        else:
            assert not f.metadata()
        for name, t in tensors:
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got, t)


# --- malformed input: read_header_len ------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_8_bytes(size):
    blob = b"\x02" * size
    with pytest.raises(FormatError, match="at least 8"):
        read_header_len(blob, size)
    with pytest.raises(FormatError, match="at least 8"):
        parse_file(blob)


def test_header_length_larger_than_file():
    blob = struct.pack("<Q", 100) + b"{}"
    with pytest.raises(FormatError, match="longer than the file"):
        read_header_len(blob[:8], len(blob))


def test_header_length_above_cap():
    n = MAX_HEADER_BYTES + 1
    with pytest.raises(FormatError, match="limit"):
        read_header_len(struct.pack("<Q", n), 8 + n + 1000)
    with pytest.raises(FormatError, match="limit"):
        read_header_len(struct.pack("<Q", 2**64 - 1), 2**63)
    # A smaller cap given by the caller is honoured.
    with pytest.raises(FormatError, match="limit"):
        read_header_len(struct.pack("<Q", 64), 1000, max_header=63)
    assert read_header_len(struct.pack("<Q", 64), 1000, max_header=64) == 64


def test_header_length_too_small():
    with pytest.raises(FormatError):
        read_header_len(struct.pack("<Q", 0), 100)
    with pytest.raises(FormatError):
        read_header_len(struct.pack("<Q", 1), 100)


# --- malformed input: parse_header ---------------------------------------------


def test_header_not_starting_with_brace():
    expect_error(make_file(' {"a":1}'), "start with '{'")
    expect_error(make_file('"abc"'), "start with '{'")


def test_top_level_json_array():
    expect_error(make_file("[1, 2, 3]"), "start with '{'")
    expect_error(make_file("[]"), "start with '{'")


def test_invalid_utf8():
    expect_error(make_file(b'{"a\xff\xfe":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'), "utf-8")


def test_invalid_json():
    expect_error(make_file('{"a": }'), "not valid json")
    expect_error(make_file('{"a": 1'), "not valid json")
    expect_error(make_file('{"a": 1} {}'), "not valid json")


def test_nan_rejected():
    expect_error(make_file('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,0]}}'), "nan")


def test_duplicate_tensor_names():
    text = '{"w":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"w":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}}'
    expect_error(make_file(text, bytes(4)), "duplicate", "'w'")


def test_duplicate_metadata_key():
    text = '{"__metadata__":{"k":"a","k":"b"}}'
    expect_error(make_file(text), "duplicate", "'k'")


@pytest.mark.parametrize("dtype", ["F128", "f32", "", "FLOAT", 32, None, ["F32"]])
def test_unknown_dtype(dtype):
    blob = make_file({"t": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    expect_error(blob, "dtype")


def test_shape_size_mismatch_with_offsets():
    # 2x3 F32 needs 24 bytes; offsets span 20.
    blob = make_file({"t": entry("F32", [2, 3], 0, 20)}, bytes(32))
    expect_error(blob, "'t'", "24", "20")
    # Larger than the file.
    blob = make_file({"t": entry("F32", [1000], 0, 8)}, bytes(8))
    expect_error(blob, "'t'")


def test_sub_byte_shape_not_whole_bytes():
    blob = make_file({"t": entry("F4", [3], 0, 2)}, bytes(2))
    expect_error(blob, "whole bytes")


def test_overlapping_offsets():
    blob = make_file({"a": entry("U8", [8], 0, 8), "b": entry("U8", [8], 4, 12)}, bytes(12))
    expect_error(blob, "'b'", "overlap")


def test_duplicate_offsets_overlap():
    blob = make_file({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 0, 4)}, bytes(4))
    expect_error(blob, "overlap")


def test_gap_between_tensors():
    blob = make_file({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 8, 12)}, bytes(12))
    expect_error(blob, "'b'", "gap")


def test_gap_before_first_tensor():
    blob = make_file({"a": entry("U8", [4], 4, 8)}, bytes(8))
    expect_error(blob, "'a'", "gap")


def test_trailing_bytes_after_last_tensor():
    blob = make_file({"a": entry("U8", [4], 0, 4)}, bytes(9))
    expect_error(blob, "trailing bytes")


def test_trailing_bytes_with_no_tensors():
    expect_error(make_file("{}", b"x"), "trailing bytes")


@pytest.mark.parametrize(
    "offsets",
    [[0, 16], [8, 12], [-4, 0], [4, 0]],
)
def test_data_offsets_outside_data_section(offsets):
    begin, end = offsets
    span = max(0, end - begin)
    blob = make_file({"a": entry("U8", [span], begin, end)}, bytes(8))
    expect_error(blob, "'a'", "outside")


@pytest.mark.parametrize("offsets", [[0], [0, 4, 8], [0.0, 4], ["0", "4"], [False, 4], None, {"0": 4}])
def test_malformed_data_offsets(offsets):
    blob = make_file({"a": {"dtype": "U8", "shape": [4], "data_offsets": offsets}}, bytes(4))
    expect_error(blob, "'a'", "data_offsets")


@pytest.mark.parametrize(
    "tensor",
    [
        {"dtype": "U8", "shape": [4], "data_offsets": [0, 4], "extra": 1},
        {"dtype": "U8", "shape": [4]},
        {"dtype": "U8", "data_offsets": [0, 4]},
        {"shape": [4], "data_offsets": [0, 4]},
        [],
        "U8",
        None,
    ],
)
def test_wrong_tensor_entry_keys(tensor):
    blob = make_file({"a": tensor}, bytes(4))
    expect_error(blob, "'a'", "exactly dtype, shape and data_offsets")


@pytest.mark.parametrize(
    "shape",
    [[-1], [2, -2], [2.0], [True], [False], [1, True], ["4"], [None], 4, "4", None, [[4]], [1] * 17],
)
def test_invalid_shape(shape):
    blob = make_file({"a": {"dtype": "U8", "shape": shape, "data_offsets": [0, 4]}}, bytes(4))
    expect_error(blob, "'a'", "shape")


@pytest.mark.parametrize(
    "metadata",
    [{"k": 1}, {"k": None}, {"k": ["v"]}, {"k": {"x": "y"}}, {"k": True}, ["k", "v"], "kv", 3],
)
def test_metadata_with_non_string_value(metadata):
    blob = make_file({METADATA_KEY: metadata, "a": entry("U8", [1], 0, 1)}, bytes(1))
    expect_error(blob, "__metadata__")


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_file_rejected(legacy):
    buf = io.BytesIO()
    torch.save({"w": torch.randn(64, 64), "b": torch.zeros(64)}, buf, _use_new_zipfile_serialization=not legacy)
    blob = buf.getvalue()
    with pytest.raises(FormatError, match="not a safetensors file"):
        parse_file(blob)
    # Even with a cap large enough for the length read from the prefix, the
    # bytes after it are not a JSON header.
    with pytest.raises(FormatError):
        parse_header(blob[8:], len(blob))


@pytest.mark.parametrize("name", ["", "a\x00b", "x" * 1025])
def test_invalid_tensor_name(name):
    blob = make_file({name: entry("U8", [1], 0, 1)}, bytes(1))
    expect_error(blob, "invalid tensor name")


def test_long_but_valid_tensor_name():
    name = "x" * 1024
    header = parse_file(make_file({name: entry("U8", [1], 0, 1)}, bytes(1)))
    assert header.tensors[0].name == name


def test_file_truncated():
    # The header promises 8 bytes of data but only 4 follow.
    blob = make_file({"a": entry("U8", [4], 0, 4), "b": entry("U8", [4], 4, 8)}, bytes(4))
    expect_error(blob, "'b'")


def test_huge_shape_does_not_allocate():
    shape = [2**40] * 16
    blob = make_file({"a": entry("F64", shape, 0, 8)}, bytes(8))
    expect_error(blob, "'a'")


# --- hostile JSON that escapes as a non-FormatError -------------------------------


def test_deeply_nested_json_is_format_error():
    text = '{"a":' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(FormatError):
        parse_header(text.encode(), 8 + len(text))


def test_integer_with_too_many_digits_is_format_error():
    text = '{"a":{"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,1]}}'
    with pytest.raises(FormatError):
        parse_header(text.encode(), 8 + len(text) + 1)


def test_lone_surrogate_tensor_name_is_format_error():
    text = '{"\\ud800":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    with pytest.raises(FormatError):
        parse_header(text.encode(), 8 + len(text) + 1)


# --- fuzzing -------------------------------------------------------------------

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.sampled_from(sorted(DTYPES)),
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
_entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), _json_scalars),
        "shape": st.one_of(st.lists(st.integers(-2, 9), max_size=4), _json_values),
        "data_offsets": st.one_of(st.lists(st.integers(-2, 80), min_size=2, max_size=2), _json_values),
    }
)
_headers = st.dictionaries(
    st.one_of(st.just(METADATA_KEY), st.text(max_size=6)),
    st.one_of(_entries, _json_values),
    max_size=4,
).map(lambda d: json.dumps(d).encode())


def _fuzz_one(data: bytes) -> None:
    try:
        n = read_header_len(data[:8], len(data))
        parse_header(data[8 : 8 + n], len(data))
    except FormatError:
        pass
    for extra in (0, 3, 64):
        try:
            parse_header(data, len(data) + 8 + extra)
        except FormatError:
            pass


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=256),
        st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b),
        st.binary(max_size=64).map(lambda b: b"{" + b),
    )
)
def test_random_bytes_raise_only_format_error(data):
    _fuzz_one(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_headers, st.integers(0, 80))
def test_random_json_headers_raise_only_format_error(header, data_len):
    _fuzz_one(make_file(header, bytes(data_len)))
