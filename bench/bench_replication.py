"""Replication benchmark: push/pull throughput with R=1 vs R=2, and rebalance movement.

Usage::

    .venv/bin/python bench/bench_replication.py [--mb 256] [--runs 3]

1. Push and pull throughput (MB/s of raw bytes, median of --runs) of a
   synthetic bf16 checkpoint over two local nodes with one and with two
   copies of every blob, in the same run: the cost of replication.
2. Rebalance from N to N+1 local nodes (N = 2..5, R = 1): the fraction of
   blob copies moved, measured by ``mzstore.storage.admin.rebalance`` on real
   stores, beside the ideal 1/(N+1) and the fraction predicted by
   ``placement.moved_fraction``.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.server.app import build_server
from mzstore.settings import Settings
from mzstore.storage import Store, open_node
from mzstore.storage.admin import rebalance
from mzstore.storage.placement import moved_fraction


def make_model(path: Path, mb: int) -> Path:
    gen = torch.Generator().manual_seed(0)
    n = max(1, mb // 32)
    tensors = {
        f"layers.{i}.weight": (torch.randn(4096, 4096, generator=gen) * 0.02).to(torch.bfloat16) for i in range(n)
    }
    save_file(tensors, str(path))
    return path


def store_over(root: Path, n: int, replicas: int) -> Store:
    return Store([open_node(root / f"node{i}") for i in range(n)], replicas)


def throughput(work: Path, model: Path, replicas: int, runs: int) -> tuple[float, float]:
    size = model.stat().st_size
    push_s, pull_s = [], []
    for run in range(runs):
        root = work / f"r{replicas}-{run}"
        server = build_server(store_over(root, 2, replicas), "127.0.0.1:0", Settings(shard_bytes=64 * 1024 * 1024))
        try:
            with Client(server.address) as client:
                start = time.perf_counter()
                client.push(model, "bench/m:v1")
                push_s.append(time.perf_counter() - start)
                out = work / f"out-{replicas}-{run}"
                start = time.perf_counter()
                client.pull("bench/m:v1", out)
                pull_s.append(time.perf_counter() - start)
                shutil.rmtree(out)
        finally:
            server.stop(1)
            shutil.rmtree(root)
    return size / statistics.median(push_s) / 1e6, size / statistics.median(pull_s) / 1e6


def rebalance_share(work: Path, model: Path, n: int) -> tuple[float, float, int]:
    root = work / f"rebalance-{n}"
    before = store_over(root, n, 1)
    server = build_server(before, "127.0.0.1:0", Settings(chunk_bytes=256 * 1024, shard_bytes=256 * 1024))
    try:
        with Client(server.address) as client:
            client.push(model, "bench/m:v1")
    finally:
        server.stop(1)
    after = store_over(root, n + 1, 1)
    digests = [
        d
        for node in before.nodes
        for d in ("sha256:" + p.name for p in (Path(node.root) / "blobs").rglob("*") if p.is_file())
    ]  # type: ignore[attr-defined]
    predicted = moved_fraction(before.urls, after.urls, digests, 1)
    report = rebalance(after)
    shutil.rmtree(root)
    return report.moved / report.copies, predicted, report.blobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the synthetic bf16 checkpoint")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mzstore-bench-rep-"))
    try:
        model = make_model(work / "model.safetensors", args.mb)
        print(
            f"mzstore replication benchmark: {model.stat().st_size / 1e6:.0f} MB bf16, {os.cpu_count()} cores, median of {args.runs}"
        )
        print("\n1. Throughput over two local nodes (MB/s of raw bytes)")
        print(f"{'replicas':>8}  {'push MB/s':>9}  {'pull MB/s':>9}")
        base = None
        for replicas in (1, 2):
            push, pull = throughput(work, model, replicas, args.runs)
            base = base or (push, pull)
            print(
                f"{replicas:>8}  {push:>9.0f}  {pull:>9.0f}   (push {push / base[0]:.2f}x, pull {pull / base[1]:.2f}x of R=1)"
            )
        print("\n2. Rebalance N -> N+1 nodes, R=1 (fraction of blob copies moved)")
        print(f"{'N':>3}  {'blobs':>5}  {'moved':>6}  {'predicted':>9}  {'ideal 1/(N+1)':>13}")
        for n in range(2, 6):
            share, predicted, blobs = rebalance_share(work, model, n)
            print(f"{n:>3}  {blobs:>5}  {share:>6.3f}  {predicted:>9.3f}  {1 / (n + 1):>13.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
