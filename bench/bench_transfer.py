#!/usr/bin/env python3
"""Raw ReadBlob transfer: how fast stored bytes cross gRPC, and the CPU each side spends (issue #5).

Pushes a synthetic bf16 checkpoint (lossless) to a ``mzstore serve``
process on loopback, then reads every stored byte back with
``Client.fetch`` in 16 MiB ranges on ``--workers`` threads, no decode: the
transport alone. For every round it prints MB/s of stored bytes and the CPU
milliseconds per MB of the server process (from ``/proc``) and of this
client process (``getrusage``). The first round after the server starts
includes its once-per-process whole-blob check; later rounds are the steady
state. Same-run baseline: ``os.pread`` of the same blob files in 16 MiB
ranges on as many threads (what ``pull --direct`` reads from a co-located
store).

Usage::

    .venv/bin/python bench/bench_transfer.py [--size-gb 0.5] [--rounds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import cpu_pid, cpu_self, fmt, log, table
from bench_lossless import fresh_store, make_synthetic

RANGE = 16 << 20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=0.5, help="synthetic checkpoint size (default 0.5)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5; the median excludes round 1)")
    p.add_argument("--workers", type=int, default=2, help="concurrent range reads (default 2, the pull default here)")
    args = p.parse_args()

    from mzstore.client import Client

    with tempfile.TemporaryDirectory(prefix="mzstore-bench-transfer-") as tmp:
        work = Path(tmp)
        src = work / "src" / "model.safetensors"
        src.parent.mkdir()
        log(f"generating a ~{args.size_gb} GB synthetic bf16 checkpoint")
        make_synthetic(src, int(args.size_gb * 1e9))
        with fresh_store(work, "process") as server:
            assert server.pid is not None
            with Client(server.address) as c:
                c.push(src.parent, "transfer:lossless", codec="lossless")
                manifest = c.manifest("transfer:lossless")[2]
            store_root = next(q for q in work.glob("store-*") if q.is_dir())
            files = {q.name: q for q in (store_root / "blobs").rglob("*") if q.is_file()}
            blobs = [(d, files[d.split(":", 1)[1]].stat().st_size) for d in sorted(manifest.blobs())]
            ranges = [(d, o, min(RANGE, n - o)) for d, n in blobs for o in range(0, n, RANGE)]
            mb = sum(r[2] for r in ranges) / 1e6
            rows: list[list[str]] = []
            grpc_rates: list[float] = []
            pread_rates: list[float] = []
            for r in range(1, args.rounds + 1):
                log(f"round {r}/{args.rounds}")
                s0, c0, t0 = cpu_pid(server.pid), cpu_self(), time.perf_counter()
                with Client(server.address) as c, ThreadPoolExecutor(args.workers) as pool:
                    got = sum(pool.map(lambda rg: len(c.fetch(*rg)), ranges))
                took = time.perf_counter() - t0
                s1, c1 = cpu_pid(server.pid), cpu_self()
                assert s0 is not None and s1 is not None, "the server process is gone"
                assert got == int(mb * 1e6 + 0.5)

                def pread(rg: tuple[str, int, int]) -> int:
                    fd = os.open(files[rg[0].split(":", 1)[1]], os.O_RDONLY)
                    try:
                        return len(os.pread(fd, rg[2], rg[1]))
                    finally:
                        os.close(fd)

                p0 = time.perf_counter()
                with ThreadPoolExecutor(args.workers) as pool:
                    sum(pool.map(pread, ranges))
                pread_s = time.perf_counter() - p0
                if r > 1:
                    grpc_rates.append(mb / took)
                    pread_rates.append(mb / pread_s)
                rows.append(
                    [
                        str(r) + (" (server's first reads)" if r == 1 else ""),
                        fmt(mb / took, ".0f"),
                        fmt(1000 * (s1 - s0) / mb, ".2f"),
                        fmt(1000 * (c1 - c0) / mb, ".2f"),
                        fmt(mb / pread_s, ".0f"),
                    ]
                )
    print(
        table(
            f"ReadBlob over loopback, {mb:.0f} MB stored in 16 MiB ranges, {args.workers} workers, os.cpu_count={os.cpu_count()}",
            ["round", "gRPC MB/s", "server CPU ms/MB", "client CPU ms/MB", "pread MB/s (baseline)"],
            rows,
        )
    )
    if grpc_rates:
        g, b = statistics.median(grpc_rates), statistics.median(pread_rates)
        print(f"\nmedian of rounds 2-{args.rounds}: gRPC {g:.0f} MB/s, pread {b:.0f} MB/s, ratio {g / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
