"""Input limits (issue #6): each one gives a clear one-line error before anything is allocated or stored.

Ingest runs directly over a :class:`Store` in a temp directory (no server):
the limits are the ingest's, the server only passes them through.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard
from conftest import store_files

from mzstore.codecs import get_codec
from mzstore.codecs.lossless import LosslessCodec, ZstdCodec
from mzstore.errors import CodecError, FormatError, IntegrityError, InvalidArgument, MzstoreError, ResourceExhausted
from mzstore.format import manifest as manifest_mod
from mzstore.format.dtypes import get_dtype
from mzstore.format.manifest import Chunk, FileEntry, Manifest, TensorEntry, parse_manifest
from mzstore.format.safetensors import build_header, parse_header, read_header_len
from mzstore.limits import DEFAULT_MAX_UPLOAD_BYTES
from mzstore.pull.pipeline import decode_verified
from mzstore.push.ingest import Ingest
from mzstore.push.protocol import UploadBegin, UploadData, UploadEnd, UploadFile, validate_begin
from mzstore.settings import Limits, load_settings
from mzstore.storage.store import Store

MiB = 1024 * 1024
U8 = get_dtype("U8")
F32 = get_dtype("F32")


def _st_file(tensors: dict[str, np.ndarray]) -> bytes:
    entries, data, pos = [], b"", 0
    for name, arr in tensors.items():
        raw = arr.tobytes()
        entries.append((name, "F32", arr.shape, pos, pos + len(raw)))
        data += raw
        pos += len(raw)
    return build_header(entries, None) + data


def _events(files: list[bytes]) -> Iterator[UploadData | UploadEnd]:
    for i, data in enumerate(files):
        for off in range(0, len(data), 4096):
            yield UploadData(i, off, data[off : off + 4096])
        yield UploadEnd(i, len(data), hashlib.sha256(data).hexdigest())


def _push(root: Path, files: list[bytes], limits: Limits | None = None, sizes: list[int] | None = None) -> None:
    begin = UploadBegin(
        ref="test/limits:v1",
        codec="lossless",
        files=[
            UploadFile(f"m{i}.safetensors", len(d) if sizes is None else sizes[i], "safetensors")
            for i, d in enumerate(files)
        ],
        source_kind="hf-dir",
    )
    ingest = Ingest(Store(root), chunk_bytes=MiB, shard_bytes=64 * MiB, spool_dir=root / "tmp", limits=limits)
    ingest.run(begin, _events(files))


def _assert_rejected(root: Path, exc_type: type[MzstoreError], match: str, run: Callable[[], Any]) -> None:
    """``run`` fails with one line, stores nothing, and allocates under 8 MiB."""
    before = store_files(root)
    tracemalloc.start()
    try:
        with pytest.raises(exc_type, match=match) as exc:
            run()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(exc.value)
    assert peak < 8 * MiB, f"{peak} bytes allocated before the error"
    assert store_files(root) == before


# --- push limits ----------------------------------------------------------------


def test_within_limits_push_succeeds(tmp_path: Path) -> None:
    _push(tmp_path / "s", [_st_file({"a": np.ones(4, np.float32), "b": np.zeros(2, np.float32)})])
    assert any(p.startswith("refs/") for p in store_files(tmp_path / "s"))


def test_header_bytes_limit(tmp_path: Path) -> None:
    data = _st_file({"w" * 200: np.ones(4, np.float32)})
    _assert_rejected(
        tmp_path,
        FormatError,
        "exceeds the 100-byte limit",
        lambda: _push(tmp_path, [data], Limits(header_bytes=100)),
    )


def test_tensors_per_file_limit(tmp_path: Path) -> None:
    data = _st_file({f"t{i}": np.ones(1, np.float32) for i in range(5)})
    _assert_rejected(
        tmp_path, FormatError, "5 tensors, more than the limit of 4", lambda: _push(tmp_path, [data], Limits(tensors=4))
    )
    with pytest.raises(FormatError, match="more than the limit of 4"):
        n = read_header_len(data[:8], len(data))
        parse_header(data[8 : 8 + n], len(data), max_tensors=4)


def test_tensors_per_push_limit(tmp_path: Path) -> None:
    files = [_st_file({f"f{j}t{i}": np.ones(1, np.float32) for i in range(3)}) for j in range(2)]
    _assert_rejected(
        tmp_path, ResourceExhausted, "more than 4 tensors", lambda: _push(tmp_path, files, Limits(tensors=4))
    )


def test_files_per_push_limit(tmp_path: Path) -> None:
    files = [_st_file({"a": np.ones(1, np.float32)})] * 3
    _assert_rejected(
        tmp_path,
        ResourceExhausted,
        "3 files, more than the limit of 2",
        lambda: _push(tmp_path, files, Limits(files=2)),
    )


def test_upload_bytes_limit_before_any_data(tmp_path: Path) -> None:
    data = _st_file({"a": np.ones(1000, np.float32)})
    _assert_rejected(
        tmp_path,
        ResourceExhausted,
        "more than the limit of 1000",
        lambda: _push(tmp_path, [data], Limits(upload_bytes=1000)),
    )
    # A declared size of petabytes is refused at begin, whatever follows.
    _assert_rejected(
        tmp_path, ResourceExhausted, "MZSTORE_MAX_UPLOAD_BYTES", lambda: _push(tmp_path, [data], sizes=[2**52])
    )


def test_declared_size_beyond_int64_is_invalid() -> None:
    begin = UploadBegin("a/b:v1", "lossless", [UploadFile("m.safetensors", 2**64, "safetensors")])
    with pytest.raises(InvalidArgument, match="invalid size"):
        validate_begin(begin)


def test_client_side_validation_does_not_apply_server_limits() -> None:
    files = [UploadFile(f"f{i}", 2**50, "file") for i in range(3)]
    validate_begin(UploadBegin("a/b:v1", "lossless", files))  # the server decides on its limits
    with pytest.raises(ResourceExhausted):
        validate_begin(UploadBegin("a/b:v1", "lossless", files), Limits(files=2))


def test_chunk_bytes_setting_is_capped(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="chunk size"):
        Ingest(Store(tmp_path), chunk_bytes=manifest_mod.MAX_CHUNK_BYTES, shard_bytes=MiB)


def test_limits_from_environment() -> None:
    limits = load_settings(
        {
            "MZSTORE_MAX_HEADER_BYTES": "1000",
            "MZSTORE_MAX_TENSORS": "7",
            "MZSTORE_MAX_FILES": "3",
            "MZSTORE_MAX_UPLOAD_BYTES": "12345",
        }
    ).limits
    assert limits == Limits(header_bytes=1000, tensors=7, files=3, upload_bytes=12345)
    assert load_settings({}).limits.upload_bytes == DEFAULT_MAX_UPLOAD_BYTES
    with pytest.raises(InvalidArgument, match="MZSTORE_MAX_TENSORS"):
        load_settings({"MZSTORE_MAX_TENSORS": "0"})


# --- sizes in a header are checked before any allocation ------------------------


def test_header_declaring_2_60_bytes_is_rejected_without_allocating(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2**29, 2**29], "data_offsets": [0, 2**60]}}).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(64)
    _assert_rejected(tmp_path, FormatError, "larger than the file|outside", lambda: _push(tmp_path, [data]))
    # Even when the declared upload size matches, the header is refused before any chunk buffer exists.
    _assert_rejected(
        tmp_path,
        ResourceExhausted,
        "more than the limit",
        lambda: _push(tmp_path, [data], sizes=[8 + len(header) + 2**60]),
    )


# --- decompressed size is capped by the declared size (zstd bombs) --------------


def _bomb(size: int = 64 * MiB, declare: bool = False) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=declare).compress(bytes(size))


def _frame_claiming(size: int) -> bytes:
    """A tiny valid frame whose header claims ``size`` bytes of content."""
    frame = bytearray(zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 300))
    # Frame header descriptor: set FCS to 8 bytes (flag 3), single segment; then patch the size field.
    assert zstandard.get_frame_parameters(bytes(frame)).content_size == 300
    descriptor = frame[4]
    fcs_flag = descriptor >> 6
    old_len = {0: 1, 1: 2, 2: 4, 3: 8}[fcs_flag] if descriptor & 0x20 or fcs_flag else 0
    start = 5 + (0 if descriptor & 0x20 else 1) + {0: 0, 1: 1, 2: 2, 3: 4}[descriptor & 3]
    new = bytearray(frame[:4]) + bytes([(descriptor & 0x3F) | 0xC0]) + frame[5:start]
    new += struct.pack("<Q", size) + frame[start + old_len :]
    assert zstandard.get_frame_parameters(bytes(new)).content_size == size
    return bytes(new)


@pytest.mark.parametrize("payload", ["undeclared bomb", "declared bomb", "claims 2**62", "second frame"])
def test_zstd_bomb_is_codec_error_not_memory_error(payload: str, tmp_path: Path) -> None:
    data = {
        "undeclared bomb": lambda: _bomb(),
        "declared bomb": lambda: _bomb(declare=True),
        "claims 2**62": lambda: _frame_claiming(2**62),
        "second frame": lambda: _bomb(10, declare=True) * 2,
    }[payload]()
    codec = ZstdCodec()
    _assert_rejected(tmp_path, CodecError, "zstd", lambda: codec.decode(data, U8, 10))
    _assert_rejected(tmp_path, CodecError, "zstd", lambda: codec.decode_into(data, U8, np.empty(10, np.uint8)))


def test_zstd_bomb_in_a_lossless_plane(tmp_path: Path) -> None:
    payload, _ = LosslessCodec().encode(np.arange(4096, dtype=np.float32).tobytes(), F32)
    head, table = payload[:8], payload[8 : 8 + 4 * 9]
    bomb = _bomb()
    # Plane 0 becomes a zstd frame expanding to 64 MiB; the others are raw planes.
    planes = [bomb, bytes(4096), bytes(4096), bytes(4096)]
    table = b"".join(struct.pack("<BQ", 1 if i == 0 else 0, len(p)) for i, p in enumerate(planes))
    crafted = head + table + b"".join(planes)
    _assert_rejected(tmp_path, CodecError, "zstd", lambda: LosslessCodec().decode(crafted, F32, 4 * 4096))


def test_zstd_bomb_in_a_quantized_section(tmp_path: Path) -> None:
    from mzstore.codecs.policy import parse_policy
    from mzstore.codecs.quant import _HEAD, _SECTION, encode_spec

    spec = parse_policy("int8").spec
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    enc = encode_spec(x.tobytes(), F32, 64, spec)
    view = memoryview(enc.payload)
    fields = _HEAD.unpack_from(view, 0)
    nsec = fields[-1]
    pos = _HEAD.size + nsec * _SECTION.size
    sections = []
    for i in range(nsec):
        sid, coding, stored, raw = _SECTION.unpack_from(view, _HEAD.size + i * _SECTION.size)
        sections.append([sid, coding, stored, raw, bytes(view[pos : pos + stored])])
        pos += stored
    bomb = _bomb()
    for s in sections:  # every section keeps its recorded size but gets a bomb for a body
        s[1], s[2], s[4] = 1, len(bomb), bomb
    crafted = enc.payload[: _HEAD.size] + b"".join(_SECTION.pack(*s[:4]) for s in sections)
    crafted += b"".join(s[4] for s in sections)
    _assert_rejected(tmp_path, CodecError, "zstd", lambda: get_codec("quant").decode(crafted, F32, x.nbytes))


def test_zstd_bomb_chunk_fails_a_pull_with_integrity_error(tmp_path: Path) -> None:
    bomb = _bomb()
    chunk = Chunk("sha256:" + "0" * 64, 0, len(bomb), [0, 10], 10, "0" * 64, "zstd", {})
    out = np.empty(10, np.uint8)
    _assert_rejected(
        tmp_path, IntegrityError, "does not decode", lambda: decode_verified(chunk, "U8", "config.json", bomb, out)
    )


# --- manifest limits -------------------------------------------------------------

DIGEST = "sha256:" + "a" * 64


def _manifest_obj() -> dict[str, Any]:
    header = build_header([("w", "F32", (4, 2), 0, 32)], None)[8:].decode()
    m = Manifest(
        files=[
            FileEntry("model.safetensors", "safetensors", 8 + len(header) + 32, "b" * 64, header=header),
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
                    Chunk(DIGEST, 18, 10, [0, 3], 24, "f" * 64, "lossless", {}),
                    Chunk(DIGEST, 28, 10, [3, 4], 8, "f" * 64, "lossless", {}),
                ],
            )
        ],
        source_kind="hf-dir",
        codec="lossless",
        bytes_raw=0,
        bytes_stored=0,
    )
    return json.loads(m.to_json())


def _mutated(path: tuple[Any, ...], value: Any) -> bytes:
    obj = copy.deepcopy(_manifest_obj())
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(obj).encode()


def test_reference_manifest_parses() -> None:
    m = parse_manifest(json.dumps(_manifest_obj()).encode())
    assert [f.path for f in m.files] == ["model.safetensors", "conf/config.json"]


@pytest.mark.parametrize(
    "path",
    ["../evil", "conf/../../evil", "/etc/passwd", "conf\\..\\evil", "evil\x00.txt", "./evil", "conf//evil", ""],
)
def test_path_traversal_in_manifest_is_rejected(path: str) -> None:
    with pytest.raises(FormatError, match="invalid file path"):
        parse_manifest(_mutated(("files", 1, "path"), path))


def test_file_path_under_another_file_is_rejected() -> None:
    with pytest.raises(FormatError, match="lies inside file"):
        parse_manifest(_mutated(("files", 1, "path"), "model.safetensors/config.json"))


T = ("tensors", 0)
C0 = ("tensors", 0, "chunks", 0)
F1 = ("files", 1)

MANIFEST_LIMITS: dict[str, tuple[tuple[Any, ...], Any, str]] = {
    "offset beyond int64": ((*C0, "offset"), 2**63, "larger than 2\\*\\*63"),
    "offset + length beyond int64": ((*C0, "offset"), 2**63 - 5, "offset \\+ length"),
    "raw_length above the chunk limit": ((*C0, "raw_length"), 2**31, "chunk limit"),
    "stored length above the chunk limit": ((*C0, "length"), 2**31, "chunk limit"),
    "file size beyond int64": ((*F1, "size"), 2**64, "larger than 2\\*\\*63"),
    "shape of 2**70 bytes": ((*T, "shape"), [2**34, 2**34], "larger than 2\\*\\*63"),
    "rank above 16": ((*T, "shape"), [1] * 17, "shape is invalid"),
    "rows beyond the shape": ((*C0, "rows"), [0, 5], "exceed the tensor"),
    "rows that do not match the bytes": ((*C0, "rows"), [0, 2], "do not match its bytes"),
    "file chunk rows off": ((*F1, "chunks", 1, "rows"), [21, 31], "do not continue"),
    "tensor not in its header": ((*T, "name"), "other", "does not match its header"),
    "header lists another dtype": ((*T, "dtype"), "I32", "does not match its header"),
    "header longer than the file": (("files", 0, "size"), 10, "outside its file"),
    "header not utf-8": (("files", 0, "header"), "\ud800", "not encodable"),
    "file sha256 not hex": ((*F1, "sha256"), "zz", "sha256 is invalid"),
    "empty codec name": ((*C0, "codec"), "", "codec is invalid"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_LIMITS))
def test_manifest_limit(case: str) -> None:
    path, value, match = MANIFEST_LIMITS[case]
    with pytest.raises(FormatError, match=match) as exc:
        parse_manifest(_mutated(path, value))
    assert "\n" not in str(exc.value)


def test_manifest_tensor_and_file_counts() -> None:
    data = json.dumps(_manifest_obj()).encode()
    with pytest.raises(FormatError, match="1 tensors, more than the limit of 0"):
        parse_manifest(data, max_tensors=0)
    with pytest.raises(FormatError, match="2 files, more than the limit of 1"):
        parse_manifest(data, max_files=1)
