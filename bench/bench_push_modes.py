"""What a resumable push costs: upload session (default) vs a streamed push (``--no-resume``).

A resumable push keeps the raw upload on the server's disk while it is
ingested as it arrives (a broken one resumes and replays at commit); a
streamed push encodes as bytes arrive with nothing kept. A resumable push's
bytes go in one HTTP PUT when the server has an HTTP plane (the default), or
in the gRPC ``Upload`` stream (``MZSTORE_TRANSPORT=grpc``); both are measured.
All store the same manifest. This prints the median push time of each over
``--runs`` rounds (a fresh server and store per push, client and server on
this machine) and their ratio. The file's sha256, which a resumable push
may send first, is computed and remembered before the first round, as a
second ``mzstore push`` of the same file finds it; the last row is a first
push (``MZSTORE_HOME`` new each round, nothing remembered), which hashes
before it sends only files whose size the store holds (none here; before
``FindFileSizes``, every file: about 0.6 s per GiB more).

    .venv/bin/python bench/bench_push_modes.py [--size-mib 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_lossless import serve
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.push.source import open_source
from mzstore.push.upload import file_hashes
from mzstore.settings import load_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512, help="bf16 checkpoint size (default 512)")
    ap.add_argument("--runs", type=int, default=3, help="rounds; medians are reported (default 3)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mzstore-bench-push-"))
    try:
        src = work / "model.safetensors"
        gen = torch.Generator().manual_seed(0)
        n = max(1, args.size_mib // 64)
        save_file(
            {f"l{i}": (torch.randn(4096, 8192, generator=gen) * 0.02).to(torch.bfloat16) for i in range(n)}, str(src)
        )
        size = src.stat().st_size
        with Client("127.0.0.1:1", cache=False) as c:  # no call goes out: only its settings are read
            file_hashes(open_source(src), c.settings.cache_dir / "file-hashes.json")
        times: dict[str, list[float]] = {
            "streamed (--no-resume)": [],
            "resumable, gRPC stream": [],
            "resumable, HTTP PUT": [],
            "resumable, first push": [],
        }
        digests = set()
        for r in range(args.runs):
            for mode in times:
                root = work / f"root-{r}"
                try:
                    plane = "grpc" if "gRPC" in mode else "auto"
                    settings = load_settings()
                    if "first" in mode:  # nothing remembered
                        settings = dataclasses.replace(settings, home=Path(tempfile.mkdtemp(dir=work)))
                    with (
                        serve(root, "process") as server,
                        Client(server.address, cache=False, data_plane=plane, settings=settings) as c,
                    ):
                        t = time.perf_counter()
                        info = c.push(src, "bench/m:v1", resumable=mode.startswith("resumable"))
                        times[mode].append(time.perf_counter() - t)
                        digests.add(info.digest)
                finally:
                    shutil.rmtree(root, ignore_errors=True)
        print(f"push of a {size / 2**20:.0f} MiB bf16 checkpoint, median of {args.runs} (MB = 10^6 B)")
        med = {m: statistics.median(v) for m, v in times.items()}
        base = med["streamed (--no-resume)"]
        for mode, m in med.items():
            runs = ", ".join(f"{x:.2f}" for x in times[mode])
            print(f"  {mode:<24} {m:6.2f} s  {size / m / 1e6:5.0f} MB/s  x{m / base:.2f} of streamed  ({runs})")
        print(f"  same digest every way: {'yes' if len(digests) == 1 else 'NO'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
