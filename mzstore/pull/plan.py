"""Pull planning (pure): which chunks to fetch and where their bytes land."""

from __future__ import annotations

from dataclasses import dataclass

from mzstore.format.manifest import Chunk, FileEntry, Manifest, TensorEntry


@dataclass(frozen=True)
class ChunkTask:
    """Fetch ``chunk``, decode it as ``dtype`` and place it.

    Attributes:
        file: source file path the bytes belong to.
        tensor: tensor name, or ``None`` for a plain file.
        file_offset: where the decoded bytes go in the source file.
        tensor_offset: where they go inside the tensor's bytes (0 for files).
    """

    chunk: Chunk
    dtype: str
    file: str
    tensor: str | None
    file_offset: int
    tensor_offset: int


def safetensors_data_start(entry: FileEntry) -> int:
    """Offset of the data section: 8-byte prefix + the original header."""
    assert entry.header is not None
    return 8 + len(entry.header.encode("utf-8"))


def tensor_tasks(entry: FileEntry, tensor: TensorEntry) -> list[ChunkTask]:
    start = safetensors_data_start(entry) + tensor.data_offsets[0]
    out = []
    pos = 0
    for c in tensor.chunks:  # contiguous row runs, in order
        out.append(ChunkTask(c, tensor.dtype, tensor.file, tensor.name, start + pos, pos))
        pos += c.raw_length
    return out


def file_tasks(entry: FileEntry) -> list[ChunkTask]:
    return [ChunkTask(c, "U8", entry.path, None, c.rows[0], c.rows[0]) for c in entry.chunks]


def plan_pull(manifest: Manifest, files: list[str] | None = None) -> list[ChunkTask]:
    """Every task for the selected files (all by default): tensors in manifest order, chunks in row
    order, then the plain files' chunks. Order matters to the pipeline: chunks next to each other in
    a blob stay next to each other, so they can share a range read. A sink keeps the tasks it
    wants (:meth:`~mzstore.pull.sinks.Sink.wants`)."""
    chosen = {f.path: f for f in manifest.files if files is None or f.path in files}
    tasks: list[ChunkTask] = []
    for t in manifest.tensors:
        if t.file in chosen:
            tasks.extend(tensor_tasks(chosen[t.file], t))
    for f in chosen.values():
        if f.kind == "file":
            tasks.extend(file_tasks(f))
    return tasks
