"""``pull --keep-quantized``: the compressed-tensors export, as a pull sink.

What is written is planned by :mod:`mzstore.pull.compressed_tensors` (pure):
per tensor, copied exact, written dequantized, or written as its stored
codes in the compressed-tensors layout. This module writes it, through the
same pull path as every other output (:class:`~mzstore.pull.puller.Puller`:
one plan, one worker pool under the in-flight byte budget, the chunk cache,
retries and re-fetches), into staged files renamed into place once every
chunk is verified (:mod:`mzstore.pull.staging`).

How chunks arrive at :class:`KeepQuantizedSink`:

* plain files and tensors written as bytes (exact, or dequantized as a plain
  pull writes them) are decoded and hash-checked by the pipeline, then
  written at their offsets;
* chunks of tensors written as codes are claimed compact: the sink gets the
  stored bytes, unpacks them, expands them with
  :func:`mzstore.codecs.quant.expand` and compares the hash of the result with
  the manifest's (which records the hash of the dequantized bytes) before any
  code is used — a chunk that fails is fetched again once, like any other;
  then it writes the packed codes and scales of the chunk's rows straight to
  their offsets. int4 zero points are packed along rows, so each tensor's are
  gathered and written when its last chunk is in (memory: the zero points of
  the tensors being pulled, 1/group of their weights).

Safetensors data are laid out largest element size first, so every tensor
is aligned to its element size; ``config.json`` gets the
``quantization_config`` and a top-level ``*.safetensors.index.json`` the new
names and sizes, both before the commit.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mzstore.codecs.quant import S_CODES, S_SCALES, S_ZEROS, Compact, expand, unpack
from mzstore.durable import write_json
from mzstore.errors import FormatError, IntegrityError, InvalidArgument
from mzstore.format.dtypes import get_dtype
from mzstore.format.manifest import Chunk, FileEntry, Manifest
from mzstore.format.safetensors import build_header, parse_header
from mzstore.pull.compressed_tensors import (
    CONFIG_FILE,
    DEFAULT_DENSE,
    INDEX_SUFFIX,
    QUANTIZATION_CONFIG,
    ExportPlan,
    OutTensor,
    Scheme,
    TensorPlan,
    pack_codes,
    pack_zero_points,
    plan_export,
)
from mzstore.pull.pipeline import Fetch
from mzstore.pull.plan import ChunkTask
from mzstore.pull.sinks import Payload, ScratchBuffers, Sink
from mzstore.pull.staging import StagedFiles


def _bytes_of(a: np.ndarray) -> memoryview:
    """The bytes of an array, in memory order (a copy only if it is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).data


def _decode_codes(payload: Payload, c: Chunk, dtype_name: str, what: str, scheme: Scheme, cols: int) -> Compact:
    """The codes of a quantized chunk, trusted only once their expansion matches the manifest's hash."""
    if c.codec != "quant":
        raise IntegrityError(f"chunk rows {c.rows} of {what} is {c.codec}, not quantized")
    dtype = get_dtype(dtype_name)
    try:
        compact = unpack(payload, c.raw_length, dtype)
        expanded = expand(compact, dtype)
    except ValueError as exc:  # CodecError, or numpy refusing a malformed section
        raise IntegrityError(f"chunk rows {c.rows} of {what} does not decode: {exc}") from None
    if not c.matches(_bytes_of(expanded)):
        raise IntegrityError(f"chunk rows {c.rows} of {what}: decoded bytes fail their {c.hash_name} check")
    rows = c.rows[1] - c.rows[0]
    if (
        compact.method != scheme.kind
        or compact.mask is not None
        or (compact.rows, compact.cols) != (rows, cols)
        or (scheme.kind == "int4" and compact.group != scheme.group)
    ):
        raise IntegrityError(
            f"chunk rows {c.rows} of {what} holds {compact.method} {compact.rows}x{compact.cols} "
            f"(group {compact.group}, pruned {compact.mask is not None}), not {scheme} {rows}x{cols}"
        )
    return compact


@dataclass
class _FileOut:
    entry: FileEntry
    outputs: list[tuple[TensorPlan, list[tuple[OutTensor, int]]]]  # per tensor: (out tensor, absolute offset)
    header: bytes
    data_len: int


def _layout(entry: FileEntry, plans: list[TensorPlan]) -> _FileOut:
    """Place the file's output tensors: largest element size first, so each is aligned."""
    assert entry.header is not None
    source = parse_header(entry.header.encode("utf-8"), entry.size)
    order = sorted(plans, key=lambda p: p.entry.data_offsets[0])
    flat = [(i, o) for i, p in enumerate(order) for o in p.outputs()]
    flat.sort(key=lambda io: -get_dtype(io[1].dtype).itemsize)  # stable: original order within a size
    offsets: dict[tuple[int, str], int] = {}
    entries = []
    pos = 0
    for i, o in flat:
        offsets[(i, o.name)] = pos
        entries.append((o.name, o.dtype, o.shape, pos, pos + o.nbytes))
        pos += o.nbytes
    header = build_header(entries, source.metadata)
    start = len(header)
    outputs = [(p, [(o, start + offsets[(i, o.name)]) for o in p.outputs()]) for i, p in enumerate(order)]
    return _FileOut(entry, outputs, header, pos)


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None


def _add_quantization_config(path: Path, plan: ExportPlan, durable: bool = True) -> None:
    config = _load_json(path, CONFIG_FILE)
    if not isinstance(config, dict):
        raise FormatError(f"{CONFIG_FILE} is not a JSON object")
    if QUANTIZATION_CONFIG in config:
        existing = config[QUANTIZATION_CONFIG]
        method = existing.get("quant_method") if isinstance(existing, dict) else None
        raise InvalidArgument(
            f"{CONFIG_FILE} already has a quantization_config ({method or 'unknown method'}); "
            "the model was pushed pre-quantized: pull it without --keep-quantized"
        )
    config[QUANTIZATION_CONFIG] = plan.quantization_config()
    write_json(
        path, config, indent=2, sort_keys=True, durable=durable
    )  # as transformers and compressed-tensors write it


def _rewrite_index(path: Path, plan: ExportPlan, layouts: dict[str, _FileOut], durable: bool = True) -> None:
    """Point the index at the new tensor names; ``total_size`` is the new data size."""
    index = _load_json(path, path.name)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return  # not a safetensors index: leave it as pulled
    renamed = {(p.entry.file, p.entry.name): [o.name for o in p.outputs()] for p in plan.tensors}
    new_map: dict[str, Any] = {}
    for name, file in weight_map.items():
        for new in renamed.get((str(file), name), [name]):
            new_map[new] = file
    index["weight_map"] = new_map
    metadata = index.get("metadata")
    if isinstance(metadata, dict) and "total_size" in metadata:
        metadata["total_size"] = sum(layouts[f].data_len for f in sorted(set(new_map.values()) & set(layouts)))
    write_json(path, index, indent=2, sort_keys=True, durable=durable)


@dataclass
class _Quantized:
    """Where a tensor written as codes goes, and its int4 zero points while its chunks arrive."""

    plan: TensorPlan
    where: dict[str, tuple[OutTensor, int]]  # role → (out tensor, absolute offset)
    fd: int
    chunks_left: int
    zeros: np.ndarray | None = None


class KeepQuantizedSink(Sink[list[Path]]):
    """Writes ``manifest``'s model under ``out_dir`` in the compressed-tensors layout.

    Args:
        out_dir: destination directory (created when the pull starts).
        manifest: the model.
        dense: tensor-name patterns written dequantized (see :func:`plan_export`).

    Raises:
        InvalidArgument: the model is not exportable (the message says why); raised here,
            before anything is fetched or created.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        manifest: Manifest,
        dense: Sequence[str] = DEFAULT_DENSE,
        durable: bool = True,
    ) -> None:
        self.plan = plan_export(manifest, dense)
        if not self.plan.ok:
            raise InvalidArgument(f"cannot keep this model quantized: {self.plan.summary()}")
        self.manifest = manifest
        self.staged = StagedFiles(out_dir, durable)
        by_file: dict[str, list[TensorPlan]] = {}
        for p in self.plan.tensors:
            by_file.setdefault(p.entry.file, []).append(p)
        self.layouts = {f.path: _layout(f, by_file.get(f.path, [])) for f in manifest.files if f.kind == "safetensors"}
        self._fds: dict[str, int] = {}
        self._bytes_at: dict[tuple[str, str], int] = {}  # (file, tensor) → where its bytes start
        self._codes: dict[tuple[str, str], _Quantized] = {}
        self._lock = threading.Lock()
        self._scratch = ScratchBuffers()

    def open(self) -> None:
        self.staged.open()
        for f in self.manifest.files:
            if f.kind != "safetensors":
                self._fds[f.path] = self.staged.create(f.path, f.size)
                continue
            layout = self.layouts[f.path]
            fd = self._fds[f.path] = self.staged.create(f.path, len(layout.header) + layout.data_len)
            self.staged.write(fd, layout.header, 0)
            for p, outs in layout.outputs:
                key = (f.path, p.entry.name)
                if p.action != "quantized":
                    self._bytes_at[key] = outs[0][1]
                    continue
                where = {o.role: (o, off) for o, off in outs}
                self._codes[key] = _Quantized(p, where, fd, len(p.entry.chunks))
                if "shape" in where:
                    rows, cols = p.entry.shape
                    self.staged.write(fd, _bytes_of(np.array([rows, cols], dtype="<i8")), where["shape"][1])

    def compact(self, task: ChunkTask) -> bool:
        return task.tensor is not None and (task.file, task.tensor) in self._codes

    def target(self, task: ChunkTask) -> np.ndarray:
        return self._scratch.get(task.chunk.raw_length)

    def write(self, task: ChunkTask, data: np.ndarray) -> None:
        """Exact bytes: a plain file's at its offset, a tensor's at its place in the new layout."""
        fd = self._fds[task.file]
        if task.tensor is None:
            self.staged.write(fd, data.data, task.file_offset)
        else:
            self.staged.write(fd, data.data, self._bytes_at[(task.file, task.tensor)] + task.tensor_offset)

    def write_payload(self, task: ChunkTask, payload: Payload) -> None:
        """Codes: verified through their expansion, then packed and written for the chunk's rows."""
        assert task.tensor is not None
        q = self._codes[(task.file, task.tensor)]
        scheme = q.plan.scheme
        assert scheme is not None
        rows, cols = q.plan.entry.shape
        c = task.chunk
        compact = _decode_codes(payload, c, task.dtype, task.tensor, scheme, cols)
        r0, r1 = c.rows
        codes = compact.sections[S_CODES].reshape(r1 - r0, cols)
        if scheme.kind == "fp8":
            self.staged.write(q.fd, _bytes_of(codes), q.where["weight"][1] + r0 * cols)
        else:
            unsigned = codes if scheme.kind == "int4" else codes ^ np.uint8(0x80)
            packed = pack_codes(unsigned, scheme.num_bits)
            self.staged.write(q.fd, _bytes_of(packed), q.where["packed"][1] + r0 * packed.shape[1])
        scols = scheme.scale_cols(cols)
        scale = compact.sections[S_SCALES].astype("<f4")  # f32 (int4: f16 values)
        self.staged.write(q.fd, _bytes_of(scale), q.where["scale"][1] + r0 * scols * 4)
        with self._lock:
            if "zero" in q.where:
                if q.zeros is None:
                    q.zeros = np.zeros((rows, scols), np.uint8)
                q.zeros[r0:r1] = compact.sections[S_ZEROS].reshape(r1 - r0, scols)
            q.chunks_left -= 1
            zeros = q.zeros if q.chunks_left == 0 else None
            if zeros is not None:
                q.zeros = None
        if zeros is not None:  # the tensor's last chunk: its zero points are complete
            self.staged.write(q.fd, _bytes_of(pack_zero_points(zeros)), q.where["zero"][1])

    def finish(self) -> list[Path]:
        for f in self.manifest.files:
            if f.path == CONFIG_FILE:
                _add_quantization_config(self.staged.path(f.path), self.plan, self.staged.durable)
            elif f.kind == "file" and "/" not in f.path and f.path.endswith(INDEX_SUFFIX):
                _rewrite_index(self.staged.path(f.path), self.plan, self.layouts, self.staged.durable)
        return self.staged.commit()

    def abort(self) -> None:
        self.staged.abort()


def export_keep_quantized(
    manifest: Manifest,
    fetch: Fetch,
    out_dir: str | os.PathLike[str],
    *,
    dense: Sequence[str] = DEFAULT_DENSE,
    workers: int = 4,
    retries: int = 3,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write ``manifest``'s model under ``out_dir`` in the compressed-tensors layout (no cache).

    The same as ``Client.pull(ref, out_dir, keep_quantized=True)`` with a ``fetch`` of one's
    own: a :class:`~mzstore.pull.puller.Puller` into a :class:`KeepQuantizedSink`.

    Args:
        manifest: the model (from ``Client.manifest``).
        fetch: ``fetch(blob, offset, length) -> bytes`` (``Client.fetch``).
        out_dir: destination directory (created if needed).
        dense: tensor-name patterns written dequantized (see :func:`plan_export`).
        workers: chunks fetched and checked in parallel.
        retries: attempts on :class:`~mzstore.errors.Unavailable` per fetch.
        progress: called with the decoded size of each verified chunk.

    Returns:
        The final paths of the written files, in manifest order.

    Raises:
        InvalidArgument: the model is not exportable (the message says why), or its
            ``config.json`` already has a ``quantization_config``.
        IntegrityError: a chunk failed its checks twice (wrong length, undecodable,
            hash mismatch, or codes that do not match the manifest).
        FormatError: ``config.json`` or an index is not valid JSON.
        Unavailable: fetching kept failing.
    """
    from mzstore.pull.puller import Puller

    sink = KeepQuantizedSink(out_dir, manifest, dense)
    return Puller(fetch, workers=workers, retries=retries).run(manifest, sink, progress=progress)[0]


__all__ = ["KeepQuantizedSink", "export_keep_quantized"]
