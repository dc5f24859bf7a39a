"""Strict safetensors header parsing and building (pure).

A safetensors file is ``u64 little-endian N`` · ``N bytes of JSON header`` ·
``data``. The header maps tensor names to ``{"dtype", "shape",
"data_offsets": [begin, end]}`` (offsets relative to the data section) and
may hold ``"__metadata__": {str: str}``.

:func:`parse_header` checks everything before any size found in the input is
used to allocate: header length against a cap and the file size, JSON shape,
duplicate keys, known dtypes, shape × dtype == byte length, and that the
tensors tile the data section exactly (no gaps, no overlaps, no trailing
bytes). The checks are those of the reference implementation's
``Metadata::validate``, plus the duplicate-key and trailing-byte checks it
does not make.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from mzstore.errors import FormatError
from mzstore.format.dtypes import DType, get_dtype, nbytes_for
from mzstore.limits import MAX_HEADER_BYTES, MAX_NAME_BYTES, MAX_RANK, MAX_TENSORS

METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file.

    Attributes:
        name: tensor name.
        dtype: its dtype.
        shape: its shape.
        begin: start offset in the data section.
        end: end offset (exclusive) in the data section.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed, validated header.

    Attributes:
        header_len: N, the JSON length (including padding).
        tensors: tensors sorted by data offset.
        metadata: the ``__metadata__`` map, if any.
        data_len: size of the data section.
    """

    header_len: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None
    data_len: int

    @property
    def data_start(self) -> int:
        """Offset of the data section in the file."""
        return 8 + self.header_len


def read_header_len(prefix: bytes, file_size: int, *, max_header: int = MAX_HEADER_BYTES) -> int:
    """Validate the 8-byte prefix and return N.

    Raises:
        FormatError: if the file is too short or N is out of bounds.
    """
    if file_size < 8 or len(prefix) < 8:
        raise FormatError(f"not a safetensors file: {file_size} bytes, need at least 8")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2:
        raise FormatError("not a safetensors file: header length is smaller than '{}'")
    if n > max_header:
        raise FormatError(f"not a safetensors file: header length {n} exceeds the {max_header}-byte limit")
    if 8 + n > file_size:
        raise FormatError(f"not a safetensors file: header length {n} is longer than the file ({file_size} bytes)")
    return n


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate key {key[:200]!r} in safetensors header")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise FormatError(f"invalid number {name} in safetensors header")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_header(header_bytes: bytes, file_size: int, *, max_tensors: int = MAX_TENSORS) -> Header:
    """Parse and validate the JSON header of a file of ``file_size`` bytes.

    Args:
        header_bytes: the N bytes after the 8-byte length prefix.
        file_size: total size of the file, to check the data section.
        max_tensors: most tensors accepted.

    Returns:
        The validated :class:`Header`.

    Raises:
        FormatError: describing the first problem found.
    """
    n = len(header_bytes)
    if not header_bytes.startswith(b"{"):
        raise FormatError("not a safetensors file: header does not start with '{'")
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("safetensors header is not valid UTF-8") from None
    try:
        raw = json.loads(text.rstrip(" "), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise FormatError(f"safetensors header is not valid JSON: {exc.msg} at byte {exc.pos}") from None
    except FormatError:
        raise
    except (RecursionError, ValueError) as exc:  # nesting too deep, integers too long
        raise FormatError(f"safetensors header is not acceptable JSON: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise FormatError("safetensors header is not a JSON object")

    metadata = raw.pop(METADATA_KEY, None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise FormatError("__metadata__ must map strings to strings")
    if len(raw) > max_tensors:
        raise FormatError(f"safetensors header lists {len(raw)} tensors, more than the limit of {max_tensors}")

    data_len = file_size - 8 - n
    tensors = []
    for name, entry in raw.items():
        tensors.append(_parse_entry(name, entry, data_len))
    tensors.sort(key=lambda t: (t.begin, t.end))

    cursor = 0
    for t in tensors:
        if t.begin != cursor:
            kind = "overlaps the previous tensor" if t.begin < cursor else "leaves a gap before it"
            raise FormatError(f"tensor {t.name!r} at data offset {t.begin} {kind} (expected {cursor})")
        cursor = t.end
    if cursor != data_len:
        raise FormatError(
            f"safetensors data section is {data_len} bytes but tensors cover {cursor}: "
            + ("trailing bytes after the last tensor" if cursor < data_len else "file is truncated")
        )
    return Header(n, tuple(tensors), metadata, data_len)


def _parse_entry(name: str, entry: object, data_len: int) -> TensorInfo:
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"invalid tensor name {name[:80]!r}: not encodable as UTF-8") from None
    if not name or len(encoded) > MAX_NAME_BYTES or "\x00" in name:
        raise FormatError(f"invalid tensor name {name[:80]!r}")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype = get_dtype(entry["dtype"])
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"tensor {name!r} has an invalid shape {str(shape)[:80]}")
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise FormatError(f"tensor {name!r} has invalid data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise FormatError(f"tensor {name!r} data_offsets {offsets} fall outside the {data_len}-byte data section")
    numel = math.prod(shape)
    if numel * dtype.bits > 8 * data_len:
        raise FormatError(f"tensor {name!r} shape {shape} is larger than the file")
    expected = nbytes_for(dtype, numel)
    if expected != end - begin:
        raise FormatError(
            f"tensor {name!r}: shape {shape} of {dtype.name} needs {expected} bytes, data_offsets span {end - begin}"
        )
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def build_header(
    entries: list[tuple[str, str, tuple[int, ...], int, int]],
    metadata: dict[str, str] | None,
    size: int | None = None,
) -> bytes:
    """Build the 8-byte prefix and the JSON header, padded with spaces to 8-byte alignment.

    Args:
        entries: ``(name, dtype, shape, begin, end)`` in data order.
        metadata: the ``__metadata__`` map, or ``None``.
        size: pad the prefix + header to exactly this many bytes (a multiple of 8) instead, when
            they fit (trailing spaces are allowed by the format); the result is longer when not.

    Returns:
        ``prefix + header`` ready to be followed by the data section.
    """
    obj: dict[str, Any] = {}
    if metadata is not None:
        obj[METADATA_KEY] = metadata
    for name, dtype, shape, begin, end in entries:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    if size is not None and 8 + len(text) < size:
        text += b" " * (size - 8 - len(text))
    return struct.pack("<Q", len(text)) + text
