"""Bit allocation across tensors for ``ecsq`` (pure: numpy in, numbers out).

Tensors differ 30-90x in how much an error in one of their weights moves
the model's output (on all-MiniLM-L6-v2 the word embeddings, half the
parameters, are the least sensitive; attention ``value`` and the FFN input
projections the most). ECSQ spends bits accordingly: tensor ``k`` is
quantized with step ``D · m_k`` (units of a row's RMS), where

* ``a_k`` is the tensor's *sensitivity*: the output's relative squared error
  per unit of relative squared error in the tensor's weights;
* ``m_k ∝ sqrt(numel_k / a_k)``, normalized so the parameter-weighted
  geometric mean is 1, clamped to ``[1/8, 8]`` (high-rate theory: this
  equalizes the output error bought per stored bit);
* the global step ``D`` is bisected so that the predicted stored size, or
  the predicted output cosine, meets the push's target.

Where the sensitivities come from (recorded in the manifest as ``source``):

``probe``  measured with random tokens through the model on the client
           (:mod:`mzstore.push.probe`; ``push --probe``);
``roles``  the role table below, by tensor name (q, k, v, attention out,
           FFN in/out, embeddings, head): each role's total sensitivity is
           shared by the tensors of that role (one per layer);
``uniform`` every tensor alike (no name has a known role).

The table's numbers are MiniLM's probe (``a`` summed over its six layers),
so on other models the *allocation* transfers well (the ordering of roles
is the robust part) and a ``cos=`` target is an estimate; ``--probe``
measures it. Predictions use a sample of each tensor's rows (at most
:data:`SAMPLE_VALUES` values): stored bits from an optimal Huffman code of
the sampled symbols, byte plane by byte plane, as zstd codes them (at least
one bit per symbol, which matters at low rates; :data:`CODER_OVERHEAD`),
error from quantizing the sample with its bin means, as the codec does.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mzstore.codecs.policy import ECSQ_STEP_RANGE, Ecsq
from mzstore.codecs.quant import ecsq_normalize, zigzag
from mzstore.errors import InvalidArgument

#: Values sampled per tensor (evenly spaced rows) for the size and error predictions.
SAMPLE_VALUES = 1 << 16
#: Stored bits per symbol over what a Huffman code of the sample's histogram spends (zstd codes literals with
#: Huffman tables per block, in four streams, with their headers).
CODER_OVERHEAD = 1.005
#: Bits per row (its f16 scale), per table entry in use (f16), per chunk (headers) on top of the symbols.
ROW_BITS = 16
ENTRY_BITS = 16
CHUNK_BITS = 8 * 128
#: The push's chunk size the prediction assumes (the server's default; each chunk has its own table).
CHUNK_BYTES = 16 << 20
#: Multipliers are clamped to this range around the geometric mean.
MULTIPLIER_RANGE = (1 / 8, 8.0)
#: Steps are recorded with this many significant digits (the recorded step is the one used).
STEP_DIGITS = 6
SOURCES = ("probe", "roles", "uniform")

#: Role → pattern on the tensor name (first match wins).
ROLE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (role, re.compile(pattern, re.I))
    for role, pattern in (
        ("position", r"(position|token_type)_?embed|wpe\b|embed_positions"),
        ("embed", r"word_embeddings|embed_tokens|tok_embeddings|\bwte\b|\bembeddings?\.weight$|shared\.weight$"),
        ("pooler", r"\bpooler\b"),
        ("head", r"lm_head|classifier|score\.weight$"),
        ("q", r"[._](query|q_proj|q|wq)\."),
        ("k", r"[._](key|k_proj|k|wk)\."),
        ("v", r"[._](value|v_proj|v|wv)\."),
        ("qkv", r"[._](c_attn|qkv_proj|query_key_value|Wqkv|qkv|in_proj)[._]"),
        ("attn_out", r"(attention\.output\.dense|o_proj|out_proj|self_attn\.dense|attn\.c_proj|[._](wo|o)\.)"),
        ("ffn_in", r"(intermediate\.dense|up_proj|gate_proj|gate_up_proj|fc1|c_fc|[._]w[13]\.|dense_h_to_4h)"),
        ("ffn_out", r"(output\.dense|down_proj|fc2|mlp\.c_proj|[._]w2\.|dense_4h_to_h)"),
    )
)

#: Total sensitivity of each role over a model's layers (MiniLM's probe; see the module docstring).
ROLE_SENSITIVITY: dict[str, float] = {
    "embed": 0.66,
    "position": 0.14,
    "head": 0.66,
    # BERT's pooler feeds only the pooled [CLS] output, which mean-pooling embedders and the hidden states
    # never see (the probe measures 0 on MiniLM); a classifier on it would, so it is low, not zero.
    "pooler": 0.05,
    "q": 0.43,
    "k": 0.43,
    "v": 1.64,
    "qkv": 2.50,
    "attn_out": 0.54,
    "ffn_in": 4.06,
    "ffn_out": 1.95,
}
#: Total sensitivity of a model whose names have no known role (MiniLM's sum), shared equally.
UNIFORM_TOTAL = sum(v for k, v in ROLE_SENSITIVITY.items() if k not in ("head", "qkv"))


def role_of(name: str) -> str | None:
    """The role of a tensor by its name, or ``None``."""
    for role, pattern in ROLE_PATTERNS:
        if pattern.search(name):
            return role
    return None


@dataclass
class TensorSample:
    """What the allocation needs of one lossy tensor.

    Attributes:
        name: the tensor's name.
        numel: its number of values.
        rows: its rows (dim 0), each with its own scale.
        values: a sample of its rows, each divided by its RMS (f32, 1-D).
        itemsize: bytes per element of its dtype (how many chunks it makes).
    """

    name: str
    numel: int
    rows: int
    values: np.ndarray
    itemsize: int = 4

    def symbols(self, step: float) -> np.ndarray:
        return np.rint(self.values * np.float32(1.0 / step)).astype(np.int64)

    def bits(self, step: float) -> float:
        """Predicted stored bits of the whole tensor at ``step``.

        The symbols cost their entropy (of each byte plane apart when there are two, as they are coded),
        plus the row scales and, per chunk, a table entry per symbol in use and a header.
        """
        chunks = max(1, -(-self.numel * self.itemsize // CHUNK_BYTES))
        if not self.values.size:
            return float(chunks * CHUNK_BITS)
        z = zigzag(self.symbols(step))
        bits = min(8.0, _huffman_bits(z & 255) * CODER_OVERHEAD)  # stored raw at worst
        if int(z.max()) >= 256:  # the high plane is nearly all zeros: zstd's matches take it near its entropy
            bits += _entropy(z >> 8)
        used = len(np.unique(z))
        return self.numel * bits + self.rows * ROW_BITS + chunks * (used * ENTRY_BITS + CHUNK_BITS)

    def rel_mse(self, step: float) -> float:
        """Predicted relative squared error (error energy / signal energy) at ``step``, with bin means."""
        v = self.values.astype(np.float64)
        energy = float(v @ v)
        if energy == 0:
            return 0.0
        q = self.symbols(step)
        _, inverse, counts = np.unique(q, return_inverse=True, return_counts=True)
        means = np.bincount(inverse, weights=v) / counts
        err = v - means[inverse]
        return float(err @ err) / energy


def _entropy(symbols: np.ndarray) -> float:
    """Empirical entropy in bits per symbol."""
    counts = np.bincount(symbols.ravel())
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum())


def _huffman_bits(symbols: np.ndarray) -> float:
    """Bits per symbol of an optimal Huffman code for the symbols' histogram (zstd's literal coder): at
    least one bit per symbol, which is what costs at low rates (1.5 bits of entropy → 2.2 bits)."""
    counts = np.bincount(symbols.ravel())
    counts = counts[counts > 0]
    if len(counts) <= 1:
        return 0.0  # one symbol: zstd stores the block as a run
    # Merge the two lightest groups until one is left; each merge lengthens the codes of both by a bit.
    heap = [(int(c), i, [i]) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    lengths = np.zeros(len(counts))
    while len(heap) > 1:
        c1, i1, m1 = heapq.heappop(heap)
        c2, _, m2 = heapq.heappop(heap)
        lengths[m1 + m2] += 1
        heapq.heappush(heap, (c1 + c2, i1, m1 + m2))
    return float((lengths * counts).sum() / counts.sum())


def sampled_rows(rows: int, cols: int, limit: int = SAMPLE_VALUES) -> np.ndarray:
    """The indices of the evenly spaced rows sampled from a ``rows × cols`` matrix (about ``limit`` values)."""
    return np.linspace(0, rows - 1, max(1, min(rows, limit // max(1, cols)))).astype(np.intp)


def normalized_sample(picked: np.ndarray, limit: int = SAMPLE_VALUES) -> np.ndarray:
    """Sampled rows divided by their scales as the codec stores them (:func:`ecsq_normalize`), flat, at most
    ``limit`` values."""
    return ecsq_normalize(picked)[0].reshape(-1)[:limit].astype(np.float32)


def sample_rows(x: np.ndarray, limit: int = SAMPLE_VALUES) -> np.ndarray:
    """Evenly spaced rows of a ``rows × cols`` f32 matrix, each divided by its RMS, at most ``limit`` values."""
    rows, cols = x.shape
    return normalized_sample(x[sampled_rows(rows, cols, limit)], limit)


def role_sensitivities(names: list[str]) -> dict[str, float] | None:
    """Each tensor's sensitivity from the role table (a role's total shared by its tensors), or ``None``
    when no name has a role. Tensors without a role get the median of the others."""
    roles = {n: role_of(n) for n in names}
    if not any(roles.values()):
        return None
    counts: dict[str, int] = {}
    for role in roles.values():
        if role is not None:
            counts[role] = counts.get(role, 0) + 1
    sens = {n: ROLE_SENSITIVITY[r] / counts[r] for n, r in roles.items() if r is not None}
    median = float(np.median(list(sens.values())))
    return {n: sens.get(n, median) for n in names}


def uniform_sensitivities(names: list[str]) -> dict[str, float]:
    return {n: UNIFORM_TOTAL / max(1, len(names)) for n in names}


def multipliers(tensors: list[TensorSample], sens: dict[str, float]) -> dict[str, float]:
    """Step multipliers ``m_k ∝ sqrt(numel_k / a_k)``: parameter-weighted geometric mean 1, clamped."""
    if not tensors:
        return {}
    lo, hi = MULTIPLIER_RANGE
    numel = np.array([t.numel for t in tensors], dtype=np.float64)
    a = np.array([max(sens[t.name], 1e-12) for t in tensors])
    log_m = 0.5 * (np.log(numel) - np.log(a))
    log_m -= float((log_m * numel).sum() / numel.sum())
    return {t.name: float(np.clip(np.exp(v), lo, hi)) for t, v in zip(tensors, log_m, strict=True)}


@dataclass
class Allocation:
    """The steps of one ECSQ push and what was predicted (and measured) for them.

    Sent by the client in the push's first message and recorded in the manifest (without ``steps``,
    which each tensor's codec records).
    """

    source: str
    target: str
    step: float
    steps: dict[str, float] = field(default_factory=dict)
    predicted_size: float | None = None
    predicted_cos: float | None = None
    probe_cos: float | None = None
    note: str = ""

    def record(self) -> dict[str, Any]:
        """The manifest's ``allocation`` entry."""
        out: dict[str, Any] = {"source": self.source, "target": self.target, "step": self.step}
        for key in ("predicted_size", "predicted_cos", "probe_cos"):
            value = getattr(self, key)
            if value is not None:
                out[key] = round(value, 6)
        if self.note:
            out["note"] = self.note
        return out

    def to_json(self) -> str:
        return json.dumps({**self.record(), "steps": self.steps}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, max_bytes: int = 16 << 20) -> Allocation:
        """Parse and check an allocation from a push's first message.

        Raises:
            InvalidArgument: malformed, or a value out of range.
        """
        if len(text) > max_bytes:
            raise InvalidArgument(f"allocation is larger than {max_bytes} bytes")
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"allocation is not JSON: {exc}") from None
        if not isinstance(raw, dict) or raw.get("source") not in SOURCES:
            raise InvalidArgument(f"allocation needs a source, one of {', '.join(SOURCES)}")
        steps = raw.get("steps")
        if not isinstance(steps, dict) or not all(isinstance(k, str) for k in steps):
            raise InvalidArgument("allocation needs steps: {tensor name: step}")
        lo, hi = ECSQ_STEP_RANGE

        def number(value: Any, what: str, low: float = lo, high: float = hi) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise InvalidArgument(f"allocation {what} must be a number in [{low:g}, {high:g}], got {value!r}")
            return float(value)

        optional = {
            k: number(raw[k], k, 0.0, 1.0) for k in ("predicted_size", "predicted_cos", "probe_cos") if k in raw
        }
        target = raw.get("target")
        note = raw.get("note", "")
        if not isinstance(target, str) or len(target) > 64 or not isinstance(note, str) or len(note) > 500:
            raise InvalidArgument("allocation target or note is malformed")
        return cls(
            source=raw["source"],
            target=target,
            step=number(raw.get("step"), "step"),
            steps={k: number(v, f"step of {k[:80]!r}") for k, v in steps.items()},
            note=note,
            **optional,
        )


def _round(step: float) -> float:
    lo, hi = ECSQ_STEP_RANGE
    return float(f"{min(hi, max(lo, step)):.{STEP_DIGITS}g}")


def predict_size(tensors: list[TensorSample], mult: dict[str, float], step: float, kept_bytes: float) -> float:
    """Predicted stored bytes of the model's tensors at global ``step``."""
    return kept_bytes + sum(t.bits(_round(step * mult[t.name])) for t in tensors) / 8


def predict_cos(tensors: list[TensorSample], mult: dict[str, float], sens: dict[str, float], step: float) -> float:
    """Predicted output cosine at global ``step``: ``1 - ½ Σ a_k · relMSE_k`` (errors of tensors add up)."""
    rel = sum(sens[t.name] * t.rel_mse(_round(step * mult[t.name])) for t in tensors)
    return 1.0 - 0.5 * rel


def allocate(
    tensors: list[TensorSample],
    sens: dict[str, float],
    source: str,
    target: Ecsq,
    *,
    kept_bytes: float,
    raw_bytes: int,
    iterations: int = 40,
) -> Allocation:
    """Steps for every tensor: multipliers from ``sens``, the global step bisected to ``target``.

    ``size`` targets the stored bytes of all tensors (``kept_bytes``: the predicted stored bytes of those
    kept exact) over ``raw_bytes``; ``cos`` the predicted output cosine; ``step`` is taken as given.
    The bisection is over ``log(step)`` in :data:`ECSQ_STEP_RANGE`; an unreachable target ends at the
    range's finest (or coarsest) step, and the prediction says how far it is.
    """
    mult = multipliers(tensors, sens)
    lo, hi = math.log(ECSQ_STEP_RANGE[0]), math.log(ECSQ_STEP_RANGE[1])
    if target.target == "step":
        step = target.value
    else:

        def ok(log_step: float) -> bool:
            step = math.exp(log_step)
            if target.target == "size":
                return predict_size(tensors, mult, step, kept_bytes) <= target.value * raw_bytes
            return predict_cos(tensors, mult, sens, step) >= target.value

        # Size falls and error grows with the step: a size target wants the smallest step that fits,
        # a cosine target the largest step that keeps it. ``good`` is the end of the range that meets it.
        good, bad = (hi, lo) if target.target == "size" else (lo, hi)
        if ok(bad):
            good = bad
        for _ in range(iterations):
            if abs(good - bad) < 1e-4:
                break
            mid = (good + bad) / 2
            if ok(mid):
                good = mid
            else:
                bad = mid
        step = math.exp(good)
    step = _round(step)
    steps = {t.name: _round(step * mult[t.name]) for t in tensors}
    return Allocation(
        source=source,
        target=str(target).split(":", 1)[1],
        step=step,
        steps=steps,
        predicted_size=predict_size(tensors, mult, step, kept_bytes) / raw_bytes if raw_bytes else None,
        predicted_cos=max(0.0, predict_cos(tensors, mult, sens, step)),
    )
