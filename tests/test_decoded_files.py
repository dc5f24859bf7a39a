"""Files kept decoded on the server's disk for the Hugging Face and S3 faces (``MZSTORE_FILES_CACHE``).

The first read of a model file through a face decodes it and queues it; a
builder thread writes it to the server's disk, and later reads go out with
``sendfile``. These tests run a real server on loopback over
all-MiniLM-L6-v2 (90.9 MB of F32), read through both faces with urllib,
boto3 and ``huggingface_hub``, and check that the bytes are the pulled ones
on either path, that the second path is really taken (no chunk decoded),
and that nothing wrong is ever kept: a corrupt chunk, a small file, a
cache of 0 bytes, eviction, a dead server's folder.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from mzstore.client import Client
from mzstore.server import metrics
from mzstore.server.app import RunningServer, build_server
from mzstore.server.files import MATERIALIZE_MIN_BYTES
from mzstore.settings import Settings
from mzstore.storage.node import sweep_temp, temp_prefix
from mzstore.storage.store import blob_key

REPO = "st/minilm"
FILE = "model.safetensors"


def serve(root: Path, files_cache: int) -> RunningServer:
    return build_server(
        root,
        "127.0.0.1:0",
        Settings(chunk_bytes=4 * 1024 * 1024, files_cache_bytes=files_cache),
        http="127.0.0.1:0",
        s3="127.0.0.1:0",
    )


def get(url: str, rng: str | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"Range": rng} if rng else {})
    with urllib.request.urlopen(req, timeout=60) as r:
        return bytes(r.read())


def hub_url(server: RunningServer, tag: str, path: str = FILE) -> str:
    return f"{server.http_url}/{REPO}/resolve/{tag}/{path}"


def s3_url(server: RunningServer, tag: str, path: str = FILE) -> str:
    return f"{server.s3_url}/mzstore/{REPO}/{tag}/{path}"


def sendfile_reads() -> float:
    return float(metrics.FACE_FILE_READS.labels("sendfile")._value.get())


def served_bytes() -> float:
    return sum(float(metrics.BLOB_BYTES.labels(plane)._value.get()) for plane in ("hub", "s3"))


def kept_dirs(root: Path) -> list[Path]:
    return [p for p in (root / "tmp").iterdir() if p.is_dir() and p.name.startswith("decoded-files~")]


@pytest.fixture()
def pushed(tmp_path: Path, minilm_dir: Path) -> Iterator[tuple[Path, dict[str, bytes]]]:
    """A store with MiniLM pushed lossless (``v1``) and int8, and the files a pull of each writes."""
    root = tmp_path / "store"
    server = serve(root, 0)
    want = {}
    try:
        with Client(server.address, cache=False) as c:
            for tag, codec in (("v1", "lossless"), ("int8", "int8")):
                c.push(minilm_dir, f"{REPO}:{tag}", codec=codec)
                c.pull(f"{REPO}:{tag}", tmp_path / tag)
                want[tag] = (tmp_path / tag / FILE).read_bytes()
    finally:
        server.stop(1)
    assert want["v1"] == (minilm_dir / FILE).read_bytes() and len(want["v1"]) >= MATERIALIZE_MIN_BYTES
    yield root, want


def test_a_file_read_once_is_then_sent_from_disk_on_both_faces(pushed: tuple[Path, dict[str, bytes]]) -> None:
    root, want = pushed
    data = want["v1"]
    server = serve(root, 1024**3)
    try:
        files = server.files
        assert files is not None
        assert get(s3_url(server, "v1")) == data  # decoded, and queued
        files.decoded.wait()
        assert files.decoded.built == 1 and len(kept_dirs(root)) == 1
        kept = next(kept_dirs(root)[0].iterdir())
        assert kept.name == hashlib.sha256(data).hexdigest() and kept.read_bytes() == data
        decoded, before, served = files.reader.decoded, sendfile_reads(), served_bytes()
        n, received = len(data), 0
        for url in (s3_url(server, "v1"), hub_url(server, "v1")):
            assert get(url) == data
            received += n
            for rng, part in (
                ("bytes=0-7", data[:8]),
                ("bytes=8-5000007", data[8:5000008]),
                (f"bytes={n - 100}-", data[-100:]),
                ("bytes=-5", data[-5:]),
                ("bytes=1000000-99999999999", data[1000000:]),
            ):
                assert get(url, rng) == part, (url, rng)
                received += len(part)
        assert files.reader.decoded == decoded  # no chunk was decoded for these reads
        assert served_bytes() - served == received  # the served-bytes metric counts what was sent
        assert sendfile_reads() - before == 12 and files.decoded.hits == 12
        # HEAD and a 416 still answer from the headers alone
        with pytest.raises(urllib.error.HTTPError) as err:
            get(hub_url(server, "v1"), f"bytes={n}-")
        assert err.value.code == 416
        # boto3 sees the same object and ETag as before
        s3 = boto3.client(
            "s3",
            endpoint_url=server.s3_url,
            aws_access_key_id="x",
            aws_secret_access_key="y",
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}),
        )
        got = s3.get_object(Bucket="mzstore", Key=f"{REPO}/v1/{FILE}", Range="bytes=100-200")
        assert got["Body"].read() == data[100:201] and got["ETag"] == f'"{kept.name}"'
    finally:
        server.stop(1)
    assert not kept_dirs(root)  # a stopped server leaves no decoded files


def test_huggingface_hub_downloads_a_kept_file(pushed: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, want = pushed
    server = serve(root, 1024**3)
    try:
        assert server.files is not None
        assert get(hub_url(server, "int8")) == want["int8"]  # lossy: the kept file is the dequantized one
        server.files.decoded.wait()
        before = sendfile_reads()
        code = (
            "import sys; from huggingface_hub import hf_hub_download; "
            f"print(hf_hub_download({REPO!r}, {FILE!r}, revision='int8'))"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_"))}
        env |= {"HF_ENDPOINT": server.http_url or "", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert Path(done.stdout.strip().splitlines()[-1]).read_bytes() == want["int8"]
        assert sendfile_reads() > before
    finally:
        server.stop(1)


def test_small_files_and_a_zero_cache_decode_every_read(pushed: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    root, want = pushed
    server = serve(root, 1024**3)
    try:
        assert server.files is not None
        config = (tmp_path / "v1" / "config.json").read_bytes()
        for _ in range(2):
            assert get(hub_url(server, "v1", "config.json")) == config
        server.files.decoded.wait()
        assert server.files.decoded.built == 0 and server.files.decoded.hits == 0  # under MATERIALIZE_MIN_BYTES
    finally:
        server.stop(1)
    server = serve(root, 0)
    try:
        assert server.files is not None
        for _ in range(2):
            assert get(s3_url(server, "v1")) == want["v1"]
        server.files.decoded.wait()
        assert server.files.decoded.built == 0 and server.files.decoded.hits == 0 and not kept_dirs(root)
    finally:
        server.stop(1)


def test_the_least_recently_read_file_is_evicted_and_open_reads_finish(pushed: tuple[Path, dict[str, bytes]]) -> None:
    root, want = pushed
    size = len(want["v1"])
    server = serve(root, size + size // 2)  # room for one of the two files
    try:
        files = server.files
        assert files is not None
        assert get(s3_url(server, "v1")) == want["v1"]
        files.decoded.wait()
        sha_v1 = hashlib.sha256(want["v1"]).hexdigest()
        held = files.decoded.open(sha_v1)  # a send that opened the file before it is evicted
        assert held is not None
        assert get(s3_url(server, "int8")) == want["int8"]
        files.decoded.wait()
        assert files.decoded.built == 2
        names = sorted(p.name for p in kept_dirs(root)[0].iterdir())
        assert names == [hashlib.sha256(want["int8"]).hexdigest()]  # v1 went: least recently read
        with held:
            assert held.read() == want["v1"]  # unlinked, not truncated
        assert files.decoded.open(sha_v1) is None
        assert get(s3_url(server, "v1"), "bytes=0-99") == want["v1"][:100]  # decoded again
    finally:
        server.stop(1)


def test_a_corrupt_chunk_is_never_kept_nor_served(pushed: tuple[Path, dict[str, bytes]]) -> None:
    root, _ = pushed
    server = serve(root, 1024**3)
    try:
        assert server.files is not None
        with Client(server.address, cache=False) as c:
            chunk = c.manifest(f"{REPO}:v1")[2].tensors[0].chunks[0]
        path = root / blob_key(chunk.blob)
        raw = bytearray(path.read_bytes())
        raw[chunk.offset + chunk.length // 2] ^= 0xFF
        path.chmod(0o644)
        path.write_bytes(bytes(raw))
        for _ in range(2):
            with pytest.raises((http.client.IncompleteRead, ConnectionError)):  # cut short: never wrong bytes
                get(s3_url(server, "v1"))
            server.files.decoded.wait()
        assert server.files.decoded.built == 0
        assert not any(list(p.iterdir()) for p in kept_dirs(root))  # no partial file either
    finally:
        server.stop(1)


def test_a_restarted_server_sweeps_a_dead_servers_folder(tmp_path: Path) -> None:
    spool = tmp_path / "tmp"
    spool.mkdir()
    dead = spool / f"decoded-files~{socket.gethostname()}~4294967295~abc"  # no process has this pid
    live = spool / (temp_prefix("decoded-files") + "def")  # this process
    for folder in (dead, live):
        folder.mkdir()
        (folder / "f").write_bytes(b"x")
    removed = sweep_temp(spool, max_age=0.0)  # age alone never removes a folder: a live server's may be old
    assert removed == [dead] and not dead.exists() and (live / "f").exists()


def test_hub_exports_live_in_the_spool_named_for_their_writer(pushed: tuple[Path, dict[str, bytes]]) -> None:
    """The Hub face's keep-quantized exports go where the kept files go, named like them: a killed
    server's exports are swept by the next one (no folder left in /tmp forever)."""
    from mzstore.format.manifest import parse_manifest
    from mzstore.server.files import ServedFiles
    from mzstore.server.hub import Exports
    from mzstore.storage import Store, open_node

    root, _ = pushed
    store = Store([open_node(f"file://{root}")])
    spool = root / "tmp-faces"
    exports = Exports(store, parent=ServedFiles(store, decoded_dir=spool).temp_dir)
    _, digest = store.resolve(f"{REPO}:int8")
    files = exports.files(digest, parse_manifest(store.get_manifest(digest)))
    assert files and all(spool in f.path.parents for f in files.values())
    (folder,) = spool.iterdir()
    assert folder.name.startswith(temp_prefix("hub-exports"))
    assert sweep_temp(spool, max_age=0.0) == []  # this process is alive: kept
    exports.close()
    assert not folder.exists()


def test_kept_files_go_out_over_tls_too(pushed: tuple[Path, dict[str, bytes]], tmp_path: Path) -> None:
    """``sendfile`` cannot encrypt: over TLS asyncio falls back to reading the kept file and writing it
    through the TLS transport, and the bytes are the same."""
    import ssl

    import trustme

    from mzstore.server.app import TlsConfig

    root, want = pushed
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    (tmp_path / "server.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    tls = TlsConfig(tmp_path / "server.pem", tmp_path / "server.key")
    server = build_server(
        root, "127.0.0.1:0", Settings(files_cache_bytes=1024**3), tls=tls, http="127.0.0.1:0", s3="127.0.0.1:0"
    )
    context = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    try:
        assert server.files is not None and (server.s3_url or "").startswith("https://")

        def tls_get(rng: str | None = None) -> bytes:
            req = urllib.request.Request(s3_url(server, "v1"), headers={"Range": rng} if rng else {})
            with urllib.request.urlopen(req, timeout=60, context=context) as r:
                return bytes(r.read())

        assert tls_get() == want["v1"]
        server.files.decoded.wait()
        assert server.files.decoded.built == 1
        assert tls_get() == want["v1"] and tls_get("bytes=123-456789") == want["v1"][123:456790]
        assert server.files.decoded.hits == 2
    finally:
        server.stop(1)
