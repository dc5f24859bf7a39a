"""Device placement: compact chunks cross to the device and are expanded there.

How it works, for a target such as ``cuda:1``: every tensor is allocated on
the device. A lossless chunk is decoded on the host into a reused scratch
buffer, its sha256 checked, and copied over. A quantized chunk is verified
on the host by the sha256 of its *stored* bytes (``params.payload_sha256``,
recorded at ingest), unpacked there (zstd), and only the compact form —
codes, scales, zero points, mask — is copied to the device, where
:func:`torch_expand` computes ``y = (q - z) · s`` in f32 and casts to the
tensor's dtype. That formula gives the same bits as the host decoder (one
exact subtraction, one correctly rounded multiply, round-to-nearest-even
cast), which the tests check on the CPU device.

The torch import stays in this adapter; codecs remain numpy-only.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from mzstore.codecs.quant import E4M3_TABLE, S_CODES, S_SCALES, S_ZEROS, Compact, expand, unpack
from mzstore.errors import IntegrityError, InvalidArgument
from mzstore.format.dtypes import get_dtype
from mzstore.format.manifest import Manifest
from mzstore.pull.plan import ChunkTask
from mzstore.pull.sinks import ScratchBuffers, select_tensors, torch_dtype


def _writable(a: np.ndarray) -> np.ndarray:
    """torch.from_numpy needs a writable array; sections parsed from bytes are read-only."""
    return np.require(a, requirements=["C", "W"])


def torch_expand(c: Compact, dtype_name: str, device: Any) -> Any:
    """Expand a compact chunk on ``device``; returns the decoded bytes as a 1-D uint8 tensor there."""
    import torch

    target = torch_dtype(dtype_name)
    if c.method == "none":  # pruned, not quantized: the kept values are lossless bytes, decoded on the host
        host = expand(c, get_dtype(dtype_name))
        return torch.from_numpy(host).to(device)
    codes = torch.from_numpy(_writable(c.sections[S_CODES])).to(device, non_blocking=True)
    scale = torch.from_numpy(_writable(c.sections[S_SCALES])).to(device, non_blocking=True)
    if c.mask is not None:
        mask = torch.from_numpy(c.mask).to(device, non_blocking=True)
        rows_idx, cols_idx = mask.nonzero(as_tuple=True)
    if c.method == "int8":
        vals = codes.view(torch.int8).to(torch.float32)
    elif c.method == "fp8":
        vals = torch.from_numpy(E4M3_TABLE).to(device)[codes.long()]
    elif c.method == "int4":
        vals = codes.to(torch.float32)
    else:
        raise InvalidArgument(f"unknown quantization method {c.method}")
    if c.method == "int4":
        groups = -(-c.cols // c.group)
        scale = scale.reshape(c.rows, groups)
        zero = torch.from_numpy(_writable(c.sections[S_ZEROS])).to(device).reshape(c.rows, groups).float()
        if c.mask is None:
            gi = torch.arange(c.cols, device=device) // c.group
            y = (vals.reshape(c.rows, c.cols) - zero[:, gi]) * scale[:, gi]
        else:
            gi = cols_idx // c.group
            y = (vals - zero[rows_idx, gi]) * scale[rows_idx, gi]
    elif c.mask is None:
        y = vals.reshape(c.rows, c.cols) * scale[:, None]
    else:
        y = vals * scale[rows_idx]
    if c.mask is not None:
        dense = torch.zeros((c.rows, c.cols), dtype=torch.float32, device=device)
        dense[rows_idx, cols_idx] = y
        y = dense
    return y.to(target).reshape(-1).view(torch.uint8)


class DeviceStateDictSink:
    """Builds ``{name: tensor}`` directly on ``device``, expanding quantized chunks there."""

    #: The pipeline hands chunks of these codecs over as verified stored bytes (see ``write_payload``).
    compact_codecs = frozenset({"quant"})

    def __init__(self, manifest: Manifest, device: Any, files: list[str] | None = None) -> None:
        import torch

        self.device = torch.device(device)
        self.entries = select_tensors(manifest, files)
        self.buffers: dict[str, Any] = {}
        for t in self.entries:
            self.buffers[t.name] = torch.empty(
                t.data_offsets[1] - t.data_offsets[0], dtype=torch.uint8, device=self.device
            )
        self._scratch = ScratchBuffers()

    def target(self, task: ChunkTask) -> np.ndarray:
        """Lossless chunks decode into a per-thread host scratch buffer first."""
        return self._scratch.get(task.chunk.raw_length)

    def write(self, task: ChunkTask, data: np.ndarray) -> None:
        import torch

        assert task.tensor is not None
        dest = self.buffers[task.tensor][task.tensor_offset : task.tensor_offset + len(data)]
        dest.copy_(torch.from_numpy(data))

    def write_payload(self, task: ChunkTask, payload: bytes | bytearray) -> None:
        """A quantized chunk: check the stored bytes' sha256, send the compact form over, expand there."""
        assert task.tensor is not None
        expected = task.chunk.params.get("payload_sha256")
        if not isinstance(expected, str) or hashlib.sha256(payload).hexdigest() != expected:
            raise IntegrityError(f"chunk rows {task.chunk.rows} of {task.tensor}: stored bytes fail their sha256 check")
        compact = unpack(payload, task.chunk.raw_length, get_dtype(task.dtype))
        expanded = torch_expand(compact, task.dtype, self.device)
        self.buffers[task.tensor][task.tensor_offset : task.tensor_offset + task.chunk.raw_length].copy_(expanded)

    def result(self) -> dict[str, Any]:
        out = {}
        for t in self.entries:
            out[t.name] = self.buffers.pop(t.name).view(torch_dtype(t.dtype)).reshape(t.shape)
        return out
