"""``pull --keep-quantized``: the compressed-tensors export, checked against the real library.

Models go through a real server (the small-chunk fixtures, so tensors span
several chunks), are exported with :func:`export_keep_quantized`, and are
then decompressed by compressed-tensors itself: its model-free dequantizer
(``convert_checkpoint`` + ``CompressedTensorsDequantizer``, which also
validates that every quantization parameter was consumed) and the
transformers loader (``CompressedTensorsHfQuantizer`` →
``ModelCompressor.decompress_model``). Decompressed weights must be
bit-identical to what a plain mzstore pull returns, and lossless tensors
identical to the original.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import save_tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mzstore.client import Client
from mzstore.errors import IntegrityError, InvalidArgument
from mzstore.format.manifest import Manifest
from mzstore.pull.compressed_tensors import (
    exportable,
    pack_codes,
    pack_zero_points,
    plan_export,
)
from mzstore.pull.keep_quantized import export_keep_quantized

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

LAYER_WEIGHTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer LlamaForCausalLM in bf16 (every projection large enough to be quantized)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def sharded_llama(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same model saved as several safetensors shards with an index."""
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    out = tmp_path_factory.mktemp("sharded-llama")
    model.save_pretrained(out, max_shard_size="1MB")
    assert (out / "model.safetensors.index.json").exists()
    return out


def _linear_model(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A hand-made checkpoint: Linear-style names plus a config.json."""
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "custom", "torch_dtype": "bfloat16"}))
    return path


def _push(client: Client, src: Path, ref: str, codec: str, **kw: Any) -> Manifest:
    info = client.push(src, ref, codec=codec, **kw)
    return client.manifest(info.ref)[2]


def _ct_dequantize(exported: Path, out: Path) -> dict[str, torch.Tensor]:
    """compressed-tensors' own model-free decompression of a checkpoint directory, in f32."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    convert_checkpoint(
        exported, out, CompressedTensorsDequantizer(exported, dtype=torch.float32), max_workers=1, device="cpu"
    )
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Bit equality after casting ``got`` (f32 from compressed-tensors) to ``want``'s dtype."""
    got = got.to(want.dtype) if got.dtype != want.dtype else got
    assert got.shape == want.shape, name
    assert torch.equal(_bits(got), _bits(want)), f"{name} differs"


def _check_against_pull(
    client: Client, ref: str, manifest: Manifest, exported: Path, src: Path, tmp_path: Path
) -> dict[str, str]:
    """Decompress ``exported`` with compressed-tensors; compare every tensor. Returns name → action."""
    plan = {p.entry.name: p.action for p in plan_export(manifest).tensors}
    pulled = client.load_state_dict(ref)
    original = _load_dir(src)
    decompressed = _ct_dequantize(exported, tmp_path / "ct-dequantized")
    assert set(decompressed) == set(original)
    for name, want in pulled.items():
        _assert_same(decompressed[name], want, name)
        if plan[name] == "copy":
            assert torch.equal(_bits(decompressed[name]), _bits(original[name])), name
            assert decompressed[name].dtype == original[name].dtype
    return plan


@pytest.mark.parametrize("codec", ["int4:g128", "int4:g32", "int8", "fp8"])
def test_export_decompresses_bit_identically(
    small_client: Client, tiny_llama: Path, tmp_path: Path, codec: str
) -> None:
    ref = f"test/llama:{codec.replace(':', '-')}"
    manifest = _push(small_client, tiny_llama, ref, codec)
    assert any(len(t.chunks) > 1 for t in manifest.tensors if t.codec == codec)  # rows assembled across chunks
    ok, why = exportable(manifest)
    assert ok, why

    out = tmp_path / "exported"
    files = export_keep_quantized(manifest, small_client.fetch, out)
    assert sorted(p.name for p in files) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not list(out.glob(".mzstore-partial-*"))

    plan = _check_against_pull(small_client, ref, manifest, out, tiny_llama, tmp_path)
    assert {plan[f"model.layers.0.{m}.weight"] for m in LAYER_WEIGHTS} == {"quantized"}
    assert plan["model.embed_tokens.weight"] == plan["lm_head.weight"] == "dense"
    assert plan["model.norm.weight"] == "copy"

    # The on-disk names, dtypes and shapes compressed-tensors and vLLM look for.
    q = "model.layers.0.self_attn.q_proj"
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
        assert f.metadata() == {"format": "pt"}
    assert f"{q}.weight" not in meta or codec == "fp8"
    if codec.startswith("int4"):
        group = int(codec.split(":g")[1])
        assert meta[f"{q}.weight_packed"] == ("I32", [256, 256 // 8])
        assert meta[f"{q}.weight_scale"] == ("F32", [256, 256 // group])
        assert meta[f"{q}.weight_zero_point"] == ("I32", [256 // 8, 256 // group])
        assert meta[f"{q}.weight_shape"] == ("I64", [2])
    elif codec == "int8":
        assert meta[f"{q}.weight_packed"] == ("I32", [256, 256 // 4])
        assert meta[f"{q}.weight_scale"] == ("F32", [256, 1])
        assert f"{q}.weight_zero_point" not in meta
    else:
        assert meta[f"{q}.weight"] == ("F8_E4M3", [256, 256])
        assert meta[f"{q}.weight_scale"] == ("F32", [256, 1])
    assert meta["model.embed_tokens.weight"] == ("BF16", [512, 256])

    # config.json: the original keys, plus a quantization_config compressed-tensors parses back unchanged.
    from compressed_tensors.quantization import QuantizationConfig

    config = json.loads((out / "config.json").read_text())
    source = json.loads((tiny_llama / "config.json").read_text())
    qc = config.pop("quantization_config")
    assert config == source
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == ("naive-quantized" if codec == "fp8" else "pack-quantized")
    assert qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head", "model.embed_tokens"]
    assert list(qc["config_groups"]) == ["group_0"]
    group = qc["config_groups"]["group_0"]
    assert len(group["targets"]) == 2 * 7
    weights = group["weights"]
    want = {
        "int4:g128": (4, "int", False, 128, "group"),
        "int4:g32": (4, "int", False, 32, "group"),
        "int8": (8, "int", True, None, "channel"),
        "fp8": (8, "float", True, None, "channel"),
    }[codec]
    assert (
        weights["num_bits"],
        weights["type"],
        weights["symmetric"],
        weights["group_size"],
        weights["strategy"],
    ) == want
    parsed = QuantizationConfig.model_validate(qc)
    dumped = parsed.model_dump(exclude={"quant_method"})
    assert {k: v for k, v in qc.items() if k in dumped} == json.loads(json.dumps(dumped))


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("codec", ["int4:g64", "int8", "fp8"])
def test_transformers_loads_the_export(client: Client, tiny_llama: Path, tmp_path: Path, codec: str) -> None:
    """transformers' compressed-tensors integration loads and decompresses it to the pulled weights."""
    ref = f"test/llama-hf:{codec.replace(':', '-')}"
    manifest = _push(client, tiny_llama, ref, codec)
    out = tmp_path / "exported"
    done: list[int] = []
    export_keep_quantized(manifest, client.fetch, out, workers=2, progress=done.append)
    chunks = manifest.chunks()
    assert sorted(done) == sorted(c.raw_length for c in chunks)
    config = transformers.utils.quantization_config.CompressedTensorsConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, quantization_config=config, dtype=torch.bfloat16)
    state = model.state_dict()
    pulled = client.load_state_dict(ref)
    for name, want in pulled.items():
        _assert_same(state[name], want, name)


def test_keep_quantized_pulls_go_through_the_cache_and_report_real_counts(
    small_client: Client, tiny_llama: Path, tmp_path: Path
) -> None:
    """The export is a pull like any other: the chunk cache serves a repeat, and the counts are measured."""
    manifest = _push(small_client, tiny_llama, "test/llama:cached", "int8")
    first = small_client.pull("test/llama:cached", tmp_path / "a", keep_quantized=True)
    total = sum(c.length for c in manifest.chunks())
    # every chunk once: fetched, or (identical chunks, e.g. all-ones norms) found in the cache the pull fills
    assert first.bytes_transferred + first.bytes_cached == total and first.bytes_transferred > total // 2
    assert first.chunks == len(manifest.chunks())
    written = sum(Path(f).stat().st_size for f in first.files)
    assert first.bytes_raw == written < manifest.bytes_raw  # the codes, not the dequantized size
    again = small_client.pull("test/llama:cached", tmp_path / "b", keep_quantized=True)
    assert again.bytes_transferred == 0 and again.bytes_cached == total
    for f in first.files:
        rel = Path(f).relative_to(tmp_path / "a")
        assert (tmp_path / "b" / rel).read_bytes() == Path(f).read_bytes(), rel


def test_sharded_checkpoint_index_is_rewritten(small_client: Client, sharded_llama: Path, tmp_path: Path) -> None:
    manifest = _push(small_client, sharded_llama, "test/sharded:v1", "int4:g128")
    out = tmp_path / "exported"
    export_keep_quantized(manifest, small_client.fetch, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    on_disk: dict[str, str] = {}
    total = 0
    for shard in sorted(out.glob("model-*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                on_disk[k] = shard.name
                tensor = f.get_tensor(k)
                total += tensor.numel() * tensor.element_size()
    assert index["weight_map"] == on_disk
    assert index["metadata"]["total_size"] == total
    assert "model.layers.1.mlp.down_proj.weight_packed" in index["weight_map"]
    _check_against_pull(small_client, "test/sharded:v1", manifest, out, sharded_llama, tmp_path)


def test_auto_with_one_spec_per_tensor_exports_mixed_precision(small_client: Client, tmp_path: Path) -> None:
    """auto (servable: no ECSQ) picking fp8 for one module and int8 for another: two config groups."""
    g = np.random.default_rng(0)
    src = _linear_model(
        tmp_path / "src",
        {
            "layers.0.fc1.weight": torch.from_numpy(g.uniform(-1, 1, (256, 256)).astype(np.float32)).bfloat16(),
            "layers.0.fc2.weight": torch.from_numpy(g.standard_t(1.5, (256, 256)).astype(np.float32)).bfloat16(),
            "layers.0.fc2.bias": torch.zeros(256, dtype=torch.bfloat16),
        },
    )
    manifest = _push(small_client, src, "test/mixed:v1", "auto:cos=0.99:servable")
    codecs = {t.name: t.codec for t in manifest.tensors}
    assert codecs["layers.0.fc1.weight"] == "auto:cos=0.99:servable→fp8"
    assert codecs["layers.0.fc2.weight"] == "auto:cos=0.99:servable→int8"
    ok, why = exportable(manifest)
    assert ok, why
    out = tmp_path / "exported"
    export_keep_quantized(manifest, small_client.fetch, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    groups = sorted((g["format"], g["targets"]) for g in qc["config_groups"].values())
    assert groups == [("naive-quantized", ["layers.0.fc1"]), ("pack-quantized", ["layers.0.fc2"])]
    _check_against_pull(small_client, "test/mixed:v1", manifest, out, src, tmp_path)


# --- what is refused, and why ------------------------------------------------------


def _refused(manifest: Manifest, client: Client, out: Path, *needles: str) -> str:
    ok, why = exportable(manifest)
    assert not ok
    for needle in needles:
        assert needle in why, why
    with pytest.raises(InvalidArgument, match="cannot keep this model quantized"):
        export_keep_quantized(manifest, client.fetch, out)
    assert not out.exists() or not any(out.iterdir())
    return why


@pytest.mark.parametrize("codec", ["prune:0.5,int4:g128", "prune:2:4,int8", "prune:0.3"])
def test_pruned_models_are_refused(small_client: Client, tiny_llama: Path, tmp_path: Path, codec: str) -> None:
    manifest = _push(small_client, tiny_llama, "test/pruned:v1", codec)
    why = _refused(manifest, small_client, tmp_path / "out", f"and 13 more: pruned ({codec})")
    assert "no sparse weight format" in why


def test_tensor_with_chunks_of_different_specs_is_refused(small_client: Client, tmp_path: Path) -> None:
    """auto choosing per chunk: uniform rows get fp8, heavy-tailed rows int8 (128 rows per 64 KiB chunk)."""
    g = np.random.default_rng(0)
    rows = np.concatenate([g.uniform(-1, 1, (128, 256)), g.standard_t(1.5, (128, 256))]).astype(np.float32)
    src = _linear_model(tmp_path / "src", {"layers.0.fc1.weight": torch.from_numpy(rows).bfloat16()})
    manifest = _push(small_client, src, "test/auto:v1", "auto:cos=0.99:servable")
    assert manifest.tensors[0].codec == "auto:cos=0.99:servable→fp8+int8"
    _refused(manifest, small_client, tmp_path / "out", "layers.0.fc1.weight: its chunks mix fp8 and int8")


def test_chunk_specs_are_read_from_the_chunks(small_client: Client, tiny_llama: Path) -> None:
    """A tensor partly lossless (as auto can leave it) or of two specs is refused; the reason names it."""
    manifest = _push(small_client, tiny_llama, "test/llama:g128", "int4:g128")
    name = "model.layers.1.mlp.up_proj.weight"
    for other in ({"codec": "lossless", "params": {}}, {"params": {"spec": "int4:g64"}}):
        tensors = [
            replace(t, chunks=[replace(t.chunks[0], **other), *t.chunks[1:]]) if t.name == name else t
            for t in manifest.tensors
        ]
        ok, why = exportable(replace(manifest, tensors=tensors))
        assert not ok
        assert f"{name}: its chunks mix" in why


def test_fused_siblings_with_different_schemes_are_refused(
    small_client: Client, tiny_llama: Path, tmp_path: Path
) -> None:
    manifest = _push(small_client, tiny_llama, "test/keep-k:v1", "int4:g128", keep=["*.k_proj.*"])
    _refused(
        manifest,
        small_client,
        tmp_path / "out",
        "model.layers.0.self_attn: vLLM fuses q_proj/k_proj/v_proj",
        "k_proj=unquantized, q_proj=int4:g128, v_proj=int4:g128",
    )


def test_columns_not_a_multiple_of_the_group_are_refused(small_client: Client, tmp_path: Path) -> None:
    src = _linear_model(tmp_path / "src", {"proj.weight": (torch.randn(64, 200) * 0.02).bfloat16()})
    manifest = _push(small_client, src, "test/cols:v1", "int4:g128")
    _refused(manifest, small_client, tmp_path / "out", "200 columns are not a multiple of the int4 group size 128")


def test_lossless_model_and_model_without_config_are_refused(
    small_client: Client, tiny_llama: Path, tmp_path: Path
) -> None:
    manifest = _push(small_client, tiny_llama, "test/lossless:v1", "lossless")
    _refused(manifest, small_client, tmp_path / "a", "no tensor is stored quantized")
    bare = tmp_path / "bare.safetensors"
    save_file({"proj.weight": torch.randn(128, 128).bfloat16()}, str(bare))
    manifest = _push(small_client, bare, "test/bare:v1", "int8")
    _refused(manifest, small_client, tmp_path / "b", "no top-level config.json")


def test_already_quantized_config_is_refused(small_client: Client, tmp_path: Path) -> None:
    src = _linear_model(tmp_path / "src", {"proj.weight": torch.randn(128, 128).bfloat16()})
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "awq"}}))
    manifest = _push(small_client, src, "test/awq:v1", "int8")
    assert exportable(manifest)[0]  # only config.json's bytes tell
    out = tmp_path / "out"
    with pytest.raises(InvalidArgument, match=r"already has a quantization_config \(awq\)"):
        export_keep_quantized(manifest, small_client.fetch, out)
    assert list(out.iterdir()) == []


# --- verification -------------------------------------------------------------------


def test_corrupt_chunks_are_caught_and_nothing_is_written(
    small_client: Client, tiny_llama: Path, tmp_path: Path
) -> None:
    manifest = _push(small_client, tiny_llama, "test/llama:g128", "int4:g128")
    target = next(t for t in manifest.tensors if t.name == "model.layers.1.mlp.up_proj.weight").chunks[2]
    seen = {"n": 0}

    def fetch(blob: str, offset: int, length: int, *, times: int) -> bytearray:
        """Reads that cover the target chunk (alone, or in a coalesced range read) get its last byte flipped."""
        data = small_client.fetch(blob, offset, length)
        end = target.offset + target.length
        if blob == target.blob and offset <= target.offset and end <= offset + length and seen["n"] < times:
            seen["n"] += 1
            data[end - 1 - offset] ^= 0x01  # a flipped bit in the codes: still decodes, fails the hash
        return data

    out = tmp_path / "out"
    with pytest.raises(IntegrityError, match=r"rows \[256, 384\] of model.layers.1.mlp.up_proj.weight"):
        export_keep_quantized(manifest, lambda b, o, n: fetch(b, o, n, times=100), out)  # every copy is bad
    assert list(out.iterdir()) == []  # no final files, no staging left

    seen["n"] = 0  # corrupted once: the re-fetch is good and the export completes
    export_keep_quantized(manifest, lambda b, o, n: fetch(b, o, n, times=1), out)
    assert seen["n"] == 1
    assert (out / "model.safetensors").exists()

    garbage = tmp_path / "garbage"  # right length, not a payload: refused, never written
    with pytest.raises(IntegrityError, match="does not decode"):
        export_keep_quantized(manifest, lambda b, o, n: bytearray(n), garbage)
    assert list(garbage.iterdir()) == []

    short = tmp_path / "short"
    with pytest.raises(IntegrityError, match="expected"):
        export_keep_quantized(manifest, lambda b, o, n: small_client.fetch(b, o, n)[:-1], short)
    assert list(short.iterdir()) == []


# --- packing against the library's own packer --------------------------------------


@pytest.mark.parametrize(("bits", "cols"), [(4, 256), (4, 200), (4, 3), (8, 256), (8, 130)])
def test_pack_codes_matches_pack_to_int32(bits: int, cols: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    g = np.random.default_rng(bits * cols)
    codes = g.integers(0, 2**bits, (37, cols), dtype=np.uint8)
    ours = pack_codes(codes, bits).view("<i4")
    theirs = pack_to_int32(torch.from_numpy((codes.astype(np.int16) - 2 ** (bits - 1)).astype(np.int8)), bits).numpy()
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("rows", [256, 37, 8, 1])
def test_pack_zero_points_matches_pack_to_int32_along_rows(rows: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    zeros = np.random.default_rng(rows).integers(0, 16, (rows, 4), dtype=np.uint8)
    theirs = pack_to_int32(torch.from_numpy((zeros.astype(np.int16) - 8).astype(np.int8)), 4, packed_dim=0).numpy()
    assert np.array_equal(pack_zero_points(zeros), theirs)
