"""The proto3 wire format of ``BlobChunk``, by hand: the one message a pull's bulk bytes travel in.

Both ends skip protobuf's message objects here. The server encodes each reply
as the tag, length and data (one copy of the data, where building and then
serializing a ``BlobChunk`` made two), and the client reads the two fields in
place. Both give exactly protobuf's encoding, and any other encoding a peer
sends goes through protobuf (tested against it in ``tests/test_fuzz.py``).
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from mzstore.errors import IntegrityError
from mzstore.v1 import store_pb2 as pb


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def blob_chunk(offset: int, data: bytes) -> bytes:
    """``BlobChunk(offset=offset, data=data).SerializeToString()``, with one copy of ``data``.

    As protobuf does in proto3, a zero offset and empty data are left out.
    """
    head = (b"\x08" + _varint_bytes(offset) if offset else b"") + (b"\x12" + _varint_bytes(len(data)) if data else b"")
    return b"".join((head, data)) if data else head


def _varint(view: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def blob_piece(message: bytes) -> tuple[int, memoryview]:
    """``(offset, data)`` of one serialized ``BlobChunk``, ``data`` a view into ``message``.

    A pull's bytes arrive in these messages. Reading the two fields in place
    (``offset = 1`` varint, ``data = 2`` bytes, in the proto3 wire format)
    skips building the message object and its copy of the data: a cold pull
    runs 10 % faster on 2 cores (562 → 616 MB/s, 1 GB bf16, median of 7).
    Anything else (another field, another encoding) goes through protobuf.

    Raises:
        IntegrityError: the message does not parse.
    """
    view = memoryview(message)
    offset, data, i = 0, view[:0], 0
    try:
        while i < len(view):
            tag = view[i]
            if tag == 0x08:
                offset, i = _varint(view, i + 1)
            elif tag == 0x12:
                n, i = _varint(view, i + 1)
                if i + n > len(view):
                    raise ValueError("truncated")
                data, i = view[i : i + n], i + n
            else:
                raise ValueError("another field")
        return offset, data
    except (ValueError, IndexError):
        try:
            piece = pb.BlobChunk.FromString(message)
        except DecodeError as exc:
            raise IntegrityError(f"malformed ReadBlob reply from the server: {exc}") from None
        return piece.offset, memoryview(piece.data)
