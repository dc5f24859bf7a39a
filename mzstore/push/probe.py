"""The data-free sensitivity probe of an ``ecsq`` push (``push --probe``).

No calibration data: the model (a Hugging Face directory that
``transformers`` can build on the CPU) runs on a fixed batch of random
token ids, and its last hidden state is the reference. For each lossy
tensor, the tensor alone is replaced by its ECSQ reconstruction at a
reference step (:data:`REFERENCE_STEP`); the output's relative squared
error over the tensor's relative squared error is the tensor's sensitivity
``a_k``. Errors of different tensors add up (checked on MiniLM: predicted
7.18e-3, measured 7.17e-3), so the model's output cosine at any allocation
is predicted from these; :meth:`Probe.cosine` measures it with every tensor
quantized, and :meth:`Probe.meet` tightens the step until a ``cos=`` target
is met as measured.

Random tokens are a harder input than text: on MiniLM, 1 - cosine of real
sentence embeddings is about 0.6x that of the probe's per-token outputs,
so a ``cos=`` target met by the probe is met with room on real inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mzstore.codecs.allocation import Allocation, TensorSample, allocate
from mzstore.codecs.policy import Ecsq
from mzstore.codecs.quant import ecsq_reconstruct

log = logging.getLogger("mzstore.push")

#: The step (units of a row's RMS) at which each tensor's sensitivity is measured.
REFERENCE_STEP = 0.5
#: Random token sequences × tokens per sequence; the seed makes the probe repeatable.
BATCH, SEQUENCE, SEED = 8, 64, 0
#: Times :meth:`Probe.meet` tightens the step when the measured cosine falls short.
MEET_TRIES = 4


class ProbeUnavailable(Exception):
    """The probe cannot run on this source or machine (the reason is the message)."""


class Probe:
    """A model loaded on the CPU with its reference output on random tokens."""

    def __init__(self, model: Any, params: dict[str, Any], ids: Any, reference: Any) -> None:
        self.model = model
        self.params = params
        self.ids = ids
        self.reference = reference

    @classmethod
    def load(cls, directory: Path | None) -> Probe:
        """Build the model of a Hugging Face directory on the CPU.

        Raises:
            ProbeUnavailable: not a model directory, torch or transformers missing, or the model does not build.
        """
        if directory is None or not (Path(directory) / "config.json").is_file():
            raise ProbeUnavailable("the source is not a Hugging Face model directory (no config.json)")
        try:
            import torch
            from transformers import AutoModel
        except ImportError as exc:
            raise ProbeUnavailable(f"torch and transformers are needed ({exc})") from None
        try:
            try:
                model = AutoModel.from_pretrained(str(directory), dtype=torch.float32)
            except TypeError:  # transformers before 4.56 names it torch_dtype
                model = AutoModel.from_pretrained(str(directory), torch_dtype=torch.float32)
            model.eval()
        except Exception as exc:  # noqa: BLE001 - any failure to build the model means no probe
            raise ProbeUnavailable(f"transformers cannot build the model on the CPU: {str(exc)[:200]}") from None
        vocab = int(getattr(model.config, "vocab_size", 0) or 0)
        if vocab < 2:
            raise ProbeUnavailable("the model has no vocabulary to draw random tokens from")
        gen = torch.Generator().manual_seed(SEED)
        low = min(1000, vocab // 10)  # past the special and byte tokens of most vocabularies
        ids = torch.randint(low, vocab, (BATCH, SEQUENCE), generator=gen)
        params = dict(model.named_parameters())
        probe = cls(model, params, ids, None)
        probe.reference = probe._forward()
        return probe

    def _forward(self) -> Any:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=self.ids)
        hidden = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out.logits
        return hidden.double()

    def _param(self, name: str) -> Any | None:
        """The model parameter of a file's tensor name (the file may carry a prefix such as ``bert.``)."""
        if name in self.params:
            return self.params[name]
        matches = [p for key, p in self.params.items() if name.endswith("." + key) or key.endswith("." + name)]
        return matches[0] if len(matches) == 1 else None

    def _rel_error(self) -> float:
        out = self._forward()
        ref = self.reference
        return float(((out - ref) ** 2).sum() / max(float((ref**2).sum()), 1e-30))

    def _swap(self, steps: dict[str, float]) -> dict[str, Any]:
        """Replace the named parameters by their reconstruction at their steps; returns the originals."""
        import torch

        saved = {}
        for name, step in steps.items():
            p = self._param(name)
            if p is None:
                continue
            saved[name] = p.detach().clone()
            x = saved[name].float().reshape(p.shape[0], -1).numpy()
            with torch.no_grad():
                p.copy_(torch.from_numpy(ecsq_reconstruct(x, step)).reshape(p.shape))
        return saved

    def _restore(self, saved: dict[str, Any]) -> None:
        import torch

        with torch.no_grad():
            for name, value in saved.items():
                self._param(name).copy_(value)  # type: ignore[union-attr]

    def sensitivities(self, samples: list[TensorSample], fallback: dict[str, float]) -> dict[str, float]:
        """``a_k`` of each sampled tensor; tensors the model does not hold get ``fallback``'s value.

        A tensor the model holds but does not use for its output (a pooler) measures 0.
        """
        out: dict[str, float] = {}
        for t in samples:
            saved = self._swap({t.name: REFERENCE_STEP})
            if not saved:
                out[t.name] = fallback[t.name]
                continue
            try:
                out_err = self._rel_error()
            finally:
                self._restore(saved)
            out[t.name] = out_err / max(t.rel_mse(REFERENCE_STEP), 1e-12)
        missing = [t.name for t in samples if self._param(t.name) is None]
        if missing:
            log.info(
                "mzstore: the probe's model lacks %d tensors (%s…); they use the role table", len(missing), missing[0]
            )
        return out

    def cosine(self, steps: dict[str, float]) -> float:
        """The mean per-token cosine of the model's output with every tensor at its step, to the original's."""
        import torch

        saved = self._swap(steps)
        try:
            out = self._forward()
        finally:
            self._restore(saved)
        return float(torch.nn.functional.cosine_similarity(out, self.reference, dim=-1).mean())

    def meet(
        self,
        samples: list[TensorSample],
        sens: dict[str, float],
        alloc: Allocation,
        target: float,
        kept: float,
        raw: int,
    ) -> Allocation:
        """Tighten ``alloc`` until the measured cosine meets ``target`` (a few tries; the last is kept)."""
        measured = self.cosine(alloc.steps)
        goal = target
        for _ in range(MEET_TRIES):
            if measured >= target:
                break
            # 1 - cos scales with the squared step: aim the prediction lower by the shortfall's ratio.
            shortfall = (1 - measured) / max(1 - goal, 1e-9)
            goal = 1 - (1 - goal) / shortfall
            alloc = allocate(
                samples, sens, alloc.source, Ecsq("cos", min(goal, 1 - 1e-9)), kept_bytes=kept, raw_bytes=raw
            )
            measured = self.cosine(alloc.steps)
        alloc.target = f"cos={target:g}"
        alloc.probe_cos = measured
        return alloc
