"""Codec policies (pure): what ``--codec`` means for each tensor.

Grammar (comma-separated stages, at most one pruner and one quantizer)::

    lossless                    byte-plane split + zstd, bit-exact (default)
    int8                        symmetric, one scale per output channel (row)
    int4[:gN]                   asymmetric, groups of N = 32 | 64 | 128 (default 32) along
                                each row, scale and clip range searched per group
    fp8                         e4m3, one scale per output channel
    prune:AMOUNT                magnitude pruning, AMOUNT in (0, 1) of the weights set to zero
    prune:N:M                   N of every M consecutive weights kept (2:4)
    prune:…,int8 / int4 / fp8   pruning then quantization of what is kept
    lowrank:energy=E            per chunk, a truncated SVD keeping E of the squared singular
    lowrank:rank=N              values (or rank N); factors stored exact, or as int8 with
    lowrank:…,int8              ``,int8`` (rarely pays on trained weights: see the docs)
    auto[:cos=0.99]             per chunk, the smallest of ecsq (at the step predicted for the
                                target), int4:g128/g64/g32, fp8, int8 and lossless whose cosine
                                to the original meets the target
    auto[:cos=0.99]:servable    the same without ecsq: only the grids compressed-tensors and vLLM
                                serve (``pull --keep-quantized`` writes them quantized)
    ecsq:size=S                 entropy-coded uniform scalar quantization (:mod:`mzstore.codecs.ecsq`)
    ecsq:cos=C                  with one step per tensor from a bit allocation across tensors
    ecsq:step=D                 (:mod:`mzstore.codecs.allocation`), the global step bisected so
                                the model's stored size is S of its raw size, or its predicted
                                output cosine is C; ``step=D`` fixes the global step instead

Keep rules: a tensor stays exact (``lossless``) unless it is a floating
point tensor (F32, F16, BF16) with at least two dimensions and
:data:`MIN_LOSSY_NUMEL` elements whose name is not a norm or a bias; names
matching a ``--keep`` pattern also stay exact. A pattern is a shell glob
(``*.embeddings.*``), or a regular expression when written ``re:<regex>``.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field, replace

from mzstore.errors import InvalidArgument

INT4_GROUPS = (32, 64, 128)
#: ``int4`` alone. On MiniLM (bench/bench_lossy.py) g128 keeps sentence-embedding cosine 0.961 at 0.121
#: of the raw size, g64 0.969 at 0.128, g32 0.975 at 0.139: only g32 meets the 0.97 that int4 promises.
DEFAULT_INT4_GROUP = 32
LOSSY_DTYPES = ("F32", "F16", "BF16")
#: Smaller tensors stay exact: their bytes do not matter, their precision might.
MIN_LOSSY_NUMEL = 4096
NORM_PATTERN = re.compile(r"(^|[._])(norm|layernorm|layer_norm|ln|ln_\w+|rmsnorm|batchnorm|bn)(\d*)([._]|$)", re.I)
BIAS_PATTERN = re.compile(r"(^|[._])bias$", re.I)
DEFAULT_AUTO_COS = 0.99


@dataclass(frozen=True)
class Quant:
    """A quantizer: ``kind`` is ``int8``, ``int4``, ``fp8`` or ``ecsq``; ``group`` for int4, ``step`` for ecsq."""

    kind: str
    group: int = 0
    step: float = 0.0

    def __str__(self) -> str:
        if self.kind == "ecsq":
            return f"ecsq:step={self.step:.6g}"
        return f"int4:g{self.group}" if self.kind == "int4" else self.kind


#: ECSQ targets: a stored size (fraction of the raw bytes), a predicted output cosine, or a fixed global step.
ECSQ_TARGETS = ("size", "cos", "step")
#: Bounds of an ECSQ step, in units of a row's RMS (smaller steps are finer than f16; larger ones zero everything).
ECSQ_STEP_RANGE = (1e-4, 64.0)


@dataclass(frozen=True)
class AutoTarget:
    """``auto[:cos=C][:servable]`` as parsed."""

    cos: float
    servable: bool = False


@dataclass(frozen=True)
class Ecsq:
    """``ecsq:<target>=<value>``: what the bit allocation aims at."""

    target: str
    value: float

    def __str__(self) -> str:
        return f"ecsq:{self.target}={self.value:g}"


@dataclass(frozen=True)
class Prune:
    """Magnitude pruning: ``amount`` (unstructured) or ``n`` of every ``m`` (N:M)."""

    amount: float = 0.0
    n: int = 0
    m: int = 0

    def __str__(self) -> str:
        return f"prune:{self.n}:{self.m}" if self.m else f"prune:{self.amount:g}"


#: Largest rank a ``lowrank:rank=N`` stage may ask for.
MAX_LOWRANK_RANK = 4096


@dataclass(frozen=True)
class LowRank:
    """A truncated SVD per chunk: the smallest rank keeping ``energy`` of the squared singular values,
    or a fixed ``rank``. Recorded per chunk with the rank used (``lowrank:r=12``)."""

    energy: float = 0.0
    rank: int = 0

    def __str__(self) -> str:
        return f"lowrank:rank={self.rank}" if self.rank else f"lowrank:energy={self.energy:g}"


@dataclass(frozen=True)
class Spec:
    """What one tensor gets: exact, or prune and/or quantize, or a low-rank split (factors exact or int8)."""

    prune: Prune | None = None
    quant: Quant | None = None
    lowrank: LowRank | None = None

    @property
    def lossless(self) -> bool:
        return self.prune is None and self.quant is None and self.lowrank is None

    def __str__(self) -> str:
        if self.lossless:
            return "lossless"
        return ",".join(str(s) for s in (self.prune, self.lowrank, self.quant) if s is not None)


@dataclass(frozen=True)
class Policy:
    """A parsed ``--codec`` value plus ``--keep`` patterns."""

    text: str
    spec: Spec = field(default_factory=Spec)
    auto_cos: float | None = None
    keep: tuple[str, ...] = ()
    #: ``auto:…:servable``: auto leaves ECSQ out (only grid formats vLLM serves).
    auto_servable: bool = False
    ecsq: Ecsq | None = None
    #: ECSQ only: the step of each tensor, from the push's allocation (:meth:`with_steps`).
    steps: dict[str, float] | None = field(default=None, compare=False)

    @property
    def lossy(self) -> bool:
        return self.auto_cos is not None or self.ecsq is not None or not self.spec.lossless

    def mode_for(self, name: str, dtype: str, shape: tuple[int, ...] | list[int]) -> str | Spec | float:
        """How one tensor is encoded: ``"lossless"``, a :class:`Spec`, or the auto cosine target.

        Raises:
            InvalidArgument: an ECSQ policy whose allocation has no step for this tensor.
        """
        if not self.lossy or not lossy_eligible(name, dtype, shape) or self.kept(name):
            return "lossless"
        if self.ecsq is not None:
            if self.steps is None:  # no allocation: step=D is uniform; size and cos need one (the ingest checks)
                return Spec(quant=Quant("ecsq", step=self.ecsq.value if self.ecsq.target == "step" else 1.0))
            step = self.steps.get(name)
            if step is None:
                raise InvalidArgument(f"{self.text}: the push's allocation has no step for tensor {name!r}")
            return Spec(quant=Quant("ecsq", step=step))
        return self.auto_cos if self.auto_cos is not None else self.spec

    def with_steps(self, steps: dict[str, float]) -> Policy:
        """This ECSQ policy with each tensor's step (from :class:`mzstore.codecs.allocation.Allocation`).

        Raises:
            InvalidArgument: a step outside :data:`ECSQ_STEP_RANGE`.
        """
        lo, hi = ECSQ_STEP_RANGE
        for name, step in steps.items():
            if not (isinstance(step, float) and lo <= step <= hi):
                raise InvalidArgument(f"ECSQ step of {name[:80]!r} must be a number in [{lo:g}, {hi:g}], got {step!r}")
        return replace(self, steps=dict(steps))

    def kept(self, name: str) -> bool:
        return any(match_name(p, name) for p in self.keep)


def match_name(pattern: str, name: str) -> bool:
    """Whether tensor ``name`` matches a keep pattern: a glob, or ``re:<regex>``."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def lossy_eligible(name: str, dtype: str, shape: tuple[int, ...] | list[int]) -> bool:
    """Default keep rules: only large float matrices that are not norms or biases."""
    return (
        dtype in LOSSY_DTYPES
        and len(shape) >= 2
        and math.prod(shape) >= MIN_LOSSY_NUMEL
        and not NORM_PATTERN.search(name)
        and not BIAS_PATTERN.search(name)
    )


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgument(f"{what}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise InvalidArgument(f"{what}: {text!r} is not a finite number")
    return value


def _parse_stage(stage: str) -> Prune | Quant | Ecsq | AutoTarget | LowRank:
    parts = stage.split(":")
    head = parts[0]
    if head == "lowrank" and len(parts) == 2:
        key, _, value = parts[1].partition("=")
        if key == "energy" and value:
            energy = _number(value, "lowrank energy")
            if not 0 < energy < 1:
                raise InvalidArgument(f"lowrank energy must be between 0 and 1 (exclusive), got {value}")
            return LowRank(energy=energy)
        if key == "rank" and value.isdigit() and 1 <= int(value) <= MAX_LOWRANK_RANK:
            return LowRank(rank=int(value))
        raise InvalidArgument(
            f"lowrank takes lowrank:energy=E (0 < E < 1) or lowrank:rank=N (1..{MAX_LOWRANK_RANK}), got {stage!r}"
        )
    if head == "ecsq" and len(parts) == 2:
        target, _, value = parts[1].partition("=")
        if target not in ECSQ_TARGETS or not value:
            raise InvalidArgument(f"ecsq takes one target: ecsq:size=S, ecsq:cos=C or ecsq:step=D, got {stage!r}")
        number = _number(value, f"ecsq {target}")
        if target == "size" and not 0.01 <= number <= 1:
            raise InvalidArgument(f"ecsq size target must be between 0.01 and 1 (of the raw bytes), got {value}")
        if target == "cos" and not 0.5 <= number < 1:
            raise InvalidArgument(f"ecsq cosine target must be in [0.5, 1), got {value}")
        if target == "step" and not ECSQ_STEP_RANGE[0] <= number <= ECSQ_STEP_RANGE[1]:
            lo, hi = ECSQ_STEP_RANGE
            raise InvalidArgument(f"ecsq step must be in [{lo:g}, {hi:g}] (units of a row's RMS), got {value}")
        return Ecsq(target, number)
    if head == "int8" and len(parts) == 1:
        return Quant("int8")
    if head == "fp8" and len(parts) == 1:
        return Quant("fp8")
    if head == "int4" and len(parts) <= 2:
        group = DEFAULT_INT4_GROUP
        if len(parts) == 2:
            if not re.fullmatch(r"g\d+", parts[1]):
                raise InvalidArgument(f"int4 takes a group size as int4:gN, got {stage!r}")
            group = int(parts[1][1:])
        if group not in INT4_GROUPS:
            raise InvalidArgument(f"int4 group size must be one of {', '.join(map(str, INT4_GROUPS))}, got {group}")
        return Quant("int4", group)
    if head == "prune" and len(parts) == 2:
        amount = _number(parts[1], "prune amount")
        if not 0 < amount < 1:
            raise InvalidArgument(f"prune amount must be between 0 and 1 (exclusive), got {parts[1]}")
        return Prune(amount=amount)
    if head == "prune" and len(parts) == 3:
        if not (parts[1].isdigit() and parts[2].isdigit()):
            raise InvalidArgument(f"N:M pruning takes two integers, got {stage!r}")
        n, m = int(parts[1]), int(parts[2])
        if not 0 < n < m <= 16:
            raise InvalidArgument(f"N:M pruning needs 0 < N < M <= 16, got {n}:{m}")
        return Prune(n=n, m=m)
    if head == "auto" and len(parts) <= 3:
        cos = DEFAULT_AUTO_COS
        options = parts[1:]
        servable = "servable" in options
        if servable:
            options.remove("servable")
        if len(options) > 1 or (options and not options[0].startswith("cos=")):
            raise InvalidArgument(f"auto takes a target and an option as auto[:cos=X][:servable], got {stage!r}")
        if options:
            cos = _number(options[0][4:], "auto cosine target")
        if not 0 < cos < 1:
            raise InvalidArgument(f"auto cosine target must be between 0 and 1 (exclusive), got {cos:g}")
        return AutoTarget(cos, servable)
    raise InvalidArgument(
        f"unknown codec stage {stage!r}; use lossless, int8, int4[:g32|g64|g128], fp8, "
        "prune:AMOUNT, prune:N:M, lowrank:energy=E|rank=N, auto[:cos=X] or ecsq:size=S|cos=C|step=D"
    )


def parse_policy(text: str, keep: tuple[str, ...] | list[str] = ()) -> Policy:
    """Parse ``--codec`` (and ``--keep`` patterns).

    Raises:
        InvalidArgument: for an unknown stage or impossible parameters.
    """
    text = (text or "lossless").strip()
    if len(text) > 200:
        raise InvalidArgument("codec policy is too long")
    for pattern in keep:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise InvalidArgument(f"--keep {pattern!r}: {exc}") from None
    if text == "lossless":
        return Policy("lossless", keep=tuple(keep))
    prune: Prune | None = None
    quant: Quant | None = None
    lowrank: LowRank | None = None
    auto: AutoTarget | None = None
    stages = [s.strip() for s in text.split(",")]
    for stage in stages:
        if stage == "lossless":
            raise InvalidArgument("lossless cannot be combined with other stages")
        parsed = _parse_stage(stage)
        if isinstance(parsed, Ecsq):
            if len(stages) > 1:
                raise InvalidArgument("ecsq cannot be combined with other stages")
            # ecsq:step=D is one spec for every tensor; size and cos get theirs from the allocation.
            spec = Spec(quant=Quant("ecsq", step=parsed.value)) if parsed.target == "step" else Spec()
            return Policy(str(parsed), spec, keep=tuple(keep), ecsq=parsed)
        if isinstance(parsed, AutoTarget):
            if len(stages) > 1:
                raise InvalidArgument("auto cannot be combined with other stages")
            auto = parsed
        elif isinstance(parsed, LowRank):
            if lowrank is not None or prune is not None:
                raise InvalidArgument("at most one lowrank stage, and not with pruning")
            if quant is not None:
                raise InvalidArgument("lowrank comes before the quantizer of its factors: lowrank:…,int8")
            lowrank = parsed
        elif isinstance(parsed, Prune):
            if lowrank is not None:
                raise InvalidArgument("lowrank does not combine with pruning")
            if prune is not None:
                raise InvalidArgument("at most one prune stage")
            if quant is not None:
                raise InvalidArgument("prune comes before the quantizer: prune:…,int8")
            prune = parsed
        else:
            if quant is not None:
                raise InvalidArgument("at most one quantizer (int8, int4 or fp8)")
            quant = parsed
    if lowrank is not None and quant is not None and quant.kind != "int8":
        raise InvalidArgument(f"lowrank factors are stored exact or as int8, not {quant}")
    spec = Spec(prune, quant, lowrank)
    if auto is None:
        return Policy(str(spec), spec, None, tuple(keep))
    canonical = f"auto:cos={auto.cos:g}" + (":servable" if auto.servable else "")
    return Policy(canonical, spec, auto.cos, tuple(keep), auto_servable=auto.servable)


def mode_name(mode: str | Spec | float) -> str:
    """The policy text recorded for a tensor encoded with ``mode``."""
    if isinstance(mode, float):
        return f"auto:cos={mode:g}"
    return str(mode)
