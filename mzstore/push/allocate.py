"""Client-side bit allocation of an ``ecsq`` push: source → per-tensor steps.

The push's client holds the whole model before anything is sent, so it
decides each tensor's step (:mod:`mzstore.codecs.allocation`) and sends the
steps in the push's first message; the server encodes each chunk with its
tensor's step as the bytes stream in, and records the allocation in the
manifest. How::

    safetensors headers ──▶ which tensors are lossy (the policy's keep rules)
    each lossy tensor ────▶ a sample of its rows (≤ 64 Ki values, seeks, not a full read)
    each kept tensor  ────▶ its lossless size, estimated on a sample of ≤ 1 MiB
    sensitivities     ────▶ probe (push --probe, a Hugging Face directory) › role table › uniform
    bisection         ────▶ the global step that meets size=S or cos=C

Reading samples costs seeks, not a pass over the model: a 7B bf16 model
(~300 tensors) reads about 40 MB.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mzstore.codecs.allocation import (
    Allocation,
    TensorSample,
    allocate,
    normalized_sample,
    role_sensitivities,
    sampled_rows,
    uniform_sensitivities,
)
from mzstore.codecs.lossless import LosslessCodec
from mzstore.codecs.policy import Policy
from mzstore.codecs.quant import to_f32
from mzstore.errors import InvalidArgument
from mzstore.push.source import Source, safetensors_files

log = logging.getLogger("mzstore.push")

#: Bytes of a kept tensor compressed to estimate its lossless size.
KEPT_SAMPLE_BYTES = 1 << 20


def sample_source(source: Source, policy: Policy) -> tuple[list[TensorSample], float, int]:
    """Samples of the lossy tensors, the predicted stored bytes of the others, and the raw bytes of all files.

    Raises:
        FormatError: a malformed safetensors header.
    """
    lossless = LosslessCodec()
    samples: list[TensorSample] = []
    kept = 0.0
    raw = 0
    for f, fh, header in safetensors_files(source):
        raw += f.size
        kept += header.data_start  # the length prefix and the header, stored in the manifest
        base = header.data_start
        for t in header.tensors:
            if policy.mode_for(t.name, t.dtype.name, t.shape) == "lossless":
                take = min(t.nbytes, KEPT_SAMPLE_BYTES)
                if take:
                    fh.seek(base + t.begin)
                    part = fh.read(take)
                    kept += t.nbytes * len(lossless.encode(part, t.dtype)[0]) / max(1, len(part))
                continue
            rows = t.shape[0]
            cols = t.numel // rows
            width = cols * t.dtype.bits // 8
            picked = sampled_rows(rows, cols)
            parts = []
            for r in picked:
                fh.seek(base + t.begin + int(r) * width)
                parts.append(fh.read(width))
            x = to_f32(b"".join(parts), t.dtype).reshape(len(picked), cols)
            samples.append(TensorSample(t.name, t.numel, rows, normalized_sample(x), max(1, t.dtype.bits // 8)))
    return samples, kept, raw


def plan_allocation(source: Source, policy: Policy, *, probe: bool = False, origin: Path | None = None) -> Allocation:
    """The allocation of an ECSQ push of ``source`` (see the module docstring).

    Args:
        probe: measure sensitivities with random tokens through the model (needs ``origin``, a Hugging Face
            model directory, and torch and transformers); when it cannot run, the role table is used and
            the allocation's ``note`` says why.

    Raises:
        InvalidArgument: ``policy`` is not an ECSQ policy.
    """
    if policy.ecsq is None:
        raise InvalidArgument(f"{policy.text} is not an ecsq policy")
    samples, kept, raw = sample_source(source, policy)
    names = [s.name for s in samples]
    note = ""
    prober = None
    sens: dict[str, float] | None = None
    source_name = "roles"
    if probe:
        from mzstore.push.probe import Probe, ProbeUnavailable

        try:
            prober = Probe.load(origin)
            sens = prober.sensitivities(samples, fallback=role_sensitivities(names) or uniform_sensitivities(names))
            source_name = "probe"
        except ProbeUnavailable as exc:
            note = f"probe not run: {exc}"
            log.warning("mzstore: %s; allocating by the role table", note)
    if sens is None:
        sens = role_sensitivities(names)
        if sens is None:
            sens, source_name = uniform_sensitivities(names), "uniform"
    alloc = allocate(samples, sens, source_name, policy.ecsq, kept_bytes=kept, raw_bytes=raw)
    if prober is not None:
        if policy.ecsq.target == "cos":
            alloc = prober.meet(samples, sens, alloc, policy.ecsq.value, kept, raw)
        else:
            alloc.probe_cos = prober.cosine(alloc.steps)
    alloc.note = note
    return alloc
