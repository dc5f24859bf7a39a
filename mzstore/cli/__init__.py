"""``mzstore`` command line: flags → library call → render.

Each command parses its flags, calls the library (:mod:`mzstore.client`,
:mod:`mzstore.server`) and renders the result either for people or, with
``--json``, as one JSON object. Errors are rendered by one formatter as a
single ``error: …`` line (:class:`~mzstore.cli.base.Group`). Exit codes: 0
ok, 1 failed, 2 usage (bad flags or an invalid reference).

Commands by group::

    base.py      the group, its error formatter, --server/--tls-ca/--json, rendering helpers
    transfer.py  push, pull
    models.py    ls, inspect, rm, tag
    server.py    serve, token add, fsck, rebalance, gc
    cache.py     cache ls | verify | prune

Only click and the settings load at start-up; each command imports what it
uses when it runs.
"""

from mzstore.cli import cache, models, server, transfer  # noqa: F401  (registers the commands)
from mzstore.cli.base import main

__all__ = ["main"]
