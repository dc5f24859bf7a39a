"""The local chunk cache: repeat, delta and resumed pulls move only what is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CountingStore
from safetensors.torch import load_file, save_file

from mzstore.client import Client
from mzstore.errors import Unavailable
from mzstore.pull.cache import ChunkCache, chunk_key
from mzstore.server.app import build_server
from mzstore.settings import Settings, load_settings

PULL = (sys.executable, "-m", "mzstore.cli", "pull")
SMALL = Settings(chunk_bytes=64 * 1024, shard_bytes=512 * 1024)


@pytest.fixture
def counted(tmp_path: Path) -> Any:
    store = CountingStore(tmp_path / "store")
    running = build_server(store, "127.0.0.1:0", SMALL)
    yield running, store
    running.stop(grace=1)


def _model(path: Path, seed: int, n: int = 8, changed: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """``n`` bf16 tensors of 256 KiB; tensors listed in ``changed`` get different values."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"layers.{i}.weight": torch.randn(512, 256, generator=gen).to(torch.bfloat16) for i in range(n)}
    for i in changed:
        tensors[f"layers.{i}.weight"] = tensors[f"layers.{i}.weight"] + 0.5
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"n": n}))
    return tensors


def _same_files(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_repeat_pull_transfers_nothing(counted: Any, tmp_path: Path) -> None:
    running, store = counted
    _model(tmp_path / "src", 0)
    with Client(running.address) as c:
        c.push(tmp_path / "src", "m:1")
        first = c.pull("m:1", tmp_path / "a")
        read_after_first = store.bytes_read
        second = c.pull("m:1", tmp_path / "b")
    with Client(running.address) as c:
        stored = sum(ch.length for ch in c.manifest("m:1")[2].chunks())
    assert first.bytes_transferred == stored > 0
    assert first.bytes_cached == 0
    assert second.bytes_transferred == 0
    assert second.bytes_cached == first.bytes_transferred
    assert store.bytes_read == read_after_first, "the repeat pull read blob bytes on the server"
    _same_files(tmp_path / "src", tmp_path / "b")


def test_load_state_dict_uses_the_cache(counted: Any, tmp_path: Path) -> None:
    running, store = counted
    tensors = _model(tmp_path / "src", 1)
    with Client(running.address) as c:
        c.push(tmp_path / "src", "m:1")
        c.load_state_dict("m:1")
        before = store.bytes_read
        sd = c.load_state_dict("m:1")
    assert store.bytes_read == before
    assert all(torch.equal(sd[k], v) for k, v in tensors.items())


def test_delta_pull_moves_only_changed_chunks(counted: Any, tmp_path: Path) -> None:
    running, _ = counted
    _model(tmp_path / "v1", 2, n=12)
    _model(tmp_path / "v2", 2, n=12, changed=(3, 7))
    with Client(running.address) as c:
        c.push(tmp_path / "v1", "m:1")
        c.push(tmp_path / "v2", "m:2")
        v1 = c.manifest("m:1")[2]
        v2 = c.manifest("m:2")[2]
        c.pull("m:1", tmp_path / "out1")
        info = c.pull("m:2", tmp_path / "out2")
    changed = {t.name for t in v2.tensors} - {"layers.3.weight", "layers.7.weight"}
    old_keys = {chunk_key(ch) for ch in v1.chunks()}
    new_chunks = [ch for ch in v2.chunks() if chunk_key(ch) not in old_keys]
    changed_bytes = sum(ch.length for t in v2.tensors if t.name not in changed for ch in t.chunks)
    assert new_chunks, "v2 shares every chunk with v1: the test model did not change"
    assert info.bytes_transferred == sum(ch.length for ch in new_chunks)
    # Only the two changed tensors (and nothing of the ten unchanged ones) came over the wire.
    assert info.bytes_transferred == changed_bytes
    assert info.bytes_transferred < 0.25 * sum(ch.length for ch in v2.chunks())
    _same_files(tmp_path / "v2", tmp_path / "out2")


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mzstore.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_kill_9_mid_pull_then_resume_transfers_the_remainder(counted: Any, tmp_path: Path) -> None:
    running, store = counted
    _model(tmp_path / "src", 3, n=16)
    home = tmp_path / "home"
    env = {**os.environ, "MZSTORE_HOME": str(home), "MZSTORE_PULL_WORKERS": "1"}
    with Client(running.address) as c:
        c.push(tmp_path / "src", "m:1")
        manifest = c.manifest("m:1")[2]
    cache = ChunkCache(home / "cache")
    chunks = manifest.chunks()
    store.delay = 0.02  # ~70 chunks at 20 ms each: time to kill the pull halfway
    proc = subprocess.Popen(
        [sys.executable, "-m", "mzstore.cli", "pull", "m:1", "-o", str(tmp_path / "out"), "--server", running.address],
        env=env,
    )
    deadline = time.monotonic() + 60
    while sum(cache.path(ch).exists() for ch in chunks) < len(chunks) // 2:
        assert proc.poll() is None, "the pull ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out" / "model.safetensors").exists(), "a killed pull left a file under its final name"
    missing = sum(ch.length for ch in chunks if not cache.path(ch).exists())
    total = sum(ch.length for ch in chunks)
    assert 0 < missing < total
    store.delay = 0.0
    rerun = _cli("pull", "m:1", "-o", str(tmp_path / "out"), "--server", running.address, "--json", env=env)
    assert rerun.returncode == 0, rerun.stderr
    info = json.loads(rerun.stdout)
    assert info["bytes_transferred"] == missing
    assert info["bytes_cached"] == total - missing
    _same_files(tmp_path / "src", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".mzstore-partial")] == []


def test_dropped_connection_then_resume(counted: Any, tmp_path: Path) -> None:
    running, store = counted
    _model(tmp_path / "src", 4, n=8)
    # every chunk its own range read, so the connection drops between chunks
    one_by_one = replace(load_settings(), pull_coalesce_bytes=0)
    with Client(running.address, settings=one_by_one) as c:
        c.push(tmp_path / "src", "m:1")
        manifest = c.manifest("m:1")[2]
        store.fail_after = store.reads + 10
        with pytest.raises(Unavailable):
            c.pull("m:1", tmp_path / "out", workers=1)
        assert not (tmp_path / "out" / "model.safetensors").exists()
        missing = sum(ch.length for ch in manifest.chunks() if not c.cache.path(ch).exists())  # type: ignore[union-attr]
        store.fail_after = None
        info = c.pull("m:1", tmp_path / "out")
    assert 0 < info.bytes_transferred == missing < sum(ch.length for ch in manifest.chunks())
    _same_files(tmp_path / "src", tmp_path / "out")


def test_corrupt_cache_entry_is_refetched_and_verify_removes_it(counted: Any, tmp_path: Path) -> None:
    running, _ = counted
    _model(tmp_path / "src", 5)
    with Client(running.address) as c:
        c.push(tmp_path / "src", "m:1")
        c.pull("m:1", tmp_path / "a")
        manifest = c.manifest("m:1")[2]
        assert c.cache is not None
        victim = c.cache.path(manifest.tensors[2].chunks[0])
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        info = c.pull("m:1", tmp_path / "b")
        assert info.bytes_transferred == manifest.tensors[2].chunks[0].length  # only the bad entry came again
        _same_files(tmp_path / "src", tmp_path / "b")
        victim.write_bytes(bytes(data))  # corrupt it again; verify must find it
    env = {**os.environ}
    bad = _cli("cache", "verify", "--json", env=env)
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["removed"] == [victim.name]
    assert not victim.exists()
    good = _cli("cache", "verify", env=env)
    assert good.returncode == 0, good.stdout + good.stderr


def test_concurrent_processes_share_one_cache(counted: Any, tmp_path: Path) -> None:
    running, _ = counted
    _model(tmp_path / "src", 6, n=12)
    with Client(running.address) as c:
        c.push(tmp_path / "src", "m:1")
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [*PULL, "m:1", "-o", str(tmp_path / f"out{i}"), "--server", running.address, "--json"],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        assert json.loads(out)["bytes_raw"] > 0
    for i in range(3):
        _same_files(tmp_path / "src", tmp_path / f"out{i}")
    assert _cli("cache", "verify", env=env).returncode == 0
    assert list((Path(os.environ["MZSTORE_HOME"]) / "cache" / "tmp").iterdir()) == []


def test_digest_pull_from_cache_needs_no_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _model(tmp_path / "src", 7)
    running = build_server(tmp_path / "store", "127.0.0.1:0", SMALL)
    with Client(running.address) as c:
        pushed = c.push(tmp_path / "src", "m:1")
        c.pull("m:1", tmp_path / "a")
    running.stop(grace=1)
    with Client(running.address, timeout=2) as c:
        info = c.pull(f"m@{pushed.digest}", tmp_path / "b")
        assert info.bytes_transferred == 0
        # A tag needs the server, unless the cache remembers it (issue 13): then it is used, with a warning.
        with caplog.at_level("WARNING", logger="mzstore.client"):
            tagged = c.pull("m:1", tmp_path / "c")
        assert tagged.digest == pushed.digest and tagged.bytes_transferred == 0
        assert "which may be stale" in caplog.text and "m:1" in caplog.text
        with pytest.raises(Unavailable):
            c.pull("m:2", tmp_path / "d")  # a tag the cache never saw must be resolved by the server
    _same_files(tmp_path / "src", tmp_path / "b")
    _same_files(tmp_path / "src", tmp_path / "c")


def test_no_cache_writes_nothing(counted: Any, tmp_path: Path) -> None:
    running, _ = counted
    _model(tmp_path / "src", 8)
    home = Path(os.environ["MZSTORE_HOME"])
    with Client(running.address) as c:
        c.push(tmp_path / "src", "m:1")
    r = _cli(
        "pull",
        "m:1",
        "-o",
        str(tmp_path / "a"),
        "--server",
        running.address,
        "--no-cache",
        "--json",
        env=dict(os.environ),
    )
    assert r.returncode == 0, r.stderr
    off = {**os.environ, "MZSTORE_CACHE": "0"}
    r2 = _cli("pull", "m:1", "-o", str(tmp_path / "b"), "--server", running.address, "--json", env=off)
    assert r2.returncode == 0, r2.stderr
    assert json.loads(r2.stdout)["bytes_transferred"] == json.loads(r.stdout)["bytes_transferred"] > 0
    assert not (home / "cache" / "chunks").exists()
    with Client(running.address, settings=replace(load_settings(), cache=False)) as c:
        assert c.cache is None


def test_cache_ls_and_prune(counted: Any, tmp_path: Path) -> None:
    running, _ = counted
    _model(tmp_path / "v1", 9, n=6)
    _model(tmp_path / "v2", 10, n=6)
    with Client(running.address) as c:
        c.push(tmp_path / "v1", "m:1")
        c.push(tmp_path / "v2", "m:2")
        c.pull("m:1", tmp_path / "a")
        c.pull("m:2", tmp_path / "b")
        assert c.cache is not None
        cache = c.cache
    env = dict(os.environ)
    ls = json.loads(_cli("cache", "ls", "--json", env=env).stdout)
    refs = sorted(m["ref"] for m in ls["models"])
    assert refs == ["m:1", "m:2"]
    assert all(m["chunks_present"] == m["chunks"] for m in ls["models"])
    full = cache.size()
    assert ls["bytes"] == full > 0

    # An entry no cached manifest names is dropped by a plain prune; named ones stay.
    orphan = cache.chunks / "00" / ("0" * 64)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x" * 100)
    r = json.loads(_cli("cache", "prune", "--json", env=env).stdout)
    assert r["removed"] == [orphan.name]
    assert cache.size() == full

    # --max-size keeps the most recently used chunks.
    r = json.loads(_cli("cache", "prune", "--max-size", f"{full // 2}B", "--json", env=env).stdout)
    assert r["bytes_removed"] > 0
    assert cache.size() <= full // 2
    assert _cli("cache", "prune", "--max-size", "lots", env=env).returncode == 2

    r = _cli("cache", "prune", "--all", env=env)
    assert r.returncode == 0
    assert cache.size() == 0
    assert json.loads(_cli("cache", "ls", "--json", env=env).stdout)["models"] == []


def test_tp_pull_to_directory(counted: Any, tmp_path: Path) -> None:
    running, _ = counted
    gen = torch.Generator().manual_seed(11)
    h, ffn = 256, 688
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(ffn, h, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(h, ffn, generator=gen).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.ones(h),
    }
    (tmp_path / "src").mkdir()
    save_file(tensors, str(tmp_path / "src" / "model.safetensors"))
    (tmp_path / "src" / "config.json").write_text("{}")
    with Client(running.address) as c:
        pushed = c.push(tmp_path / "src", "tp:1")
    parts, moved = [], []
    for rank in range(2):
        env = {**os.environ, "MZSTORE_HOME": str(tmp_path / f"home{rank}")}  # separate caches: separate machines
        out = tmp_path / f"rank{rank}"
        args = ("pull", "tp:1", "--tp-size", "2", "--tp-rank", str(rank), "-o", str(out))
        r = _cli(*args, "--server", running.address, "--json", env=env)
        assert r.returncode == 0, r.stderr
        moved.append(json.loads(r.stdout)["bytes_transferred"])
        parts.append(load_file(str(out / "model.safetensors")))
        assert (out / "config.json").read_text() == "{}"
    up = torch.cat([p["model.layers.0.mlp.up_proj.weight"] for p in parts], dim=0)
    down = torch.cat([p["model.layers.0.mlp.down_proj.weight"] for p in parts], dim=1)
    assert torch.equal(up, tensors["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(down, tensors["model.layers.0.mlp.down_proj.weight"])
    assert parts[0]["model.layers.0.mlp.up_proj.weight"].shape == (ffn // 2, h)
    assert torch.equal(
        parts[1]["model.layers.0.input_layernorm.weight"], tensors["model.layers.0.input_layernorm.weight"]
    )
    # up_proj (half of the stored bytes) is split along dim 0: each rank fetches about half of it.
    assert max(moved) < 0.8 * pushed.bytes_stored
    bad = _cli("pull", "tp:1", "--tp-size", "2", "--tp-rank", "2", "--server", running.address, env=dict(os.environ))
    assert bad.returncode == 2
