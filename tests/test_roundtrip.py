"""End-to-end round trips through a real gRPC server: every dtype, shapes, layouts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mzstore.client import Client
from mzstore.format.manifest import parse_manifest
from mzstore.storage.store import Store, manifest_key

DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.uint16,
    torch.uint32,
    torch.uint64,
]


def _random(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (every byte value, NaNs and infs included)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = 1
    for d in shape:
        n *= d
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=gen)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) if a.numel() else True


@pytest.fixture
def all_dtypes_file(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    shapes = [(), (0,), (1,), (3, 0, 5), (7, 13), (300, 97), (5, 3, 11), (1000,)]
    for dtype in DTYPES:
        for i, shape in enumerate(shapes):
            tensors[f"{str(dtype).split('.')[-1]}.{i}"] = _random(dtype, shape, gen)
    # A float tensor large enough to span many chunks of the small test settings.
    tensors["big.weight"] = (torch.randn(1024, 256, generator=gen) * 0.02).to(torch.bfloat16)
    path = tmp_path / "src" / "all.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path), metadata={"note": "every dtype"})
    return path


def test_every_dtype_round_trips_bit_exactly(small_client: Client, all_dtypes_file: Path, tmp_path: Path) -> None:
    info = small_client.push(all_dtypes_file, "test/dtypes:v1")
    assert info.chunks > info.tensors  # big.weight was split
    assert info.shards > 1  # and the shards rolled over

    out = tmp_path / "out"
    pulled = small_client.pull("test/dtypes:v1", out)
    assert [Path(p).name for p in pulled.files] == ["all.safetensors"]
    # The file comes back byte-identical, header included.
    assert _sha(out / "all.safetensors") == _sha(all_dtypes_file)

    original = load_file(str(all_dtypes_file))
    loaded = small_client.load_state_dict("test/dtypes:v1")
    assert set(loaded) == set(original)
    for name, tensor in original.items():
        assert _same(loaded[name], tensor), name


@pytest.mark.parametrize("written_once", [False, True])
def test_shards_are_valid_safetensors_with_chunk_metadata(
    small_client: Client, all_dtypes_file: Path, root: Path, monkeypatch: pytest.MonkeyPatch, written_once: bool
) -> None:
    """Also for shards written once behind a reserved, space-padded header (large pushes to a local
    node; here every push, with a reserve small enough that shards are sealed early for it)."""
    from mzstore.push import shards

    if written_once:
        monkeypatch.setattr(shards, "DIRECT_MIN_BYTES", 0)
        monkeypatch.setattr(shards, "HEADER_RESERVE", 8192)
    info = small_client.push(all_dtypes_file, "test/dtypes:v1")
    if written_once:
        for digest in parse_manifest(Store(root).get_manifest(info.digest)).blobs():
            with open(root / "blobs" / "sha256" / digest[7:9] / digest[7:], "rb") as fh:
                assert int.from_bytes(fh.read(8), "little") + 8 == 8192, "the header fills its reserved region"
        assert not [p for p in (root / "tmp").rglob("*") if p.is_file()], "no spool or staged file is left"
        out = small_client.pull("test/dtypes:v1", root.parent / "out")
        assert (Path(out.files[0]).read_bytes()) == all_dtypes_file.read_bytes()
    store = Store(root)
    manifest = parse_manifest(store.get_manifest(info.digest))
    blobs = manifest.blobs()
    assert len(blobs) == info.shards
    seen_chunks = 0
    for digest in blobs:
        path = root / "blobs" / "sha256" / digest[7:9] / digest[7:]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest[7:]  # content-addressed
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
            assert meta["format"] == "pt"
            chunks = json.loads(meta["mzstore"])
            keys = list(f.keys())
            assert len(keys) == len(chunks)
            for entry in chunks:
                stored = f.get_tensor(entry["key"])
                assert stored.dtype.name == "uint8"
                assert {"tensor", "dtype", "shape", "rows", "codec", "params", "sha256", "raw_length"} <= set(
                    entry
                ) or entry.get("file")
            seen_chunks += len(chunks)
    assert seen_chunks == info.chunks
    # Every chunk's manifest offset points at the stored entry bytes.
    for tensor in manifest.tensors:
        for c in tensor.chunks:
            assert len(store.read_blob(c.blob, c.offset, c.length)) == c.length


def test_push_is_deterministic_and_idempotent(small_client: Client, all_dtypes_file: Path, root: Path) -> None:
    a = small_client.push(all_dtypes_file, "test/dtypes:a")
    before = sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())
    b = small_client.push(all_dtypes_file, "test/dtypes:b")
    after = sorted(p.name for p in (root / "blobs").rglob("*") if p.is_file())
    assert a.digest == b.digest
    assert before == after  # same content, same blobs: nothing new stored
    assert (root / manifest_key(a.digest)).is_file()


def test_sharded_hf_directory_round_trips_and_loads_in_transformers(client: Client, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    src = tmp_path / "bert"
    model.save_pretrained(src, max_shard_size="200KB", safe_serialization=True)
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) > 1 and (src / "model.safetensors.index.json").exists()

    info = client.push(src, "test/bert:v1")
    out = tmp_path / "pulled"
    client.pull("test/bert:v1", out)
    src_files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    out_files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert out_files == src_files
    for rel in src_files:
        assert _sha(out / rel) == _sha(src / rel), rel
    assert info.bytes_raw == sum((src / rel).stat().st_size for rel in src_files)

    reloaded = transformers.BertModel.from_pretrained(out).eval()
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, reloaded(ids).last_hidden_state)


def test_minilm_embeddings_are_identical(client: Client, minilm_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    info = client.push(minilm_dir, "sentence-transformers/all-MiniLM-L6-v2:v1")
    assert info.bytes_stored < info.bytes_raw
    out = tmp_path / "minilm"
    client.pull("sentence-transformers/all-MiniLM-L6-v2:v1", out)
    sentences = [
        "A model store ships weights to many GPUs.",
        "The quick brown fox jumps over the lazy dog.",
        "Compression must never change what the model computes.",
        "Edge devices pull models over flaky links.",
    ]
    original = SentenceTransformer(str(minilm_dir), device="cpu").encode(sentences, convert_to_tensor=True)
    pulled = SentenceTransformer(str(out), device="cpu").encode(sentences, convert_to_tensor=True)
    assert torch.equal(original, pulled)


def test_torch_state_dict_source(client: Client, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 32, generator=gen)
    sd = {"layer.weight": weight, "layer.bias": torch.randn(64, generator=gen), "tied.weight": weight}
    src = tmp_path / "pytorch_model.bin"
    torch.save(sd, src)
    info = client.push(src, "test/torch:v1")
    assert info.tensors == 3
    out = tmp_path / "out"
    client.pull("test/torch:v1", out)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]  # converted, HF naming
    back = load_file(str(out / "model.safetensors"))
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k])


def test_torch_pickle_with_code_is_refused(client: Client, tmp_path: Path, root: Path) -> None:
    import collections

    src = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "obj": collections.Counter(a=1)}, src)
    from mzstore.errors import FormatError

    with pytest.raises(FormatError, match=r"evil\.pt"):
        client.push(src, "test/evil:v1")
    assert client.ls() == []


def test_tag_ls_rm(client: Client, all_dtypes_file: Path) -> None:
    info = client.push(all_dtypes_file, "team/m:v1")
    assert client.tag("team/m:v1", "team/m:prod") == ("team/m:prod", info.digest)
    assert client.ls() == [("team/m", "prod", info.digest), ("team/m", "v1", info.digest)]
    assert client.ls("team/m") == client.ls()
    # A digest reference resolves without a tag.
    _, digest, _ = client.manifest(f"team/m@{info.digest}")
    assert digest == info.digest
    assert client.rm("team/m:v1") == ("team/m:v1", info.digest)
    assert client.ls("team/m") == [("team/m", "prod", info.digest)]
    from mzstore.errors import NotFound

    with pytest.raises(NotFound):
        client.manifest("team/m:v1")
    with pytest.raises(NotFound):
        client.rm("team/m:v1")


def test_name_that_clashes_with_a_tag_path_is_refused(client: Client, all_dtypes_file: Path) -> None:
    from mzstore.errors import Conflict

    client.push(all_dtypes_file, "org/m:latest")
    with pytest.raises(Conflict):
        client.push(all_dtypes_file, "org/m/latest:v1")
    client.push(all_dtypes_file, "org/n/sub:v1")
    with pytest.raises(Conflict):
        client.tag("org/n/sub:v1", "org/n:sub")
    assert [(n, t) for n, t, _ in client.ls()] == [("org/m", "latest"), ("org/n/sub", "v1")]


def test_module_level_helpers(server, all_dtypes_file: Path, tmp_path: Path) -> None:
    import mzstore

    info = mzstore.push(all_dtypes_file, "org/helpers:v1", server=server.address)
    sd = mzstore.load_state_dict("org/helpers:v1", server=server.address)
    assert len(sd) == info.tensors
    pulled = mzstore.pull("org/helpers:v1", tmp_path / "o", server=server.address)
    assert pulled.digest == info.digest


def test_rows_larger_than_a_chunk_and_sub_byte_dtypes_round_trip(small_client: Client, tmp_path: Path) -> None:
    import struct

    gen = torch.Generator().manual_seed(11)
    wide = torch.randn(3, 50_000, generator=gen)  # 200 KB rows > 64 KiB chunks
    fp4 = torch.randint(0, 256, (150_000,), dtype=torch.uint8, generator=gen).numpy().tobytes()  # F4 [100000, 3]
    wide_bytes = wide.numpy().tobytes()
    header = {
        "wide": {"dtype": "F32", "shape": [3, 50_000], "data_offsets": [0, len(wide_bytes)]},
        "fp4": {"dtype": "F4", "shape": [100_000, 3], "data_offsets": [len(wide_bytes), len(wide_bytes) + len(fp4)]},
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    src = tmp_path / "odd.safetensors"
    src.write_bytes(struct.pack("<Q", len(text)) + text + wide_bytes + fp4)

    info = small_client.push(src, "test/odd:v1")
    _, _, manifest = small_client.manifest("test/odd:v1")
    chunks = {t.name: t.chunks for t in manifest.tensors}
    assert max(c.raw_length for t in chunks.values() for c in t) <= 64 * 1024
    assert len(chunks["wide"]) > 3 and len(chunks["fp4"]) > 1
    out = tmp_path / "out"
    small_client.pull("test/odd:v1", out)
    assert _sha(out / "odd.safetensors") == _sha(src)
    assert info.tensors == 2
    # F4 has no torch dtype: loading to memory says so clearly, before fetching anything.
    from mzstore.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="F4"):
        small_client.load_state_dict("test/odd:v1")


def test_a_shard_written_once_that_fails_leaves_nothing(
    client: Client, all_dtypes_file: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push whose shard (written once, hashed on its own thread) cannot be hashed fails cleanly:
    no blob, no manifest, no ref, no spool or staged file; the next push works."""
    from mzstore.errors import MzstoreError
    from mzstore.push import shards

    monkeypatch.setattr(shards, "DIRECT_MIN_BYTES", 0)
    real = Store.adopt_blob

    def failing(self: Store, path: Path) -> tuple[str, object]:
        raise OSError(5, "the disk went away while the shard was read back")

    monkeypatch.setattr(Store, "adopt_blob", failing)
    with pytest.raises(MzstoreError):
        client.push(all_dtypes_file, "test/failed:v1")
    assert [p for p in root.rglob("*") if p.is_file() and "tmp" not in p.relative_to(root).parts] == []
    assert not [p for p in (root / "tmp").rglob("*") if p.is_file() and p.suffix in (".spool", ".part")]
    monkeypatch.setattr(Store, "adopt_blob", real)
    info = client.push(all_dtypes_file, "test/ok:v1")
    assert client.pull("test/ok:v1", root.parent / "out").digest == info.digest


def test_a_push_written_once_cuts_a_small_last_shard(
    client: Client, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard written once can only be hashed once sealed, so a large push seals early when the raw bytes
    left are at most the shard's stored bytes, and the next shard again: the last shard (whose hash is the
    push's tail) is small, and the ones before are hashed while the rest arrives. The files still round-trip
    byte for byte."""
    from mzstore.push import shards

    def six(seed: int) -> Path:
        path = tmp_path / f"six{seed}.safetensors"
        gen = torch.Generator().manual_seed(seed)
        save_file({f"t{i}": torch.randn(1024, 1024, generator=gen) for i in range(6)}, str(path))  # 4 MiB each
        return path

    monkeypatch.setattr(shards, "DIRECT_MIN_BYTES", 0)
    assert client.push(six(1), "test/tail:one").shards == 1  # the shard is under TAIL_MIN_BYTES: no early cut
    src = six(2)
    monkeypatch.setattr(shards, "TAIL_MIN_BYTES", 0)
    info = client.push(src, "test/tail:v1")
    manifest = parse_manifest(Store(root).get_manifest(info.digest))
    by_blob: dict[str, list[str]] = {}
    for t in manifest.tensors:
        for c in t.chunks:
            by_blob.setdefault(c.blob, []).append(t.name)
    # Each tensor stores about 3.4 of its 4 MiB: after t3, 8 MiB are left for a 13.6 MiB shard (cut); the
    # next shard is cut by its last tensor.
    groups = sorted(by_blob.values(), key=lambda names: names[0])
    assert info.shards == 2 and groups == [["t0", "t1", "t2", "t3"], ["t4", "t5"]]
    out = client.pull("test/tail:v1", tmp_path / "out")
    assert Path(out.files[0]).read_bytes() == src.read_bytes()
