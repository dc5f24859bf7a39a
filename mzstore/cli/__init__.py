"""``mzstore`` command line: flags → library call → render.

Each command parses its flags, calls the library (:mod:`mzstore.client`,
:mod:`mzstore.server`) and renders the result either for people or, with
``--json``, as one JSON object. Every expected failure is one ``error: …``
line (:func:`~mzstore.cli.base.run`, :class:`~mzstore.cli.base.Group`).
Exit codes: 0 ok, 1 failed, 2 usage (bad flags, an invalid reference, an
option that does not apply), 130 interrupted.

Commands by group::

    base.py      the group, its error formatting, --server/--tls-ca/--json, rendering helpers
    transfer.py  push, pull
    models.py    ls, inspect, rm, tag
    server.py    serve, token add, fsck, rebalance, gc
    cache.py     cache ls | verify | prune

:func:`main` is the console script. It imports the commands itself, so that
even a Ctrl-C while they load ends with one line; each command imports what
it uses when it runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any


def main(args: Sequence[str] | None = None, standalone_mode: bool = True) -> Any:
    """The ``mzstore`` command. ``standalone_mode=False`` returns (or raises) as click's ``main`` does."""
    # numpy's OpenBLAS starts a thread per core that spins between calls: 4 % of a pull's CPU in
    # perf, for nothing (mzstore's threads do the parallel work and call no BLAS on pull).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _tune_malloc()
    try:
        from mzstore.cli import cache, models, server, transfer  # noqa: F401  (registers the commands)
        from mzstore.cli.base import cli, run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    if not standalone_mode:
        return cli.main(args, prog_name="mzstore", standalone_mode=False)
    _leave(run(cli, args))


#: glibc ``mallopt`` parameters (``malloc.h``) and the values the CLI sets: two arenas, buffers up to
#: 32 MiB from the heap (not a fresh ``mmap`` each), and up to 512 MiB of freed heap kept. A pull's
#: range buffers are then reused instead of page-faulted in and zeroed per chunk: 1 GB bf16 lossless
#: on loopback, 1.05 s and 1.47 CPU-s instead of 1.16 s and 1.60 (median of 5 CLI pulls to tmpfs).
_MALLOPT = ((-8, 2), (-3, 32 << 20), (-1, 512 << 20))  # M_ARENA_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
_MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _tune_malloc() -> None:
    """Set :data:`_MALLOPT` on glibc, unless the user set any of those ``MALLOC_*`` variables."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in _MALLOC_ENV):
        return
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for param, value in _MALLOPT:
        mallopt(param, value)


def _leave(code: int) -> None:
    """Flush and exit without the interpreter's teardown.

    The work is done and every file is closed by then; tearing down modules, the gRPC runtime
    and the pools' threads took another 60 ms after a pull (``bench/bench_link.py``).
    """
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


__all__ = ["main"]
