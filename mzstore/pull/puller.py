"""The one pull path: manifest → plan → fetch → decode → verify → sink, for every output.

How it works: a :class:`Puller` holds what every pull shares — the
``fetch(blob, offset, length)`` callable of a transport, the local chunk
cache, the worker count and the in-flight byte budget. :meth:`Puller.run`
plans the manifest's chunk tasks (:func:`~mzstore.pull.plan.plan_pull`),
keeps those the sink wants, opens the sink, runs the pipeline
(:func:`~mzstore.pull.pipeline.run_pull`: parallel range reads, retries,
cache, decode, hash check) and finishes the sink — or aborts it, so a failed
pull leaves nothing half-written. Each output is just a sink:

==========================  ==================================================
output                      sink
==========================  ==================================================
``pull -o DIR``             :class:`~mzstore.pull.sinks.DirectorySink`
``pull --tp-size/--tp-rank``  :class:`~mzstore.pull.sinks.TensorParallelFilesSink`
``pull --keep-quantized``   :class:`~mzstore.pull.keep_quantized.KeepQuantizedSink`
``load_state_dict`` (CPU)   :class:`~mzstore.pull.sinks.StateDictSink`
… on a GPU                  :class:`~mzstore.pull.device.DeviceStateDictSink`
… one TP rank               :class:`~mzstore.pull.sinks.TensorParallelSink`
``load_into`` (device map)  :class:`~mzstore.pull.device.DeviceMapSink`
==========================  ==================================================

The transport, resolving refs and checking manifests belong to the caller
(:class:`mzstore.client.Client`); a ``Puller`` over any ``fetch`` — a
transport's, a :class:`~mzstore.storage.Store`'s, a test's — pulls the same way.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mzstore.errors import MzstoreError, UsageError
from mzstore.format.manifest import Manifest
from mzstore.pull.pipeline import COALESCE_BYTES, Cache, Fetch, Parts, PullStats, run_pull
from mzstore.pull.plan import plan_pull
from mzstore.pull.sinks import (
    DirectorySink,
    FileBytesSink,
    Sink,
    StateDictSink,
    TensorParallelFilesSink,
    TensorParallelSink,
)
from mzstore.pull.tp import DEFAULT_RULES, tp_warnings
from mzstore.settings import DEFAULT_PULL_INFLIGHT_BYTES

log = logging.getLogger("mzstore.pull")

R = TypeVar("R")
#: Called with each verified chunk's decoded size (a progress bar's ``update``), or ``None``.
ProgressFn = Callable[[int], None] | None
TpRules = list[tuple[str, int | None]]


@dataclass
class Puller:
    """Everything a pull needs besides the manifest and the output.

    Attributes:
        fetch: ``fetch(blob, offset, length) -> bytes`` (a transport's ``read_blob``).
        cache: the local chunk cache, or ``None``.
        workers: decoder threads.
        streams: range reads in flight ahead of the decoders (default: ``workers``).
        refetch: how a chunk that failed its check is read again (default ``fetch``; a transport's
            ``read_blob_again``, which goes to the origin past any cache in between).
        inflight_bytes: cap on stored + decoded bytes of the chunks in flight.
        coalesce_bytes: small adjacent chunks share one range read up to this many bytes (0: never).
        retries: attempts per chunk on transient fetch errors.
        durable: outputs written to a directory are fsynced before they take their final names.
        parts: ``parts(blob, offset, lengths)`` reads runs of adjacent chunks in one request, each
            chunk yielded as it arrives (the HTTP transport's ``read_parts``); ``None``: ``fetch`` alone.
    """

    fetch: Fetch
    cache: Cache | None = None
    workers: int = 4
    streams: int | None = None
    refetch: Fetch | None = None
    inflight_bytes: int | None = DEFAULT_PULL_INFLIGHT_BYTES
    coalesce_bytes: int = COALESCE_BYTES
    retries: int = 3
    durable: bool = True
    parts: Parts | None = None

    def run(
        self, manifest: Manifest, sink: Sink[R], files: list[str] | None = None, progress: ProgressFn = None
    ) -> tuple[R, PullStats]:
        """Pull the chunks of ``manifest`` (of ``files``) that ``sink`` wants into it; its result and the counts.

        Raises:
            IntegrityError: a chunk failed verification twice; Unavailable: fetching kept failing.
            Whatever the sink raises. On any failure the sink is aborted.
        """
        tasks = [t for t in plan_pull(manifest, files) if sink.wants(t)]
        try:
            sink.open()
            try:
                stats = run_pull(
                    tasks,
                    self.fetch,
                    sink,
                    workers=self.workers,
                    streams=self.streams,
                    refetch=self.refetch,
                    retries=self.retries,
                    on_bytes=progress,
                    cache=self.cache,
                    inflight_bytes=self.inflight_bytes,
                    coalesce_bytes=self.coalesce_bytes,
                    parts=self.parts,
                )
            finally:
                if self.cache is not None:
                    self.cache.flush()  # the chunks it still writes behind the pull: a finished pull left them all
            return sink.finish(), stats
        except BaseException:
            sink.abort()
            raise

    def file_bytes(self, manifest: Manifest, path: str) -> bytes | None:
        """The bytes of the model's plain file ``path`` (``config.json``…), or ``None`` when it has none."""
        entry = next((f for f in manifest.files if f.path == path and f.kind == "file"), None)
        return None if entry is None else self.run(manifest, FileBytesSink(entry), [path])[0]

    def _warn_tp(self, manifest: Manifest, tp_size: int, tp_rules: TpRules | None) -> None:
        """Say, in one line each, what a ``tp_size``-way split gets wrong (see :func:`~mzstore.pull.tp.tp_warnings`)."""
        if tp_size <= 1:
            return
        config: Any = None
        try:
            raw = self.file_bytes(manifest, "config.json")
            config = json.loads(raw) if raw else None
        except (MzstoreError, ValueError):
            config = None
        shapes = [(t.name, t.shape) for t in manifest.tensors]
        for warning in tp_warnings(
            shapes, tp_size, tp_rules or DEFAULT_RULES, config if isinstance(config, dict) else None
        ):
            log.warning("warning: tensor-parallel size %d: %s", tp_size, warning)

    # -- the outputs ----------------------------------------------------------------------
    def to_directory(
        self,
        manifest: Manifest,
        out_dir: str | os.PathLike[str],
        *,
        progress: ProgressFn = None,
        keep_quantized: bool = False,
        tp_size: int = 1,
        tp_rank: int = 0,
        tp_rules: TpRules | None = None,
        ref: str = "",
        files: list[str] | None = None,
    ) -> tuple[list[Path], PullStats]:
        """Write ``manifest``'s model under ``out_dir``: its source layout, one TP rank's slices,
        or the compressed-tensors layout; nothing appears under a final name until every chunk is verified.

        ``files`` (a plain pull only) writes just these of the model's files.
        """
        sink: Sink[list[Path]]
        if files is not None:
            if tp_size > 1 or tp_rank or keep_quantized:
                raise UsageError("choosing files (--include/--exclude) works for a plain pull only")
            chosen = set(files)
            return self.run(
                manifest,
                DirectorySink(out_dir, manifest, [f for f in manifest.files if f.path in chosen], self.durable),
                files,
                progress,
            )
        if tp_size > 1 or tp_rank:
            if keep_quantized:
                raise UsageError("--keep-quantized and tensor-parallel slices cannot be combined")
            self._warn_tp(manifest, tp_size, tp_rules)
            sink = TensorParallelFilesSink(out_dir, manifest, tp_size, tp_rank, tp_rules, ref=ref, durable=self.durable)
        elif keep_quantized:
            from mzstore.pull.keep_quantized import KeepQuantizedSink

            sink = KeepQuantizedSink(out_dir, manifest, durable=self.durable)
        else:
            sink = DirectorySink(out_dir, manifest, durable=self.durable)
        return self.run(manifest, sink, progress=progress)

    def state_dict(
        self,
        manifest: Manifest,
        *,
        device: str | Any = "cpu",
        files: list[str] | None = None,
        expand_on_device: bool | None = None,
        tp_size: int = 1,
        tp_rank: int = 0,
        tp_rules: TpRules | None = None,
        progress: ProgressFn = None,
    ) -> dict[str, Any]:
        """``{name: tensor}`` on ``device`` (see :meth:`mzstore.client.Client.load_state_dict`)."""
        sink: Sink[dict[str, Any]]
        if tp_size > 1 or tp_rank:
            self._warn_tp(manifest, tp_size, tp_rules)
            sink = TensorParallelSink(manifest, tp_size, tp_rank, tp_rules, files, device=device)
        elif expand_on_device if expand_on_device is not None else str(device) != "cpu":
            from mzstore.pull.device import DeviceStateDictSink

            sink = DeviceStateDictSink(manifest, device, files)
        else:
            sink = StateDictSink(manifest, files, device)
        return self.run(manifest, sink, files, progress)[0]

    def into_model(
        self,
        model: Any,
        manifest: Manifest,
        *,
        device_map: Any = None,
        devices: list[Any] | None = None,
        strict: bool = True,
        prefix: str | None = None,
        files: list[str] | None = None,
        expand_on_device: bool | None = None,
        in_place: bool = True,
        progress: ProgressFn = None,
    ) -> dict[str, Any]:
        """Load ``manifest``'s tensors into ``model`` (see :meth:`mzstore.client.Client.load_into`)."""
        from mzstore.pull.device import DeviceMapSink
        from mzstore.pull.load_into import apply_loaded, plan_load

        plan = plan_load(
            model,
            manifest,
            device_map=device_map,
            devices=devices,
            strict=strict,
            prefix=prefix,
            files=files,
            in_place=in_place,
        )
        sink = DeviceMapSink(manifest, plan.placement, files, expand_on_device=expand_on_device, into=plan.into)
        tensors, _ = self.run(manifest, sink, files, progress)
        return apply_loaded(model, plan, tensors, strict=strict)
