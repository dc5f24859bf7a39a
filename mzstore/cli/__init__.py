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
    try:
        from mzstore.cli import cache, models, server, transfer  # noqa: F401  (registers the commands)
        from mzstore.cli.base import cli, run
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    if not standalone_mode:
        return cli.main(args, prog_name="mzstore", standalone_mode=False)
    _leave(run(cli, args))


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
