"""Tensor-parallel slices (pure planning): which part of each tensor a rank loads.

Rules map tensor names to the dimension a tensor is split along across
``tp_size`` ranks, the way Megatron-style inference servers shard weights:

* column-parallel projections (q/k/v, query/key/value, gate/up, fc1,
  intermediate, w1/w3) and their biases split along dim 0 (output features);
* vocabulary-parallel embeddings and ``lm_head`` split along dim 0;
* row-parallel projections (o_proj, down_proj, attention/FFN output dense,
  fc2, w2, dense_4h_to_h) split along dim 1 (input features), their biases
  are replicated;
* everything else (norms, position embeddings, …) is replicated.

The first matching rule wins; callers pass their own rules to override.
Ranges follow ``numpy.array_split``: near-equal contiguous runs, the first
``size % tp_size`` ranks one longer. A rank whose tensor is split along dim
0 fetches only the chunks covering its rows.

Heads: a rank's rows of ``q_proj``/``k_proj``/``v_proj`` are whole attention
heads exactly when ``tp_size`` divides the head count (and then every rank
gets the same number of heads), which is also what vLLM and Megatron require.
:func:`tp_warnings` says when it does not — from the model's ``config.json``
(``num_attention_heads``, ``num_key_value_heads``) when there is one, and for
any split dimension ``tp_size`` does not divide. Fused projections
(``qkv_proj``, ``c_attn``, ``gate_up_proj``, ``query_key_value``) hold q, k
and v (or gate and up) one after the other: a contiguous split gives a rank
pieces of the wrong ones, so they are flagged too; load them whole with a
rule such as ``tp_rules=[(r"qkv_proj\\.", None), *DEFAULT_RULES]`` and split them
in the serving code, which knows their layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from mzstore.errors import InvalidArgument

#: (regex on the tensor name, split dim or None for replicated), first match wins.
DEFAULT_RULES: tuple[tuple[str, int | None], ...] = (
    (r"(o_proj|down_proj|dense_4h_to_h|fc2|\.w2|attention\.output\.dense|\boutput\.dense|c_proj)\.bias$", None),
    (r"(o_proj|down_proj|dense_4h_to_h|fc2|\.w2|attention\.output\.dense|\boutput\.dense|c_proj)\.weight$", 1),
    (
        r"(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|query|key|value|fc1|\.w1|\.w3|intermediate\.dense|dense_h_to_4h|c_attn|c_fc)\.(weight|bias)$",
        0,
    ),
    (r"(embed_tokens|word_embeddings|wte|tok_embeddings)\.weight$", 0),
    (r"lm_head\.weight$", 0),
)


#: Tensors that hold several projections one after the other (a contiguous split mixes them up).
FUSED = re.compile(r"(qkv_proj|c_attn|gate_up_proj|query_key_value|W_pack)\.(weight|bias)$")
#: How many tensor names a warning lists before summarizing.
SHOWN = 3


def tp_warnings(
    tensors: Sequence[tuple[str, Sequence[int]]],
    tp_size: int,
    rules: Sequence[tuple[str, int | None]] = DEFAULT_RULES,
    config: Mapping[str, object] | None = None,
) -> list[str]:
    """What a ``tp_size``-way split of these tensors gets wrong: uneven heads, uneven or fused splits.

    Args:
        tensors: ``(name, shape)`` of the checkpoint's tensors.
        config: the model's ``config.json``, if it has one (head counts).
    """
    if tp_size <= 1:
        return []
    out = []
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = (config or {}).get(key)
        if isinstance(heads, int) and heads > 0:
            uneven = heads % tp_size if heads >= tp_size else tp_size % heads
            if uneven:
                out.append(f"{key} {heads} is not split evenly over {tp_size} ranks: ranks get parts of heads")
    uneven_names, fused_names = [], []
    for name, shape in tensors:
        dim = split_dim(name, shape, rules)
        if dim is None:
            continue
        if FUSED.search(name):
            fused_names.append(name)
        elif shape[dim] % tp_size:
            uneven_names.append(f"{name} ({shape[dim]} over {tp_size})")
    if uneven_names:
        more = f" and {len(uneven_names) - SHOWN} more" if len(uneven_names) > SHOWN else ""
        out.append(f"uneven splits: {', '.join(uneven_names[:SHOWN])}{more}")
    if fused_names:
        more = f" and {len(fused_names) - SHOWN} more" if len(fused_names) > SHOWN else ""
        out.append(
            f"fused projections split contiguously: {', '.join(fused_names[:SHOWN])}{more} "
            "(pass tp_rules to load them whole)"
        )
    return out


def split_dim(name: str, shape: Sequence[int], rules: Sequence[tuple[str, int | None]] = DEFAULT_RULES) -> int | None:
    """The dimension ``name`` is split along, or ``None`` when every rank gets all of it."""
    for pattern, dim in rules:
        if re.search(pattern, name):
            if dim is None or dim >= len(shape):
                return None
            return dim
    return None


def rank_range(size: int, tp_size: int, tp_rank: int) -> tuple[int, int]:
    """``[start, end)`` of ``size`` items owned by ``tp_rank`` of ``tp_size``.

    Raises:
        InvalidArgument: for a rank outside ``[0, tp_size)``.
    """
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise InvalidArgument(f"tensor-parallel rank {tp_rank} is not in [0, {tp_size})")
    base, extra = divmod(size, tp_size)
    start = tp_rank * base + min(tp_rank, extra)
    return start, start + base + (1 if tp_rank < extra else 0)
