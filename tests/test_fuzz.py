"""Bounded fuzz of every parser that reads untrusted bytes (issue #6).

The only allowed outcomes are a successful parse or one of mzstore's own
errors (:class:`MzstoreError` subclasses): never ``IndexError``,
``KeyError``, ``TypeError``, ``UnicodeError``, ``MemoryError`` or
``RecursionError``. Inputs are both random bytes and structured ones (valid
headers and manifests with one field mutated), which reach the deep checks.

CI runs a bounded number of examples per test (200, a few seconds in all);
run longer on demand::

    MZSTORE_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -m fuzz tests/test_fuzz.py
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mzstore.codecs import get_codec, native
from mzstore.errors import MzstoreError
from mzstore.format.dtypes import DTYPES, get_dtype
from mzstore.format.manifest import Chunk, FileEntry, Manifest, TensorEntry, parse_manifest, validate_relpath
from mzstore.format.refs import parse_ref
from mzstore.format.safetensors import METADATA_KEY, build_header, parse_header, read_header_len

pytestmark = pytest.mark.fuzz

EXAMPLES = int(os.environ.get("MZSTORE_FUZZ_EXAMPLES", "200"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64, 2**31]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["", "..", "../x", "/abs", "a\\b", "\x00", "\ud800", "F32", "U8", "sha256:" + "a" * 64, "a" * 64]),
)
_json = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)


def _only_own_errors(call: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return call(*args, **kwargs)
    except MzstoreError:
        return None


def _mutate(draw: st.DrawFn, obj: Any) -> Any:
    """Replace, delete or add one node somewhere inside a JSON object (in place)."""
    target = obj
    while True:
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        if not keys:
            break
        key = draw(st.sampled_from(keys))
        child = target[key]
        if not isinstance(child, (dict, list)) or draw(st.booleans()):
            action = draw(st.sampled_from(["set", "set", "delete", "add"]))
            if action == "set":
                target[key] = draw(_json)
            elif action == "delete":
                del target[key]
            elif isinstance(target, dict):
                target[draw(st.text(max_size=8))] = draw(_json)
            else:
                target.append(draw(_json))
            return obj
        target = child
    return obj


# --- safetensors ------------------------------------------------------------------


def _parse_file(data: bytes) -> None:
    n = read_header_len(data[:8], len(data))
    parse_header(data[8 : 8 + n], len(data))


_entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), _json_scalars),
        "shape": st.one_of(
            st.lists(st.integers(0, 2**64), max_size=17), st.lists(st.integers(-1, 9), max_size=3), _json
        ),
        "data_offsets": st.one_of(st.lists(st.integers(-1, 2**64), min_size=2, max_size=2), _json),
    }
)


@fuzz
@given(
    st.one_of(
        st.binary(max_size=512),
        st.binary(max_size=128).map(lambda b: struct.pack("<Q", len(b)) + b),
        st.binary(max_size=128).map(lambda b: struct.pack("<Q", len(b) + 1) + b"{" + b),
    )
)
def test_safetensors_random_bytes(data: bytes) -> None:
    _only_own_errors(_parse_file, data)


@fuzz
@given(
    st.dictionaries(st.one_of(st.just(METADATA_KEY), st.text(max_size=6)), st.one_of(_entries, _json), max_size=5),
    st.integers(0, 96),
    st.binary(max_size=4),
)
def test_safetensors_structured_headers(header: dict[str, Any], data_len: int, junk: bytes) -> None:
    text = json.dumps(header).encode() + junk
    _only_own_errors(_parse_file, struct.pack("<Q", len(text)) + text + bytes(data_len))
    _only_own_errors(parse_header, text, len(text) + 8 + data_len, max_tensors=2)


@fuzz
@given(st.data())
def test_safetensors_valid_header_one_mutation(data: st.DataObject) -> None:
    shapes = data.draw(st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=4))
    entries, pos = [], 0
    for i, shape in enumerate(shapes):
        n = 4 * int(np.prod(shape))
        entries.append((f"t{i}", "F32", tuple(shape), pos, pos + n))
        pos += n
    blob = build_header(entries, {"format": "pt"})
    obj = json.loads(blob[8:])
    text = json.dumps(_mutate(data.draw, obj)).encode()
    _only_own_errors(_parse_file, struct.pack("<Q", len(text)) + text + bytes(pos))


# --- manifests --------------------------------------------------------------------

DIGEST = "sha256:" + "a" * 64


def _manifest() -> Manifest:
    header = build_header([("w", "F32", (4, 2), 0, 32), ("b", "BF16", (3,), 32, 38)], None)[8:].decode()
    return Manifest(
        files=[
            FileEntry("model.safetensors", "safetensors", 8 + len(header) + 38, "b" * 64, header=header),
            FileEntry(
                "conf/config.json",
                "file",
                30,
                "c" * 64,
                chunks=[
                    Chunk(DIGEST, 0, 9, [0, 20], 20, "d" * 64, "zstd", {}),
                    Chunk(DIGEST, 9, 9, [20, 30], 10, "e" * 64, "zstd", {}),
                ],
            ),
        ],
        tensors=[
            TensorEntry(
                "model.safetensors",
                "w",
                "F32",
                [4, 2],
                [0, 32],
                "lossless",
                [
                    Chunk(DIGEST, 18, 10, [0, 3], 24, "f" * 64, "lossless", {"word": 4}),
                    Chunk(DIGEST, 28, 10, [3, 4], 8, "f" * 64, "lossless", {}),
                ],
            ),
            TensorEntry(
                "model.safetensors",
                "b",
                "BF16",
                [3],
                [32, 38],
                "lossless",
                [Chunk(DIGEST, 38, 7, [0, 3], 6, "1" * 64, "lossless", {})],
            ),
        ],
        source_kind="hf-dir",
        codec="lossless",
        bytes_raw=0,
        bytes_stored=0,
        annotations={"k": "v"},
    )


VALID_MANIFEST = _manifest().to_json()


def test_reference_manifest_is_valid() -> None:
    assert parse_manifest(VALID_MANIFEST).to_json() == VALID_MANIFEST


def _check_manifest(data: bytes) -> None:
    m = _only_own_errors(parse_manifest, data)
    if m is None:
        return
    # What a parsed manifest promises the pull side: paths stay inside, sizes are bounded.
    for f in m.files:
        validate_relpath(f.path)
        assert 0 <= f.size < 2**63
    for t in m.tensors:
        for c in t.chunks:
            assert 0 <= c.raw_length <= 2**30 and c.rows[0] <= c.rows[1]
    assert m.to_json() == parse_manifest(m.to_json()).to_json()


@fuzz
@given(st.binary(max_size=512))
def test_manifest_random_bytes(data: bytes) -> None:
    _check_manifest(data)


@fuzz
@given(_json)
def test_manifest_random_json(obj: Any) -> None:
    _check_manifest(json.dumps(obj).encode())


@fuzz
@given(st.data())
def test_manifest_one_or_two_mutations(data: st.DataObject) -> None:
    obj = json.loads(VALID_MANIFEST)
    for _ in range(data.draw(st.integers(1, 2))):
        _mutate(data.draw, obj)
    _check_manifest(json.dumps(obj).encode())


@fuzz
@given(st.binary(min_size=1, max_size=64), st.integers(0, len(VALID_MANIFEST)))
def test_manifest_byte_splices(junk: bytes, at: int) -> None:
    _check_manifest(VALID_MANIFEST[:at] + junk + VALID_MANIFEST[at + len(junk) :])


# --- references -------------------------------------------------------------------

_ref_alphabet = st.sampled_from([*list("aZ09._-/:@"), "sha256:", "a" * 64, "..", "\x00", "\\", " ", "é"])


@fuzz
@given(st.one_of(st.text(max_size=80), st.lists(_ref_alphabet, max_size=20).map("".join)))
def test_parse_ref(text: str) -> None:
    ref = _only_own_errors(parse_ref, text)
    if ref is not None:
        assert ".." not in ref.name.split("/") and "\x00" not in ref.name and not ref.name.startswith("/")
        assert parse_ref(str(ref)) == ref


# --- codec payloads (what a pull decodes from a hostile server) ------------------


@fuzz
@given(
    st.sampled_from(["lossless", "zstd", "quant"]),
    st.sampled_from(["F32", "BF16", "U8", "F16"]),
    st.integers(0, 4096),
    st.one_of(
        st.binary(max_size=256),
        st.binary(max_size=200).map(lambda b: b"MZL1" + b),
        st.binary(max_size=200).map(lambda b: b"MZQ1" + b),
        st.binary(max_size=200).map(lambda b: b"\x28\xb5\x2f\xfd" + b),
    ),
)
def test_codec_decode_random_payloads(codec: str, dtype: str, raw_len: int, payload: bytes) -> None:
    dt = get_dtype(dtype)
    raw_len -= raw_len % dt.itemsize
    core = native.core
    try:
        for each in (core, None) if core is not None else (None,):  # the native decoders, then numpy's
            native.core = each
            out = np.empty(raw_len, np.uint8)
            _only_own_errors(get_codec(codec).decode_into, payload, dt, out)
            decoded = _only_own_errors(get_codec(codec).decode, payload, dt, raw_len)
            if decoded is not None:
                assert len(decoded) == raw_len
    finally:
        native.core = core


# --- ReadBlob replies, read in place by the client --------------------------------------------------


@fuzz
@given(st.integers(0, 2**64 - 1), st.binary(max_size=3000))
def test_blob_piece_reads_what_protobuf_wrote(offset: int, data: bytes) -> None:
    from mzstore.transport.wire import blob_piece
    from mzstore.v1 import store_pb2 as pb

    got_offset, got = blob_piece(pb.BlobChunk(offset=offset, data=data).SerializeToString())
    assert (got_offset, bytes(got)) == (offset, data)


@fuzz
@given(st.integers(0, 2**64 - 1), st.binary(max_size=3000))
def test_blob_chunk_writes_what_protobuf_writes(offset: int, data: bytes) -> None:
    """The server's hand-encoded replies are byte for byte protobuf's, so any gRPC client reads them."""
    from mzstore.transport.wire import blob_chunk
    from mzstore.v1 import store_pb2 as pb

    wire = blob_chunk(offset, data)
    assert wire == pb.BlobChunk(offset=offset, data=data).SerializeToString()
    parsed = pb.BlobChunk.FromString(wire)
    assert (parsed.offset, parsed.data) == (offset, data)


def test_blob_piece_other_encodings_go_through_protobuf() -> None:
    from mzstore.errors import IntegrityError
    from mzstore.transport.wire import blob_piece
    from mzstore.v1 import store_pb2 as pb

    wire = pb.BlobChunk(offset=300, data=b"payload").SerializeToString()
    # Fields in the other order, and an unknown field (number 3, varint 7), which protobuf skips.
    reordered = wire[3:] + wire[:3]
    assert wire[:3] == b"\x08\xac\x02"
    assert (blob_piece(reordered)[0], bytes(blob_piece(reordered)[1])) == (300, b"payload")
    assert (blob_piece(wire + b"\x18\x07")[0], bytes(blob_piece(wire + b"\x18\x07")[1])) == (300, b"payload")
    for bad in (wire[:-1], b"\x12\x05ab", b"\x08", b"\xff\xff"):
        with pytest.raises(IntegrityError, match="malformed ReadBlob reply"):
            blob_piece(bad)


@fuzz
@given(st.binary(max_size=64))
def test_blob_piece_random_bytes(message: bytes) -> None:
    from mzstore.errors import IntegrityError
    from mzstore.transport.wire import blob_piece

    try:
        offset, data = blob_piece(message)
    except IntegrityError:
        return
    assert offset >= 0 and len(data) <= len(message)


# --- upload data messages, written by hand by the client and read in place by the server ------------


@fuzz
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=3000), st.text(max_size=40))
def test_file_data_writes_what_protobuf_writes(file: int, offset: int, data: bytes, session: str) -> None:
    """The client's hand-encoded data messages are byte for byte protobuf's, so any gRPC server reads them."""
    from mzstore.transport.wire import file_data
    from mzstore.v1 import store_pb2 as pb

    fd = pb.FileData(file=file, offset=offset, data=data)
    assert file_data(file, offset, data) == pb.PushRequest(data=fd).SerializeToString()
    assert file_data(file, offset, memoryview(data), session) == (
        pb.UploadRequest(session=session, data=fd).SerializeToString()
    )


def _as_protobuf_reads(kind: str, message: bytes) -> tuple[Any, ...] | str:
    """What a message means, read by ``mzstore.transport.wire`` and by protobuf: equal or both refused."""
    from google.protobuf.message import DecodeError

    from mzstore.transport import wire
    from mzstore.v1 import store_pb2 as pb

    parse, cls = (wire.push_request, pb.PushRequest) if kind == "push" else (wire.upload_request, pb.UploadRequest)
    try:
        expected = cls.FromString(message)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse(message)
        return "refused"
    got = parse(message)
    if isinstance(got, wire.FileDataMessage):
        assert expected.WhichOneof("msg") == "data"
        session = expected.session if kind == "upload" else ""
        want = (session, expected.data.file, expected.data.offset, expected.data.data)
        assert (got.session, got.file, got.offset, bytes(got.data)) == want
        return want
    assert got == expected
    return "protobuf"


@fuzz
@given(
    st.sampled_from(["push", "upload"]),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=300),
    st.text(max_size=20),
)
def test_upload_messages_read_in_place_as_protobuf_reads_them(
    kind: str, file: int, offset: int, data: bytes, session: str
) -> None:
    from mzstore.transport.wire import FileDataMessage, push_request, upload_request
    from mzstore.v1 import store_pb2 as pb

    fd = pb.FileData(file=file, offset=offset, data=data)
    if kind == "push":
        got = push_request(pb.PushRequest(data=fd).SerializeToString())
    else:
        got = upload_request(pb.UploadRequest(session=session, data=fd).SerializeToString())
    assert isinstance(got, FileDataMessage)  # protobuf's own encoding takes the in-place path
    assert (got.file, got.offset, bytes(got.data)) == (file, offset, data)
    assert got.session == (session if kind == "upload" else "")


@fuzz
@given(
    st.sampled_from(["push", "upload"]),
    st.binary(max_size=40),
    st.integers(0, 60),
    st.binary(min_size=1, max_size=3),
)
def test_upload_messages_damaged_mean_what_protobuf_says(kind: str, data: bytes, cut: int, junk: bytes) -> None:
    """Truncated, extended and overwritten encodings: the in-place reader agrees with protobuf, or both refuse."""
    from mzstore.transport.wire import file_data

    good = file_data(3, 300, data, "s" if kind == "upload" else "")
    _as_protobuf_reads(kind, good[:cut])
    _as_protobuf_reads(kind, good + junk)
    at = cut % len(good)
    _as_protobuf_reads(kind, good[:at] + junk + good[at + len(junk) :])


@fuzz
@given(st.sampled_from(["push", "upload"]), st.binary(max_size=64))
def test_upload_messages_random_bytes(kind: str, message: bytes) -> None:
    _as_protobuf_reads(kind, message)


def test_upload_messages_other_encodings_go_through_protobuf() -> None:
    from mzstore.transport.wire import FileDataMessage, push_request, upload_request
    from mzstore.v1 import store_pb2 as pb

    inner = b"\x1a\x03abc\x10\x05\x08\x02"  # FileData's fields in reverse order
    got = push_request(b"\x12" + bytes([len(inner)]) + inner)
    assert isinstance(got, pb.PushRequest) and (got.data.file, got.data.offset, got.data.data) == (2, 5, b"abc")
    # The session after the data, and a file index above uint32 (protobuf keeps its low 32 bits).
    got = upload_request(b"\x12\x05\x1a\x03abc\x0a\x01s")
    assert isinstance(got, pb.UploadRequest) and (got.session, got.data.data) == ("s", b"abc")
    big = b"\x12\x06\x08" + b"\x81\x80\x80\x80\x10"
    got = push_request(big)
    assert isinstance(got, pb.PushRequest) and got.data.file == 1
    # The begin and end messages are protobuf's; an explicit zero field is still read in place.
    end = pb.PushRequest(end=pb.FileEnd(file=1, size=2, sha256="ab")).SerializeToString()
    assert push_request(end) == pb.PushRequest.FromString(end)
    got = push_request(b"\x12\x02\x08\x00")
    assert isinstance(got, FileDataMessage) and (got.file, got.offset, bytes(got.data)) == (0, 0, b"")
