#!/usr/bin/env python3
"""``load_into`` a model that already holds its weights: in place against new memory (issue 15).

A model built normally (or loaded before) already has memory for every
tensor. ``load_into`` decodes the checkpoint's chunks straight into it
(``in_place=True``, the default) instead of pulling every tensor into new
memory and assigning it (``in_place=False``, the behaviour before). This
bench pushes a synthetic bf16 checkpoint (``--size-gb``, TinyLlama-shaped)
to a ``mzstore serve`` on loopback, then in each round, in fresh processes,
builds a model of the checkpoint's shapes on the CPU (zero-filled, so its
memory is touched, as a model's initialisation does) and loads the checkpoint
into it both ways; ``load_state_dict`` (a new state dict, no model) runs
beside them for reference. The client's chunk cache is off, so every run
moves the same bytes.

Printed per mode (median of ``--runs``): wall seconds, client CPU-seconds
(every thread of the process), CPU-s per decoded GB, and the process's peak
RSS beyond the built model, in MiB and as a multiple of the model's size; then
in place / new memory ratios from the same run. Nothing is asserted.

Usage::

    .venv/bin/python bench/bench_load_into.py [--runs 5] [--size-gb 1.0] [--codec lossless|int8]

Internal: ``--child MODE REF --server ADDR`` runs one load in this process and
prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, fmt, log, package_versions, run_child, table
from bench_lossless import SEED, fresh_store, make_synthetic

MODES = ("new memory", "in place", "load_state_dict")
GB = 1_000_000_000
MIB = 1024 * 1024


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_main(mode: str, ref: str, server: str) -> int:
    import torch

    from mzstore.client import Client

    with Client(server, cache=False) as client:
        _, _, manifest = client.manifest(ref)
        model = torch.nn.Module()
        for t in manifest.tensors:  # one Parameter per checkpoint tensor, dotted names as submodules
            owner = model
            *path, attr = t.name.split(".")
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[t.dtype]
            owner.register_parameter(attr, torch.nn.Parameter(torch.zeros(t.shape, dtype=dtype)))
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        built_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        c0, t0 = _cpu(), time.perf_counter()
        if mode == "load_state_dict":
            sd = client.load_state_dict(ref)
            placed = 0
        else:
            report = client.load_into(model, ref, in_place=mode == "in place")
            placed = len(report["in_place"])
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if mode == "load_state_dict":
            del sd
    print(
        json.dumps(
            {
                "wall": wall,
                "cpu": cpu,
                "model_bytes": model_bytes,
                "extra_mib": (peak_kib - built_kib) / 1024,
                "in_place": placed,
            }
        ),
        flush=True,
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds, median reported (default 5)")
    parser.add_argument("--size-gb", type=float, default=1.0, help="synthetic bf16 checkpoint size (default 1.0)")
    parser.add_argument("--codec", default="lossless", help="push policy (default lossless)")
    parser.add_argument("--tmpdir", default=None, help="where temp files go")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "REF"), help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child[0], args.child[1], args.server)

    versions = package_versions(("mzstore", "torch"))
    print("mzstore load_into benchmark: in place against new memory")
    print(f"  python {platform.python_version()}; cpu: {cpu_model()}; usable cores: {len(os.sched_getaffinity(0))}")
    print(f"  {', '.join(f'{k} {v}' for k, v in versions.items())}; codec {args.codec}; runs {args.runs}")
    with tempfile.TemporaryDirectory(prefix="mzstore-bench-load-into-", dir=args.tmpdir) as tmp:
        work = Path(tmp)
        log(f"generating a ~{args.size_gb} GB synthetic bf16 checkpoint (seed {SEED})")
        src = work / "src"
        src.mkdir()
        make_synthetic(src / "model.safetensors", int(args.size_gb * GB))
        with fresh_store(work, "process") as server:
            from mzstore.client import Client

            ref = "bench/load-into:1"
            with Client(server.address, cache=False) as client:
                client.push(src, ref, codec=args.codec)
            results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
            for i in range(args.runs):
                log(f"round {i + 1}/{args.runs}")
                for mode in MODES:
                    results[mode].append(run_child(__file__, [mode, ref, "--server", server.address]))

    model_bytes = results["in place"][0]["model_bytes"]
    med = {m: {k: statistics.median(r[k] for r in results[m]) for k in ("wall", "cpu", "extra_mib")} for m in MODES}
    rows = []
    for m in MODES:
        f = med[m]
        rows.append(
            [
                m,
                fmt(f["wall"]),
                fmt(f["cpu"], ".2f"),
                fmt(f["cpu"] / (model_bytes / GB), ".2f"),
                fmt(f["extra_mib"], ".0f"),
                fmt(f["extra_mib"] * MIB / model_bytes, ".2f"),
                ", ".join(fmt(r["wall"], ".2f") for r in results[m]),
                str(results[m][0]["in_place"]) if m != "load_state_dict" else "-",
            ]
        )
    print()
    print(
        table(
            f"{model_bytes / GB:.2f} GB bf16 model, {args.codec}, loopback, chunk cache off: medians of {args.runs}",
            ["mode", "wall s", "CPU s", "CPU s/GB", "peak RSS +MiB", "x model", "wall runs", "tensors in place"],
            rows,
        )
    )
    new, inplace = med["new memory"], med["in place"]
    print()
    print(
        f"in place / new memory: wall {inplace['wall'] / new['wall']:.2f}x, client CPU {inplace['cpu'] / new['cpu']:.2f}x,"
        f" peak RSS beyond the model {inplace['extra_mib'] / max(new['extra_mib'], 1e-9):.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
