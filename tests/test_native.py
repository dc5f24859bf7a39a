"""The native codec core gives exactly the numpy reference's bytes and errors.

Every codec entry point is run twice per example, once on the native core
(``mzstore/codecs/_native.c``) and once with ``native.core`` set to ``None``
(the numpy code), and the results are compared: encoded payloads, decoded
bytes, and for malformed payloads the exception type and message.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mzstore.codecs import native
from mzstore.codecs.lossless import PAIRS_MIN_BYTES, LosslessCodec
from mzstore.codecs.policy import Prune, Quant, Spec
from mzstore.codecs.quant import ECSQ_STEP_RANGE, QuantCodec, encode_spec
from mzstore.errors import CodecError
from mzstore.format.dtypes import DTYPES

CORE = native.core
EXAMPLES = int(os.environ.get("MZSTORE_NATIVE_EXAMPLES", "60"))
examples = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

pytestmark = pytest.mark.skipif(
    CORE is None and os.environ.get("MZSTORE_NATIVE", "1") == "0",
    reason="MZSTORE_NATIVE=0: this run checks the numpy reference alone",
)


def test_the_core_is_built_and_loaded() -> None:
    """`make setup` builds the core where a C compiler is; a missing one would silently halve pull speed."""
    if CORE is None and not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler on this machine: mzstore runs on its numpy codecs")
    assert CORE is not None, "mzstore.codecs._native is not built (pip install -e . / make setup builds it)"
    assert CORE.ABI == native.ABI
    other = os.environ.get("MZSTORE_NATIVE_LIB")
    if other:  # a variant build under test (see test_every_cpu_variant_of_the_core_gives_numpys_bytes)
        assert Path(CORE.__file__).resolve() == Path(other).resolve()


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        result = fn()
    except CodecError as exc:
        return "error", str(exc)
    if isinstance(result, np.ndarray):
        return "ok", result.tobytes()
    if isinstance(result, tuple):
        return "ok", result[0]
    return "ok", getattr(result, "payload", result)


def both(fn: Callable[[], Any]) -> tuple[tuple[str, Any], tuple[str, Any]]:
    """``fn`` on the native core, then on numpy."""
    try:
        native.core = CORE
        fast = outcome(fn)
        native.core = None
        reference = outcome(fn)
    finally:
        native.core = CORE
    return fast, reference


def _weights(rng: np.random.Generator, n: int, name: str, escapes: bool) -> bytes:
    """Raw little-endian bytes of ``n`` elements that look like trained weights (or like noise)."""
    x = rng.standard_normal(n).astype(np.float32) * np.float32(0.02)
    if escapes:  # wild values: many distinct exponents, so the pair coder escapes some pairs
        wild = rng.random(n) < 0.03
        x[wild] = rng.standard_normal(int(wild.sum())).astype(np.float32) * np.float32(2.0) ** rng.integers(
            -60, 60, int(wild.sum())
        )
    if name == "BF16":
        return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if name == "F16":
        return x.astype(np.float16).tobytes()
    if name == "F32":
        return x.tobytes()
    if name == "F64":
        return x.astype(np.float64).tobytes()
    width = DTYPES[name].bits // 8 or 1
    return rng.integers(0, 256, n * width, dtype=np.uint8).tobytes()


LOSSLESS_DTYPES = ["BF16", "F16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL"]


@examples
@given(
    name=st.sampled_from(LOSSLESS_DTYPES),
    n=st.one_of(st.integers(0, 64), st.integers(PAIRS_MIN_BYTES - 2, PAIRS_MIN_BYTES * 3)),
    escapes=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_lossless_encode_and_decode_match_numpy(name: str, n: int, escapes: bool, seed: int) -> None:
    codec = LosslessCodec()
    dtype = DTYPES[name]
    raw = _weights(np.random.default_rng(seed), n, name, escapes)
    enc_fast, enc_ref = both(lambda: codec.encode(raw, dtype))
    assert enc_fast == enc_ref
    payload = enc_ref[1]
    dec_fast, dec_ref = both(lambda: codec.decode(payload, dtype, len(raw)))
    assert dec_fast == dec_ref == ("ok", raw)


@pytest.fixture(scope="module")
def payloads() -> dict[str, tuple[bytes, bytes]]:
    """Valid payloads to mutate: bf16 with pair-coded exponents and escapes (the fused path), f32, odd lengths."""
    rng = np.random.default_rng(7)
    out = {}
    for name, n in (("BF16", 2 * PAIRS_MIN_BYTES + 1), ("F16", 2 * PAIRS_MIN_BYTES), ("F32", 3000), ("BF16", 5)):
        raw = _weights(rng, n, name, escapes=True)
        out[f"{name}-{n}"] = (raw, LosslessCodec().encode(raw, DTYPES[name])[0])
    return out


@examples
@given(data=st.data())
def test_malformed_lossless_payloads_fail_the_same_way(
    data: st.DataObject, payloads: dict[str, tuple[bytes, bytes]]
) -> None:
    key = data.draw(st.sampled_from(sorted(payloads)))
    raw, payload = payloads[key]
    bad = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(bad) - 1)))
        if kind == "flip" and bad:
            bad[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del bad[at : at + data.draw(st.integers(1, 64))]
        else:
            bad[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    dtype = DTYPES[key.split("-")[0]]
    fast, ref = both(lambda: LosslessCodec().decode(bytes(bad), dtype, len(raw)))
    assert fast == ref


QUANT_SPECS = [
    Spec(quant=Quant("int8")),
    Spec(quant=Quant("fp8")),
    Spec(quant=Quant("int4", 32)),
    Spec(quant=Quant("int4", 128)),
    Spec(prune=Prune(0.5), quant=Quant("int8")),
    Spec(prune=Prune(0.5), quant=Quant("int4", 64)),
    Spec(quant=Quant("ecsq", step=0.3)),
    Spec(quant=Quant("ecsq", step=0.005)),  # two byte planes
]


@examples
@given(
    spec=st.sampled_from(QUANT_SPECS),
    name=st.sampled_from(["BF16", "F32", "F16"]),
    rows=st.integers(1, 12),
    cols=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_quantized_encode_and_decode_match_numpy(spec: Spec, name: str, rows: int, cols: int, seed: int) -> None:
    dtype = DTYPES[name]
    raw = _weights(np.random.default_rng(seed), rows * cols, name, escapes=False)
    enc_fast, enc_ref = both(lambda: encode_spec(raw, dtype, rows, spec))
    assert enc_fast == enc_ref
    payload = enc_ref[1]
    dec_fast, dec_ref = both(lambda: QuantCodec().decode(payload, dtype, len(raw)))
    assert dec_fast == dec_ref
    assert dec_ref[0] == "ok"


@examples
@given(
    group=st.sampled_from([32, 64, 128]),
    rows=st.integers(1, 9),
    cols=st.integers(1, 300),
    magnitude=st.sampled_from([1e-30, 1e-7, 1e-4, 0.02, 1.0, 3e3, 6e4, 1e30]),
    shape=st.sampled_from(["normal", "ties", "sparse", "constant", "one-sided"]),
    masked=st.booleans(),
    f16=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_int4_search_matches_numpy(
    group: int, rows: int, cols: int, magnitude: float, shape: str, masked: bool, f16: bool, seed: int
) -> None:
    """The int4 scale/zero search (grid, least-squares refits, f16 rounding of scales) gives numpy's exact bits."""
    from mzstore.codecs import quant

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)) * magnitude
    if shape == "ties":  # values on a coarse grid: rint meets exact halves
        x = np.round(x / magnitude * 4) / 8 * magnitude
    elif shape == "sparse":
        x[rng.random(x.shape) < 0.7] = 0
    elif shape == "constant":
        x[:] = magnitude
    elif shape == "one-sided":
        x = np.abs(x)
    xm = x.astype(np.float32)
    mask = rng.random(xm.shape) > 0.4 if masked else None
    if mask is not None:
        xm = np.where(mask, xm, np.float32(0))
    try:
        native.core = None
        ref = quant._int4_encode(xm, mask, group, f16)
    finally:
        native.core = CORE
    fast = quant._int4_encode(xm, mask, group, f16)
    assert fast[0].view(np.uint32).tolist() == ref[0].view(np.uint32).tolist()
    assert fast[1].tolist() == ref[1].tolist()
    assert fast[2].tolist() == ref[2].tolist()


@examples
@given(
    rows=st.integers(1, 4),
    cols=st.sampled_from([0, 1, 7, 300, 40_000]),
    step=st.sampled_from([ECSQ_STEP_RANGE[0], 0.005, 0.3, ECSQ_STEP_RANGE[1]]),
    outlier=st.floats(0.0, 1e6),
    seed=st.integers(0, 2**32 - 1),
)
def test_ecsq_codes_match_numpy(rows: int, cols: int, step: float, outlier: float, seed: int) -> None:
    """The fused ECSQ pass gives numpy's codes, planes and reconstruction table: clipped codes (an outlier in a
    40 000-wide row lies past the largest code), ties of rint (values on half steps), signed zeros, empty rows."""
    from mzstore.codecs.quant import ecsq_quantize

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    if cols:
        x[0, rng.integers(0, cols)] = np.float32(outlier)
        x[-1, : min(cols, 8)] = np.float32(-0.0)
        half = (rng.integers(-40, 40, min(cols, 64)) + 0.5).astype(np.float32)
        x[rows // 2, : len(half)] = half * np.float32(step) * np.float32(0.02)
    fast, ref = both(
        lambda: b"".join(np.ascontiguousarray(a).tobytes() for _, a in sorted(ecsq_quantize(x, step).items()))
    )
    assert fast == ref and fast[0] == "ok"
    if cols:
        x[0, 0] = np.nan
        fast, ref = both(lambda: ecsq_quantize(x, step))
        assert fast == ref and fast[0] == "error"


@examples
@given(n=st.integers(0, 600), seed=st.integers(0, 2**32 - 1), escape_rate=st.sampled_from([0.0, 0.02, 0.5, 1.0]))
def test_pair_ranks_match_numpy(n: int, seed: int, escape_rate: float) -> None:
    """Ranks and escapes of every pair, any plane length (the native loop takes four pairs a step, then the rest,
    then an odd plane's last byte), escapes anywhere in a step and in runs."""
    from mzstore.codecs.lossless import pair_ranks

    rng = np.random.default_rng(seed)
    plane = rng.integers(120, 128, n, dtype=np.uint8)  # exponents: few distinct pairs
    wild = rng.random(n) < escape_rate / 2
    plane[wild] = rng.integers(0, 256, int(wild.sum()), dtype=np.uint8)
    lut = np.full(65536, 255, dtype=np.uint8)
    common = rng.permutation(np.array([(a << 8) | b for a in range(120, 128) for b in range(120, 128)]))
    kept = common[: int(len(common) * (1 - escape_rate))]
    lut[kept] = np.arange(len(kept), dtype=np.uint8)

    fast, ref = both(lambda: b"".join(a.tobytes() for a in pair_ranks(plane, lut)))
    assert fast == ref and fast[0] == "ok"
    if escape_rate == 1.0 and n:
        assert len(fast[1]) == 3 * ((n + 1) // 2)  # every pair escaped: a rank byte and two value bytes each


@examples
@given(n=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1), pad=st.integers(0, 255))
def test_nibble_split_and_merge_match_numpy(n: int, seed: int, pad: int) -> None:
    """split_nibbles and merge_nibbles give numpy's bytes; merge undoes split whatever the pad nibble holds."""
    from mzstore.codecs.quant import merge_nibbles, split_nibbles

    codes = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    halves_fast, halves_ref = both(lambda: np.concatenate(split_nibbles(codes)))
    assert halves_fast == halves_ref
    high, low = split_nibbles(codes)
    if n % 2:  # the pad nibble is not part of any code
        high[-1] |= pad & 0x0F
        low[-1] |= pad >> 4

    def merged() -> np.ndarray:
        out = np.full(n, 0x5A, np.uint8)
        merge_nibbles(high, low, out)
        return out

    fast, ref = both(merged)
    assert fast == ref == ("ok", codes.tobytes())


@settings(max_examples=max(4, EXAMPLES // 6), deadline=None)
@given(
    rows=st.integers(300, 340),
    cols=st.sampled_from([256, 257, 300]),
    prune=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_nibble_split_int8_payloads_match_numpy(rows: int, cols: int, prune: bool, seed: int) -> None:
    """Chunks with enough int8 codes to be stored nibble-split (odd counts too) encode and decode alike."""
    from mzstore.codecs.quant import S_CODES, unpack

    dtype = DTYPES["BF16"]
    spec = Spec(prune=Prune(0.1) if prune else None, quant=Quant("int8"))
    raw = _weights(np.random.default_rng(seed), rows * cols, "BF16", escapes=False)
    enc_fast, enc_ref = both(lambda: encode_spec(raw, dtype, rows, spec))
    assert enc_fast == enc_ref
    payload = enc_ref[1]
    nsec = payload[24]  # the header: "<4sBBHQQB3x"
    table = [struct.unpack_from("<BBQQ", payload, 28 + 18 * i)[:2] for i in range(nsec)]
    # Pruning removes the codes nearest 0, so their low nibbles are no longer noise: not worth splitting.
    assert ((S_CODES, 2) in table) == (not prune), table
    dec_fast, dec_ref = both(lambda: QuantCodec().decode(payload, dtype, len(raw)))
    assert dec_fast == dec_ref and dec_ref[0] == "ok"
    into_fast, into_ref = both(lambda: QuantCodec().decode_into(payload, dtype, np.empty(len(raw), np.uint8)) or 0)
    assert into_fast == into_ref
    codes = both(lambda: unpack(payload, len(raw), dtype).sections[S_CODES].copy())
    assert codes[0] == codes[1]


def test_hostile_scales_round_the_same_way() -> None:
    """A payload whose scales are NaN, infinite, huge or subnormal: bf16 rounding and NaN patterns match numpy's."""
    dtype = DTYPES["BF16"]
    rows, cols = 6, 40
    raw = _weights(np.random.default_rng(1), rows * cols, "BF16", escapes=False)
    payload = bytearray(encode_spec(raw, dtype, rows, Spec(quant=Quant("int8"))).payload)
    from mzstore.codecs.quant import S_SCALES, unpack

    scales = unpack(bytes(payload), len(raw), dtype).sections[S_SCALES]
    start = bytes(payload).find(scales.tobytes())
    assert start > 0, "scales are stored raw in this payload"
    hostile = np.array([np.nan, -np.inf, 3e38, 1e-41, -0.0, 1.7e38], dtype=np.float32)
    payload[start : start + 4 * rows] = hostile.tobytes()
    fast, ref = both(lambda: QuantCodec().decode(bytes(payload), dtype, len(raw)))
    assert fast == ref
    assert fast[0] == "ok"


def test_native_zero_runs_on_numpy() -> None:
    """MZSTORE_NATIVE=0 turns the core off, with no warning; the codecs still round-trip."""
    code = (
        "import warnings; warnings.simplefilter('error');"
        "from mzstore.codecs import native, lossless; from mzstore.format.dtypes import DTYPES;"
        "assert native.core is None;"
        "c = lossless.LosslessCodec(); raw = bytes(range(256)) * 600;"
        "p, _ = c.encode(raw, DTYPES['BF16']); assert c.decode(p, DTYPES['BF16'], len(raw)).tobytes() == raw;"
        "print('numpy')"
    )
    env = {**os.environ, "MZSTORE_NATIVE": "0"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "numpy"


def test_a_missing_core_warns_once_and_falls_back(tmp_path: Any) -> None:
    """Without the compiled module (a machine with no compiler), mzstore warns once and decodes on numpy."""
    code = (
        "import sys, warnings, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'mzstore.codecs._native': raise ImportError('no compiler here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    from mzstore.codecs import native, lossless\n"
        "    from mzstore.codecs import quant\n"
        "from mzstore.format.dtypes import DTYPES\n"
        "assert native.core is None\n"
        "assert len(seen) == 1 and 'native codec core is not built' in str(seen[0].message), seen\n"
        "c = lossless.LosslessCodec(); raw = bytes(range(256)) * 600\n"
        "p, _ = c.encode(raw, DTYPES['BF16']); assert c.decode(p, DTYPES['BF16'], len(raw)).tobytes() == raw\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MZSTORE_NATIVE"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


ROOT = Path(__file__).resolve().parent.parent


def _cpu_has(flag: str) -> bool:
    try:
        return f" {flag}" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("flags", ["-DMZSTORE_NO_CLONES", "-DMZSTORE_NO_CLONES -mavx2"], ids=["baseline", "avx2"])
def test_every_cpu_variant_of_the_core_gives_numpys_bytes(tmp_path: Path, flags: str) -> None:
    """The core's hot loops are compiled per CPU (AVX-512, AVX2, baseline) and the CPU picks one at load,
    so this machine's tests run one of them. Each other one is built alone here and checked against numpy."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler")
    if "-mavx2" in flags and not _cpu_has("avx2"):
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "CFLAGS": flags}
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (lib,) = (tmp_path / "lib").rglob("_native*.so")
    env = {**os.environ, "MZSTORE_NATIVE_LIB": str(lib), "MZSTORE_NATIVE_EXAMPLES": "25"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
         "-k", "built_and_loaded or match_numpy or fail_the_same_way or round_the_same_way"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-500:]


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.split_planes(b"abc", 2, True, bytearray(3)),
        lambda c: c.split_planes(b"abcd", 2, True, bytearray(3)),
        lambda c: c.split_planes(b"abcd", 3, False, bytearray(4)),
        lambda c: c.merge_planes([b"ab", b"a"], True, bytearray(4)),
        lambda c: c.merge_planes([b"ab", b"ab"], True, bytearray(3)),
        lambda c: c.merge_planes([b"ab", b"ab"], True, b"abcd"),  # read-only destination
        lambda c: c.pair_histogram(b"ab", bytearray(8)),
        lambda c: c.ecsq_codes(bytes(8), 1.0, 3.0, bytearray(1), bytearray(2), bytearray(56), bytearray(56)),
        lambda c: c.ecsq_codes(bytes(8), 1.0, 3.0, bytearray(2), bytearray(2), bytearray(55), bytearray(56)),
        lambda c: c.ecsq_codes(bytes(7), 1.0, 3.0, bytearray(1), bytearray(1), bytearray(56), bytearray(56)),
        lambda c: c.ecsq_codes(bytes(8), 1.0, 3.5, bytearray(2), bytearray(2), bytearray(64), bytearray(64)),
        lambda c: c.ecsq_codes(bytes(8), 1.0, 40000.0, bytearray(2), bytearray(2), bytearray(8), bytearray(8)),
        lambda c: c.ecsq_codes(bytes(8), float("inf"), 3.0, bytearray(2), bytearray(2), bytearray(56), bytearray(56)),
        lambda c: c.ecsq_codes(bytes(8), 1.0, 3.0, bytearray(2), bytearray(2), bytearray(56), bytes(56)),
        lambda c: c.pair_ranks(b"abc", bytes(65536), bytearray(1), bytearray(4)),
        lambda c: c.pair_ranks(b"abc", bytes(65535), bytearray(2), bytearray(4)),
        lambda c: c.pairs_to_plane(b"\x00", bytes(512), b"", bytearray(3)),
        lambda c: c.pairs_to_half(b"\x00", bytes(510), b"", b"\x00", bytearray(2)),
        lambda c: c.pairs_to_half(b"\x00", bytes(512), b"\x00", b"\x00", bytearray(2)),
        lambda c: c.expand(0, b"\x00" * 4, b"\x00" * 4, b"", b"", 2, 2, 1, bytearray(8), 1),
        lambda c: c.expand(2, b"\x00" * 4, b"\x00" * 8, b"\x00", b"", 2, 2, 2, bytearray(8), 1),
        lambda c: c.expand(1, b"\x00" * 4, b"\x00" * 8, b"", b"", 2, 2, 1, bytearray(8), 1),
        lambda c: c.expand(0, b"\x00" * 4, b"\x00" * 8, b"", b"", 2, 2, 1, bytearray(8), 7),
        lambda c: c.expand(2, b"", b"", b"", b"", 0, 0, 0, bytearray(0), 0),
        lambda c: c.split_nibbles(b"abc", bytearray(1), bytearray(2)),
        lambda c: c.split_nibbles(b"abc", bytearray(2), bytearray(3)),
        lambda c: c.split_nibbles(b"abc", bytearray(2), b"ab"),  # read-only output
        lambda c: c.merge_nibbles(b"ab", b"a", bytearray(3)),
        lambda c: c.merge_nibbles(b"ab", b"ab", bytearray(5)),
        lambda c: c.merge_nibbles(b"ab", b"ab", b"abc"),
        lambda c: c.int4_params(bytes(8), b"", 1, 2, 0, bytes(4), 3, 1, bytearray(4), bytearray(1), bytearray(2)),
        lambda c: c.int4_params(bytes(8), b"", 1, 2, 32, bytes(4), 3, 1, bytearray(4), bytearray(1), bytearray(1)),
        lambda c: c.int4_params(bytes(8), b"\x01", 1, 2, 32, bytes(4), 3, 1, bytearray(4), bytearray(1), bytearray(2)),
        lambda c: c.int4_params(bytes(8), b"", 1, 2, 32, bytes(4), 3, 1, bytes(4), bytearray(1), bytearray(2)),
        lambda c: c.int4_params(bytes(7), b"", 1, 2, 32, bytes(4), 3, 1, bytearray(4), bytearray(1), bytearray(2)),
    ],
)
def test_entry_points_check_their_buffers(call: Callable[[Any], Any]) -> None:
    """Wrong lengths, read-only outputs and bad codes raise instead of reading or writing out of bounds."""
    assert CORE is not None
    with pytest.raises((ValueError, TypeError)):
        call(CORE)
