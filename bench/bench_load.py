#!/usr/bin/env python3
"""Load harness (issue #6): N concurrent clients against one ``mzstore serve`` on loopback.

For every configuration (clients x TLS) it starts a fresh ``mzstore serve``
subprocess over a new temp store (plaintext, or TLS with trustme-made
certificates), pushes a pool of small bf16 models, then runs N client
processes for ``--duration`` seconds. Each client loops: 70 % of its
operations pull a random pooled model into a temp directory (no local cache,
so every byte crosses the wire) and check every file's sha256 on the spot;
30 % push a fresh model under a new ref. Afterwards every pushed model is
pulled again and compared byte for byte. Meanwhile the server's RSS is
sampled every second.

It prints one table per configuration (ops/s, MB/s, p50/p99 latency, errors,
integrity failures, server RSS) and a summary against the issue's targets:
0 integrity failures, 0 unexpected errors, server RSS flat over the run.
Nothing is asserted; the exit status does not depend on the figures.

Usage::

    .venv/bin/python bench/bench_load.py [--clients 4,16] [--duration 60] [--tls both|on|off]
                                         [--quick] [--json OUT] [--tmpdir DIR]

See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from _common import cpu_pid, fmt, log, package_versions, read_address, stop, table

MB = 1_000_000  # throughput unit (raw bytes)
MIB = 1024 * 1024
PUSH_FRACTION = 0.30
POOL_SIZE = 8
MODEL_MB = (1.0, 4.0)  # model.safetensors size range, MB
FLAT_TOLERANCE = 0.25  # "flat": end RSS <= (1 + this) x RSS after warm-up
WARMUP_S = 10.0
#: Errors a loaded server may legitimately answer with (it sheds load or a deadline passes); anything
#: else is unexpected. IntegrityError (and any byte mismatch) is counted apart, as an integrity failure.
EXPECTED_ERRORS = ("ResourceExhausted", "DeadlineExceeded")


# --------------------------------------------------------------------------- models


def make_model(directory: Path, rng: random.Random, label: str) -> dict[str, Any]:
    """A small bf16 checkpoint directory (model.safetensors + config.json); return its files' sha256s.

    bf16 weights are normal(0, 0.02) floats truncated to their top 16 bits (numpy has no bf16), written as a
    hand-made safetensors file, so the workers need neither torch nor safetensors.
    """
    import numpy as np

    gen = np.random.default_rng(rng.getrandbits(63))
    total = int(rng.uniform(*MODEL_MB) * MB)
    cols = 512
    rows = max(8, total // 2 // cols // 4)  # four matrices of rows x cols bf16, plus a norm vector
    tensors: dict[str, np.ndarray] = {}
    for i in range(4):
        std = 0.02 * (0.5 + rng.random())
        w = (gen.standard_normal((rows, cols), dtype=np.float32) * std).view(np.uint32) >> 16
        tensors[f"layers.{i}.weight"] = w.astype(np.uint16)
    norm = (1.0 + 0.05 * gen.standard_normal(cols, dtype=np.float32)).view(np.uint32) >> 16
    tensors["norm.weight"] = norm.astype(np.uint16)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "label": label}}
    offset = 0
    for name, t in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    blob = struct.pack("<Q", len(head)) + head + b"".join(t.tobytes() for t in tensors.values())
    config = json.dumps({"model_type": "bench-load", "label": label, "hidden_size": cols, "layers": 4}).encode()
    directory.mkdir(parents=True)
    files = {"model.safetensors": blob, "config.json": config}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return {
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        "bytes": sum(len(d) for d in files.values()),
    }


# --------------------------------------------------------------------------- client side (worker processes)


def classify(exc: BaseException) -> str:
    from mzstore.errors import IntegrityError

    if isinstance(exc, IntegrityError):
        return "integrity"
    if type(exc).__name__ in EXPECTED_ERRORS:
        return "expected"
    return "unexpected"


def pull_and_check(client: Any, ref: str, expected: dict[str, Any], out: Path, digest: str | None = None) -> str:
    """Pull ``ref`` into ``out`` (a new directory) and compare every file with ``expected``.

    Returns "" when every byte matches, else what differs (an integrity failure). The directory is removed.
    """
    try:
        info = client.pull(ref, out)
        got = {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}
        problems = []
        if set(got) != set(expected["sha256"]):
            problems.append(f"files {sorted(got)} != {sorted(expected['sha256'])}")
        for name, sha in expected["sha256"].items():
            if name in got and hashlib.sha256(got[name].read_bytes()).hexdigest() != sha:
                problems.append(f"{name} sha256 differs")
        if digest is not None and info.digest != digest:
            problems.append(f"digest {info.digest} != pushed {digest}")
        return "; ".join(problems)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def worker_main(
    idx: int, conn: Connection, address: str, tls_ca: str | None, pool: list[dict[str, Any]], scratch: str, seed: int
) -> None:
    """One client: connect, report ready, run the op loop until the deadline, then verify what it is given."""
    from mzstore.client import Client

    scratch_dir = Path(scratch)
    rng = random.Random(seed)
    try:
        client = Client(address, timeout=60.0, cache=False, tls_ca=tls_ca)
        client.manifest(pool[0]["ref"])  # open the channel (TCP + TLS handshake) before the clock starts
    except Exception:  # noqa: BLE001 - reported to the parent
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ready", os.getpid()))
    _, t0, deadline = conn.recv()
    ops: list[tuple[str, float, float, int, str, str]] = []  # kind, start (s after t0), latency, bytes, outcome, msg
    pushed: list[dict[str, Any]] = []
    n = 0
    while time.monotonic() < deadline:
        n += 1
        if rng.random() < PUSH_FRACTION:
            src = scratch_dir / f"src-{n}"
            ref = f"load/w{idx}-{n}:v1"
            model = make_model(src, rng, f"w{idx}-{n}-{seed}")
            start = time.monotonic()
            try:
                info = client.push(src, ref)
                outcome, msg = "ok", ""
                pushed.append({"ref": ref, "digest": info.digest, **model})
            except Exception as exc:  # noqa: BLE001 - every failure is counted and classified
                outcome, msg = classify(exc), f"{type(exc).__name__}: {exc}"
            latency = time.monotonic() - start
            shutil.rmtree(src, ignore_errors=True)
            ops.append(("push", start - t0, latency, model["bytes"], outcome, msg[:300]))
        else:
            entry = rng.choice(pool)
            start = time.monotonic()
            try:
                problem = pull_and_check(client, entry["ref"], entry, scratch_dir / f"pull-{n}")
                outcome, msg = ("integrity", problem) if problem else ("ok", "")
            except Exception as exc:  # noqa: BLE001 - every failure is counted and classified
                outcome, msg = classify(exc), f"{type(exc).__name__}: {exc}"
            ops.append(("pull", start - t0, time.monotonic() - start, entry["bytes"], outcome, msg[:300]))
    conn.send(("done", ops, pushed))
    _, items = conn.recv()
    results = []
    for i, item in enumerate(items):
        try:
            problem = pull_and_check(client, item["ref"], item, scratch_dir / f"verify-{i}", item["digest"])
            results.append((item["ref"], "integrity" if problem else "ok", problem))
        except Exception as exc:  # noqa: BLE001 - every failure is counted and classified
            results.append((item["ref"], classify(exc), f"{type(exc).__name__}: {exc}"[:300]))
    conn.send(("verified", results))
    client.close()


# --------------------------------------------------------------------------- server


def proc_status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Server:
    address: str
    pid: int
    tls_ca: str | None


def make_certs(directory: Path) -> tuple[Path, Path, Path]:
    """A trustme CA and a server certificate for 127.0.0.1/localhost: (cert chain, key, CA) PEM files."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_pem = directory / "server.pem", directory / "server.key", directory / "ca.pem"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_pem))
    return cert, key, ca_pem


@contextlib.contextmanager
def serve(work: Path, tls: bool) -> Iterator[Server]:
    """``mzstore serve`` over a new temp store on 127.0.0.1 (TLS with fresh certificates if asked)."""
    root = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    extra: list[str] = []
    ca: str | None = None
    if tls:
        certs = Path(tempfile.mkdtemp(prefix="certs-", dir=work))
        cert, key, ca_pem = make_certs(certs)
        extra = ["--tls-cert", str(cert), "--tls-key", str(key)]
        ca = str(ca_pem)
    exe = Path(sys.executable).with_name("mzstore")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from mzstore.cli import main; main()"]
    errlog = work / f"{root.name}.server.log"
    with open(errlog, "wb") as err:
        proc = subprocess.Popen(
            [*cmd, "serve", "--root", str(root), "--listen", "127.0.0.1:0", *extra], stdout=subprocess.PIPE, stderr=err
        )
    try:
        try:
            address = read_address(proc, timeout=60)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\nserver stderr:\n{errlog.read_text()[-4000:]}") from None
        yield Server(address, proc.pid, ca)
    finally:
        stop(proc)
        if proc.stdout:
            proc.stdout.close()
        shutil.rmtree(root, ignore_errors=True)


class RssSampler(threading.Thread):
    """Samples the server's VmRSS every ``interval`` seconds: ``[(seconds since t0, KiB)]``."""

    def __init__(self, pid: int, t0: float, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0, self.interval = pid, t0, interval
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while True:
            kib = proc_status_kib(self.pid, "VmRSS")
            if kib is not None:
                self.samples.append((time.monotonic() - self.t0, kib))
            if self._done.wait(self.interval):
                return

    def stop(self) -> None:
        self._done.set()
        self.join()

    def at(self, t: float) -> int | None:
        """The sample nearest to ``t`` seconds."""
        return min(self.samples, key=lambda s: abs(s[0] - t))[1] if self.samples else None


# --------------------------------------------------------------------------- one configuration


@dataclass
class Result:
    clients: int
    tls: bool
    duration: float  # configured
    wall: float = 0.0  # from "go" to the last worker's last op
    ops: list[tuple[str, float, float, int, str, str]] = field(default_factory=list)
    verified: list[tuple[str, str, str]] = field(default_factory=list)
    worker_failures: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    rss_start: int | None = None
    rss_warm: int | None = None
    rss_mid: int | None = None
    rss_end: int | None = None
    rss_max: int | None = None
    rss_after_verify: int | None = None
    hwm: int | None = None
    warmup: float = WARMUP_S
    server_cpu: float | None = None
    pool_bytes: int = 0
    setup_s: float = 0.0
    verify_s: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.clients} clients, {'TLS' if self.tls else 'plaintext'}"

    def count(self, kind: str | None, outcome: str) -> int:
        return sum(1 for o in self.ops if (kind is None or o[0] == kind) and o[4] == outcome)

    def verify_count(self, outcome: str) -> int:
        return sum(1 for v in self.verified if v[1] == outcome)

    @property
    def integrity_failures(self) -> int:
        return self.count(None, "integrity") + self.verify_count("integrity")

    @property
    def unexpected(self) -> int:
        return self.count(None, "unexpected") + self.verify_count("unexpected") + len(self.worker_failures)

    @property
    def expected(self) -> int:
        return self.count(None, "expected") + self.verify_count("expected")

    @property
    def flat(self) -> bool | None:
        if self.rss_warm is None or self.rss_end is None:
            return None
        return self.rss_end <= (1 + FLAT_TOLERANCE) * self.rss_warm

    def to_json(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "tls": self.tls,
            "duration_s": self.duration,
            "wall_s": self.wall,
            "setup_s": self.setup_s,
            "verify_s": self.verify_s,
            "summary": summary_rows(self),
            "integrity_failures": self.integrity_failures,
            "unexpected_errors": self.unexpected,
            "expected_errors": self.expected,
            "verified": len(self.verified),
            "worker_failures": self.worker_failures,
            "errors": error_samples(self),
            "rss_kib": {
                "start": self.rss_start,
                "warm_up": self.rss_warm,
                "middle": self.rss_mid,
                "end": self.rss_end,
                "max": self.rss_max,
                "after_verify": self.rss_after_verify,
                "vmhwm": self.hwm,
                "flat": self.flat,
                "samples": self.rss,
            },
            "server_cpu_s": self.server_cpu,
        }


def _recv(conn: Connection, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"no {what} message within {timeout:.0f} s")
    return conn.recv()


def run_config(clients: int, tls: bool, duration: float, work: Path, seed: int) -> Result:
    res = Result(clients, tls, duration, warmup=min(WARMUP_S, duration / 3))
    setup_start = time.monotonic()
    with serve(work, tls) as server:
        from mzstore.client import Client

        log(f"[{res.name}] server {server.address} (pid {server.pid}); pushing {POOL_SIZE} pool models")
        rng = random.Random(seed)
        pool = []
        models = Path(tempfile.mkdtemp(prefix="pool-", dir=work))
        with Client(server.address, cache=False, tls_ca=server.tls_ca) as client:
            for i in range(POOL_SIZE):
                model = make_model(models / f"m{i}", rng, f"pool-{i}-{seed}")
                ref = f"load/pool-{i}:v1"
                info = client.push(models / f"m{i}", ref)
                pool.append({"ref": ref, "digest": info.digest, **model})
        shutil.rmtree(models, ignore_errors=True)
        res.pool_bytes = sum(p["bytes"] for p in pool)
        ctx = mp.get_context("spawn")
        procs: list[tuple[Any, Connection, Path]] = []
        try:
            for i in range(clients):
                parent, child = ctx.Pipe()
                scratch = Path(tempfile.mkdtemp(prefix=f"client{i}-", dir=work))
                p = ctx.Process(
                    target=worker_main,
                    args=(i, child, server.address, server.tls_ca, pool, str(scratch), seed * 1000 + i),
                    daemon=True,
                )
                p.start()
                child.close()
                procs.append((p, parent, scratch))
            for i, (_, conn, _) in enumerate(procs):
                try:
                    msg = _recv(conn, 120, "ready")
                except EOFError:
                    raise RuntimeError(f"client {i} exited before it was ready") from None
                if msg[0] != "ready":
                    raise RuntimeError(f"client {i} failed to start:\n{msg[1]}")
            res.setup_s = time.monotonic() - setup_start
            log(f"[{res.name}] {clients} clients ready; running {duration:g} s")
            cpu0 = cpu_pid(server.pid)
            t0 = time.monotonic()
            sampler = RssSampler(server.pid, t0)
            sampler.start()
            for _, conn, _ in procs:
                conn.send(("go", t0, t0 + duration))
            pushed: list[dict[str, Any]] = []
            failed: set[int] = set()
            for i, (_, conn, _) in enumerate(procs):
                try:
                    _, ops, pushed_by = _recv(conn, duration + 300, "done")
                except (EOFError, OSError, TimeoutError) as exc:
                    res.worker_failures.append(f"client {i}: {type(exc).__name__}: {exc}")
                    failed.add(i)
                    continue
                res.ops.extend(ops)
                pushed.extend(pushed_by)
            t_end = time.monotonic()
            res.wall = t_end - t0
            cpu1 = cpu_pid(server.pid)
            res.server_cpu = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None
            load = [s for s in sampler.samples if s[0] <= res.wall]
            res.rss_start = load[0][1] if load else None
            res.rss_warm = sampler.at(res.warmup)
            res.rss_mid = sampler.at(res.wall / 2)
            res.rss_end = load[-1][1] if load else None
            res.rss_max = max((s[1] for s in load), default=None)
            log(f"[{res.name}] {len(res.ops)} ops; verifying {len(pushed)} pushed models")
            v0 = time.monotonic()
            live = [(i, conn) for i, (_, conn, _) in enumerate(procs) if i not in failed]
            for k, (_, conn) in enumerate(live):
                conn.send(("verify", pushed[k :: len(live)]))
            for i, conn in live:
                try:
                    _, results = _recv(conn, 600, "verified")
                    res.verified.extend(results)
                except (EOFError, OSError, TimeoutError) as exc:
                    res.worker_failures.append(f"client {i} (verify): {type(exc).__name__}: {exc}")
            missing = len(pushed) - len(res.verified)
            if missing > 0 and not res.worker_failures:
                res.worker_failures.append(f"{missing} pushed models were not verified")
            res.verify_s = time.monotonic() - v0
            sampler.stop()
            res.rss = sampler.samples
            res.rss_after_verify = proc_status_kib(server.pid, "VmRSS")
            res.hwm = proc_status_kib(server.pid, "VmHWM")
        finally:
            for p, conn, scratch in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
                conn.close()
                shutil.rmtree(scratch, ignore_errors=True)
    return res


# --------------------------------------------------------------------------- report


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def summary_rows(res: Result) -> list[dict[str, Any]]:
    rows = []
    for kind in ("pull", "push", "all"):
        ops = [o for o in res.ops if kind == "all" or o[0] == kind]
        ok = [o for o in ops if o[4] == "ok"]
        lat = sorted(o[2] for o in ok)
        wall = res.wall or res.duration
        rows.append(
            {
                "op": kind,
                "ops": len(ops),
                "ok": len(ok),
                "ops_per_s": len(ok) / wall,
                "mb_per_s": sum(o[3] for o in ok) / MB / wall,
                "p50_ms": _pct(lat, 50) * 1000 if lat else None,
                "p99_ms": _pct(lat, 99) * 1000 if lat else None,
                "max_ms": lat[-1] * 1000 if lat else None,
                "unexpected": sum(1 for o in ops if o[4] == "unexpected"),
                "expected": sum(1 for o in ops if o[4] == "expected"),
                "integrity": sum(1 for o in ops if o[4] == "integrity"),
            }
        )
    return rows


def error_samples(res: Result, limit: int = 5) -> list[str]:
    msgs = [f"{o[0]}: {o[4]}: {o[5]}" for o in res.ops if o[4] != "ok"]
    msgs += [f"verify {v[0]}: {v[1]}: {v[2]}" for v in res.verified if v[1] != "ok"]
    msgs += res.worker_failures
    counts: dict[str, int] = {}
    for m in msgs:
        counts[m] = counts.get(m, 0) + 1
    return [f"{n} x {m}" for m, n in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]]


def yes_no(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[value]


def mib(kib: int | None) -> float | None:
    return kib / 1024 if kib is not None else None


def report_config(res: Result) -> str:
    rows = [
        [
            r["op"],
            str(r["ops"]),
            fmt(r["ops_per_s"], ".1f"),
            fmt(r["mb_per_s"], ".1f"),
            fmt(r["p50_ms"], ".0f"),
            fmt(r["p99_ms"], ".0f"),
            fmt(r["max_ms"], ".0f"),
            f"{r['unexpected']}/{r['expected']}",
            str(r["integrity"]),
        ]
        for r in summary_rows(res)
    ]
    verify_fail = len(res.verified) - res.verify_count("ok")
    rows.append(
        [
            "final verify",
            str(len(res.verified)),
            "-",
            "-",
            "-",
            "-",
            "-",
            f"{res.verify_count('unexpected')}/{res.verify_count('expected')}",
            str(res.verify_count("integrity")),
        ]
    )
    out = [
        table(
            f"{res.name}: {res.wall:.1f} s of load (70 % pull / 30 % push, models 1-4 MB bf16, no client cache); "
            "latency of successful ops; MB = 10^6 raw bytes",
            ["op", "ops", "ops/s", "MB/s", "p50 ms", "p99 ms", "max ms", "errors unexp/exp", "integrity fail"],
            rows,
        )
    ]
    growth = (res.rss_end / res.rss_warm - 1) * 100 if res.rss_end and res.rss_warm else None
    flat = yes_no(res.flat)
    busy = res.server_cpu / res.wall if res.server_cpu is not None and res.wall else None
    out.append(
        f"  server RSS MiB: start {fmt(mib(res.rss_start), '.0f')}, after warm-up ({res.warmup:.0f} s) "
        f"{fmt(mib(res.rss_warm), '.0f')}, middle {fmt(mib(res.rss_mid), '.0f')}, end {fmt(mib(res.rss_end), '.0f')}, "
        f"max {fmt(mib(res.rss_max), '.0f')} (VmHWM {fmt(mib(res.hwm), '.0f')}, after verify "
        f"{fmt(mib(res.rss_after_verify), '.0f')}); end vs warm-up {fmt(growth, '+.1f')} % -> flat "
        f"(<= +{FLAT_TOLERANCE:.0%}): {flat}"
    )
    out.append(
        f"  server CPU {fmt(res.server_cpu, '.1f')} s = {fmt(busy, '.2f')} cores busy; setup {res.setup_s:.1f} s "
        f"(server, {POOL_SIZE} pool models of {res.pool_bytes / MB:.1f} MB in all, client start), final verify "
        f"{res.verify_s:.1f} s for {len(res.verified)} pushed models ({verify_fail} failed)"
    )
    for m in error_samples(res):
        out.append(f"  error: {m}")
    return "\n".join(out)


def report_summary(results: list[Result]) -> str:
    rows = []
    for r in results:
        s = {row["op"]: row for row in summary_rows(r)}
        rows.append(
            [
                r.name,
                fmt(s["all"]["ops_per_s"], ".1f"),
                fmt(s["pull"]["p99_ms"], ".0f"),
                fmt(s["push"]["p99_ms"], ".0f"),
                f"{r.integrity_failures} ({yes_no(r.integrity_failures == 0)})",
                f"{r.unexpected} ({yes_no(r.unexpected == 0)})",
                str(r.expected),
                f"{fmt(mib(r.rss_warm), '.0f')} -> {fmt(mib(r.rss_end), '.0f')} ({yes_no(r.flat)})",
            ]
        )
    return table(
        "Issue targets: 0 integrity failures, 0 unexpected errors, server RSS flat (met in parentheses)",
        [
            "configuration",
            "ops/s",
            "pull p99 ms",
            "push p99 ms",
            "integrity failures",
            "unexpected errors",
            "expected errors",
            "RSS warm-up -> end MiB",
        ],
        rows,
    )


def environment(args: argparse.Namespace) -> dict[str, Any]:
    versions = package_versions(("mzstore", "grpcio", "numpy", "trustme"))
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "clients": args.clients,
        "duration_s": args.duration,
        "tls": args.tls,
        "seed": args.seed,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", default=None, help="comma-separated client counts (default 4,16; 4 with --quick)")
    p.add_argument("--duration", type=float, default=None, help="seconds of load per configuration (default 60)")
    p.add_argument("--tls", choices=("both", "on", "off"), default="both", help="plaintext, TLS or both (default)")
    p.add_argument("--quick", action="store_true", help="smoke run: 10 s, 4 clients (unless given)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the models and of the op mix (default 1234)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write every figure to OUT as JSON")
    p.add_argument("--tmpdir", type=Path, default=None, help="where temp files go (default: system temp dir)")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 10.0 if args.quick else 60.0
    if args.clients is None:
        args.clients = "4" if args.quick else "4,16"
    try:
        args.clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    except ValueError:
        p.error("--clients must be comma-separated integers")
    if not args.clients or min(args.clients) < 1:
        p.error("--clients must be at least 1")
    if args.duration <= 0:
        p.error("--duration must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    env = environment(args)
    print("mzstore load harness")
    print(f"  python {env['python']} on {env['platform']}; cpu_count={env['cpu_count']}")
    print("  " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(
        f"  {args.duration:g} s per configuration; clients {args.clients}; TLS {args.tls}; "
        f"{POOL_SIZE} pool models; push {PUSH_FRACTION:.0%}; seed {args.seed}"
    )
    print(flush=True)
    tls_modes = {"both": [False, True], "on": [True], "off": [False]}[args.tls]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="mzstore-load-", dir=args.tmpdir) as tmp:
        work = Path(tmp)
        for clients in args.clients:
            for tls in tls_modes:
                res = run_config(clients, tls, args.duration, work, args.seed)
                results.append(res)
                print(report_config(res))
                print(flush=True)
    print(report_summary(results))
    wall = time.monotonic() - t_start
    print(f"\nwall time: {wall:.1f} s")
    if args.json:
        doc = {"environment": env, "configs": [r.to_json() for r in results], "wall_seconds": wall}
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
