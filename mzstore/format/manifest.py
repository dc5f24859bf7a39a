"""The manifest: what a model is and where its bytes are.

A manifest is canonical JSON (sorted keys, no spaces, ASCII) addressed by
the sha256 of those bytes. It records:

* ``files``: the source layout in upload order. A ``safetensors`` file keeps
  its original header bytes verbatim, so a pull rewrites the very same file
  (same sha256); every other file (``config.json``, tokenizer…) is a run of
  zstd chunks.
* ``tensors``: per tensor, dtype, shape, codec policy and its ``chunks``;
  each chunk names its blob digest, offset and length in that blob, the row
  range it covers, its codec parameters and the hash of its decoded bytes
  (``blake3``; manifests written before it carry ``sha256``, still read).
* ``sizes``: raw and stored bytes; ``annotations``: free lineage notes;
* ``allocation`` (``ecsq`` pushes only): how the per-tensor steps were chosen
  (``source`` probe/roles/uniform, ``target``, the global ``step``, the
  predicted size and cosine, the probe's measured cosine).

:func:`parse_manifest` validates structure, types and bounds before any
field is used, so a corrupt or hostile manifest is a :class:`FormatError`,
never a crash or a huge allocation.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import posixpath
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mzstore.errors import FormatError
from mzstore.format.dtypes import get_dtype, nbytes_for, row_bytes
from mzstore.format.hashing import Buffer, blake3_hex
from mzstore.format.refs import validate_digest
from mzstore.format.safetensors import parse_header
from mzstore.limits import (
    MAX_CHUNK_BYTES,
    MAX_CODEC_NAME,
    MAX_DELTA_DEPTH,
    MAX_HEADER_BYTES,
    MAX_INT,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_FILES,
    MAX_PATH_BYTES,
    MAX_RANK,
    MAX_TENSORS,
)

SCHEMA = "mzstore.manifest.v1"


@dataclass
class Chunk:
    """One independently decodable piece of a tensor or file.

    Attributes:
        blob: ``sha256:<hex>`` of the shard holding it.
        offset: byte offset of the encoded chunk inside the blob.
        length: encoded (stored) length.
        rows: ``[start, end)`` along dim 0 (for files: byte range).
        raw_length: decoded length in bytes.
        sha256: hex sha256 of the decoded bytes (manifests written before BLAKE3), else ``None``.
        codec: codec name.
        params: codec parameters chosen at encode time.
        blake3: hex BLAKE3 of the decoded bytes (what new manifests carry), else ``None``.
        base: codec ``delta`` (``push --base``): the base model's chunk whose decoded bytes this
            chunk's decoded XOR delta applies to, with its location and hash, so decoding and gc
            need nothing but this manifest. A base chunk may itself be a delta, at most
            :data:`MAX_DELTA_DEPTH` deep.

    Exactly one of ``sha256`` and ``blake3`` is set; the other is left out of
    the JSON, so a manifest written with sha256 re-serializes byte for byte.
    """

    blob: str
    offset: int
    length: int
    rows: list[int]
    raw_length: int
    sha256: str | None
    codec: str
    params: dict[str, Any] = field(default_factory=dict)
    blake3: str | None = None
    base: Chunk | None = None

    def chain(self) -> list[Chunk]:
        """This chunk and its bases, nearest first."""
        out: list[Chunk] = []
        c: Chunk | None = self
        while c is not None:
            out.append(c)
            c = c.base
        return out

    @property
    def decoded_hash(self) -> str:
        """``<algorithm>:<hex>`` of the decoded bytes."""
        return f"blake3:{self.blake3}" if self.blake3 is not None else f"sha256:{self.sha256}"

    @property
    def hash_name(self) -> str:
        return "blake3" if self.blake3 is not None else "sha256"

    def matches(self, decoded: Buffer) -> bool:
        """Whether ``decoded`` hashes to this chunk's decoded hash."""
        if self.blake3 is not None:
            return blake3_hex(decoded) == self.blake3
        return hashlib.sha256(decoded).hexdigest() == self.sha256


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
    ``"file"`` (then ``chunks`` hold its bytes). ``decoded_sha256`` is set
    when a pull writes other bytes than were pushed (lossy tensors): the
    sha256 of the file a pull writes, recorded at push.
    """

    path: str
    kind: str
    size: int
    sha256: str
    header: str | None = None
    chunks: list[Chunk] = field(default_factory=list)
    decoded_sha256: str | None = None


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
    allocation: dict[str, str | float] | None = None
    #: ``push --base``: the digest of the base model's manifest (its chunks that deltas apply to are in
    #: the deltas' ``base``; this is the lineage, and gc keeps that manifest while this one lives).
    base: str | None = None
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
        if self.allocation is not None:  # absent otherwise: manifests without one keep their digests
            obj["allocation"] = dict(self.allocation)
        if self.base is not None:
            obj["base"] = self.base
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @property
    def digest(self) -> str:
        return digest_of(self.to_json())

    def chunks(self) -> list[Chunk]:
        """Every chunk: the tensors' first, then the plain files'."""
        return [c for t in self.tensors for c in t.chunks] + [c for f in self.files for c in f.chunks]

    def blobs(self) -> set[str]:
        """Every blob digest this manifest references (the base chunks of deltas included)."""
        return {b.blob for c in self.chunks() for b in c.chain()}

    def tensors_of(self, path: str) -> list[TensorEntry]:
        return [t for t in self.tensors if t.file == path]


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    """Drop ``None`` fields, the entry's own and its chunks' (a chunk has one decoded hash; most have no base)."""
    out = {k: v for k, v in d.items() if v is not None}
    if "chunks" in out:
        out["chunks"] = [_strip_chunk(c) for c in out["chunks"]]
    return out


def _strip_chunk(c: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in c.items() if v is not None}
    if "base" in out:
        out["base"] = _strip_chunk(out["base"])
    return out


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


def path_selected(path: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> bool:
    """Whether a file path inside a model passes ``--include`` / ``--exclude`` globs (as ``hf download``).

    Patterns are shell globs over the ``/``-separated path (``*.json``, ``1_Pooling/*``); one
    ending in ``/`` means everything under that folder. A path is selected when it matches
    some include pattern (or there are none) and no exclude pattern.
    """

    def matches(pattern: str) -> bool:
        return fnmatch.fnmatchcase(path, pattern + "*" if pattern.endswith("/") else pattern)

    return (not include or any(matches(p) for p in include)) and not any(matches(p) for p in exclude)


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT


def _req(obj: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise FormatError(f"manifest: {where} lacks {key!r}")
    value = obj[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise FormatError(f"manifest: {where}.{key} has the wrong type")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise FormatError(f"manifest: {where}.{key} is negative")
        if value > MAX_INT:
            raise FormatError(f"manifest: {where}.{key} is larger than 2**63 - 1")
    return value


def _hex64(obj: dict[str, Any], key: str, where: str) -> str:
    value = _req(obj, key, str, where)
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise FormatError(f"manifest: {where}.{key} is invalid")
    return value


def _is_digest(value: object) -> bool:
    if not isinstance(value, str):
        return False
    try:
        validate_digest(value)
    except ValueError:
        return False
    return True


def _chunk(obj: object, where: str, depth: int = 0) -> Chunk:
    if not isinstance(obj, dict):
        raise FormatError(f"manifest: {where} is not an object")
    rows = _req(obj, "rows", list, where)
    if len(rows) != 2 or not all(_is_uint(r) for r in rows) or rows[0] > rows[1]:
        raise FormatError(f"manifest: {where}.rows is invalid")
    if ("sha256" in obj) == ("blake3" in obj):
        raise FormatError(f"manifest: {where} needs exactly one of blake3 and sha256")
    sha = _hex64(obj, "sha256", where) if "sha256" in obj else None
    b3 = _hex64(obj, "blake3", where) if "blake3" in obj else None
    blob = _req(obj, "blob", str, where)
    try:
        validate_digest(blob)
    except ValueError:
        raise FormatError(f"manifest: {where}.blob is not a digest") from None
    codec = _req(obj, "codec", str, where)
    if not codec or len(codec) > MAX_CODEC_NAME:
        raise FormatError(f"manifest: {where}.codec is invalid")
    chunk = Chunk(
        blob=blob,
        offset=_req(obj, "offset", int, where),
        length=_req(obj, "length", int, where),
        rows=rows,
        raw_length=_req(obj, "raw_length", int, where),
        sha256=sha,
        codec=codec,
        params=_req(obj, "params", dict, where),
        blake3=b3,
    )
    if chunk.raw_length > MAX_CHUNK_BYTES or chunk.length > MAX_CHUNK_BYTES:
        raise FormatError(f"manifest: {where} is larger than the {MAX_CHUNK_BYTES}-byte chunk limit")
    if chunk.offset + chunk.length > MAX_INT:
        raise FormatError(f"manifest: {where}.offset + length is larger than 2**63 - 1")
    if "base" in obj:
        if codec != "delta":
            raise FormatError(f"manifest: {where} has a base but is not a delta")
        if depth >= MAX_DELTA_DEPTH:
            raise FormatError(f"manifest: {where} is a delta more than {MAX_DELTA_DEPTH} deep")
        chunk.base = _chunk(obj["base"], f"{where}.base", depth + 1)
        if chunk.base.raw_length != chunk.raw_length:
            raise FormatError(
                f"manifest: {where}.base decodes to {chunk.base.raw_length} bytes, not {chunk.raw_length}"
            )
    elif codec == "delta":
        raise FormatError(f"manifest: {where} is a delta without its base")
    return chunk


def _chunks(obj: dict[str, Any], where: str) -> list[Chunk]:
    return [_chunk(c, f"{where}.chunks[{j}]") for j, c in enumerate(_req(obj, "chunks", list, where))]


def _check_file_chunks(f: FileEntry, where: str) -> None:
    """A plain file's chunks tile ``[0, size)`` in order; ``rows`` are their byte ranges."""
    pos = 0
    for j, c in enumerate(f.chunks):
        if c.rows != [pos, pos + c.raw_length]:
            raise FormatError(f"manifest: {where}.chunks[{j}].rows {c.rows} do not continue the file at byte {pos}")
        pos += c.raw_length
    if pos != f.size:
        raise FormatError(f"manifest: chunks of {f.path[:200]!r} do not add up to its size")


def _check_tensor_chunks(chunks: list[Chunk], row_bytes: int | None, nrows: int, where: str) -> None:
    """Tensor chunks tile the tensor's bytes in order and record the rows they touch (see the planner)."""
    pos = 0
    for j, c in enumerate(chunks):
        if c.rows[1] > nrows:
            raise FormatError(f"manifest: {where}.chunks[{j}].rows {c.rows} exceed the tensor's {nrows} rows")
        end = pos + c.raw_length
        if row_bytes and c.raw_length and c.rows != [pos // row_bytes, -(-end // row_bytes)]:
            raise FormatError(f"manifest: {where}.chunks[{j}].rows {c.rows} do not match its bytes [{pos}, {end})")
        pos = end


def _header_bytes(f: dict[str, Any], where: str) -> bytes:
    header = f.get("header")
    if not isinstance(header, str):
        raise FormatError(f"manifest: {where} lacks its header")
    try:
        data = header.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"manifest: {where}.header is not encodable as UTF-8") from None
    if len(data) > MAX_HEADER_BYTES:
        raise FormatError(f"manifest: {where}.header is longer than {MAX_HEADER_BYTES} bytes")
    return data


def parse_manifest(data: bytes, *, max_tensors: int = MAX_TENSORS, max_files: int = MAX_MANIFEST_FILES) -> Manifest:
    """Parse and validate manifest bytes.

    Every size is checked before it is used: integers fit 64 bits, chunks
    are at most :data:`MAX_CHUNK_BYTES` and tile their tensor or file, a
    safetensors file's header parses and lists exactly the manifest's
    tensors, and file paths cannot leave the output directory.

    Raises:
        FormatError: if the bytes are not a well-formed v1 manifest or exceed a limit.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise FormatError("manifest is larger than the limit")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"manifest is not valid JSON: {exc}") from None
    except FormatError:
        raise
    except (RecursionError, ValueError, TypeError) as exc:  # nesting too deep, integers too long, odd input
        raise FormatError(f"manifest is not acceptable JSON: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise FormatError("manifest is not a JSON object")
    if obj.get("schema") != SCHEMA:
        raise FormatError(f"unsupported manifest schema {str(obj.get('schema'))[:60]!r}")
    file_list = _req(obj, "files", list, "manifest")
    if len(file_list) > max_files:
        raise FormatError(f"manifest lists {len(file_list)} files, more than the limit of {max_files}")
    tensor_list = _req(obj, "tensors", list, "manifest")
    if len(tensor_list) > max_tensors:
        raise FormatError(f"manifest lists {len(tensor_list)} tensors, more than the limit of {max_tensors}")
    files = []
    headers: dict[str, bytes] = {}
    for i, f in enumerate(file_list):
        where = f"files[{i}]"
        if not isinstance(f, dict):
            raise FormatError(f"manifest: {where} is not an object")
        kind = _req(f, "kind", str, where)
        if kind not in ("safetensors", "file"):
            raise FormatError(f"manifest: {where}.kind {kind[:40]!r} is unknown")
        path = validate_relpath(_req(f, "path", str, where))
        header = _header_bytes(f, where) if kind == "safetensors" else None
        fentry = FileEntry(
            path=path,
            kind=kind,
            size=_req(f, "size", int, where),
            sha256=_hex64(f, "sha256", where),
            header=f["header"] if header is not None else None,
            chunks=_chunks(f, where),
            decoded_sha256=_hex64(f, "decoded_sha256", where) if "decoded_sha256" in f else None,
        )
        if header is not None:
            if fentry.chunks:
                raise FormatError(f"manifest: {where} is a safetensors file with file chunks")
            if 8 + len(header) > fentry.size:
                raise FormatError(f"manifest: {where} header lies outside its file")
            headers[path] = header
        files.append(fentry)
    paths = {f.path for f in files}
    if len(paths) != len(files):
        raise FormatError("manifest: duplicate file paths")
    _check_path_prefixes(paths)
    for i, f in enumerate(files):
        if f.kind == "file":
            _check_file_chunks(f, f"files[{i}]")
    sizes_by_path = {f.path: f.size for f in files}
    tensors = []
    for i, t in enumerate(tensor_list):
        where = f"tensors[{i}]"
        if not isinstance(t, dict):
            raise FormatError(f"manifest: {where} is not an object")
        shape = _req(t, "shape", list, where)
        if len(shape) > MAX_RANK or not all(_is_uint(d) for d in shape):
            raise FormatError(f"manifest: {where}.shape is invalid")
        offsets = _req(t, "data_offsets", list, where)
        if len(offsets) != 2 or not all(_is_uint(o) for o in offsets) or offsets[0] > offsets[1]:
            raise FormatError(f"manifest: {where}.data_offsets is invalid")
        dtype = _req(t, "dtype", str, where)
        try:
            dt = get_dtype(dtype)
            numel = math.prod(shape)
            if numel * dt.bits > 8 * MAX_INT:
                raise FormatError(f"shape {str(shape)[:80]} is larger than 2**63 - 1 bytes")
            nbytes = nbytes_for(dt, numel)
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
            chunks=_chunks(t, where),
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
        if entry.file not in headers:
            raise FormatError(f"manifest: {where} refers to {entry.file[:200]!r}, which is not a safetensors file")
        if sum(c.raw_length for c in entry.chunks) != nbytes:
            raise FormatError(f"manifest: {where} chunks do not add up to the tensor size")
        if 8 + len(headers[entry.file]) + offsets[1] > sizes_by_path[entry.file]:
            raise FormatError(f"manifest: {where} lies outside its file")
        rb = row_bytes(dt, shape)
        _check_tensor_chunks(entry.chunks, rb, shape[0] if shape else 1, where)
        tensors.append(entry)
    _check_headers(files, headers, tensors)
    sizes = _req(obj, "sizes", dict, "manifest")
    source = _req(obj, "source", dict, "manifest")
    annotations = _req(obj, "annotations", dict, "manifest")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise FormatError("manifest: annotations must map strings to strings")
    allocation = obj.get("allocation")
    if allocation is not None and (
        not isinstance(allocation, dict)
        or not all(
            isinstance(k, str) and isinstance(v, (str, int, float)) and not isinstance(v, bool)
            for k, v in allocation.items()
        )
    ):
        raise FormatError("manifest: allocation must map names to strings or numbers")
    base = obj.get("base")
    if base is not None and not _is_digest(base):
        raise FormatError("manifest: base is not a manifest digest")
    return Manifest(
        files=files,
        tensors=tensors,
        source_kind=_req(source, "kind", str, "source"),
        codec=_req(obj, "codec", str, "manifest"),
        bytes_raw=_req(sizes, "raw", int, "sizes"),
        bytes_stored=_req(sizes, "stored", int, "sizes"),
        annotations=annotations,
        allocation=allocation,
        base=base,
        manifest_bytes=len(data),
    )


def _check_path_prefixes(paths: set[str]) -> None:
    """No file path is a directory of another (``a`` and ``a/b``): a pull could not write both."""
    for path in paths:
        parts = path.split("/")
        for k in range(1, len(parts)):
            if "/".join(parts[:k]) in paths:
                raise FormatError(f"manifest: file {path[:200]!r} lies inside file {'/'.join(parts[:k])[:200]!r}")


def _check_headers(files: list[FileEntry], headers: dict[str, bytes], tensors: list[TensorEntry]) -> None:
    """Each safetensors file's header is valid for its size and lists exactly its tensors."""
    listed: dict[str, dict[str, TensorEntry]] = {path: {} for path in headers}
    for t in tensors:
        if t.name in listed[t.file]:
            raise FormatError(f"manifest: tensor {t.name[:200]!r} is listed twice for {t.file[:200]!r}")
        listed[t.file][t.name] = t
    for i, f in enumerate(files):
        if f.path not in headers:
            continue
        try:
            header = parse_header(headers[f.path], f.size)
        except FormatError as exc:
            raise FormatError(f"manifest: files[{i}].header: {exc}") from None
        mine = listed[f.path]
        if len(header.tensors) != len(mine):
            raise FormatError(f"manifest: files[{i}] header lists {len(header.tensors)} tensors, manifest {len(mine)}")
        for info in header.tensors:
            found = mine.get(info.name)
            if (
                found is None
                or found.dtype != info.dtype.name
                or tuple(found.shape) != info.shape
                or found.data_offsets != [info.begin, info.end]
            ):
                raise FormatError(f"manifest: tensor {info.name[:200]!r} of files[{i}] does not match its header")
