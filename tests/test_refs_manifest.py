"""Model references, relative paths and the manifest."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re

import pytest

import mzstore.format.manifest as manifest_mod
from mzstore.errors import FormatError, InvalidName
from mzstore.format.manifest import (
    SCHEMA,
    Chunk,
    FileEntry,
    Manifest,
    TensorEntry,
    digest_of,
    parse_manifest,
    validate_relpath,
)
from mzstore.format.refs import (
    DEFAULT_TAG,
    MAX_NAME_LENGTH,
    Ref,
    parse_ref,
    validate_digest,
    validate_name,
    validate_tag,
)

HEX_A = "a" * 64
HEX_B = "0123456789abcdef" * 4
DIGEST_A = "sha256:" + HEX_A
DIGEST_B = "sha256:" + HEX_B

# --- refs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "tag", "digest"),
    [
        ("org/model", "org/model", DEFAULT_TAG, None),
        ("model", "model", DEFAULT_TAG, None),
        ("org/model:v1", "org/model", "v1", None),
        ("org/team/model:1.0-rc_2", "org/team/model", "1.0-rc_2", None),
        ("org/model:_x", "org/model", "_x", None),
        (f"org/model@{DIGEST_A}", "org/model", DEFAULT_TAG, DIGEST_A),
        (f"org/model:v2@{DIGEST_B}", "org/model", "v2", DIGEST_B),
        ("Sentence-Transformers/All-MiniLM-L6-v2:Latest", "Sentence-Transformers/All-MiniLM-L6-v2", "Latest", None),
        ("a.b_c-d/e", "a.b_c-d/e", DEFAULT_TAG, None),
        ("0/9", "0/9", DEFAULT_TAG, None),
        ("x" * MAX_NAME_LENGTH, "x" * MAX_NAME_LENGTH, DEFAULT_TAG, None),
        ("org/model:" + "t" * 128, "org/model", "t" * 128, None),
    ],
)
def test_parse_ref_valid(text, name, tag, digest):
    ref = parse_ref(text)
    assert ref == Ref(name, tag, digest)
    assert (ref.name, ref.tag, ref.digest) == (name, tag, digest)
    # str() is a normal form that parses back to the same ref.
    assert parse_ref(str(ref)) == ref


def test_digest_wins_but_both_are_kept():
    ref = parse_ref(f"org/model:v3@{DIGEST_A}")
    assert ref.tag == "v3" and ref.digest == DIGEST_A
    assert str(ref) == f"org/model:v3@{DIGEST_A}"
    assert str(parse_ref("org/model")) == "org/model:latest"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "..",
        ".",
        "a/../b",
        "a/./b",
        "a//b",
        "/a",
        "a/",
        "a\x00b",
        "x" * (MAX_NAME_LENGTH + 1),
        "x" * 1000,
        "-a",
        "a-",
        "a..b",
        "a b",
        "a\\b",
        "ü/model",
        "org/model:",
        "org/model:v/1",
        "org/model:.v1",
        "org/model:-v1",
        "org/model:v..1",
        "org/model:" + "t" * 129,
        "org/model:a:b",
        "org/model@",
        "org/model@sha256:abc",
        "org/model@sha256:" + "A" * 64,
        "org/model@sha256:" + "a" * 63,
        "org/model@sha256:" + "a" * 65,
        "org/model@sha256:" + "g" * 64,
        "org/model@md5:" + "a" * 32,
        "org/model@sha512:" + "a" * 64,
        "org/model@" + HEX_A,
        f"org/model@{DIGEST_A}@{DIGEST_A}",
        f"@{DIGEST_A}",
        ":v1",
        "localhost:5000/org/model",
    ],
)
def test_parse_ref_invalid(text):
    with pytest.raises(InvalidName):
        parse_ref(text)


@pytest.mark.parametrize("value", [None, 5, b"org/model"])
def test_parse_ref_non_string(value):
    with pytest.raises(InvalidName):
        parse_ref(value)


def test_invalid_name_is_value_error():
    assert issubclass(InvalidName, ValueError)
    with pytest.raises(ValueError):
        parse_ref("a//b")


def test_validators_return_input_and_name_the_problem():
    assert validate_name("Org/Model-1") == "Org/Model-1"
    assert validate_tag("v1.2") == "v1.2"
    assert validate_digest(DIGEST_B) == DIGEST_B
    with pytest.raises(InvalidName, match="empty"):
        validate_name("")
    with pytest.raises(InvalidName, match="255"):
        validate_name("x" * 256)
    with pytest.raises(InvalidName, match="NUL"):
        validate_name("a\x00")
    with pytest.raises(InvalidName, match=re.escape("'..'")):
        validate_name("a/../b")
    with pytest.raises(InvalidName, match="tag"):
        validate_tag("a/b")
    with pytest.raises(InvalidName, match="digest"):
        validate_digest("md5:" + "a" * 32)


# --- validate_relpath ---------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["../x", "/abs", "a/../b", "a\\b", "", "a//b", "./a", "a/./b", "a/", ".", "..", "a/..", "a\x00b", "x" * 5000, None],
)
def test_validate_relpath_rejects(path):
    with pytest.raises(FormatError):
        validate_relpath(path)


@pytest.mark.parametrize(
    "path",
    ["a/b.json", "1_Pooling/config.json", "model.safetensors", "tokenizer.json", ".gitattributes", "a/.b/c", "ü.txt"],
)
def test_validate_relpath_accepts(path):
    assert validate_relpath(path) == path


# --- manifest -------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_manifest() -> Manifest:
    """A two-file model: one safetensors file with two tensors (one chunked), one plain file."""
    header = '{"a":{"dtype":"F32","shape":[4,2],"data_offsets":[0,32]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[32,38]}}  '
    a_chunks = [
        Chunk(DIGEST_A, 0, 10, [0, 2], 16, _sha(b"a0"), "lossless", {"word": 4, "rotate": True, "zstd_level": 1}),
        Chunk(DIGEST_A, 10, 12, [2, 4], 16, _sha(b"a1"), "lossless", {"word": 4, "rotate": True, "zstd_level": 1}),
    ]
    b_chunks = [Chunk(DIGEST_B, 0, 7, [0, 3], 6, _sha(b"b"), "lossless", {"word": 2, "rotate": True})]
    files = [
        FileEntry("model.safetensors", "safetensors", 8 + len(header) + 38, _sha(b"model"), header=header),
        FileEntry(
            "1_Pooling/config.json",
            "file",
            120,
            _sha(b"config"),
            chunks=[
                Chunk(DIGEST_B, 7, 50, [0, 100], 100, _sha(b"c0"), "zstd", {"zstd_level": 1}),
                Chunk(DIGEST_B, 57, 9, [100, 120], 20, _sha(b"c1"), "zstd", {}),
            ],
        ),
    ]
    tensors = [
        TensorEntry("model.safetensors", "a", "F32", [4, 2], [0, 32], "lossless", a_chunks),
        TensorEntry("model.safetensors", "b", "BF16", [3], [32, 38], "lossless", b_chunks),
    ]
    return Manifest(
        files=files,
        tensors=tensors,
        source_kind="local",
        codec="lossless",
        bytes_raw=158,
        bytes_stored=88,
        annotations={"source": "unit test", "note": "ünïcode ☃"},
    )


def fields(m: Manifest) -> dict:
    d = dataclasses.asdict(m)
    d.pop("manifest_bytes")
    return d


def manifest_obj() -> dict:
    return json.loads(make_manifest().to_json())


def dump(obj: dict) -> bytes:
    return json.dumps(obj).encode()


def test_to_json_is_canonical():
    m = make_manifest()
    data = m.to_json()
    assert isinstance(data, bytes)
    assert data == m.to_json()
    assert data == make_manifest().to_json()
    data.decode("ascii")  # ASCII only, even with non-ASCII annotations
    assert b"\\u2603" in data  # the snowman is escaped
    obj = json.loads(data)
    # Sorted keys and compact separators: re-dumping canonically gives the same bytes.
    assert json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() == data
    assert list(obj) == sorted(obj)
    assert list(obj["files"][0]) == sorted(obj["files"][0])
    assert list(obj["tensors"][0]["chunks"][0]) == sorted(obj["tensors"][0]["chunks"][0])
    assert obj["schema"] == SCHEMA
    assert obj["annotations"]["note"] == "ünïcode ☃"
    # A plain file has no header key at all.
    assert "header" not in obj["files"][1]


def test_to_json_independent_of_dict_insertion_order():
    m1 = make_manifest()
    m2 = make_manifest()
    m2.annotations = dict(reversed(list(m2.annotations.items())))
    m2.tensors[0].chunks[0].params = dict(reversed(list(m2.tensors[0].chunks[0].params.items())))
    assert m1.to_json() == m2.to_json()


def test_round_trip():
    m = make_manifest()
    data = m.to_json()
    parsed = parse_manifest(data)
    assert fields(parsed) == fields(m)
    assert parsed.manifest_bytes == len(data)
    assert parsed.to_json() == data
    assert parsed.digest == m.digest
    assert parsed.blobs() == {DIGEST_A, DIGEST_B}
    assert [t.name for t in parsed.tensors_of("model.safetensors")] == ["a", "b"]
    assert parsed.tensors_of("1_Pooling/config.json") == []
    assert parsed.files[0].header == m.files[0].header  # padding kept verbatim
    assert parsed.stored_total == m.bytes_stored + len(data)


def test_digest_is_sha256_of_bytes():
    m = make_manifest()
    data = m.to_json()
    assert m.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert digest_of(data) == m.digest
    assert digest_of(memoryview(data)) == m.digest
    m.annotations["x"] = "y"
    assert m.digest != digest_of(data)


def test_empty_manifest_round_trips():
    m = Manifest(files=[], tensors=[], source_kind="hf", codec="zstd", bytes_raw=0, bytes_stored=0)
    parsed = parse_manifest(m.to_json())
    assert fields(parsed) == fields(m)


# Each mutation turns a valid manifest object into an invalid one.
def _set(path, value):
    def mutate(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path):
    def mutate(obj):
        target = obj
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


T0C0 = ("tensors", 0, "chunks", 0)
F1C0 = ("files", 1, "chunks", 0)

INVALID = {
    "wrong schema": _set(("schema",), "mzstore.manifest.v2"),
    "no schema": _delete(("schema",)),
    "chunk sha256 short": _set((*T0C0, "sha256"), "a" * 63),
    "chunk sha256 uppercase": _set((*T0C0, "sha256"), "A" * 64),
    "chunk sha256 prefixed": _set((*T0C0, "sha256"), DIGEST_A),
    "chunk sha256 not str": _set((*T0C0, "sha256"), 5),
    "file chunk sha256": _set((*F1C0, "sha256"), "z" * 64),
    "chunk with no decoded hash": _delete((*T0C0, "sha256")),
    "chunk with both hashes": _set((*T0C0, "blake3"), HEX_A),
    "chunk blake3 short": lambda o: (o["tensors"][0]["chunks"][0].pop("sha256"), _set((*T0C0, "blake3"), "b" * 63)(o)),
    "chunk blob not a digest": _set((*T0C0, "blob"), HEX_A),
    "negative chunk offset": _set((*T0C0, "offset"), -1),
    "negative chunk length": _set((*T0C0, "length"), -5),
    "negative file size": _set(("files", 0, "size"), -1),
    "negative sizes.raw": _set(("sizes", "raw"), -1),
    "negative data_offsets": _set(("tensors", 1, "data_offsets"), [-6, 0]),
    "negative dim": _set(("tensors", 0, "shape"), [-4, -2]),
    "bool offset": _set((*T0C0, "offset"), False),
    "bool length": _set((*T0C0, "length"), True),
    "bool raw_length": _set(("tensors", 1, "chunks", 0, "raw_length"), True),
    "bool file size": _set(("files", 1, "size"), True),
    "bool sizes.stored": _set(("sizes", "stored"), False),
    "bool dim": _set(("tensors", 1, "shape"), [True]),
    "bool rows": _set((*T0C0, "rows"), [False, 2]),
    "float offset": _set((*T0C0, "offset"), 0.0),
    "string length": _set((*T0C0, "length"), "10"),
    "rows reversed": _set((*T0C0, "rows"), [2, 0]),
    "rows wrong arity": _set((*T0C0, "rows"), [0, 1, 2]),
    "chunk missing codec": _delete((*T0C0, "codec")),
    "chunk params not dict": _set((*T0C0, "params"), []),
    "chunk not object": _set(T0C0, "chunk"),
    "raw_length sum too small": _set((*T0C0, "raw_length"), 15),
    "raw_length sum too large": _set(("tensors", 1, "chunks", 0, "raw_length"), 7),
    "tensor chunk missing": _set(("tensors", 0, "chunks"), [{}]),
    "shape does not match offsets": _set(("tensors", 0, "shape"), [4, 3]),
    "sub-byte shape": _set(("tensors", 1, "dtype"), "F4"),
    "unknown dtype": _set(("tensors", 1, "dtype"), "F128"),
    "unknown file": _set(("tensors", 0, "file"), "other.safetensors"),
    "file with dotdot": _set(("files", 1, "path"), "../config.json"),
    "absolute file": _set(("files", 1, "path"), "/etc/passwd"),
    "backslash file": _set(("files", 1, "path"), "1_Pooling\\config.json"),
    "duplicate file paths": _set(("files", 1, "path"), "model.safetensors"),
    "unknown file kind": _set(("files", 1, "kind"), "symlink"),
    "safetensors without header": _delete(("files", 0, "header")),
    "files not list": _set(("files",), {}),
    "tensors not list": _set(("tensors",), None),
    "file not object": _set(("files", 0), "model.safetensors"),
    "tensor not object": _set(("tensors", 0), 3),
    "no sizes": _delete(("sizes",)),
    "no source kind": _delete(("source", "kind")),
    "annotation not str": _set(("annotations", "note"), 3),
    "codec not str": _set(("codec",), None),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_parse_manifest_rejects(case):
    obj = manifest_obj()
    before = copy.deepcopy(obj)
    INVALID[case](obj)
    assert dump(obj) != dump(before), "mutation did nothing"
    with pytest.raises(FormatError):
        parse_manifest(dump(obj))


def test_parse_manifest_accepts_unmutated_object():
    # The mutation table starts from a manifest that does parse.
    assert fields(parse_manifest(dump(manifest_obj()))) == fields(make_manifest())


def test_rejection_messages_name_the_problem():
    obj = manifest_obj()
    obj["tensors"][0]["chunks"][0]["sha256"] = "nothex"
    with pytest.raises(FormatError, match=r"tensors\[0\]\.chunks\[0\]\.sha256"):
        parse_manifest(dump(obj))
    obj = manifest_obj()
    obj["tensors"][0]["chunks"][1]["offset"] = -3
    with pytest.raises(FormatError, match=r"chunks\[1\]\.offset is negative"):
        parse_manifest(dump(obj))
    obj = manifest_obj()
    obj["tensors"][1]["file"] = "nope.safetensors"
    with pytest.raises(FormatError, match="unknown file"):
        parse_manifest(dump(obj))
    obj = manifest_obj()
    obj["tensors"][1]["chunks"][0]["raw_length"] = 5
    with pytest.raises(FormatError, match="do not add up"):
        parse_manifest(dump(obj))
    obj = manifest_obj()
    obj["files"].append(copy.deepcopy(obj["files"][1]))
    with pytest.raises(FormatError, match="duplicate"):
        parse_manifest(dump(obj))
    obj = manifest_obj()
    obj["schema"] = "other"
    with pytest.raises(FormatError, match="schema"):
        parse_manifest(dump(obj))


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"{", b"\xff\xfe\xfd", b"[]", b"null", b"42", b'"mzstore.manifest.v1"', b"{}", b"\x00" * 16],
)
def test_parse_manifest_rejects_non_manifests(data):
    with pytest.raises(FormatError):
        parse_manifest(data)


def test_parse_manifest_oversize(monkeypatch):
    data = make_manifest().to_json()
    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_BYTES", len(data))
    assert fields(parse_manifest(data)) == fields(make_manifest())
    monkeypatch.setattr(manifest_mod, "MAX_MANIFEST_BYTES", len(data) - 1)
    with pytest.raises(FormatError, match="larger than the limit"):
        parse_manifest(data)
    # The size check comes first: oversize garbage is rejected for its size.
    with pytest.raises(FormatError, match="larger than the limit"):
        parse_manifest(b"\xff" * len(data))


def test_parse_manifest_deep_nesting_is_format_error():
    with pytest.raises(FormatError):
        parse_manifest(b"[" * 100_000 + b"]" * 100_000)


def test_parse_manifest_huge_integer_is_format_error():
    canonical = make_manifest().to_json()
    data = canonical.replace(b'"raw":158', b'"raw":' + b"9" * 5000)
    assert data != canonical
    with pytest.raises(FormatError):
        parse_manifest(data)


def test_parse_manifest_rejects_file_chunks_that_do_not_add_up():
    m = make_manifest()
    m.files[1].size = 121
    with pytest.raises(FormatError, match="do not add up"):
        parse_manifest(m.to_json())


def test_parse_manifest_rejects_tensor_outside_its_file():
    m = make_manifest()
    m.files[0].size = 20
    with pytest.raises(FormatError, match="outside its file"):
        parse_manifest(m.to_json())
