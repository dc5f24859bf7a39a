"""Device placement: compact chunks cross to the device and are expanded there.

How it works, for a target such as ``cuda:1``: every tensor is allocated on
the device. A lossless chunk is decoded on the host into a staging buffer,
its hash checked, and copied over. A quantized chunk is verified on the
host by the hash of its *stored* bytes (``params.payload_blake3``, recorded
at ingest; ``payload_sha256`` in older manifests), unpacked there (zstd), and only the compact form — codes,
scales, zero points, mask — is copied to the device, where
:func:`torch_expand` computes ``y = (q - z) · s`` in f32 and casts to the
tensor's dtype. That formula gives the same bits as the host decoder (one
exact subtraction, one correctly rounded multiply, round-to-nearest-even
cast), which the tests check on the CPU device.

Pinned staging (CUDA targets, :class:`PinnedStaging`): each pull thread
owns one reusable page-locked host buffer and one CUDA stream per device.
The decoded chunk (or the packed compact sections) is written into the
buffer and copied with ``copy_(non_blocking=True)`` on the thread's stream;
an event recorded after the copy is waited on before that thread writes
into the buffer again, so a buffer is never reused while its copy may be in
flight. The thread's next fetch overlaps the copy. Destination tensors are
marked as used by the stream (``record_stream``), and ``result()``
synchronizes every stream before the tensors are handed out. Other devices
(and the CPU, where tests force the device path) copy synchronously from a
per-thread scratch buffer.

:class:`DeviceMapSink` serves ``load_into``: one sub-sink per device of a
placement (:mod:`mzstore.pull.device_map`). CPU tensors are decoded straight
into their memory (:class:`HostTensorSink`); other devices use
:class:`DeviceStateDictSink`. Which chunks arrive compact is the sink's
answer to ``compact(task)`` (here: a codec in ``compact_codecs``); when a map
mixes the CPU with a GPU, the CPU sub-sink takes compact chunks too and
decodes them on the host with the same verified decoder the pipeline uses.
The model side of ``load_into`` (matching names, placing tensors, putting
them in) is :mod:`mzstore.pull.load_into`.

The torch import stays in this adapter; codecs remain numpy-only.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mzstore.codecs.quant import (
    E4M3_TABLE,
    S_CODES,
    S_HIGH,
    S_LR_A,
    S_LR_B,
    S_SCALES,
    S_TABLE,
    S_ZEROS,
    Compact,
    expand,
    unpack,
)
from mzstore.errors import IntegrityError, InvalidArgument
from mzstore.format.dtypes import get_dtype
from mzstore.format.hashing import blake3_hex
from mzstore.format.manifest import Manifest, TensorEntry
from mzstore.pull.device_map import few_names
from mzstore.pull.pipeline import decode_verified
from mzstore.pull.plan import ChunkTask
from mzstore.pull.sinks import Payload, ScratchBuffers, Sink, select_tensors, torch_dtype, torch_module

#: Sends host arrays to the device: returns one device tensor per array, same dtype and shape.
Upload = Callable[[Sequence[np.ndarray]], list[Any]]


def _writable(a: np.ndarray) -> np.ndarray:
    """torch.from_numpy needs a writable array; sections parsed from bytes are read-only."""
    return np.require(a, requirements=["C", "W"])


def _plain_upload(device: Any) -> Upload:
    import torch

    def send(arrays: Sequence[np.ndarray]) -> list[Any]:
        return [torch.from_numpy(_writable(a)).to(device, non_blocking=True) for a in arrays]

    return send


def torch_expand(c: Compact, dtype_name: str, device: Any, upload: Upload | None = None) -> Any:
    """Expand a compact chunk on ``device``; returns the decoded bytes as a 1-D uint8 tensor there.

    Args:
        upload: how host arrays reach the device (default: one ``.to(device)`` each);
            :meth:`PinnedStaging.upload` packs them into one pinned copy.
    """
    import torch

    send = upload or _plain_upload(device)
    target = torch_dtype(dtype_name)
    if c.method == "none":  # pruned, not quantized: the kept values are lossless bytes, decoded on the host
        (dense,) = send([expand(c, get_dtype(dtype_name))])
        return dense
    if c.method not in ("int8", "fp8", "int4", "ecsq", "lowrank"):
        raise InvalidArgument(f"unknown quantization method {c.method}")
    if c.method == "ecsq":
        return _torch_ecsq(c, target, send)
    if c.method == "lowrank":
        return _torch_lowrank(c, target, send)
    arrays = [c.sections[S_CODES], c.sections[S_SCALES]]
    if c.method == "int4":
        arrays.append(c.sections[S_ZEROS])
    if c.method == "fp8":
        arrays.append(E4M3_TABLE)
    if c.mask is not None:
        arrays.append(c.mask)
    sent = send(arrays)
    codes, scale = sent[0], sent[1]
    if c.mask is not None:
        rows_idx, cols_idx = sent[-1].nonzero(as_tuple=True)
    if c.method == "int8":
        vals = codes.view(torch.int8).to(torch.float32)
    elif c.method == "fp8":
        vals = sent[2][codes.long()]
    else:
        vals = codes.to(torch.float32)
    if c.method == "int4":
        groups = -(-c.cols // c.group)
        scale = scale.reshape(c.rows, groups)
        zero = sent[2].reshape(c.rows, groups).float()
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


def _torch_ecsq(c: Compact, target: Any, send: Upload) -> Any:
    """ECSQ on the device: ``table[low | high << 8] * scale[row]`` in f32 (the host's formula), then the cast."""
    import torch

    arrays = [c.sections[S_CODES], c.sections[S_SCALES], c.sections[S_TABLE]]
    if S_HIGH in c.sections:
        arrays.append(c.sections[S_HIGH])
    sent = send(arrays)
    index = sent[0].long()
    if len(sent) > 3:
        index |= sent[3].long() << 8
    y = sent[2][index].reshape(c.rows, c.cols) * sent[1][:, None]
    return y.to(target).reshape(-1).view(torch.uint8)


def _torch_lowrank(c: Compact, target: Any, send: Upload) -> Any:
    """``A·B`` on the device summed over the rank in order, a rounded multiply and add per term (the host's
    :func:`~mzstore.codecs.quant.lowrank_product`; a matmul would not give the same bits)."""
    import torch

    a, b = send([c.sections[S_LR_A], c.sections[S_LR_B]])
    a, b = a.reshape(c.rows, c.group), b.reshape(c.group, c.cols)
    y = torch.zeros((c.rows, c.cols), dtype=torch.float32, device=a.device)
    for k in range(c.group):
        y.add_(a[:, k : k + 1] * b[k : k + 1, :])
    return y.to(target).reshape(-1).view(torch.uint8)


# --- pinned staging -----------------------------------------------------------

_ALIGN = 64  # section offsets in a packed upload: any element view is aligned


def _grow(size: int) -> int:
    """Pinned allocations are slow: round up to a power of two, at least 1 MiB."""
    return max(1 << 20, 1 << max(size - 1, 0).bit_length())


def payload_matches(params: Mapping[str, Any], payload: Payload) -> bool:
    """Whether a quantized chunk's stored bytes match the hash ingest recorded for them."""
    b3 = params.get("payload_blake3")
    if isinstance(b3, str):
        return blake3_hex(payload) == b3
    sha = params.get("payload_sha256")
    return isinstance(sha, str) and hashlib.sha256(payload).hexdigest() == sha


@dataclass
class _Slot:
    """One pull thread's staging state."""

    buf: Any = None  # pinned uint8 tensor
    pending: Any = None  # CUDA event recorded after the last copy out of ``buf``
    streams: dict[Any, Any] = field(default_factory=dict)  # torch.device → torch.cuda.Stream


class PinnedStaging:
    """Per-thread page-locked host buffers and CUDA streams for host → device copies.

    The rule that makes reuse safe: :meth:`buffer` waits for the event of the
    last asynchronous copy out of the calling thread's buffer before handing
    it out again. Shared by every CUDA sub-sink of a load, so a thread holds
    one pinned buffer whatever the number of GPUs.
    """

    #: Page-locked buffers (a test turns this off to run the bookkeeping without a GPU).
    pin = True

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._streams: list[Any] = []

    def _slot(self) -> _Slot:
        slot = getattr(self._local, "slot", None)
        if slot is None:
            slot = self._local.slot = _Slot()
        return slot

    def stream(self, device: Any) -> Any:
        """The calling thread's stream on ``device``."""
        import torch

        slot = self._slot()
        stream = slot.streams.get(device)
        if stream is None:
            stream = torch.cuda.Stream(device=device)
            # Work already queued on the default stream (the destination buffers' allocation) comes first.
            stream.wait_stream(torch.cuda.current_stream(device))
            slot.streams[device] = stream
            with self._lock:
                self._streams.append(stream)
        return stream

    def buffer(self, size: int) -> Any:
        """The calling thread's pinned buffer, ``size`` bytes, once no copy out of it is in flight."""
        import torch

        slot = self._slot()
        if slot.pending is not None:
            slot.pending.synchronize()
            slot.pending = None
        if slot.buf is None or slot.buf.numel() < size:
            slot.buf = None
            slot.buf = torch.empty(_grow(size), dtype=torch.uint8, pin_memory=self.pin)
        return slot.buf[:size]

    def holds(self, data: np.ndarray) -> bool:
        """Whether ``data`` is the start of the calling thread's buffer (as :meth:`buffer` gave it)."""
        buf = self._slot().buf
        return buf is not None and data.size <= buf.numel() and data.ctypes.data == buf.data_ptr()

    def copy(self, dest: Any, size: int, stream: Any) -> None:
        """Copy the first ``size`` bytes of the thread's buffer into ``dest`` asynchronously on ``stream``."""
        import torch

        slot = self._slot()
        with torch.cuda.stream(stream):
            dest.copy_(slot.buf[:size], non_blocking=True)
            dest.record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
        slot.pending = event

    def upload(self, arrays: Sequence[np.ndarray], device: Any, stream: Any) -> list[Any]:
        """Pack ``arrays`` into the thread's buffer and send them in one asynchronous copy.

        Returns device tensors (views of one allocation, made on ``stream``) with
        the arrays' dtypes and shapes. Callers run their kernels on ``stream`` too.
        """
        import torch

        offsets, pos = [], 0
        flat = []
        for a in arrays:
            pos = -(-pos // _ALIGN) * _ALIGN
            offsets.append(pos)
            b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            flat.append(b)
            pos += b.size
        host = self.buffer(pos).numpy()
        for off, b in zip(offsets, flat, strict=True):
            host[off : off + b.size] = b
        with torch.cuda.stream(stream):
            dev = torch.empty(pos, dtype=torch.uint8, device=device)
        self.copy(dev, pos, stream)
        out = []
        for a, off, b in zip(arrays, offsets, flat, strict=True):
            kind = torch.from_numpy(np.empty(0, dtype=a.dtype)).dtype
            out.append(dev[off : off + b.size].view(kind).reshape(a.shape))
        return out

    def finish(self) -> None:
        """Wait for every copy and kernel queued so far on the staging streams."""
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.synchronize()


# --- sinks --------------------------------------------------------------------


class DeviceStateDictSink(Sink[dict[str, Any]]):
    """Builds ``{name: tensor}`` directly on ``device``, expanding quantized chunks there.

    Args:
        entries: the tensors to build (default: every tensor of ``files``).
        staging: pinned staging to share (CUDA only; one is made when not given).
        into: ``{name: tensor}`` to fill in place instead of allocating (``load_into``'s
            :func:`~mzstore.pull.load_into.in_place_targets`: contiguous, on ``device``, the
            entry's dtype and shape); :meth:`finish` returns those tensors themselves.
    """

    #: The pipeline hands chunks of these codecs over as verified stored bytes (see ``write_payload``).
    compact_codecs: frozenset[str] = frozenset({"quant"})

    def __init__(
        self,
        manifest: Manifest,
        device: Any,
        files: list[str] | None = None,
        *,
        entries: list[TensorEntry] | None = None,
        staging: PinnedStaging | None = None,
        into: Mapping[str, Any] | None = None,
    ) -> None:
        torch = torch_module("loading onto a device")
        self.device = torch.device(device)
        self.entries = entries if entries is not None else select_tensors(manifest, files)
        self.into = dict(into or {})
        self.buffers = _buffers(self.entries, self.into, self.device)
        self._scratch = ScratchBuffers()
        self._staging = staging
        if self.device.type == "cuda" and staging is None:
            self._staging = PinnedStaging()
        elif self.device.type != "cuda":
            self._staging = None

    def target(self, task: ChunkTask) -> np.ndarray:
        """Lossless chunks decode into a per-thread host buffer first (pinned for CUDA)."""
        if self._staging is not None:
            return self._staging.buffer(task.chunk.raw_length).numpy()
        return self._scratch.get(task.chunk.raw_length)

    def _dest(self, task: ChunkTask, size: int) -> Any:
        assert task.tensor is not None
        return self.buffers[task.tensor][task.tensor_offset : task.tensor_offset + size]

    def write(self, task: ChunkTask, data: np.ndarray) -> None:
        import torch

        dest = self._dest(task, len(data))
        if self._staging is not None and self._staging.holds(data):
            self._staging.copy(dest, len(data), self._staging.stream(self.device))
        else:
            dest.copy_(torch.from_numpy(data))

    def write_payload(self, task: ChunkTask, payload: Payload) -> None:
        """A quantized chunk: check the stored bytes' hash, send the compact form over, expand there."""
        assert task.tensor is not None
        if not payload_matches(task.chunk.params, payload):
            raise IntegrityError(f"chunk rows {task.chunk.rows} of {task.tensor}: stored bytes fail their hash check")
        compact = unpack(payload, task.chunk.raw_length, get_dtype(task.dtype))
        dest = self._dest(task, task.chunk.raw_length)
        if self._staging is None:
            dest.copy_(torch_expand(compact, task.dtype, self.device))
            return
        import torch

        staging, device = self._staging, self.device
        stream = staging.stream(device)
        with torch.cuda.stream(stream):
            expanded = torch_expand(compact, task.dtype, device, lambda arrays: staging.upload(arrays, device, stream))
            dest.copy_(expanded)
            dest.record_stream(stream)

    def wants(self, task: ChunkTask) -> bool:
        return task.tensor in self.buffers

    def abort(self) -> None:
        """Wait for every asynchronous copy (also after a failed pull)."""
        if self._staging is not None:
            self._staging.finish()

    def finish(self) -> dict[str, Any]:
        self.abort()
        return _tensors(self.entries, self.buffers, self.into)


class HostTensorSink(Sink[dict[str, Any]]):
    """CPU tensors for ``entries``: chunks decode straight into the tensors' memory.

    Also takes compact chunks (``write_payload``), which it decodes on the host
    with the pipeline's verified decoder: a :class:`DeviceMapSink` that mixes
    the CPU with a GPU receives them compact for every tensor.
    """

    def __init__(self, entries: list[TensorEntry], into: Mapping[str, Any] | None = None) -> None:
        self.entries = entries
        self.into = dict(into or {})  # filled in place, as in DeviceStateDictSink
        self.buffers = _buffers(entries, self.into, "cpu")

    def target(self, task: ChunkTask) -> np.ndarray:
        assert task.tensor is not None
        buf = self.buffers[task.tensor].numpy()
        return buf[task.tensor_offset : task.tensor_offset + task.chunk.raw_length]

    def write_payload(self, task: ChunkTask, payload: Payload) -> None:
        decode_verified(task.chunk, task.dtype, task.tensor or task.file, payload, self.target(task))

    def finish(self) -> dict[str, Any]:
        return _tensors(self.entries, self.buffers, self.into)


def _buffers(entries: Sequence[TensorEntry], into: Mapping[str, Any], device: Any) -> dict[str, Any]:
    """A sink's flat ``uint8`` buffer per tensor: the bytes of the tensor ``into`` names for it, else new memory."""
    torch = torch_module()
    return {
        t.name: tensor_bytes(into[t.name])
        if t.name in into
        else torch.empty(t.data_offsets[1] - t.data_offsets[0], dtype=torch.uint8, device=device)
        for t in entries
    }


def tensor_bytes(tensor: Any) -> Any:
    """The bytes of a contiguous tensor as a flat ``uint8`` view of its memory (writes go into the tensor)."""
    return tensor.detach().reshape(-1).view(torch_module().uint8)


def _tensors(entries: Sequence[TensorEntry], buffers: dict[str, Any], into: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: tensor}`` from a sink's filled buffers: the tensors filled in place themselves, the rest typed.

    A tensor filled in place is marked as changed (its autograd version goes up, as a ``copy_`` into it
    would do): the decoders wrote its memory through numpy, which autograd does not see, and a backward
    pass over a graph that saved its old values must fail rather than use the new ones.
    """
    from torch.autograd.graph import increment_version

    out = {}
    for t in entries:
        buf = buffers.pop(t.name)
        if t.name in into:
            out[t.name] = into[t.name]
            try:
                increment_version(into[t.name])
            except RuntimeError:  # an inference tensor on a torch that refuses to count it: it has no version
                pass
        else:
            out[t.name] = buf.view(torch_dtype(t.dtype)).reshape(t.shape)
    return out


def _torch_device(label: str) -> Any:
    """``torch.device(label)``, refusing what this process cannot allocate on before anything is fetched."""
    import torch

    try:
        device = torch.device(label)
    except RuntimeError:
        raise InvalidArgument(f"{label!r} is not a torch device") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise InvalidArgument(f"device {label}: CUDA is not available")
        if device.index is not None and device.index >= count:
            raise InvalidArgument(f"device {label}: only {count} CUDA device(s) visible")
    return device


class DeviceMapSink(Sink[dict[str, Any]]):
    """Builds ``{name: tensor}`` with every tensor on its own device (see :mod:`mzstore.pull.device_map`).

    Args:
        placement: ``{tensor name: device}`` for the tensors to build; other tensors are not wanted.
        expand_on_device: use the device path (compact chunks expanded by torch) for CPU
            targets too (default: only for other devices), as ``load_state_dict`` does.
        into: ``{name: tensor}`` filled in place (see :class:`DeviceStateDictSink`).

    Raises:
        InvalidArgument: a placed name that is not a tensor of the selected files.
    """

    def __init__(
        self,
        manifest: Manifest,
        placement: Mapping[str, Any],
        files: list[str] | None = None,
        *,
        expand_on_device: bool | None = None,
        into: Mapping[str, Any] | None = None,
    ) -> None:
        into = into or {}
        entries = [t for t in select_tensors(manifest, files) if t.name in placement]
        absent = set(placement) - {t.name for t in entries}
        if absent:
            raise InvalidArgument(f"not tensors of this model: {few_names(sorted(absent))}")
        groups: dict[str, list[TensorEntry]] = {}
        for t in entries:
            groups.setdefault(str(placement[t.name]), []).append(t)
        devices = {label: _torch_device(label) for label in groups}
        self._staging = PinnedStaging() if any(d.type == "cuda" for d in devices.values()) else None
        self.sinks: dict[str, DeviceStateDictSink | HostTensorSink] = {}
        self._route: dict[str, DeviceStateDictSink | HostTensorSink] = {}
        for label, group in groups.items():
            device = devices[label]
            on_device = expand_on_device if expand_on_device is not None else device.type != "cpu"
            mine = {t.name: into[t.name] for t in group if t.name in into}
            sink: DeviceStateDictSink | HostTensorSink
            if on_device:
                sink = DeviceStateDictSink(manifest, device, entries=group, staging=self._staging, into=mine)
            else:
                sink = HostTensorSink(group, into=mine)
            self.sinks[label] = sink
            self._route.update(dict.fromkeys((t.name for t in group), sink))
        wants_compact = any(isinstance(s, DeviceStateDictSink) for s in self.sinks.values())
        if wants_compact:
            self.compact_codecs = DeviceStateDictSink.compact_codecs
        self.placement = {t.name: str(placement[t.name]) for t in entries}

    def wants(self, task: ChunkTask) -> bool:
        return task.tensor in self._route

    def _sink(self, task: ChunkTask) -> DeviceStateDictSink | HostTensorSink:
        assert task.tensor is not None
        return self._route[task.tensor]

    def target(self, task: ChunkTask) -> np.ndarray:
        return self._sink(task).target(task)

    def write(self, task: ChunkTask, data: np.ndarray) -> None:
        self._sink(task).write(task, data)

    def write_payload(self, task: ChunkTask, payload: Payload) -> None:
        self._sink(task).write_payload(task, payload)

    def abort(self) -> None:
        """Wait for every asynchronous copy (also after a failed pull)."""
        if self._staging is not None:
            self._staging.finish()

    def finish(self) -> dict[str, Any]:
        self.abort()
        out: dict[str, Any] = {}
        for sink in self.sinks.values():
            out.update(sink.finish())
        return out
