"""The manifest: what a model is and where its bytes are.

A manifest is canonical JSON (sorted keys, no spaces, ASCII) addressed by
the sha256 of those bytes. It records:

* ``files``: the source layout in upload order. A ``safetensors`` file keeps
  its original header bytes verbatim, so a pull rewrites the very same file
  (same sha256); every other file (``config.json``, tokenizer…) is a run of
  zstd chunks.
* ``tensors``: per tensor, dtype, shape, codec policy and its ``chunks``;
  each chunk names its blob digest, offset and length in that blob, the row
  range it covers, its codec parameters and the sha256 of its decoded bytes.
* ``sizes``: raw and stored bytes; ``annotations``: free lineage notes.

:func:`parse_manifest` validates structure, types and bounds before any
field is used, so a corrupt or hostile manifest is a :class:`FormatError`,
never a crash or a huge allocation.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

from mzstore.errors import FormatError
from mzstore.format.dtypes import get_dtype, nbytes_for
from mzstore.format.refs import validate_digest

SCHEMA = "mzstore.manifest.v1"
MAX_MANIFEST_BYTES = 512 * 1024 * 1024
MAX_PATH_BYTES = 4096


@dataclass
class Chunk:
    """One independently decodable piece of a tensor or file.

    Attributes:
        blob: ``sha256:<hex>`` of the shard holding it.
        offset: byte offset of the encoded chunk inside the blob.
        length: encoded (stored) length.
        rows: ``[start, end)`` along dim 0 (for files: byte range).
        raw_length: decoded length in bytes.
        sha256: hex sha256 of the decoded bytes.
        codec: codec name.
        params: codec parameters chosen at encode time.
    """

    blob: str
    offset: int
    length: int
    rows: list[int]
    raw_length: int
    sha256: str
    codec: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TensorEntry:
    """A tensor of a source safetensors file."""

    file: str
    name: str
    dtype: str
    shape: list[int]
    data_offsets: list[int]
    codec: str
    chunks: list[Chunk]
    #: Error of lossy stages against the original: cosine, snr_db (None = exact), max_abs_err.
    fidelity: dict[str, float | None] | None = None


@dataclass
class FileEntry:
    """A source file.

    ``kind`` is ``"safetensors"`` (then ``header`` is the original JSON
    header text, padding included, and its tensors are in ``tensors``) or
    ``"file"`` (then ``chunks`` hold its bytes).
    """

    path: str
    kind: str
    size: int
    sha256: str
    header: str | None = None
    chunks: list[Chunk] = field(default_factory=list)


@dataclass
class Manifest:
    """A whole model."""

    files: list[FileEntry]
    tensors: list[TensorEntry]
    source_kind: str
    codec: str
    bytes_raw: int
    bytes_stored: int
    annotations: dict[str, str] = field(default_factory=dict)
    schema: str = SCHEMA
    #: Length of the manifest's own bytes when parsed (not serialized).
    manifest_bytes: int = 0

    @property
    def stored_total(self) -> int:
        """What the model costs in the store: blob bytes plus the manifest."""
        return self.bytes_stored + (self.manifest_bytes or len(self.to_json()))

    def to_json(self) -> bytes:
        """Canonical bytes: sorted keys, compact separators, ASCII only."""
        obj = {
            "schema": self.schema,
            "source": {"kind": self.source_kind},
            "codec": self.codec,
            "files": [_strip(asdict(f)) for f in self.files],
            "tensors": [_strip(asdict(t)) for t in self.tensors],
            "sizes": {"raw": self.bytes_raw, "stored": self.bytes_stored},
            "annotations": dict(self.annotations),
        }
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @property
    def digest(self) -> str:
        return digest_of(self.to_json())

    def blobs(self) -> set[str]:
        """Every blob digest this manifest references."""
        out = {c.blob for t in self.tensors for c in t.chunks}
        out.update(c.blob for f in self.files for c in f.chunks)
        return out

    def tensors_of(self, path: str) -> list[TensorEntry]:
        return [t for t in self.tensors if t.file == path]


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def digest_of(data: bytes | memoryview) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def validate_relpath(path: str) -> str:
    """Check a source-relative file path: '/'-separated, no '..', no absolute paths.

    Raises:
        FormatError: if it could escape the output directory.
    """
    if (
        not isinstance(path, str)
        or not path
        or len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES
        or "\x00" in path
        or "\\" in path
        or path.startswith("/")
        or posixpath.normpath(path) != path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise FormatError(f"invalid file path {str(path)[:200]!r} (must be relative, no '..')")
    return path


# --- parsing -----------------------------------------------------------------


def _req(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise FormatError(f"manifest: {where} lacks {key!r}")
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise FormatError(f"manifest: {where}.{key} has the wrong type")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise FormatError(f"manifest: {where}.{key} is negative")
    return value


def _chunk(obj: object, where: str) -> Chunk:
    if not isinstance(obj, dict):
        raise FormatError(f"manifest: {where} is not an object")
    rows = _req(obj, "rows", list, where)
    if (
        len(rows) != 2
        or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows)
        or rows[0] > rows[1]
    ):
        raise FormatError(f"manifest: {where}.rows is invalid")
    sha = _req(obj, "sha256", str, where)
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise FormatError(f"manifest: {where}.sha256 is invalid")
    blob = _req(obj, "blob", str, where)
    try:
        validate_digest(blob)
    except ValueError:
        raise FormatError(f"manifest: {where}.blob is not a digest") from None
    return Chunk(
        blob=blob,
        offset=_req(obj, "offset", int, where),
        length=_req(obj, "length", int, where),
        rows=rows,
        raw_length=_req(obj, "raw_length", int, where),
        sha256=sha,
        codec=_req(obj, "codec", str, where),
        params=_req(obj, "params", dict, where),
    )


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes.

    Raises:
        FormatError: if the bytes are not a well-formed v1 manifest.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError("manifest is larger than the limit")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"manifest is not valid JSON: {exc}") from None
    except FormatError:
        raise
    except (RecursionError, ValueError) as exc:  # nesting too deep, integers too long
        raise FormatError(f"manifest is not acceptable JSON: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise FormatError("manifest is not a JSON object")
    if obj.get("schema") != SCHEMA:
        raise FormatError(f"unsupported manifest schema {str(obj.get('schema'))[:60]!r}")
    files = []
    for i, f in enumerate(_req(obj, "files", list, "manifest")):
        where = f"files[{i}]"
        if not isinstance(f, dict):
            raise FormatError(f"manifest: {where} is not an object")
        kind = _req(f, "kind", str, where)
        if kind not in ("safetensors", "file"):
            raise FormatError(f"manifest: {where}.kind {kind[:40]!r} is unknown")
        header = f.get("header")
        if kind == "safetensors" and not isinstance(header, str):
            raise FormatError(f"manifest: {where} lacks its header")
        files.append(
            FileEntry(
                path=validate_relpath(_req(f, "path", str, where)),
                kind=kind,
                size=_req(f, "size", int, where),
                sha256=_req(f, "sha256", str, where),
                header=header,
                chunks=[_chunk(c, f"{where}.chunks[{j}]") for j, c in enumerate(_req(f, "chunks", list, where))],
            )
        )
    paths = {f.path for f in files}
    if len(paths) != len(files):
        raise FormatError("manifest: duplicate file paths")
    for f in files:
        if f.kind == "file" and sum(c.raw_length for c in f.chunks) != f.size:
            raise FormatError(f"manifest: chunks of {f.path[:200]!r} do not add up to its size")
    sizes_by_path = {f.path: f.size for f in files}
    tensors = []
    for i, t in enumerate(_req(obj, "tensors", list, "manifest")):
        where = f"tensors[{i}]"
        if not isinstance(t, dict):
            raise FormatError(f"manifest: {where} is not an object")
        shape = _req(t, "shape", list, where)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FormatError(f"manifest: {where}.shape is invalid")
        offsets = _req(t, "data_offsets", list, where)
        if len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets):
            raise FormatError(f"manifest: {where}.data_offsets is invalid")
        dtype = _req(t, "dtype", str, where)
        try:
            nbytes = nbytes_for(get_dtype(dtype), math.prod(shape))
        except FormatError as exc:
            raise FormatError(f"manifest: {where}: {exc}") from None
        if offsets[1] - offsets[0] != nbytes:
            raise FormatError(f"manifest: {where} shape does not match its data_offsets")
        entry = TensorEntry(
            file=_req(t, "file", str, where),
            name=_req(t, "name", str, where),
            dtype=dtype,
            shape=shape,
            data_offsets=offsets,
            codec=_req(t, "codec", str, where),
            chunks=[_chunk(c, f"{where}.chunks[{j}]") for j, c in enumerate(_req(t, "chunks", list, where))],
        )
        fidelity = t.get("fidelity")
        if fidelity is not None and (
            not isinstance(fidelity, dict)
            or not all(isinstance(k, str) and (v is None or isinstance(v, (int, float))) for k, v in fidelity.items())
        ):
            raise FormatError(f"manifest: {where}.fidelity is invalid")
        entry.fidelity = fidelity
        if entry.file not in paths:
            raise FormatError(f"manifest: {where} refers to unknown file {entry.file[:200]!r}")
        if sum(c.raw_length for c in entry.chunks) != nbytes:
            raise FormatError(f"manifest: {where} chunks do not add up to the tensor size")
        if offsets[1] > sizes_by_path[entry.file]:
            raise FormatError(f"manifest: {where} lies outside its file")
        tensors.append(entry)
    sizes = _req(obj, "sizes", dict, "manifest")
    source = _req(obj, "source", dict, "manifest")
    annotations = _req(obj, "annotations", dict, "manifest")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise FormatError("manifest: annotations must map strings to strings")
    return Manifest(
        files=files,
        tensors=tensors,
        source_kind=_req(source, "kind", str, "source"),
        codec=_req(obj, "codec", str, "manifest"),
        bytes_raw=_req(sizes, "raw", int, "sizes"),
        bytes_stored=_req(sizes, "stored", int, "sizes"),
        annotations=annotations,
        manifest_bytes=len(data),
    )
