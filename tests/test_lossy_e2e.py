"""Lossy policies end to end over a real gRPC server: MiniLM pushed, pulled, loaded and compared."""

from __future__ import annotations

import fnmatch
import math
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import start_serve, stop_serve, store_files
from safetensors.torch import load_file, save_file

from mzstore.client import Client, PushInfo
from mzstore.errors import IntegrityError, InvalidArgument
from mzstore.format.manifest import Manifest
from mzstore.server.app import build_server

POLICIES = ["int8", "int4", "int4:g32", "fp8", "prune:2:4,int8", "auto:cos=0.99", "ecsq:size=0.14"]
#: Mean cosine of sentence embeddings to the original model's, per policy.
MIN_EMBEDDING_COS = {
    "int8": 0.999,
    "fp8": 0.995,
    "int4:g32": 0.97,
    "auto:cos=0.99": 0.99,
    "int4": 0.97,  # = int4:g32 (g128 kept 0.961 on MiniLM, below what int4 promises)
    "ecsq:size=0.14": 0.993,  # the target is 0.995 on bench_lossy's sentences (measured 0.9953)
    "prune:2:4,int8": 0.3,  # lossy by design (half the weights gone, no fine-tuning): it just has to run
}
#: Stored tensor bytes / size of model.safetensors.
MAX_STORED_RATIO = {"int8": 0.25, "int4:g32": 0.15, "int4": 0.15, "auto:cos=0.99": 0.15, "ecsq:size=0.14": 0.1405}
#: What the manifest records per eligible tensor.
RECORDED_CODEC = {"int4": "int4:g32"}

SENTENCES = [
    "A model store ships weights to many GPUs.",
    "The quick brown fox jumps over the lazy dog.",
    "Compression must never change what the model computes.",
    "Edge devices pull models over flaky links.",
    "How do I reset my password?",
    "The stock market fell sharply after the announcement.",
    "She plays the violin in a small orchestra.",
    "Photosynthesis converts light into chemical energy.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Quantum computers exploit superposition and entanglement.",
    "My flight was delayed by three hours.",
    "The cat is sleeping on the warm windowsill.",
    "Interest rates are expected to rise next quarter.",
    "He scored the winning goal in the final minute.",
    "Please send the invoice by Friday.",
    "The museum opens at nine in the morning.",
    "Rain is forecast for the entire weekend.",
    "Neural networks learn representations from data.",
    "The patient was prescribed antibiotics for the infection.",
    "Our team shipped the new release yesterday.",
    "Mount Everest is the highest mountain above sea level.",
    "I would like a large coffee with oat milk.",
    "The library extended its opening hours during exams.",
    "Volcanic eruptions can affect the global climate.",
    "The contract must be signed by both parties.",
    "Children were playing football in the park.",
    "The database query timed out after thirty seconds.",
    "Shakespeare wrote many plays and sonnets.",
    "The train to Berlin leaves from platform four.",
    "Electric cars are becoming more affordable.",
    "She translated the novel from Japanese into English.",
    "The bridge was closed for maintenance.",
    "Bees are essential pollinators for many crops.",
    "The court adjourned until next Monday.",
    "A balanced diet includes fruit and vegetables.",
    "The telescope captured images of a distant galaxy.",
    "Our server crashed because the disk was full.",
    "He apologized for the misunderstanding.",
    "The orchestra performed Beethoven's ninth symphony.",
    "Migrating birds fly thousands of kilometres each year.",
    "The startup raised ten million dollars in funding.",
    "Wear sunscreen when you go to the beach.",
    "The algorithm sorts the list in linear time.",
    "A thunderstorm knocked out power across the city.",
    "The novel's ending surprised every reader.",
    "Vaccines train the immune system to recognise pathogens.",
    "The chef sliced the onions very thinly.",
    "Traffic on the highway was unusually light.",
    "Ancient Rome built aqueducts to carry water.",
    "Can you recommend a good book about history?",
    "Le chat dort sur le canapé.",
    "Der Zug hat zehn Minuten Verspätung.",
    "el perro corre en la playa",
    "42",
    "GPU memory bandwidth limits large language model inference.",
    "I love this product, it works perfectly!",
    "This is the worst service I have ever experienced.",
]


def exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def is_eligible_minilm(name: str, t: torch.Tensor) -> bool:
    """Which MiniLM tensors a lossy policy may touch: float matrices of >= 4096 elements, not norms or biases."""
    return (
        t.is_floating_point()
        and t.dim() >= 2
        and t.numel() >= 4096
        and "LayerNorm" not in name
        and not name.endswith(".bias")
    )


def ref_for(policy: str) -> str:
    return "lossy/minilm:" + re.sub(r"[^A-Za-z0-9_.-]", "-", policy)


# --- one push and one pull per policy, shared by the module --------------------------------------


@dataclass
class Pushed:
    policy: str
    info: PushInfo
    manifest: Manifest
    out: Path


@pytest.fixture(scope="module")
def lossy_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    running = build_server(tmp_path_factory.mktemp("lossy") / "store", "127.0.0.1:0")
    with Client(running.address, timeout=60) as c:
        yield c
    running.stop(grace=1)


@pytest.fixture(scope="module")
def pushed(lossy_client: Client, minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, Pushed] = {}

    def get(policy: str) -> Pushed:
        if policy not in cache:
            ref = ref_for(policy)
            info = lossy_client.push(minilm_dir, ref, codec=policy)
            out = tmp_path_factory.mktemp("pulled")
            lossy_client.pull(ref, out)
            _, digest, manifest = lossy_client.manifest(ref)
            assert digest == info.digest
            cache[policy] = Pushed(policy, info, manifest, out)
        return cache[policy]

    return get


@pytest.fixture(scope="module")
def original_tensors(minilm_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(minilm_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def original_embeddings(minilm_dir: Path) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu").encode(SENTENCES, convert_to_tensor=True)


def test_sentences_are_varied_enough():
    assert len(SENTENCES) >= 50 and len(set(SENTENCES)) == len(SENTENCES)


# --- quality and size -----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_embeddings_stay_close(pushed, original_embeddings, policy):
    from sentence_transformers import SentenceTransformer

    p = pushed(policy)
    pulled = SentenceTransformer(str(p.out), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert pulled.shape == original_embeddings.shape
    cos = torch.nn.functional.cosine_similarity(original_embeddings.double(), pulled.double(), dim=1)
    assert float(cos.mean()) >= MIN_EMBEDDING_COS[policy], float(cos.mean())
    # Lossy, so not identical (this would pass vacuously if the policy had not been applied).
    assert not torch.equal(original_embeddings, pulled)


@pytest.mark.parametrize("policy", sorted(MAX_STORED_RATIO))
def test_stored_bytes_ratio(pushed, minilm_dir, policy):
    p = pushed(policy)
    stored = sum(c.length for t in p.manifest.tensors for c in t.chunks)
    ratio = stored / (minilm_dir / "model.safetensors").stat().st_size
    assert ratio <= MAX_STORED_RATIO[policy], ratio
    assert p.info.bytes_stored < p.info.bytes_raw


# --- the manifest ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_manifest_codecs_and_fidelity(pushed, original_tensors, policy):
    p = pushed(policy)
    m = p.manifest
    assert m.codec == ("int4:g32" if policy == "int4" else policy)
    assert {t.name for t in m.tensors} == set(original_tensors)
    lossy = 0
    for t in m.tensors:
        orig = original_tensors[t.name]
        assert t.dtype == {torch.float32: "F32", torch.int64: "I64"}[orig.dtype]
        assert t.shape == list(orig.shape)
        if is_eligible_minilm(t.name, orig):
            lossy += 1
            if policy.startswith("auto"):
                assert t.codec.startswith("auto:cos=0.99→"), t.codec
            elif policy.startswith("ecsq"):  # each tensor records the step its allocation gave it
                assert re.fullmatch(r"ecsq:step=[0-9.e-]+", t.codec), t.codec
                assert {c.params["spec"] for c in t.chunks} == {t.codec}
            else:
                assert t.codec == RECORDED_CODEC.get(policy, policy), (t.name, t.codec)
            f = t.fidelity
            assert f is not None and set(f) == {"cosine", "snr_db", "max_abs_err"}
            assert 0 < f["cosine"] <= 1
            assert f["max_abs_err"] >= 0
            if f["snr_db"] is None:
                assert f["cosine"] == 1 and f["max_abs_err"] == 0  # exact: only when auto kept it lossless
            assert all(c.codec in ("quant", "lossless") for c in t.chunks)
            if not policy.startswith("auto"):
                assert all(c.codec == "quant" for c in t.chunks)
        else:
            assert t.codec == "lossless", t.name
            assert t.fidelity is None, t.name
            assert all(c.codec == "lossless" for c in t.chunks)
    assert lossy == 39  # 6 layers x 6 matrices, the pooler, word and position embeddings
    # The worst tensor reported by push is the manifest's lowest cosine.
    worst = min((t for t in m.tensors if t.fidelity is not None), key=lambda t: t.fidelity["cosine"])
    assert p.info.worst is not None
    assert p.info.worst["tensor"] == worst.name
    assert p.info.worst["codec"] == worst.codec
    assert p.info.worst["cosine"] == worst.fidelity["cosine"]
    assert p.info.worst["cosine"] < 1


@pytest.mark.parametrize("policy", POLICIES)
def test_tensors_after_load_state_dict(pushed, lossy_client, original_tensors, policy):
    """Exact tensors stay bit-exact; lossy ones match the fidelity the manifest claims; pull == load_state_dict."""
    p = pushed(policy)
    loaded = lossy_client.load_state_dict(ref_for(policy))
    from_file = load_file(str(p.out / "model.safetensors"))
    assert set(loaded) == set(original_tensors) == set(from_file)
    by_name = {t.name: t for t in p.manifest.tensors}
    for name, orig in original_tensors.items():
        got = loaded[name]
        assert exact(got, from_file[name]), name  # both pull paths decode the same bytes
        entry = by_name[name]
        if entry.fidelity is None:
            assert exact(got, orig), name
            continue
        assert got.dtype == orig.dtype and got.shape == orig.shape
        o, g = orig.double().reshape(-1), got.double().reshape(-1)
        e = o - g
        assert torch.isfinite(g).all()
        f = entry.fidelity
        assert float(o @ g) / math.sqrt(float(o @ o) * float(g @ g)) == pytest.approx(f["cosine"], abs=2e-7), name
        assert e.abs().max().item() == pytest.approx(f["max_abs_err"], rel=1e-5, abs=1e-12), name
        if f["snr_db"] is not None:
            assert 10 * math.log10(float(o @ o) / float(e @ e)) == pytest.approx(f["snr_db"], abs=2e-3), name
    for name in ("embeddings.position_ids", "embeddings.LayerNorm.weight", "encoder.layer.0.attention.self.query.bias"):
        assert by_name[name].codec == "lossless" and exact(loaded[name], original_tensors[name])


@pytest.mark.parametrize("policy", POLICIES)
def test_other_files_come_back_byte_identical(pushed, minilm_dir, policy):
    p = pushed(policy)
    src = sorted(q.relative_to(minilm_dir).as_posix() for q in minilm_dir.rglob("*") if q.is_file())
    out = sorted(q.relative_to(p.out).as_posix() for q in p.out.rglob("*") if q.is_file())
    assert out == src
    for rel in src:
        if rel != "model.safetensors":
            assert (p.out / rel).read_bytes() == (minilm_dir / rel).read_bytes(), rel
    # The safetensors file keeps its size and its header byte for byte; only tensor data changes.
    original = (minilm_dir / "model.safetensors").read_bytes()
    pulled = (p.out / "model.safetensors").read_bytes()
    assert len(pulled) == len(original)
    (header_len,) = struct.unpack("<Q", original[:8])
    assert pulled[: 8 + header_len] == original[: 8 + header_len]
    assert pulled != original


# --- keep patterns -------------------------------------------------------------------------------------


KEEP = ["*.attention.*", "re:\\.intermediate\\.dense\\.weight$"]


def test_keep_patterns_stay_exact(lossy_client, minilm_dir, original_tensors):
    """A glob and a ``re:`` pattern: what either matches is stored lossless and comes back bit-exact."""
    by_glob = {n for n in original_tensors if fnmatch.fnmatchcase(n, KEEP[0])}
    by_regex = {n for n in original_tensors if re.search(KEEP[1][3:], n)}
    assert by_regex and not by_regex & by_glob  # the re: pattern has tensors of its own to keep

    lossy_client.push(minilm_dir, "keep/minilm:v1", codec="int8", keep=KEEP)
    _, _, manifest = lossy_client.manifest("keep/minilm:v1")
    loaded = lossy_client.load_state_dict("keep/minilm:v1")
    kept = set()
    n_lossy = 0
    for t in manifest.tensors:
        orig = original_tensors[t.name]
        if not is_eligible_minilm(t.name, orig):
            assert t.codec == "lossless" and exact(loaded[t.name], orig), t.name
        elif t.name in by_glob | by_regex:
            kept.add(t.name)
            assert t.codec == "lossless" and t.fidelity is None, t.name
            assert exact(loaded[t.name], orig), t.name
        else:
            n_lossy += 1
            assert t.codec == "int8" and t.fidelity is not None, t.name
            assert not exact(loaded[t.name], orig), t.name
    assert kept == {n for n in by_glob | by_regex if is_eligible_minilm(n, original_tensors[n])}
    assert len(kept & by_glob) == 24 and len(kept & by_regex) == 6
    assert n_lossy == 39 - 30


# --- bad input is refused before anything is stored ---------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "keep"),
    [("int4:g7", ()), ("prune:1.5", ()), ("bogus", ()), ("int8,fp8", ()), ("int8", ("re:(",))],
)
def test_bad_policy_is_rejected_before_upload(client, root, minilm_dir, codec, keep):
    before = store_files(root)
    with pytest.raises(InvalidArgument):
        client.push(minilm_dir, "bad/minilm:v1", codec=codec, keep=keep)
    assert store_files(root) == before
    assert client.ls() == []


def test_policy_with_nothing_to_apply_to_is_rejected(client, root, tmp_path):
    src = tmp_path / "ints" / "model.safetensors"
    src.parent.mkdir()
    save_file(
        {"ids": torch.arange(64 * 128).reshape(64, 128), "counts": torch.zeros(100, 100, dtype=torch.int64)}, str(src)
    )
    before = store_files(root)
    with pytest.raises(InvalidArgument) as info:
        client.push(src, "ints/m:v1", codec="int8")
    assert "I64" in str(info.value)
    assert store_files(root) == before
    assert client.ls() == []
    # The same model pushes fine without a lossy policy.
    client.push(src, "ints/m:v1")
    loaded, original = client.load_state_dict("ints/m:v1"), load_file(str(src))
    assert set(loaded) == set(original) and all(exact(loaded[k], original[k]) for k in original)


def test_cli_rejects_a_bad_policy_with_exit_2(tmp_path: Path, minilm_dir: Path):
    data = tmp_path / "data"
    address, proc = start_serve(data, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        before = store_files(data)
        env = dict(os.environ, MZSTORE_SERVER=address)
        result = subprocess.run(
            [sys.executable, "-m", "mzstore.cli", "push", str(minilm_dir), "org/m:v1", "--codec", "int4:g7"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
        errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error:")]
        assert len(errors) == 1, result.stderr
        assert "int4" in errors[0] and "7" in errors[0]
        assert store_files(data) == before
    finally:
        stop_serve(proc)


# --- a corrupted lossy chunk is never returned as data ----------------------------------------------------


@pytest.mark.parametrize("codec", ["int8", "int4:g32", "fp8", "prune:2:4,int8"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_corrupt_lossy_chunk_is_never_returned_as_data(server, client, root, tmp_path, codec, where):
    src = tmp_path / "src" / "model.safetensors"
    src.parent.mkdir()
    save_file({"w": torch.randn(256, 64, generator=torch.Generator().manual_seed(5)), "b": torch.zeros(64)}, str(src))
    info = client.push(src, "org/m:v1", codec=codec)
    _, _, manifest = client.manifest("org/m:v1")
    (entry,) = [t for t in manifest.tensors if t.name == "w"]
    chunk = entry.chunks[0]
    assert chunk.codec == "quant"
    blob = root / "blobs" / "sha256" / chunk.blob[7:9] / chunk.blob[7:]
    data = bytearray(blob.read_bytes())
    pos = {"first": 0, "middle": chunk.length // 2, "last": chunk.length - 1}[where]
    data[chunk.offset + pos] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(IntegrityError):
        client.pull("org/m:v1", out)
    assert not (out / "model.safetensors").exists()
    assert not out.exists() or list(out.iterdir()) == []
    with pytest.raises(IntegrityError):
        client.load_state_dict("org/m:v1")
    assert info.digest == client.manifest("org/m:v1")[1]


# --- ecsq: the allocation ---------------------------------------------------------------------------------


def test_ecsq_allocation_is_recorded_and_met(pushed, minilm_dir):
    """The client's allocation reaches the manifest, its size prediction holds, and steps follow the role table."""
    p = pushed("ecsq:size=0.14")
    a = p.manifest.allocation
    assert a is not None and p.info.allocation == a
    assert a["source"] == "roles" and a["target"] == "size=0.14"
    stored = sum(c.length for t in p.manifest.tensors for c in t.chunks)
    ratio = stored / (minilm_dir / "model.safetensors").stat().st_size
    assert abs(ratio - 0.14) < 0.003, ratio  # the bisection aims at 0.14, and the sample predicts within 2 %
    assert abs(a["predicted_size"] - ratio) < 0.003
    steps = {t.name: float(t.codec.split("=")[1]) for t in p.manifest.tensors if t.codec.startswith("ecsq")}
    # Least sensitive per weight: the word embeddings get a coarser step than any FFN input matrix.
    ffn_in = [s for n, s in steps.items() if "intermediate.dense" in n]
    assert len(ffn_in) == 6 and steps["embeddings.word_embeddings.weight"] > 2 * max(ffn_in)


def test_ecsq_without_allocation_is_refused(server, root):
    """A raw gRPC client sending ecsq:size without the allocation gets a clear error; nothing is stored."""
    import grpc

    from mzstore.v1 import store_pb2 as pb
    from mzstore.v1 import store_pb2_grpc as rpc

    before = store_files(root)
    with grpc.insecure_channel(server.address) as channel:
        stub = rpc.StoreStub(channel)
        begin = pb.PushBegin(ref="raw/m:v1", codec="ecsq:size=0.14", files=[pb.FileInfo(path="a", size=1, kind="file")])
        with pytest.raises(grpc.RpcError) as info:
            stub.Push(iter([pb.PushRequest(begin=begin)]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "allocation" in (info.value.details() or "")
    assert store_files(root) == before
