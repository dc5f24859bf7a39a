"""The native codec core, or ``None`` where it is not built or turned off.

``mzstore/codecs/_native.c`` holds the hot loops of the lossless and
quantized codecs (plane split and merge, the exponent-pair coder, int8,
int4 and fp8 expansion), each one pass with the GIL released, so decoders
on worker threads run in parallel. The numpy code beside each call site is
the reference implementation; ``tests/test_native.py`` proves the two give
the same bytes and the same errors.

``MZSTORE_NATIVE=0`` turns the core off (CI runs the codec tests that way
too). A checkout or wheel built without a C compiler has no core: mzstore
then runs on numpy and says so once. ``MZSTORE_NATIVE_LIB=PATH`` loads
another build of the module instead (``make fuzz-native`` loads one built
with AddressSanitizer).
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

#: The interface version this Python code expects of ``_native`` (its ``ABI`` constant).
ABI = 5


def _load() -> ModuleType | None:
    if os.environ.get("MZSTORE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        other = os.environ.get("MZSTORE_NATIVE_LIB")
        if other:
            _native = _load_file(other)
        else:
            from mzstore.codecs import _native  # type: ignore[attr-defined,no-redef]
    except ImportError:
        warnings.warn(
            "mzstore: the native codec core is not built (was a C compiler missing at install?); "
            "decoding runs on numpy, 2-10x slower. Reinstall with a compiler, or set MZSTORE_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    if getattr(_native, "ABI", None) != ABI:
        warnings.warn(
            "mzstore: the native codec core is stale (rebuild it: pip install -e . or make setup); using numpy",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return _native


def _load_file(path: str) -> ModuleType:
    """The module ``mzstore.codecs._native`` from the extension file at ``path``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mzstore.codecs._native", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"MZSTORE_NATIVE_LIB={path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The loaded core. Call sites read ``native.core`` each time, so tests can set it to ``None``.
core: ModuleType | None = _load()


def enabled() -> bool:
    """Whether the codecs run on the native core."""
    return core is not None
