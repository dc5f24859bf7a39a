#!/usr/bin/env python3
"""CLI start-up: how long ``mzstore --version`` and ``mzstore ls`` take before doing anything (issue #12).

Every command pays the interpreter's start and its imports before its first
byte of work; an operator's ``mzstore ls`` in a loop, a health probe or a
shell completion pays it every time. This runs, interleaved, ``--runs``
times each:

* ``python -c pass`` with the same interpreter: the same-run baseline (the
  floor no CLI can go under);
* ``mzstore --version``;
* ``mzstore ls`` against a ``mzstore serve`` on loopback (one RPC);

and prints the median wall time and CPU time (user + sys of the child) of
each, the ratio to the baseline, and the target (≤ 0.25 s). It also prints
the cumulative ``-X importtime`` of the modules each command imports, the
largest first, so a regression names its culprit.

With ``--pull-mb N`` it also times whole ``mzstore pull -o DIR`` commands
(cold: a fresh ``MZSTORE_HOME`` each run) of an N MB bf16 checkpoint pushed
lossless and int8, beside ``cp`` of the source file: what an edge device's
pull costs, start-up and imports included. ``--other-checkout DIR`` runs the
same commands a second time with ``PYTHONPATH=DIR`` (another checkout of
mzstore, e.g. a ``git worktree`` of an older commit), for a before/after in
one run; the server is this checkout's in both.

Usage::

    .venv/bin/python bench/bench_startup.py [--runs 15] [--pull-mb 512 --other-checkout /tmp/old]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import fmt, read_address, table

TARGET_S = 0.25
ROOT = Path(__file__).resolve().parent.parent


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one run of ``cmd``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _imports(cmd: list[str], top: int = 6) -> list[tuple[str, float]]:
    """The modules with the largest cumulative ``-X importtime`` under ``cmd``'s own top-level imports."""
    out = subprocess.run([sys.executable, "-X", "importtime", *cmd], capture_output=True, text=True, check=False).stderr
    rows = []
    for line in out.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if m and len(m.group(2)) <= 2:  # top-level and first-level imports
            rows.append((m.group(3).strip(), int(m.group(1)) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def _checkpoint(path: Path, mb: int) -> None:
    """A bf16 checkpoint of about ``mb`` MB: 2048-wide layers of Gaussian weights."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    rows = 2048
    layers = max(1, mb * 1_000_000 // (rows * 8192 * 2))
    tensors = {f"layers.{i}.weight": (torch.randn(rows, 8192, generator=gen) * 0.02).bfloat16() for i in range(layers)}
    save_file(tensors, str(path))


def _pulls(mz: list[str], address: str, work: Path, runs: int, other: Path | None) -> list[list[str]]:
    """Cold ``mzstore pull -o`` wall times (this checkout, and ``other``), beside ``cp`` of the source."""
    src = work / "model.safetensors"
    rows: list[list[str]] = []
    times: dict[str, list[float]] = {}
    who = {"this checkout": os.environ.get("PYTHONPATH", "")}
    if other is not None:
        who[f"PYTHONPATH={other}"] = str(other)
    for i in range(runs):
        out = work / "cp-out"
        start = time.perf_counter()
        subprocess.run(["cp", str(src), str(out)], check=True)
        os.sync()
        times.setdefault("cp of the source file (baseline)", []).append(time.perf_counter() - start)
        out.unlink()
        for codec in ("lossless", "int8"):
            for label, pythonpath in who.items():
                home = work / f"home-{i}"
                env = {**os.environ, "MZSTORE_HOME": str(home), "PYTHONPATH": pythonpath}
                dest = work / "pull-out"
                start = time.perf_counter()
                subprocess.run(
                    [*mz, "pull", f"bench/m:{codec}", "-o", str(dest), "--server", address],
                    check=True,
                    env=env,
                    stdout=subprocess.DEVNULL,
                )
                times.setdefault(f"mzstore pull {codec} ({label})", []).append(time.perf_counter() - start)
                subprocess.run(["rm", "-rf", str(dest), str(home)], check=True)
    base = statistics.median(times["cp of the source file (baseline)"])
    size = src.stat().st_size
    for name, runs_s in times.items():
        wall = statistics.median(runs_s)
        rows.append([name, fmt(wall), f"{size / wall / 1e6:.0f}", fmt(wall / base, ".2f")])
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15, help="runs per command (median reported)")
    p.add_argument("--pull-mb", type=int, default=0, help="also time cold CLI pulls of a checkpoint this big (MB)")
    p.add_argument("--other-checkout", type=Path, default=None, help="run the pulls with PYTHONPATH=DIR too")
    args = p.parse_args()

    exe = Path(sys.executable).with_name("mzstore")
    mz = [str(exe)] if exe.exists() else [sys.executable, "-m", "mzstore.cli"]
    with tempfile.TemporaryDirectory(prefix="mzstore-startup-") as tmp:
        env = {**os.environ, "MZSTORE_HOME": tmp}
        server = subprocess.Popen(
            [*mz, "serve", "--root", f"{tmp}/store", "--listen", "127.0.0.1:0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            address = read_address(server, 30)
            commands = {
                "python -c pass (baseline)": [sys.executable, "-c", "pass"],
                "mzstore --version": [*mz, "--version"],
                "mzstore ls": [*mz, "ls", "--server", address],
            }
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
            for _ in range(args.runs):
                for name, cmd in commands.items():
                    results[name].append(_timed(cmd))
            imports = {
                "mzstore --version": _imports(["-m", "mzstore.cli", "--version"]),
                "mzstore ls": _imports(["-m", "mzstore.cli", "ls", "--server", address]),
            }
            pull_rows: list[list[str]] = []
            if args.pull_mb:
                work = Path(tmp) / "pulls"
                work.mkdir()
                _checkpoint(work / "model.safetensors", args.pull_mb)
                for codec in ("lossless", "int8"):
                    subprocess.run(
                        [
                            *mz,
                            "push",
                            str(work / "model.safetensors"),
                            f"bench/m:{codec}",
                            "--codec",
                            codec,
                            "--server",
                            address,
                        ],
                        check=True,
                        env=env,
                        stdout=subprocess.DEVNULL,
                    )
                pull_rows = _pulls(mz, address, work, max(3, args.runs // 3), args.other_checkout)
        finally:
            server.terminate()
            server.wait(timeout=30)

    base = statistics.median(w for w, _ in results["python -c pass (baseline)"])
    rows = []
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        target = "" if "baseline" in name else ("met" if wall <= TARGET_S else "MISSED")
        rows.append([name, fmt(wall), fmt(cpu), fmt(wall / base, ".1f"), f"≤ {TARGET_S} s {target}" if target else ""])
    print(
        table(
            f"CLI start-up, median of {args.runs} (wall and child CPU seconds)",
            ["command", "wall s", "cpu s", "x baseline", "target"],
            rows,
        )
    )
    for name, top in imports.items():
        shown = ", ".join(f"{mod} {sec * 1000:.0f} ms" for mod, sec in top)
        print(f"largest imports of {name}: {shown}")
    if pull_rows:
        print()
        print(
            table(
                f"cold CLI pulls of a {args.pull_mb} MB bf16 checkpoint, start-up included (median)",
                ["command", "wall s", "MB/s", "x cp"],
                pull_rows,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
