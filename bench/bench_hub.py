#!/usr/bin/env python3
"""Hugging Face face benchmark (issue 17): ``snapshot_download`` from mzstore vs the same files from nginx.

The servers run in their own network namespace behind a veth pair (as in
``bench_link.py``), at each ``--rates`` rate (``tc tbf``; ``none``: the veth
unlimited, the loopback case). Beside ``mzstore serve`` (the checkpoint
pushed lossless; after its first read of a file the face keeps it decoded
on its disk and sends it with ``sendfile``, and a second server with
``MZSTORE_FILES_CACHE=0`` decodes every read), nginx serves the same files
as a static Hub mirror: the
``/api/models/…/revision/main`` and ``/tree/…`` answers written as JSON
files, the files themselves under ``/{repo}/resolve/{commit}/``, and
``X-Repo-Commit`` added to every response, which is all ``huggingface_hub``
needs. Each timed run is a fresh interpreter calling
``snapshot_download(repo, cache_dir=…)`` into an empty cache with
``HF_ENDPOINT`` set to one server, runs interleaved; the figure is the call
(interpreter start and imports left out), with the server's CPU seconds per
GB served around it. mzstore decodes the files from its stored chunks as
it serves them (a lossless model's file bytes are the raw ones, so the
bytes on the wire are the same as nginx's).

Needs root (``ip netns``, ``tc``) and nginx.

Usage::

    sudo .venv/bin/python bench/bench_hub.py [--rates none,1gbit] [--runs 3] [--size-gb 1.0737] [--work /dev/shm]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from subprocess import Popen

from _common import cpu_model, cpu_pid, fmt, log, read_address, sha256_file, stop, table, wait_kept
from bench_link import (
    GRPC_PORT,
    HTTP_PORT,
    NGINX_CONF,
    NGINX_PORT,
    NS,
    SRV_IP,
    limit,
    link,
    mzstore_cmd,
    rate_bytes,
    sh,
)
from bench_lossless import make_synthetic

GB = 1e9
REPO = "bench/hub"
NGINX_COMMIT = "0" * 40

#: What nginx adds to bench_link's server block: the commit header on every answer, JSON for the API files.
NGINX_EXTRA = "add_header X-Repo-Commit {commit} always; location /api/ {{ default_type application/json; }}"

CHILD = """
import json, sys, time
from huggingface_hub import snapshot_download
start = time.perf_counter()
path = snapshot_download(sys.argv[1], cache_dir=sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - start, "path": path}))
"""


def _mirror(root: Path, model: Path) -> None:
    """A static Hub mirror of ``model`` for nginx: the API answers as files, the files under resolve/."""
    api = root / "api" / "models" / REPO
    (api / "revision").mkdir(parents=True)
    (api / "tree").mkdir()
    entries = []
    files = root / REPO / "resolve" / NGINX_COMMIT
    files.mkdir(parents=True)
    for f in sorted(model.iterdir()):
        os.link(f, files / f.name)
        sha = sha256_file(f)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {f.stat().st_size}\n".encode()
        oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer).hexdigest()
        lfs = {"oid": sha, "size": f.stat().st_size, "pointerSize": len(pointer)}
        entries.append({"type": "file", "path": f.name, "size": f.stat().st_size, "oid": oid, "lfs": lfs})
    info = {"id": REPO, "sha": NGINX_COMMIT, "siblings": [{"rfilename": e["path"]} for e in entries]}
    (api / "revision" / "main").write_text(json.dumps(info))
    (api / "tree" / NGINX_COMMIT).write_text(json.dumps(entries))


def _download(endpoint: str, cache: Path) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1", "HF_HOME": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, REPO, str(cache / "hub")], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"snapshot_download from {endpoint} failed:\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="none,1gbit", help="comma-separated tc rates; none = no limit")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per rate and server (medians are printed)")
    ap.add_argument("--size-gb", type=float, default=2**30 / GB, help="checkpoint size (default 1 GiB)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench_hub needs root (ip netns, tc)")
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        raise SystemExit("bench_hub needs nginx (apt-get install nginx)")
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    for r in rates:
        if r != "none":
            rate_bytes(r)
    work = Path(tempfile.mkdtemp(prefix="bench-hub-", dir=args.work))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args, rates, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, rates: list[str], work: Path) -> int:
    model = work / "model"
    model.mkdir()
    log(f"making a {args.size_gb:.2f} GB bf16 checkpoint")
    shape = make_synthetic(model / "model.safetensors", int(args.size_gb * GB))
    (model / "config.json").write_text(json.dumps({"num_attention_heads": 32, "num_key_value_heads": 4}))
    size = sum(f.stat().st_size for f in model.iterdir())
    want = {f.name: sha256_file(f) for f in model.iterdir()}
    mirror = work / "mirror"
    _mirror(mirror, model)
    prefix = work / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    extra = NGINX_EXTRA.format(commit=NGINX_COMMIT)
    conf.write_text(NGINX_CONF.format(prefix=prefix, ip=SRV_IP, port=NGINX_PORT, root=mirror, extra=extra))
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    with link():
        procs: list[subprocess.Popen[bytes]] = []
        try:
            procs.append(subprocess.Popen(["ip", "netns", "exec", NS, nginx_bin, "-c", str(conf), "-p", str(prefix)]))

            def mzstore_server(name: str, grpc_port: int, http_port: int, files_cache: str | None) -> Popen:
                """``mzstore serve`` in the namespace (``files_cache``: its MZSTORE_FILES_CACHE), the model pushed."""
                where = ["--root", str(work / name), "--listen", f"{SRV_IP}:{grpc_port}"]
                where += ["--http", f"{SRV_IP}:{http_port}"]
                env = {k: v for k, v in os.environ.items() if k != "MZSTORE_FILES_CACHE"}
                proc = subprocess.Popen(
                    ["ip", "netns", "exec", NS, "env", *([f"MZSTORE_FILES_CACHE={files_cache}"] if files_cache else []),
                     *mzstore_cmd(), "serve", *where],
                    stdout=subprocess.PIPE,
                    stderr=open(work / f"{name}.log", "wb"),
                    env=env,
                )  # fmt: skip
                procs.append(proc)
                address = read_address(proc, timeout=60)
                log(f"pushing to {name} (lossless)")
                sh(*mzstore_cmd(), "push", str(model), f"{REPO}:latest", "--server", address, "-q")
                return proc

            # The Hub face keeps a file decoded on its disk after its first read (the default); the
            # second server decodes every read, as the face did before it kept files.
            server = mzstore_server("store", GRPC_PORT, HTTP_PORT, None)
            plain = mzstore_server("store-nokeep", GRPC_PORT + 10, HTTP_PORT + 10, "0")
            nginx_pid = procs[0].pid

            def nginx_cpu() -> float:
                kids = sh("pgrep", "-P", str(nginx_pid), check=False).stdout.split()
                return sum(cpu_pid(int(p)) or 0.0 for p in [nginx_pid, *kids])

            sources = {
                "nginx (static files)": (f"http://{SRV_IP}:{NGINX_PORT}", nginx_cpu),
                "mzstore (Hub face)": (f"http://{SRV_IP}:{HTTP_PORT}", lambda: cpu_pid(server.pid) or 0.0),
                "mzstore, decoding every read": (
                    f"http://{SRV_IP}:{HTTP_PORT + 10}",
                    lambda: cpu_pid(plain.pid) or 0.0,
                ),
            }
            for name, (endpoint, _) in sources.items():  # warm-up, and the bytes are checked once
                cache = work / "cache"
                _download(endpoint, cache)
                got = {p.name: sha256_file(p) for p in (cache / "hub").rglob("snapshots/*/*")}
                if got != want:
                    raise RuntimeError(f"{name}: the downloaded files differ from the source")
                shutil.rmtree(cache)
            weights = (model / "model.safetensors").stat().st_size
            log(f"first read kept decoded {wait_kept(f'http://{SRV_IP}:{HTTP_PORT}', weights, 600):.1f} s after it")
            for rate in rates:
                limit(None if rate == "none" else rate)
                for i in range(args.runs):
                    for name, (endpoint, server_cpu) in sources.items():
                        log(f"{rate}: {name} run {i + 1}/{args.runs}")
                        cache = work / "cache"
                        before = server_cpu()
                        times.setdefault((rate, name), []).append(_download(endpoint, cache))
                        cpu.setdefault((rate, name), []).append((server_cpu() - before) / (size / GB))
                        shutil.rmtree(cache)
            limit(None)
        finally:
            for proc in reversed(procs):
                stop(proc)

    print()
    print(f"# bench_hub: snapshot_download of a {size / GB:.3f} GB bf16 checkpoint ({shape['layers']} layers)")
    print(f"# {cpu_model()}, {os.cpu_count()} CPUs; servers in netns {NS} behind veth (+ tc tbf); medians")
    rows = []
    for rate in rates:
        base = statistics.median(times[(rate, "nginx (static files)")])
        for name in ("nginx (static files)", "mzstore (Hub face)", "mzstore, decoding every read"):
            t = statistics.median(times[(rate, name)])
            rows.append(
                [
                    rate,
                    name,
                    str(len(times[(rate, name)])),
                    fmt(t, ".2f"),
                    fmt(size / t / 1e6, ".0f"),
                    fmt(base / t, ".2f"),
                    fmt(statistics.median(cpu[(rate, name)]), ".3f"),
                ]
            )
    headers = ["link", "source", "runs", "seconds", "MB/s", "x nginx", "server CPU s/GB"]
    print(
        table(
            "snapshot_download (x nginx = nginx seconds / these seconds; >= 1.0 is the target at 1gbit)", headers, rows
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
