"""Export a quantized model in the compressed-tensors layout (``pull --keep-quantized``).

A plain pull expands every lossy chunk back to the original dtype. This
module instead writes the codes mzstore stores, in the on-disk format of
`compressed-tensors <https://github.com/vllm-project/compressed-tensors>`_
(checked against release 0.20.0), so vLLM serves the model quantized and
``transformers`` loads it through its compressed-tensors integration.

Format decisions (weights only; activations stay in the model's dtype, which
is what an mzstore-quantized model computes):

=========  ===================  =============================================================
mzstore    compressed-tensors   tensors written for module ``M`` (weight ``M.weight``)
=========  ===================  =============================================================
int4:gN    ``pack-quantized``   ``M.weight_packed`` I32 ``[rows, cols/8]`` (8 codes per word);
           int, 4 bits,         ``M.weight_scale`` F32 ``[rows, cols/N]``;
           asymmetric,          ``M.weight_zero_point`` I32 ``[ceil(rows/8), cols/N]`` (packed
           strategy ``group``,  along rows); ``M.weight_shape`` I64 ``[rows, cols]``
           ``group_size`` N
int8       ``pack-quantized``   ``M.weight_packed`` I32 ``[rows, cols/4]``;
           int, 8 bits,         ``M.weight_scale`` F32 ``[rows, 1]``; ``M.weight_shape``
           symmetric, strategy
           ``channel``
fp8        ``naive-quantized``  ``M.weight`` F8_E4M3 ``[rows, cols]`` (the stored codes);
           float, 8 bits,       ``M.weight_scale`` F32 ``[rows, 1]``
           symmetric, strategy
           ``channel``
=========  ===================  =============================================================

Codes are moved, never re-quantized: an int4 code ``q`` in 0..15 with zero
point ``z`` is compressed-tensors' signed ``q - 8`` with zero point ``z - 8``
(its packer adds the 8 back), an int8 code is packed as ``q + 128``, and fp8
codes are float8_e4m3fn bit patterns already. Scales are written as F32,
which holds every mzstore scale exactly (int4 scales are f16 values), so
compressed-tensors' decompression, ``(q - z) · s`` in the scale's dtype, is
the same f32 arithmetic as mzstore's decoder: its result cast to the
original dtype is bit-identical to a plain pull. (Weight-only fp8 has no
activation scheme, and compressed-tensors names that format
``naive-quantized``; ``float-quantized`` is its W8A8 alias.)

``quantization_config`` in ``config.json`` is what
``ModelCompressor.update_config`` writes: ``version``, ``quant_method``
``"compressed-tensors"``, empty ``sparsity_config`` and ``transform_config``,
``quantization_status`` ``"compressed"``, one config group per scheme
(``group_0``, ``group_1``…) whose ``targets`` are the exact module names it
covers and whose ``format`` is set per group, the top-level ``format`` (or
``mixed-precision`` when int and fp8 groups coexist), and ``ignore``: every
module with a 2-D ``.weight`` that is not written quantized.

What is exported, per tensor:

* lossless tensors: copied exactly (they need not be in any group);
* a quantized tensor that is a 2-D ``*.weight`` of a safetensors file at the
  top level, not an embedding or output head (see :data:`DEFAULT_DENSE`):
  written quantized. It must have one spec over all its chunks, no pruning,
  chunks of whole rows (so scales follow output channels) and, for int4, a
  column count that is a multiple of the group size; anything else makes the
  model not exportable (see below);
* other quantized tensors (embeddings, ``lm_head``, tensors of rank other
  than 2, tensors of files in subdirectories): written dequantized, exactly
  as a plain pull writes them, because vLLM loads those modules unquantized
  (and compressed-tensors packs 2-D Linear weights). :class:`ExportPlan`
  lists them with the reason.

Not exportable (:func:`exportable` says why):

* pruned tensors (``prune:…``): compressed-tensors 0.20 has no sparse weight
  format (its bitmask and 2:4 compressors were removed), and zeros written
  as codes would lose the sparsity anyway;
* a tensor whose chunks mix specs (``auto`` chose e.g. int4:g64 for some row
  ranges and fp8 for others, or left some chunks lossless): a
  compressed-tensors scheme covers a whole module. ``auto`` models whose
  tensors each have one spec are exported with one config group per spec;
* modules vLLM fuses (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``,
  ``query``/``key``/``value``, ``w1``/``w3``) stored with different schemes, or
  some quantized and some not (``--keep`` or the small-tensor rule): vLLM
  requires one scheme per fused layer;
* models without a top-level ``config.json`` (where the config goes), with
  a ``quantization_config`` already in it, or with nothing stored quantized.

Layout conventions mzstore cannot check: weights are taken to be
``[out_features, in_features]`` (``torch.nn.Linear``); a model that stores
transposed weights (GPT-2's ``Conv1D``) would be exported with scales along
the wrong axis.

The export itself (a pull sink: staged, verified, renamed into place) is
:mod:`mzstore.pull.keep_quantized`; this module is pure: the per-tensor plan,
the ``quantization_config`` and the packing of codes and zero points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mzstore.codecs.policy import LOSSY_DTYPES, Quant, match_name, parse_policy
from mzstore.errors import InvalidArgument
from mzstore.format.dtypes import get_dtype, nbytes_for
from mzstore.format.manifest import Chunk, Manifest, TensorEntry

#: The compressed-tensors release whose layout this module writes (``quantization_config.version``).
COMPRESSED_TENSORS_VERSION = "0.20.0"
CONFIG_FILE = "config.json"
QUANTIZATION_CONFIG = "quantization_config"
INDEX_SUFFIX = ".safetensors.index.json"

#: Quantized tensors written dequantized: embeddings (a last module name containing
#: ``embed``) and output heads, which vLLM loads unquantized. Shell globs, or regular
#: expressions written ``re:<regex>`` (searched), over tensor names, as ``--keep``.
DEFAULT_DENSE: tuple[str, ...] = (
    r"re:(^|\.)[^.]*embed[^.]*\.weight$",
    r"re:(^|\.)(lm_head|embed_out|output_embeddings|shared|wte|wpe)\.weight$",
)

#: Module names vLLM fuses into one layer (they must share one scheme).
FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)

#: How many problems :func:`exportable` spells out before summarizing.
MAX_REASONS = 5


# --- schemes -----------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Scheme:
    """A compressed-tensors weight scheme for one mzstore quantizer.

    Attributes:
        kind: ``int4``, ``int8`` or ``fp8``.
        group: int4 group size (0 otherwise).
    """

    kind: str
    group: int = 0

    def __str__(self) -> str:
        return str(Quant(self.kind, self.group))

    @property
    def num_bits(self) -> int:
        return 4 if self.kind == "int4" else 8

    @property
    def packed(self) -> bool:
        """Integer codes packed into int32 words (``pack-quantized``)."""
        return self.kind in ("int4", "int8")

    @property
    def symmetric(self) -> bool:
        return self.kind != "int4"

    @property
    def format(self) -> str:
        """The compressed-tensors format name (what its ``infer_module_format`` picks)."""
        return "pack-quantized" if self.packed else "naive-quantized"

    def weights(self) -> dict[str, Any]:
        """``QuantizationArgs`` of the weights, as ``model_dump`` writes them."""
        return {
            "num_bits": self.num_bits,
            "type": "float" if self.kind == "fp8" else "int",
            "symmetric": self.symmetric,
            "group_size": self.group if self.kind == "int4" else None,
            "strategy": "group" if self.kind == "int4" else "channel",
            "dynamic": False,
        }

    def scale_cols(self, cols: int) -> int:
        return cols // self.group if self.kind == "int4" else 1


# --- planning (pure) ----------------------------------------------------------


@dataclass(frozen=True)
class OutTensor:
    """One tensor of an exported safetensors file.

    Attributes:
        name: tensor name.
        dtype: safetensors dtype.
        shape: its shape.
        role: ``weight`` (the source tensor's bytes, exact or dequantized, or fp8 codes),
            ``packed``, ``scale``, ``zero`` or ``shape``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    role: str

    @property
    def nbytes(self) -> int:
        return nbytes_for(get_dtype(self.dtype), math.prod(self.shape))


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one tensor of the manifest.

    Attributes:
        entry: the manifest's tensor.
        action: ``copy`` (lossless, exact), ``dense`` (stored quantized, written
            dequantized as a plain pull does), ``quantized`` (written as codes) or
            ``refused`` (stored quantized in a way compressed-tensors cannot hold).
        scheme: the scheme of a ``quantized`` tensor.
        note: why a tensor is ``dense``.
    """

    entry: TensorEntry
    action: str
    scheme: Scheme | None = None
    note: str = ""

    @property
    def module(self) -> str:
        return self.entry.name.removesuffix(".weight")

    def outputs(self) -> list[OutTensor]:
        """The tensors written for this one, in the order they are listed."""
        e = self.entry
        if self.action != "quantized":
            return [OutTensor(e.name, e.dtype, tuple(e.shape), "weight")]
        assert self.scheme is not None
        rows, cols = e.shape
        m, s = self.module, self.scheme
        scale = OutTensor(f"{m}.weight_scale", "F32", (rows, s.scale_cols(cols)), "scale")
        if not s.packed:
            return [OutTensor(e.name, "F8_E4M3", (rows, cols), "weight"), scale]
        out = [OutTensor(f"{m}.weight_packed", "I32", (rows, -(-cols * s.num_bits // 32)), "packed"), scale]
        if not s.symmetric:
            out.append(OutTensor(f"{m}.weight_zero_point", "I32", (-(-rows // 8), s.scale_cols(cols)), "zero"))
        out.append(OutTensor(f"{m}.weight_shape", "I64", (2,), "shape"))
        return out


@dataclass
class ExportPlan:
    """The per-tensor decisions for a manifest, and why it cannot be exported if it cannot.

    Attributes:
        tensors: one plan per manifest tensor, in manifest order.
        problems: reasons the model is not exportable (empty when it is).
    """

    tensors: list[TensorPlan]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def groups(self) -> dict[Scheme, list[str]]:
        """Scheme → sorted module names written with it."""
        out: dict[Scheme, list[str]] = {}
        for t in self.tensors:
            if t.action == "quantized" and t.scheme is not None:
                out.setdefault(t.scheme, []).append(t.module)
        return {s: sorted(out[s]) for s in sorted(out)}

    def ignore(self) -> list[str]:
        """Modules with a 2-D ``.weight`` at the top level that stay unquantized."""
        return sorted(
            t.module
            for t in self.tensors
            if t.action in ("copy", "dense") and _is_root(t.entry.file) and _weight_matrix(t.entry)
        )

    def quantization_config(self) -> dict[str, Any]:
        """``config.json``'s ``quantization_config``, as compressed-tensors writes it."""
        groups = self.groups()
        formats = {s.format for s in groups}
        config_groups = {
            f"group_{i}": {
                "targets": modules,
                "weights": scheme.weights(),
                "input_activations": None,
                "output_activations": None,
                "format": scheme.format,
            }
            for i, (scheme, modules) in enumerate(groups.items())
        }
        return {
            "version": COMPRESSED_TENSORS_VERSION,
            "quant_method": "compressed-tensors",
            "sparsity_config": {},
            "transform_config": {},
            "config_groups": config_groups,
            "kv_cache_scheme": None,
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "global_compression_ratio": None,
            "ignore": self.ignore(),
            "moe_sparsity_config": None,
        }

    def summary(self) -> str:
        """One line: what is kept quantized, what is written dequantized, what is copied."""
        if not self.ok:
            shown = "; ".join(self.problems[:MAX_REASONS])
            more = len(self.problems) - MAX_REASONS
            return shown + (f"; and {more} more" if more > 0 else "")
        groups = self.groups()
        kept = ", ".join(f"{len(m)} {s} ({s.format})" for s, m in groups.items())
        dense = [t for t in self.tensors if t.action == "dense"]
        copied = sum(t.action == "copy" for t in self.tensors)
        text = f"kept quantized: {kept}; copied exact: {copied}"
        if dense:
            names = ", ".join(f"{t.entry.name} ({t.note})" for t in dense[:3])
            text += f"; written dequantized: {len(dense)}: {names}" + (", …" if len(dense) > 3 else "")
        return text


def _is_root(path: str) -> bool:
    return "/" not in path


def _weight_matrix(t: TensorEntry) -> bool:
    return t.name.endswith(".weight") and len(t.shape) == 2


def _chunk_spec(c: Chunk) -> str:
    """The spec a chunk was stored with: ``lossless`` or its quant spec (``?`` if unrecorded)."""
    if c.codec != "quant":
        return "lossless"
    spec = c.params.get("spec")
    return spec if isinstance(spec, str) else "?"


def _dense_reason(t: TensorEntry, dense: Sequence[str]) -> str:
    """Why a stored-quantized tensor is written dequantized ("" if it is written as codes)."""
    if not _is_root(t.file):
        return "in a subdirectory; quantization_config covers the top-level model"
    if not t.name.endswith(".weight"):
        return "not a module weight"
    if len(t.shape) != 2:
        return f"{len(t.shape)}-D; compressed-tensors packs 2-D Linear weights"
    if any(match_name(p, t.name) for p in dense):
        return "embedding or output head, which vLLM loads unquantized"
    return ""


def _plan_tensor(t: TensorEntry, dense: Sequence[str]) -> tuple[TensorPlan, str]:
    """The tensor's plan, and why it cannot be exported ("" if it can)."""
    specs = sorted({_chunk_spec(c) for c in t.chunks})
    if specs in ([], ["lossless"]):
        return TensorPlan(t, "copy"), ""
    why = _dense_reason(t, dense)
    if why:
        return TensorPlan(t, "dense", note=why), ""
    if any(s.startswith("lowrank") for s in specs):
        return TensorPlan(t, "dense", note="low-rank factors have no compressed-tensors scheme"), ""
    if any(s.startswith("ecsq") for s in specs):
        # Entropy-coded symbols with a per-chunk table: no compressed-tensors scheme (nor vLLM kernel) reads them.
        return TensorPlan(t, "dense", note="ecsq (entropy-coded) has no compressed-tensors scheme"), ""
    refused = TensorPlan(t, "refused")
    if len(specs) > 1:
        return refused, (
            f"its chunks mix {' and '.join(specs)} (auto chose per row range), "
            "and a compressed-tensors scheme covers a whole module"
        )
    text = specs[0]
    try:
        spec = parse_policy(text).spec
    except InvalidArgument:
        return refused, f"unrecognized chunk spec {text[:60]!r}"
    if spec.prune is not None or spec.quant is None:
        return (
            refused,
            f"pruned ({text}), and compressed-tensors {COMPRESSED_TENSORS_VERSION} has no sparse weight format",
        )
    if t.dtype not in LOSSY_DTYPES:
        return refused, f"quantized from {t.dtype}, which mzstore does not quantize"
    scheme = Scheme(spec.quant.kind, spec.quant.group if spec.quant.kind == "int4" else 0)
    rows, cols = t.shape
    row_bytes = cols * get_dtype(t.dtype).bits // 8
    pos = 0
    for c in t.chunks:
        if c.rows[0] != pos or c.raw_length != (c.rows[1] - c.rows[0]) * row_bytes:
            return refused, (
                "its chunks are not runs of whole rows (a row is larger than the push chunk size), "
                "so its scales do not follow output channels"
            )
        pos = c.rows[1]
    if pos != rows:
        return refused, "its chunks do not cover its rows"
    if scheme.kind == "int4" and cols % scheme.group:
        return refused, (
            f"{cols} columns are not a multiple of the int4 group size {scheme.group} "
            "(compressed-tensors and vLLM need whole groups)"
        )
    return TensorPlan(t, "quantized", scheme), ""


def plan_export(manifest: Manifest, dense: Sequence[str] = DEFAULT_DENSE) -> ExportPlan:
    """Decide, per tensor, how ``manifest`` is exported (pure: reads no blob).

    Args:
        manifest: the model.
        dense: tensor-name patterns written dequantized even when stored quantized
            (see :data:`DEFAULT_DENSE`).

    Returns:
        The plan; its ``problems`` say why the model cannot be exported, if it cannot.
    """
    plans: list[TensorPlan] = []
    refused: dict[str, list[str]] = {}  # reason → tensor names, so a model-wide reason reads once
    for t in manifest.tensors:
        plan, why = _plan_tensor(t, dense)
        plans.append(plan)
        if why:
            refused.setdefault(why, []).append(t.name)
    problems = [
        f"{names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''}: {why}" for why, names in refused.items()
    ]
    out = ExportPlan(plans, problems)

    if not any(f.path == CONFIG_FILE and f.kind == "file" for f in manifest.files):
        problems.append(f"no top-level {CONFIG_FILE} to hold the quantization_config")
    if not out.groups() and not problems:
        lossy = [t for t in plans if t.action == "dense"]
        problems.append(
            "no tensor is stored quantized"
            if not lossy
            else f"no Linear weight is stored quantized (the {len(lossy)} quantized tensors, e.g. "
            f"{lossy[0].entry.name}, would all be written dequantized: {lossy[0].note})"
        )

    # New names must not collide with tensors already in the file (e.g. a pre-quantized model).
    by_file: dict[str, set[str]] = {}
    for t in manifest.tensors:
        by_file.setdefault(t.file, set()).add(t.name)
    for p in plans:
        if p.action == "quantized":
            for o in p.outputs():
                if o.name != p.entry.name and o.name in by_file[p.entry.file]:
                    problems.append(f"{o.name} already exists in {p.entry.file}")

    # vLLM fuses sibling projections into one layer with one scheme.
    schemes: dict[str, str] = {}
    for p in plans:
        if p.action != "refused" and _is_root(p.entry.file) and _weight_matrix(p.entry):
            schemes[p.module] = str(p.scheme) if p.action == "quantized" else "unquantized"
    fused: dict[tuple[str, tuple[str, ...]], dict[str, str]] = {}
    for module, scheme in schemes.items():
        parent, _, leaf = module.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if leaf in siblings:
                fused.setdefault((parent, siblings), {})[module] = scheme
    for (parent, siblings), members in sorted(fused.items()):
        if len(set(members.values())) > 1:
            shown = ", ".join(f"{m.rpartition('.')[2]}={s}" for m, s in sorted(members.items()))
            where = parent or "the top level"
            problems.append(f"{where}: vLLM fuses {'/'.join(siblings)} into one layer, but they are {shown}")
    return out


def exportable(manifest: Manifest, dense: Sequence[str] = DEFAULT_DENSE) -> tuple[bool, str]:
    """Can ``manifest`` be written in the compressed-tensors layout, and if not, why.

    Args:
        manifest: the model.
        dense: see :func:`plan_export`.

    Returns:
        ``(True, summary of what is kept quantized)`` or ``(False, the reasons)``.
    """
    plan = plan_export(manifest, dense)
    return plan.ok, plan.summary()


# --- packing (pure) -------------------------------------------------------------


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along each row, as compressed-tensors' ``pack_to_int32``.

    Args:
        codes: ``rows × cols`` uint8, each below ``2**bits`` (compressed-tensors'
            signed value plus ``2**(bits - 1)``).
        bits: 4 or 8.

    Returns:
        ``rows × ceil(cols·bits/32)`` little-endian int32 words (value ``i`` of a row at
        bit ``i·bits``, padding zero), as a ``rows × 4·words`` uint8 array of their bytes.
    """
    rows, cols = codes.shape
    per = 32 // bits
    pad = -cols % per
    if pad:
        codes = np.concatenate([codes, np.zeros((rows, pad), np.uint8)], axis=1)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    elif bits != 8:
        raise ValueError(f"cannot pack {bits}-bit codes")
    return np.ascontiguousarray(codes, dtype=np.uint8)


def pack_zero_points(zeros: np.ndarray) -> np.ndarray:
    """Pack ``rows × groups`` 4-bit zero points along rows (``pack_to_int32(..., packed_dim=0)``).

    Returns:
        ``ceil(rows/8) × groups`` int32 (little-endian).
    """
    packed = pack_codes(np.ascontiguousarray(zeros.T), 4)  # groups × 4·words bytes
    words = packed.view("<i4")  # groups × words
    return np.ascontiguousarray(words.T)


__all__ = [
    "COMPRESSED_TENSORS_VERSION",
    "DEFAULT_DENSE",
    "ExportPlan",
    "OutTensor",
    "Scheme",
    "TensorPlan",
    "exportable",
    "pack_codes",
    "pack_zero_points",
    "plan_export",
]
