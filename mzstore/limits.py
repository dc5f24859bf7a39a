"""Every limit mzstore enforces, in one place (pure constants; imports nothing).

Two kinds:

* **Hard ceilings** of the parsers (``MAX_*``): what a safetensors header, a
  manifest or a chunk may claim before anything is allocated from it. They
  guard the arithmetic and the memory of every reader, whatever the server's
  configuration, so they are not configurable.
* **Push limits** (``DEFAULT_MAX_*``): what one push may declare; a server
  lowers or raises them with ``MZSTORE_MAX_*`` (see
  :class:`mzstore.settings.Limits`) and refuses more before storing a byte.
  Each stays within the matching hard ceiling: a pushed model is always one
  every client can parse.

The table in ``docs/architecture.md`` ("Input limits") is generated from
this module (``python scripts/limits_table.py``; ``make lint`` checks it).
"""

from __future__ import annotations

# --- numbers ---------------------------------------------------------------------

#: Every size and offset fits a signed 64-bit integer (numpy, torch, ftruncate and pwrite take int64).
MAX_INT = 2**63 - 1

# --- safetensors (mzstore.format.safetensors) ------------------------------------

#: Largest safetensors JSON header read (the reference implementation's limit).
MAX_HEADER_BYTES = 100_000_000
#: Most tensors in one safetensors file or one manifest (a 100 MB header could list about 2 million).
MAX_TENSORS = 1_000_000
#: Largest tensor rank; guards the shape arithmetic.
MAX_RANK = 16
#: Longest tensor name, in UTF-8 bytes.
MAX_NAME_BYTES = 1024

# --- manifests (mzstore.format.manifest) -------------------------------------------

#: Largest manifest accepted by a reader.
MAX_MANIFEST_BYTES = 512 * 1024 * 1024
#: Longest file path inside a model, in UTF-8 bytes.
MAX_PATH_BYTES = 4096
#: Most files a manifest may list (the ceiling over every server's ``MZSTORE_MAX_FILES``).
MAX_MANIFEST_FILES = 100_000
#: Largest decoded (and stored) chunk: what one pull worker may allocate for one chunk.
MAX_CHUNK_BYTES = 1024 * 1024 * 1024
#: Longest codec name recorded for a chunk.
MAX_CODEC_NAME = 64
#: Deepest chain of deltas (``push --base`` of a model that is itself a delta): each level costs a pull
#: one more chunk fetch and decode.
MAX_DELTA_DEPTH = 4

# --- names (mzstore.format.refs) ---------------------------------------------------

#: Longest model name (``org/model``), in characters.
MAX_NAME_LENGTH = 255

# --- annotations (mzstore.push.protocol) -------------------------------------------

#: Most annotations (lineage notes such as ``fine-tuned-from``) one push may record.
MAX_ANNOTATIONS = 64
#: Longest annotation key, in characters.
MAX_ANNOTATION_KEY = 128
#: Longest annotation value, in UTF-8 bytes.
MAX_ANNOTATION_VALUE = 4096

# --- the wire (mzstore.transport.grpc, mzstore.server) -----------------------------

#: Payload bytes per gRPC message for uploads and blob reads (about 1 MiB).
TRANSFER_BYTES = 1024 * 1024
#: Largest gRPC message either side accepts; payloads are ~1 MiB, so 8 MiB leaves room for headers.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

# --- push limits, configurable per server (MZSTORE_MAX_*) ------------------------

#: Default ``MZSTORE_MAX_HEADER_BYTES``: safetensors header of one pushed file.
DEFAULT_MAX_HEADER_BYTES = MAX_HEADER_BYTES
#: Default ``MZSTORE_MAX_TENSORS``: tensors per file and per push.
DEFAULT_MAX_TENSORS = MAX_TENSORS
#: Default ``MZSTORE_MAX_FILES``: files per push.
DEFAULT_MAX_FILES = 10_000
#: Default ``MZSTORE_MAX_UPLOAD_BYTES``: sum of the declared file sizes of one push (4 TiB).
DEFAULT_MAX_UPLOAD_BYTES = 4 * 1024**4
