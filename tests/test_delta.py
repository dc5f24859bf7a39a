"""push --base: lossless tensors stored as exact XOR deltas against a base model, pulled exactly, kept by gc."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start_serve, stop_serve
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mzstore.client import Client
from mzstore.codecs.delta import DeltaCodec
from mzstore.errors import CodecError, FormatError, IntegrityError, NotFound
from mzstore.format.dtypes import DTYPES
from mzstore.format.manifest import Manifest, parse_manifest
from mzstore.limits import MAX_DELTA_DEPTH
from mzstore.server.app import build_server
from mzstore.settings import load_settings
from mzstore.storage import Store, open_node
from mzstore.storage.admin import fsck, gc

WEIGHTS = "model.safetensors"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS))
    (path / "config.json").write_text('{"model_type": "test"}')
    return path


@pytest.fixture
def versions(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """v1, and v2: a "fine-tune" of it (small changes to two matrices, one tensor reshaped, one added,
    one removed, the rest untouched)."""
    g = torch.Generator().manual_seed(0)
    v1 = {
        "layers.0.attn.weight": torch.randn(512, 256, generator=g) * 0.05,  # two chunks at the test chunk size
        "layers.0.mlp.weight": torch.randn(300, 128, generator=g).bfloat16(),
        "layers.0.norm.weight": torch.ones(256),
        "frozen.weight": torch.randn(64, 64, generator=g),
        "reshaped.weight": torch.randn(32, 64, generator=g),
        "removed.weight": torch.randn(16, 16, generator=g),
        "step": torch.tensor(3),
    }
    v2 = {k: v.clone() for k, v in v1.items() if k != "removed.weight"}
    v2["layers.0.attn.weight"] += torch.randn(512, 256, generator=g) * 1e-5
    v2["layers.0.mlp.weight"] = (
        v2["layers.0.mlp.weight"].float() + torch.randn(300, 128, generator=g) * 1e-3
    ).bfloat16()
    v2["reshaped.weight"] = v1["reshaped.weight"].reshape(64, 32).clone()
    v2["added.weight"] = torch.randn(8, 8, generator=g)
    return _save(v1, tmp_path / "v1"), _save(v2, tmp_path / "v2"), v2


def _manifest(client: Client, ref: str) -> Manifest:
    return client.manifest(ref)[2]


def test_delta_push_is_exact_and_smaller(small_client: Client, versions, tmp_path: Path) -> None:
    v1, v2, tensors = versions
    base = small_client.push(v1, "m/x:v1")
    plain = small_client.push(v2, "m/x:plain")
    delta = small_client.push(v2, "m/x:v2", base="m/x:v1")
    m = _manifest(small_client, "m/x:v2")
    assert m.base == base.digest
    by = {t.name: t for t in m.tensors}
    base_m = _manifest(small_client, "m/x:v1")
    base_chunks = {(c.blob, c.offset) for t in base_m.tensors for c in t.chunks}
    # Changed matrices: every chunk a delta against the base chunk of the same rows.
    for name in ("layers.0.attn.weight", "layers.0.mlp.weight"):
        old = {tuple(c.rows): c for c in next(t for t in base_m.tensors if t.name == name).chunks}
        assert by[name].chunks and all(c.codec == "delta" for c in by[name].chunks), name
        for c in by[name].chunks:
            assert c.base == old[tuple(c.rows)]
    assert len(by["layers.0.attn.weight"].chunks) >= 2
    # Untouched tensors are the base's chunks themselves: no new bytes.
    for name in ("layers.0.norm.weight", "frozen.weight", "step"):
        assert all((c.blob, c.offset) in base_chunks and c.base is None for c in by[name].chunks), name
    # A reshaped tensor or a new one has nothing to delta against.
    for name in ("reshaped.weight", "added.weight"):
        assert all(c.codec == "lossless" and c.base is None for c in by[name].chunks), name
    new_bytes = sum(c.length for t in m.tensors for c in t.chunks if (c.blob, c.offset) not in base_chunks)
    plain_bytes = sum(c.length for t in _manifest(small_client, "m/x:plain").tensors for c in t.chunks)
    assert new_bytes < 0.75 * plain_bytes, (new_bytes, plain_bytes)
    assert delta.digest != plain.digest
    # Exact, both ways a pull decodes.
    out = tmp_path / "out"
    small_client.pull("m/x:v2", out)
    assert _sha(out / WEIGHTS) == _sha(v2 / WEIGHTS)
    loaded = small_client.load_state_dict("m/x:v2")
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(
            loaded[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
        ), k


def test_edge_update_fetches_only_the_deltas(small_server, versions, tmp_path: Path) -> None:
    """A device that holds v1 in its cache updates to v2 moving only the delta chunks and the new tensors."""
    v1, v2, _ = versions
    with Client(small_server.address) as c:
        c.push(v1, "m/x:v1")
        c.push(v2, "m/x:plain")
        c.push(v2, "m/x:v2", base="m/x:v1")
        m = _manifest(c, "m/x:v2")
        base_m = _manifest(c, "m/x:v1")
    base_chunks = {(ch.blob, ch.offset) for t in base_m.tensors for ch in t.chunks}
    own = sum(ch.length for t in m.tensors for ch in t.chunks if (ch.blob, ch.offset) not in base_chunks)
    own += sum(ch.length for f in m.files for ch in f.chunks if (ch.blob, ch.offset) not in base_chunks)

    def edge(name: str) -> Client:
        return Client(
            small_server.address, settings=load_settings({**os.environ, "MZSTORE_HOME": str(tmp_path / name)})
        )

    with edge("edge-delta") as device:
        device.pull("m/x:v1", tmp_path / "e1")
        update = device.pull("m/x:v2", tmp_path / "e2")
        assert _sha(tmp_path / "e2" / WEIGHTS) == _sha(v2 / WEIGHTS)
        assert update.bytes_transferred <= own
        assert update.bytes_transferred > 0
    with edge("edge-plain") as device:
        device.pull("m/x:v1", tmp_path / "p1")
        plain_update = device.pull("m/x:plain", tmp_path / "p2")
    assert update.bytes_transferred < 0.75 * plain_update.bytes_transferred
    with edge("edge-fresh") as device:  # no base in the cache: the base chunks come too, and it is still exact
        fresh = device.pull("m/x:v2", tmp_path / "f")
        assert _sha(tmp_path / "f" / WEIGHTS) == _sha(v2 / WEIGHTS)
        assert fresh.bytes_transferred > update.bytes_transferred


def test_rm_and_gc_never_take_what_a_delta_needs(tmp_path: Path, versions) -> None:
    v1, v2, _ = versions
    root = tmp_path / "store"
    running = build_server(root, "127.0.0.1:0")
    try:
        with Client(running.address) as c:
            c.push(v1, "m/x:v1")
            c.push(v2, "m/x:v2", base="m/x:v1")
            base_digest = _manifest(c, "m/x:v2").base
            c.rm("m/x:v1")
            store = Store([open_node(root)], replicas=1)
            report = gc(store, grace_s=0, now=time.time() + 1)
            assert not [d for d in report.deleted if "blob" in d or base_digest.split(":")[1] in d], report.deleted
            assert fsck(store).ok
            out = tmp_path / "out"
            c.pull("m/x:v2", out)
            assert _sha(out / WEIGHTS) == _sha(v2 / WEIGHTS)
            # With the delta gone too, gc reclaims both.
            c.rm("m/x:v2")
            report = gc(store, grace_s=0, now=time.time() + 1)
            assert any(base_digest in d for d in report.deleted)
            assert not list((root / "blobs").rglob("*")) or all(p.is_dir() for p in (root / "blobs").rglob("*"))
    finally:
        running.stop(grace=1)


def test_a_base_that_does_not_exist_is_refused(small_client: Client, versions, root: Path) -> None:
    _, v2, _ = versions
    with pytest.raises(NotFound):
        small_client.push(v2, "m/x:v2", base="m/nothing:v1")
    assert small_client.ls() == []


def test_a_corrupt_base_chunk_is_never_returned_as_data(small_client: Client, versions, root: Path, tmp_path) -> None:
    v1, v2, _ = versions
    small_client.push(v1, "m/x:v1")
    small_client.push(v2, "m/x:v2", base="m/x:v1")
    m = _manifest(small_client, "m/x:v2")
    delta = next(c for t in m.tensors for c in t.chunks if c.base is not None)
    b = delta.base
    assert b is not None
    path = root / "blobs" / "sha256" / b.blob[7:9] / b.blob[7:]
    data = bytearray(path.read_bytes())
    data[b.offset + b.length // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match="its base"):
        small_client.pull("m/x:v2", out)
    assert not (out / WEIGHTS).exists()


def test_deltas_chain_and_stop_at_the_depth_limit(small_client: Client, versions, tmp_path: Path) -> None:
    """v3 against v2 (itself a delta), and so on: each pulls exactly; past MAX_DELTA_DEPTH a chunk is stored whole."""
    v1, _, _ = versions
    tensors = load_file(str(v1 / WEIGHTS))
    previous = "m/x:v0"
    small_client.push(v1, previous)
    g = torch.Generator().manual_seed(1)
    for i in range(1, MAX_DELTA_DEPTH + 2):
        tensors["layers.0.attn.weight"] = tensors["layers.0.attn.weight"] + torch.randn(512, 256, generator=g) * 1e-6
        src = _save(tensors, tmp_path / f"v{i}")
        small_client.push(src, f"m/x:v{i}", base=previous)
        m = _manifest(small_client, f"m/x:v{i}")
        depth = max(len(c.chain()) for t in m.tensors for c in t.chunks)
        assert depth == min(i, MAX_DELTA_DEPTH) + 1 if i <= MAX_DELTA_DEPTH else depth <= MAX_DELTA_DEPTH + 1
        out = tmp_path / f"out{i}"
        small_client.pull(f"m/x:v{i}", out)
        assert _sha(out / WEIGHTS) == _sha(src / WEIGHTS), i
        parse_manifest(m.to_json())  # re-parses within the limit
        previous = f"m/x:v{i}"


def test_manifest_refuses_malformed_deltas(small_client: Client, versions) -> None:
    v1, v2, _ = versions
    small_client.push(v1, "m/x:v1")
    small_client.push(v2, "m/x:v2", base="m/x:v1")
    m = _manifest(small_client, "m/x:v2")
    obj = json.loads(m.to_json())
    t = next(t for t in obj["tensors"] if any("base" in c for c in t["chunks"]))
    chunk = next(c for c in t["chunks"] if "base" in c)

    def refused(mutate, match: str) -> None:
        o = json.loads(json.dumps(obj))
        tt = next(x for x in o["tensors"] if x["name"] == t["name"])
        cc = next(c for c in tt["chunks"] if c["rows"] == chunk["rows"])
        mutate(o, cc)
        with pytest.raises(FormatError, match=match):
            parse_manifest(json.dumps(o).encode())

    refused(lambda o, c: c.pop("base"), "delta without its base")
    refused(lambda o, c: c.update(codec="lossless"), "has a base but is not a delta")
    refused(lambda o, c: c["base"].update(raw_length=c["raw_length"] + 1), "decodes to")
    refused(lambda o, c: o.update(base="sha256:nothex"), "base is not a manifest digest")

    def deep(o, c):
        template = json.dumps(c["base"])
        node = c["base"]
        for _ in range(MAX_DELTA_DEPTH):
            node["codec"] = "delta"
            node["base"] = json.loads(template)
            node = node["base"]

    refused(deep, "more than")
    # What the client did not send cannot be written: a manifest without a base has no "base" key.
    plain = json.loads(replace(m, base=None).to_json())
    assert "base" not in plain


def test_cli_push_base(tmp_path: Path, versions) -> None:
    v1, v2, _ = versions
    address, proc = start_serve(tmp_path / "data", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = {**os.environ, "MZSTORE_SERVER": address, "MZSTORE_HOME": str(tmp_path / "home")}
        run = [sys.executable, "-m", "mzstore.cli", "push"]
        assert subprocess.run([*run, str(v1), "m/x:v1"], env=env, capture_output=True, timeout=120).returncode == 0
        result = subprocess.run(
            [*run, str(v2), "m/x:v2", "--base", "m/x:v1", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        inspect = subprocess.run(
            [sys.executable, "-m", "mzstore.cli", "inspect", "m/x:v2", "--json"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert json.loads(inspect.stdout)["manifest"]["base"].startswith("sha256:")
        human = subprocess.run(
            [sys.executable, "-m", "mzstore.cli", "inspect", "m/x:v2"], env=env, capture_output=True, text=True
        ).stdout
        assert "base: sha256:" in human and "chunks stored as deltas against it" in human and "lossless Δ" in human
        assert info["bytes_stored"] > 0
        missing = subprocess.run(
            [*run, str(v2), "m/x:v3", "--base", "m/none:v1"], env=env, capture_output=True, text=True, timeout=120
        )
        assert missing.returncode == 1 and "Traceback" not in missing.stderr and "m/none" in missing.stderr
    finally:
        stop_serve(proc)


def test_hub_face_serves_a_delta_model_byte_for_byte(tmp_path: Path, versions) -> None:
    """The Hub face (and the S3 face, through the same reader) decodes deltas against their base too."""
    import urllib.request

    from mzstore.settings import Settings

    v1, v2, _ = versions
    server = build_server(
        tmp_path / "store", "127.0.0.1:0", Settings(chunk_bytes=64 * 1024), http="127.0.0.1:0", public_hub=True
    )
    try:
        with Client(server.address) as c:
            c.push(v1, "m/x:v1")
            c.push(v2, "m/x:v2", base="m/x:v1")
        want = (v2 / WEIGHTS).read_bytes()
        url = f"{server.http_url}/m/x/resolve/v2/{WEIGHTS}"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.read() == want
        req = urllib.request.Request(url, headers={"Range": "bytes=100000-200000"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 206 and r.read() == want[100000:200001]
    finally:
        server.stop(grace=1)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(DTYPES)),
    n=st.integers(0, 300),
    seed=st.integers(0, 2**32 - 1),
    changed=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
)
def test_delta_codec_round_trips_every_dtype(name: str, n: int, seed: int, changed: float) -> None:
    """base + delta gives the bytes back exactly, whatever changed (sign, exponent, every bit)."""
    dtype = DTYPES[name]
    width = max(1, dtype.bits // 8)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, n * width, dtype=np.uint8)
    new = base.copy()
    flip = rng.random(new.size) < changed
    new[flip] = rng.integers(0, 256, int(flip.sum()), dtype=np.uint8)
    payload, _ = DeltaCodec().encode_against(new.tobytes(), base, dtype)
    out = np.full(new.size, 0xAB, np.uint8)
    DeltaCodec().apply_into(payload, dtype, base, out)
    assert np.array_equal(out, new)
    with pytest.raises(CodecError):
        DeltaCodec().apply_into(payload, dtype, base[:-1] if base.size else np.zeros(1, np.uint8), out)


def test_small_changes_cost_little() -> None:
    """A float nudged by a relative 1e-4 moves its bit pattern by a small integer: well under half the bytes."""
    rng = np.random.default_rng(0)
    base = (rng.standard_normal(1 << 16) * 0.05).astype(np.float32)
    new = base * (1 + rng.standard_normal(base.size).astype(np.float32) * 1e-4)
    payload, _ = DeltaCodec().encode_against(new.tobytes(), base.view(np.uint8), DTYPES["F32"])
    assert len(payload) < 0.4 * new.nbytes


def test_a_real_fine_tune_of_minilm_ships_as_a_small_delta(small_server, minilm_dir: Path, tmp_path: Path) -> None:
    """A few AdamW steps with sentence-transformers on the CPU (every weight moves), pushed with --base: exact
    on pull, well under half the plain push, and an edge device holding v1 moves only the delta."""
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(minilm_dir), device="cpu")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    pairs = [("A cat sleeps on the sofa.", "A kitten naps on the couch."), ("Rates rose.", "The bank raised rates.")]
    for _ in range(5):
        a = model(model.preprocess([p[0] for p in pairs]))["sentence_embedding"]
        b = model(model.preprocess([p[1] for p in pairs]))["sentence_embedding"]
        scores = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T * 20
        torch.nn.functional.cross_entropy(scores, torch.arange(len(pairs))).backward()
        opt.step()
        opt.zero_grad()
    tuned = tmp_path / "tuned"
    model.save(str(tuned), safe_serialization=True)
    with Client(small_server.address) as c:
        c.push(minilm_dir, "mini/lm:v1")
        plain = c.push(tuned, "mini/lm:plain")
        c.push(tuned, "mini/lm:v2", base="mini/lm:v1")
        base_chunks = {(ch.blob, ch.offset) for t in _manifest(c, "mini/lm:v1").tensors for ch in t.chunks}
        m = _manifest(c, "mini/lm:v2")
    own = sum(ch.length for t in m.tensors for ch in t.chunks if (ch.blob, ch.offset) not in base_chunks)
    assert own < 0.5 * plain.bytes_stored, (own, plain.bytes_stored)
    settings = load_settings({**os.environ, "MZSTORE_HOME": str(tmp_path / "edge")})
    with Client(small_server.address, settings=settings) as device:
        device.pull("mini/lm:v1", tmp_path / "v1")
        update = device.pull("mini/lm:v2", tmp_path / "v2")
    assert _sha(tmp_path / "v2" / WEIGHTS) == _sha(tuned / WEIGHTS)
    assert update.bytes_transferred < 0.5 * plain.bytes_stored
