#!/usr/bin/env python3
"""S3 face benchmark (issue 18): the Run:ai Model Streamer reading a checkpoint from mzstore's S3 face.

Four sources of the same synthetic bf16 checkpoint (1 GiB by default), on
loopback, in the same run, interleaved ``--runs`` times:

* ``mzstore S3 face``: ``mzstore serve --s3`` (its own process), the
  checkpoint pushed lossless. Its first read decodes the file as it
  serves the ranged GETs and keeps it decoded on the server's disk
  (``MZSTORE_FILES_CACHE``); that read is timed once on a fresh server
  (``first read``), and the timed runs that follow are sent with
  ``sendfile``;
* ``mzstore S3 face, decoding every read``: a second server with
  ``MZSTORE_FILES_CACHE=0``, which decodes and verifies every chunk of
  every read (how the face served before it kept files);
* ``moto (raw file)``: moto's S3 server (``ThreadedMotoServer`` in a process
  of its own) holding the raw file, the S3 server the tests use;
* ``local file``: the streamer reading the file from disk (the work
  directory; use ``--work /dev/shm`` to keep the VM's disk out of it).

A source that fails or takes over ``--timeout`` seconds is reported, not
retried. moto is not made for large objects: it builds the whole object
for every ranged GET and slices it (``moto/s3/responses.py``,
``_handle_range_header``), so under the streamer's concurrent ranges a
1 GiB object does not finish; run ``--size-gb 0.13`` for a size it serves.

Each run is a fresh interpreter that times ``SafetensorsStreamer().stream_file``
plus reading every tensor (imports left out), the call vLLM's
``--load-format runai_streamer`` makes; the server's CPU seconds are read
from ``/proc`` around it. The first run from each S3 source checks every
tensor against the file. Prints medians, each beside the local file's time.

Usage::

    .venv/bin/python bench/bench_s3.py [--runs 3] [--size-gb 1.0737] [--work /dev/shm]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_model, cpu_pid, fmt, log, read_address, stop, table, wait_kept
from bench_lossless import make_synthetic

GB = 1e9
CHILD = """
import json, sys, time, torch
from runai_model_streamer import SafetensorsStreamer
source, check = sys.argv[1], sys.argv[2]
start = time.perf_counter()
n = 0
tensors = {}
with SafetensorsStreamer() as streamer:
    streamer.stream_file(source)
    for name, tensor in streamer.get_tensors():
        n += tensor.numel() * tensor.element_size()
        if check != "-":
            tensors[name] = tensor.clone()
seconds = time.perf_counter() - start
same = None
if check != "-":
    from safetensors.torch import load_file
    want = load_file(check)
    same = len(want) == len(tensors) and all(torch.equal(tensors[k], want[k]) for k in want)
print(json.dumps({"seconds": seconds, "bytes": n, "same": same}))
"""


MOTO = """
import logging, resource, sys, time
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False).start()
while True:
    time.sleep(3600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_child(source: str, endpoint: str | None, check: str, timeout: float) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
    }
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, source, check], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"streaming {source} took over {timeout:.0f} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"streaming {source} failed:\n{done.stderr[-2000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if check != "-" and not out["same"]:
        raise RuntimeError(f"{source}: the streamed tensors differ from the file")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="timed runs per source (medians are printed)")
    ap.add_argument("--size-gb", type=float, default=2**30 / GB, help="checkpoint size (default 1 GiB)")
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds one stream may take before its source fails")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=args.work))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        model = work / "model"
        model.mkdir()
        src = model / "model.safetensors"
        log(f"making a {args.size_gb:.2f} GB bf16 checkpoint")
        shape = make_synthetic(src, int(args.size_gb * GB))
        size = src.stat().st_size
        mz = Path(sys.executable).with_name("mzstore")
        cmd = [str(mz)] if mz.exists() else [sys.executable, "-m", "mzstore.cli"]

        def mzstore_server(name: str, files_cache: str | None) -> tuple[subprocess.Popen[bytes], int, int]:
            """A server with its S3 face (and its HTTP plane, for /metrics), the checkpoint pushed lossless."""
            s3_port, http_port = free_port(), free_port()
            proc = subprocess.Popen(
                [*cmd, "serve", "--root", str(work / name), "--listen", "127.0.0.1:0",
                 "--http", f"127.0.0.1:{http_port}", "--s3", f"127.0.0.1:{s3_port}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if k != "MZSTORE_FILES_CACHE"}
                | ({"MZSTORE_FILES_CACHE": files_cache} if files_cache is not None else {}),
            )  # fmt: skip
            procs.append(proc)
            address = read_address(proc, timeout=60)
            log(f"pushing to mzstore ({name}, lossless)")
            subprocess.run([*cmd, "push", str(model), "bench/s3:v1", "--server", address, "-q"], check=True)
            return proc, s3_port, http_port

        server, s3_port, http_port = mzstore_server("store", None)  # the default cache size
        plain, plain_s3_port, _ = mzstore_server("store-nokeep", "0")
        key = "s3://mzstore/bench/s3/v1/model.safetensors"
        # The first read of the keeping server, timed once: it decodes, and the file is written beside it.
        log("first read from the mzstore S3 face (the file is kept decoded meanwhile)")
        before = cpu_pid(server.pid)
        first = run_child(key, f"http://127.0.0.1:{s3_port}", "-", args.timeout)
        kept_after = wait_kept(f"http://127.0.0.1:{http_port}", size, args.timeout)
        first_cpu = ((cpu_pid(server.pid) or 0.0) - (before or 0.0)) / (size / GB)  # the read and the write
        log(f"kept decoded {kept_after:.1f} s after the first read ended")
        moto_port = free_port()
        moto = subprocess.Popen(  # threaded, as the tests run it (moto's CLI server serves one request at a time)
            [sys.executable, "-c", MOTO, str(moto_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        procs.append(moto)
        import boto3

        moto_url = f"http://127.0.0.1:{moto_port}"
        client = boto3.client(
            "s3", endpoint_url=moto_url, aws_access_key_id="bench", aws_secret_access_key="b", region_name="us-east-1"
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket="raw")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        log("uploading the raw file to moto")
        client.upload_file(str(src), "raw", "model.safetensors")
        sources = {
            "mzstore S3 face": (key, f"http://127.0.0.1:{s3_port}", server.pid),
            "mzstore S3 face, decoding every read": (key, f"http://127.0.0.1:{plain_s3_port}", plain.pid),
            "moto (raw file)": ("s3://raw/model.safetensors", moto_url, moto.pid),
            "local file": (str(src), None, None),
        }
        failed: dict[str, str] = {}
        for name, (source, endpoint, _) in sources.items():
            if endpoint:
                log(f"warm-up and check: {name}")
                try:
                    run_child(source, endpoint, str(src), args.timeout)
                except RuntimeError as exc:
                    failed[name] = str(exc).splitlines()[-1][:150]
                    log(f"{name} failed: {failed[name]}")
        times: dict[str, list[float]] = {n: [] for n in sources}
        cpu: dict[str, list[float]] = {n: [] for n in sources}
        for i in range(args.runs):
            for name, (source, endpoint, pid) in sources.items():
                if name in failed:
                    continue
                log(f"run {i + 1}/{args.runs}: {name}")
                before = cpu_pid(pid) if pid else None
                out = run_child(source, endpoint, "-", args.timeout)
                times[name].append(out["seconds"])
                if pid and before is not None:
                    cpu[name].append(((cpu_pid(pid) or 0.0) - before) / (size / GB))
        local = statistics.median(times["local file"])
        rows = [
            [
                "mzstore S3 face, first read",
                "1",
                fmt(first["seconds"], ".2f"),
                fmt(size / first["seconds"] / 1e6, ".0f"),
                fmt(local / first["seconds"], ".2f"),
                fmt(first_cpu, ".2f"),
            ]
        ]
        for name in sources:
            if name in failed:
                rows.append([name, "0", "failed", "", "", failed[name]])
                continue
            t = statistics.median(times[name])
            rows.append(
                [
                    name,
                    str(len(times[name])),
                    fmt(t, ".2f"),
                    fmt(size / t / 1e6, ".0f"),
                    fmt(local / t, ".2f"),
                    fmt(statistics.median(cpu[name]), ".2f") if cpu[name] else "-",
                ]
            )
        print()
        print(f"# bench_s3: Run:ai stream_file of a {size / GB:.3f} GB bf16 checkpoint ({shape['layers']} layers)")
        print(f"# {cpu_model()}, {os.cpu_count()} CPUs; everything on loopback; medians of {args.runs} runs")
        headers = ["source", "runs", "seconds", "MB/s", "x local file", "server CPU s/GB"]
        print(table("Run:ai Model Streamer (x local file = local seconds / these seconds)", headers, rows))
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
