"""A re-push sends only what the store does not hold yet (issue 13 item 5), counted on the wire.

The client names each file's sha256 when it starts an upload session; the
server answers which files it already holds under the same policy, and the
client sends the rest. The bytes are counted by a TCP proxy between client and
server (both directions together: an upper bound on what the server received).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from faultproxy import FaultProxy
from safetensors.torch import load_file, save_file

from mzstore.client import Client
from mzstore.server.app import RunningServer, build_server
from mzstore.settings import Settings
from mzstore.storage.admin import fsck, gc

#: A push of nothing new may cost this much on the wire: the begin message, replies, the commit.
OVERHEAD = 16 * 1024


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RunningServer, FaultProxy]]:
    running = build_server(tmp_path / "store", "127.0.0.1:0", Settings(chunk_bytes=256 * 1024))
    proxy = FaultProxy(running.port).start()
    yield running, proxy
    proxy.stop()
    running.stop(grace=1)


def _model(path: Path) -> Path:
    """Two safetensors shards (about 1 MB each), an index, a config and a tokenizer."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        tensors = {f"layers.{i}.w": torch.randn(512, 512, generator=gen), f"layers.{i}.b": torch.zeros(512)}
        save_file(tensors, str(path / f"model-0000{i + 1}-of-00002.safetensors"))
    index = {
        "weight_map": {f"layers.{i}.{k}": f"model-0000{i + 1}-of-00002.safetensors" for i in range(2) for k in "wb"}
    }
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps({"hidden_size": 512}))
    (path / "tokenizer.json").write_text(json.dumps({"vocab": list(range(2000))}))
    return path


def _push(proxy: FaultProxy, src: Path, ref: str, **kw: object) -> tuple[int, object]:
    before = proxy.forwarded
    with Client(proxy.address, cache=False) as c:
        info = c.push(src, ref, **kw)  # type: ignore[arg-type]
    return proxy.forwarded - before, info


def test_an_identical_re_push_sends_nothing_and_gets_the_same_digest(
    served: tuple[RunningServer, FaultProxy], tmp_path: Path
) -> None:
    running, proxy = served
    src = _model(tmp_path / "src")
    total = sum(f.stat().st_size for f in src.iterdir())
    first_bytes, first = _push(proxy, src, "org/m:v1")
    assert first_bytes > total  # everything went over the wire the first time
    again_bytes, again = _push(proxy, src, "org/m:v2")
    assert again_bytes <= OVERHEAD, again_bytes
    assert again.bytes_transferred == 0  # type: ignore[attr-defined]
    assert again.digest == first.digest  # type: ignore[attr-defined]  # the same files, stored as they were
    # the copy under another name and tag pulls byte-identical, and the store is sound
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    (moved / "config.json").rename(moved / "config-renamed.json")
    renamed_bytes, _ = _push(proxy, moved, "org/other:v1")
    assert renamed_bytes <= OVERHEAD
    with Client(running.address, cache=False) as c:
        c.pull("org/other:v1", tmp_path / "out")
    for f in moved.iterdir():
        assert (tmp_path / "out" / f.name).read_bytes() == f.read_bytes(), f.name
    assert fsck(running.store).ok


def test_a_changed_file_is_the_only_one_sent(served: tuple[RunningServer, FaultProxy], tmp_path: Path) -> None:
    running, proxy = served
    src = _model(tmp_path / "src")
    _push(proxy, src, "org/m:v1")
    tuned = load_file(str(src / "model-00002-of-00002.safetensors"))
    tuned["layers.1.w"] += 0.01  # a fine-tune that changed one shard
    save_file(tuned, str(src / "model-00002-of-00002.safetensors"))
    changed = (src / "model-00002-of-00002.safetensors").stat().st_size
    sent, info = _push(proxy, src, "org/m:v2")
    assert changed <= sent <= changed + OVERHEAD, (sent, changed)
    assert info.bytes_transferred == changed  # type: ignore[attr-defined]
    with Client(running.address, cache=False) as c:
        sd = c.load_state_dict("org/m:v2")
        v1 = c.load_state_dict("org/m:v1")
    assert torch.equal(sd["layers.1.w"], tuned["layers.1.w"])
    assert torch.equal(sd["layers.0.w"], v1["layers.0.w"])


def test_another_policy_or_a_collected_copy_is_sent_again(
    served: tuple[RunningServer, FaultProxy], tmp_path: Path
) -> None:
    running, proxy = served
    src = _model(tmp_path / "src")
    weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    _push(proxy, src, "org/m:v1")
    sent, _ = _push(proxy, src, "org/m:int8", codec="int8")  # other codec: the weights go again
    assert sent >= weights
    # the lossless copy is collected: the index still names it, but its blobs are gone
    with Client(running.address) as c:
        c.rm("org/m:v1")
    gc(running.store, grace_s=0)
    sent, _ = _push(proxy, src, "org/m:v3")
    assert sent >= weights
    with Client(running.address, cache=False) as c:
        c.pull("org/m:v3", tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert fsck(running.store).ok


def test_a_streamed_push_is_indexed_too(served: tuple[RunningServer, FaultProxy], tmp_path: Path) -> None:
    _, proxy = served
    src = _model(tmp_path / "src")
    _push(proxy, src, "org/m:v1", resumable=False)
    sent, info = _push(proxy, src, "org/m:v2")
    assert sent <= OVERHEAD and info.bytes_transferred == 0  # type: ignore[attr-defined]


def test_a_reused_config_counts_its_own_bytes_not_the_shard_it_lives_in(
    served: tuple[RunningServer, FaultProxy], tmp_path: Path
) -> None:
    """The int8 copy of a model reuses the lossless copy's config files, which share a shard with its weights."""
    running, proxy = served
    src = _model(tmp_path / "src")
    _, lossless = _push(proxy, src, "org/m:lossless")
    _, int8 = _push(proxy, src, "org/m:int8", codec="int8")
    with Client(running.address, cache=False) as c:
        sizes = {info.tag: info.bytes_stored for info in c.refs("org/m")}
        config = {f.path: f for f in c.manifest("org/m:int8")[2].files}["config.json"]
        lossless_blobs = {ch.blob for t in c.manifest("org/m:lossless")[2].tensors for ch in t.chunks}
    assert config.chunks[0].blob in lossless_blobs  # reused: it lives in a shard of the lossless weights
    assert sizes["int8"] < 0.6 * sizes["lossless"], sizes  # not the lossless weights' shard on top of its own
    assert sizes["lossless"] == lossless.bytes_stored and sizes["int8"] == int8.bytes_stored  # type: ignore[attr-defined]


def test_a_file_changed_after_its_hash_was_remembered_fails_the_push_and_is_rehashed(
    served: tuple[RunningServer, FaultProxy], tmp_path: Path
) -> None:
    """Files are not hashed again as they are sent: the server checks the sha256 named up front.

    A file rewritten in place with its size and mtime kept (so the remembered hash is stale), pushed
    to a store that does not hold the old bytes, is caught by that check: the push fails and stores
    nothing, the stale hash is forgotten, and the next push stores the new bytes.
    """
    import os

    from mzstore.errors import IntegrityError

    _running, proxy = served
    src = _model(tmp_path / "src")
    settings = Settings(home=tmp_path / "home", chunk_bytes=256 * 1024)
    with Client(proxy.address, settings=settings, cache=False) as c:
        c.push(src, "m/x:v1")
    assert (settings.cache_dir / "file-hashes.json").exists()
    victim = src / "model-00002-of-00002.safetensors"
    before = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float of layers.1.w becomes inf: same size
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    other = build_server(tmp_path / "other", "127.0.0.1:0", Settings(chunk_bytes=256 * 1024))
    try:
        with Client(other.address, settings=settings, cache=False) as c:
            with pytest.raises(IntegrityError, match="changed after it was hashed"):
                c.push(src, "m/x:v2")
            assert not c.ls("m/x")
            c.push(src, "m/x:v2")
            c.pull("m/x:v2", tmp_path / "out")
    finally:
        other.stop(grace=1)
    got = load_file(str(tmp_path / "out" / victim.name))
    assert torch.isinf(got["layers.1.w"].reshape(-1)[-1])
