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

Usage::

    .venv/bin/python bench/bench_startup.py [--runs 15]
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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=15, help="runs per command (median reported)")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
