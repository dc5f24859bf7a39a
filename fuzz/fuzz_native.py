#!/usr/bin/env python3
"""Coverage-guided differential fuzzing of the native codec core against numpy (issue 15), with atheris.

Each input is ``[kind byte][raw length, u32 LE][payload]``: the payload is
decoded as one chunk of the kind's dtype by both the native core
(``mzstore/codecs/_native.c``) and the numpy reference, and the two must give
the same bytes or the same :class:`~mzstore.errors.CodecError` message.
Anything else (a crash, a differing result, another exception) is a finding:
libFuzzer stops and writes the input to ``crash-*``.

The seed corpus is valid payloads of every kind (lossless bf16/f16/f32/f64
and integer dtypes, with and without pair-coded exponents and escapes; int8,
fp8, int4, ecsq and pruned chunks, int8 codes nibble-split), written to the corpus directory when it is
empty, so mutations start from inputs that reach deep into the decoders.

``make fuzz-native`` runs this for ``FUZZ_SECONDS`` (default 60) with
coverage guidance, growing ``build/fuzz-corpus``, then replays every input
of the corpus against a build of the core with AddressSanitizer (gcc's
``-fsanitize=address``, loaded through ``MZSTORE_NATIVE_LIB`` with the ASan
runtime preloaded): an out-of-bounds read or write in C is reported even
where it would not crash. The ASan runtime takes over the coverage hooks
atheris needs, hence two steps. Python code is instrumented for coverage;
the C code is not (that needs clang's ``-fsanitize=fuzzer``, not installed
here), so the guidance comes from the Python paths around the native calls.

    .venv/bin/python fuzz/fuzz_native.py [libFuzzer flags: -runs=N -max_total_time=S] [CORPUS_DIR]
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import numpy as np

    from mzstore.codecs import native
    from mzstore.codecs.lossless import PAIRS_MIN_BYTES, LosslessCodec
    from mzstore.codecs.policy import Prune, Quant, Spec
    from mzstore.codecs.quant import QuantCodec, encode_spec
    from mzstore.errors import CodecError
    from mzstore.format.dtypes import DTYPES

CORE = native.core
#: (codec, dtype) of each kind byte.
KINDS = [("lossless", n) for n in ("BF16", "F16", "F32", "F64", "I8", "I16", "I32", "BOOL")] + [
    ("quant", n) for n in ("BF16", "F32", "F16")
]
MAX_RAW = 1 << 20


def decode(codec: str, dtype: str, payload: bytes, raw_len: int) -> tuple[str, bytes | str]:
    try:
        if codec == "lossless":
            out = LosslessCodec().decode(payload, DTYPES[dtype], raw_len)
        else:
            out = QuantCodec().decode(payload, DTYPES[dtype], raw_len)
    except CodecError as exc:
        return "error", str(exc)
    return "ok", np.asarray(out).tobytes()


def test_one_input(data: bytes) -> None:
    if len(data) < 5:
        return
    codec, dtype = KINDS[data[0] % len(KINDS)]
    raw_len = struct.unpack_from("<I", data, 1)[0] % MAX_RAW
    payload = data[5:]
    try:
        native.core = CORE
        fast = decode(codec, dtype, payload, raw_len)
        native.core = None
        reference = decode(codec, dtype, payload, raw_len)
    finally:
        native.core = CORE
    if fast != reference:
        raise AssertionError(
            f"native and numpy differ on {codec} {dtype} raw_len={raw_len}: {fast[0]} vs {reference[0]}"
        )


def _weights(rng: np.random.Generator, n: int, dtype: str, escapes: bool) -> bytes:
    x = rng.standard_normal(n).astype(np.float32) * np.float32(0.02)
    if escapes:
        wild = rng.random(n) < 0.03
        x[wild] *= np.float32(2.0) ** rng.integers(-60, 60, int(wild.sum())).astype(np.float32)
    if dtype == "BF16":
        return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    if dtype == "F16":
        return x.astype(np.float16).tobytes()
    if dtype == "F32":
        return x.tobytes()
    if dtype == "F64":
        return x.astype(np.float64).tobytes()
    width = max(1, DTYPES[dtype].bits // 8)
    return rng.integers(0, 256, n * width, dtype=np.uint8).tobytes()


def seeds() -> list[bytes]:
    """Valid inputs of every kind: what the mutations start from."""
    rng = np.random.default_rng(15)
    out = []
    for k, (codec, dtype) in enumerate(KINDS):
        if codec == "lossless":
            for n, escapes in ((2 * PAIRS_MIN_BYTES + 1, True), (3000, False), (7, True)):
                raw = _weights(rng, n, dtype, escapes)
                out.append(bytes([k]) + struct.pack("<I", len(raw)) + LosslessCodec().encode(raw, DTYPES[dtype])[0])
        else:
            for spec in (
                Quant("int8"),
                Quant("fp8"),
                Quant("int4", 32),
                Quant("ecsq", step=0.3),
                Quant("ecsq", step=0.004),
            ):
                rows, cols = 6, 96
                raw = _weights(rng, rows * cols, dtype, False)
                for prune in (None,) if spec.kind == "ecsq" else (None, Prune(0.5)):
                    payload = encode_spec(raw, DTYPES[dtype], rows, Spec(prune=prune, quant=spec)).payload
                    out.append(bytes([k]) + struct.pack("<I", len(raw)) + payload)
            if dtype == "BF16":  # enough int8 codes to be stored nibble-split
                raw = _weights(rng, 256 * 256, dtype, False)
                payload = encode_spec(raw, DTYPES[dtype], 256, Spec(quant=Quant("int8"))).payload
                out.append(bytes([k]) + struct.pack("<I", len(raw)) + payload)
    return out


def main() -> None:
    if CORE is None:
        raise SystemExit("the native core is not built (make setup), or MZSTORE_NATIVE=0 is set")
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), None)
    if corpus is not None and corpus.is_file():
        pass  # libFuzzer runs the given inputs (a crash file to reproduce)
    elif corpus is not None:
        corpus.mkdir(parents=True, exist_ok=True)
        if not any(corpus.iterdir()):
            for i, seed in enumerate(seeds()):
                (corpus / f"seed-{i:03d}").write_bytes(seed)
    else:
        for seed in seeds():  # no corpus directory: check the seeds, then mutate from nothing
            test_one_input(seed)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
