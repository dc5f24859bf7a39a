"""ECSQ: the codec (numpy reference, native core, torch expansion), the bit allocation and its checks."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_llama, start_serve, stop_serve, store_files
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.codecs import native
from mzstore.codecs.allocation import (
    MULTIPLIER_RANGE,
    Allocation,
    TensorSample,
    allocate,
    multipliers,
    role_of,
    role_sensitivities,
    sample_rows,
)
from mzstore.codecs.policy import Ecsq, Quant, Spec, parse_policy
from mzstore.codecs.quant import (
    S_CODES,
    S_HIGH,
    S_SCALES,
    S_TABLE,
    auto_ecsq_step,
    encode_spec,
    expand,
    to_f32,
    unpack,
)
from mzstore.errors import CodecError, InvalidArgument
from mzstore.format.dtypes import DTYPES
from mzstore.pull.device import torch_expand
from mzstore.push.upload import begin_for

CORE = native.core


def _matrix(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_t(4, size=(rows, cols)) * 0.02).astype(np.float32)


def _raw(x: np.ndarray, dtype: str) -> bytes:
    return (
        torch.from_numpy(x)
        .to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype])
        .view(torch.uint8)
        .numpy()
        .tobytes()
        if dtype != "F32"
        else x.tobytes()
    )


def _encode(x: np.ndarray, dtype: str, step: float):
    return encode_spec(_raw(x, dtype), DTYPES[dtype], x.shape[0], Spec(quant=Quant("ecsq", step=step)))


# --- the policy -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "target", "value"),
    [("ecsq:size=0.14", "size", 0.14), ("ecsq:cos=0.995", "cos", 0.995), ("ecsq:step=0.25", "step", 0.25)],
)
def test_policy_parses(text: str, target: str, value: float) -> None:
    policy = parse_policy(text)
    assert policy.ecsq == Ecsq(target, value) and policy.lossy and policy.text == text
    assert policy.mode_for("w", "F32", (64, 64)) == Spec(quant=Quant("ecsq", step=value if target == "step" else 1.0))
    assert policy.mode_for("w.bias", "F32", (64, 64)) == "lossless"
    steps = policy.with_steps({"w": 0.5})
    assert steps.mode_for("w", "F32", (64, 64)) == Spec(quant=Quant("ecsq", step=0.5))
    with pytest.raises(InvalidArgument, match="no step for tensor 'v'"):
        steps.mode_for("v", "F32", (64, 64))


@pytest.mark.parametrize(
    "text",
    [
        "ecsq",
        "ecsq:size",
        "ecsq:size=0",
        "ecsq:size=1.5",
        "ecsq:cos=1",
        "ecsq:cos=0.2",
        "ecsq:step=0",
        "ecsq:step=100",
        "ecsq:bits=3",
        "ecsq:size=0.1,int8",
        "prune:0.5,ecsq:size=0.2",
        "ecsq:size=nan",
    ],
)
def test_bad_policies_are_refused(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_policy(text)


def test_steps_out_of_range_are_refused() -> None:
    policy = parse_policy("ecsq:size=0.2")
    for bad in (0.0, -1.0, 1e9, math.nan, math.inf):
        with pytest.raises(InvalidArgument):
            policy.with_steps({"w": bad})


# --- the codec --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("step", [0.01, 0.2, 1.5])
def test_round_trip_and_error_follow_the_step(dtype: str, step: float) -> None:
    x = _matrix(96, 200)
    x[7] = 0  # an all-zero row stays exactly zero
    enc = _encode(x, dtype, step)
    c = unpack(enc.payload, len(_raw(x, dtype)), DTYPES[dtype])
    assert (S_HIGH in c.sections) == (step == 0.01)  # |q| >= 128 needs the second byte plane
    assert len(c.sections[S_TABLE]) == 256 * (1 + (int(c.sections[S_HIGH].max()) if S_HIGH in c.sections else 0))
    y = to_f32(expand(c, DTYPES[dtype]), DTYPES[dtype]).reshape(x.shape)
    assert np.array_equal(expand(c, DTYPES[dtype]), enc.decoded)
    assert (y[7] == 0).all()
    xs = to_f32(_raw(x, dtype), DTYPES[dtype]).reshape(x.shape)
    rel = float(((xs - y) ** 2).sum() / (xs**2).sum())
    # Uniform quantization of rows scaled to unit RMS: relative error about step^2 / 12 (less: bin means).
    assert rel < step**2 / 12 * 1.2 + (2e-5 if dtype != "F32" else 0)
    assert rel > step**2 / 12 * 0.3 or step == 0.01
    x64, y64 = xs.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    cos = float(x64 @ y64 / np.linalg.norm(x64) / np.linalg.norm(y64))
    assert enc.stats.cosine == pytest.approx(cos, abs=1e-9)


def test_entropy_coding_spends_bits_where_values_are() -> None:
    """Coarser steps cost fewer bits; above 2 bits per symbol the stored symbols come within 6 % of their
    entropy plus the side data. (zstd codes literals with Huffman, at least one bit per symbol: at 1.5
    bits of entropy it spends 45 % more, the known cost of the coder at very low rates.)"""
    x = _matrix(256, 512)
    sizes = []
    for step in (0.3, 0.6, 1.5):
        enc = _encode(x, "F32", step)
        c = unpack(enc.payload, x.nbytes, DTYPES["F32"])
        assert S_HIGH not in c.sections
        z = c.sections[S_CODES].astype(np.int64)
        p = np.bincount(z) / z.size
        entropy = -(p[p > 0] * np.log2(p[p > 0])).sum() * z.size / 8
        side = 256 * 2 + 2 * x.shape[0] + 200
        if step < 1:
            assert len(enc.payload) < entropy * 1.06 + side
        sizes.append(len(enc.payload))
    assert sizes[0] > sizes[1] > sizes[2]


def test_tiny_and_huge_rows_use_f32_scales() -> None:
    x = _matrix(16, 64)
    x[0] *= 1e-9  # an RMS below f16's normal range
    x[1] *= 1e7  # and one above it
    enc = _encode(x, "F32", 0.2)
    c = unpack(enc.payload, x.nbytes, DTYPES["F32"])
    assert c.sections[S_SCALES].dtype == np.float32
    y = to_f32(enc.decoded, DTYPES["F32"]).reshape(x.shape)
    for r in (0, 1, 5):
        assert float(np.dot(x[r], y[r]) / np.linalg.norm(x[r]) / np.linalg.norm(y[r])) > 0.99


def _payload_with(payload: bytes, sid: int, body: bytes) -> bytes:
    """Rebuild a quantized payload with section ``sid`` replaced by raw ``body`` (coding 0)."""
    import struct

    head = struct.Struct("<4sBBHQQB3x")
    sec = struct.Struct("<BBQQ")
    magic, method, pruned, group, rows, cols, n = head.unpack_from(payload, 0)
    pos = head.size + n * sec.size
    sections = []
    for i in range(n):
        s, coding, stored, raw = sec.unpack_from(payload, head.size + i * sec.size)
        sections.append((s, coding, raw, payload[pos : pos + stored]))
        pos += stored
    out_heads, out_bodies = [], []
    for s, coding, raw, data in sections:
        if s == sid:
            coding, raw, data = 0, len(body), body
        out_heads.append(sec.pack(s, coding, len(data), raw))
        out_bodies.append(data)
    return b"".join([head.pack(magic, method, pruned, group, rows, cols, n), *out_heads, *out_bodies])


def test_malformed_payloads_are_refused() -> None:
    x = _matrix(32, 64)
    x[3, 5] = 3.0  # an outlier: the high plane exists
    enc = _encode(x, "F32", 0.01)
    c = unpack(enc.payload, x.nbytes, DTYPES["F32"])
    pages = len(c.sections[S_TABLE]) // 256
    high = c.sections[S_HIGH].copy()
    cases = {
        "high byte beyond the table": _payload_with(enc.payload, S_HIGH, np.full_like(high, pages).tobytes()),
        "short high plane": _payload_with(enc.payload, S_HIGH, high[:-1].tobytes()),
        "partial table page": _payload_with(enc.payload, S_TABLE, np.zeros(300, np.float16).tobytes()),
        "infinite table value": _payload_with(enc.payload, S_TABLE, np.full(256 * pages, np.inf, np.float16).tobytes()),
    }
    low = _encode(_matrix(32, 64), "F32", 0.5)
    cases["unreachable table page"] = _payload_with(low.payload, S_TABLE, np.zeros(512, np.float16).tobytes())
    for what, payload in cases.items():
        with pytest.raises(CodecError):
            unpack(payload, x.nbytes, DTYPES["F32"])
        assert what


@pytest.mark.skipif(CORE is None, reason="the native core is not built")
@pytest.mark.parametrize("dtype", ["F32", "BF16"])
@pytest.mark.parametrize("step", [0.01, 0.3])
def test_native_expansion_is_the_numpy_reference(dtype: str, step: float, monkeypatch: pytest.MonkeyPatch) -> None:
    x = _matrix(64, 300, seed=3)
    enc = _encode(x, dtype, step)
    c = unpack(enc.payload, len(_raw(x, dtype)), DTYPES[dtype])
    fast = expand(c, DTYPES[dtype])
    monkeypatch.setattr(native, "core", None)
    assert np.array_equal(fast, expand(c, DTYPES[dtype]))


@pytest.mark.skipif(CORE is None, reason="the native core is not built")
def test_native_core_refuses_codes_beyond_the_table() -> None:
    """The core checks what unpack checks, so a caller that skips unpack cannot read past the table."""
    rows, cols = 4, 8
    out = np.empty(rows * cols * 4, np.uint8)
    codes = np.zeros(rows * cols, np.uint8)
    scales = np.ones(rows, np.float32)
    table = np.zeros(256, np.float32)
    core = CORE
    assert core is not None
    core.expand(3, codes, scales, b"", table, rows, cols, 1, out, 0)
    with pytest.raises(ValueError, match="beyond its table"):
        core.expand(3, codes, scales, np.ones(rows * cols, np.uint8), table, rows, cols, 1, out, 0)
    with pytest.raises(ValueError, match="do not match"):
        core.expand(3, codes, scales, b"", np.zeros(512, np.float32), rows, cols, 1, out, 0)


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_torch_expansion_is_bit_identical(dtype: str) -> None:
    x = _matrix(48, 130, seed=9)
    x[1, 1] = 2.0
    for step in (0.01, 0.4):
        enc = _encode(x, dtype, step)
        c = unpack(enc.payload, len(_raw(x, dtype)), DTYPES[dtype])
        on_device = torch_expand(c, dtype, torch.device("cpu")).numpy()
        assert np.array_equal(on_device, enc.decoded)


def test_auto_step_meets_the_chunk_target() -> None:
    x = _matrix(128, 256, seed=2)
    for target in (0.99, 0.999, 0.9999):
        enc = _encode(x, "F32", auto_ecsq_step(target))
        assert enc.stats.cosine >= target - (1 - target) * 0.5


# --- the allocation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("encoder.layer.0.attention.self.query.weight", "q"),
        ("encoder.layer.3.attention.self.value.weight", "v"),
        ("encoder.layer.3.attention.output.dense.weight", "attn_out"),
        ("encoder.layer.3.intermediate.dense.weight", "ffn_in"),
        ("encoder.layer.3.output.dense.weight", "ffn_out"),
        ("embeddings.word_embeddings.weight", "embed"),
        ("embeddings.position_embeddings.weight", "position"),
        ("model.layers.0.self_attn.k_proj.weight", "k"),
        ("model.layers.0.self_attn.o_proj.weight", "attn_out"),
        ("model.layers.0.mlp.gate_proj.weight", "ffn_in"),
        ("model.layers.0.mlp.down_proj.weight", "ffn_out"),
        ("model.embed_tokens.weight", "embed"),
        ("lm_head.weight", "head"),
        ("bert.pooler.dense.weight", "pooler"),
        ("transformer.h.0.attn.c_attn.weight", "qkv"),
        ("transformer.h.0.mlp.c_proj.weight", "ffn_out"),
        ("transformer.wte.weight", "embed"),
        ("conv1.weight", None),
    ],
)
def test_roles_by_name(name: str, role: str | None) -> None:
    assert role_of(name) == role


def _samples(n: int = 4) -> list[TensorSample]:
    out = []
    for i in range(n):
        x = _matrix(64 * (i + 1), 128, seed=i)
        out.append(
            TensorSample(
                f"layers.{i}.mlp.up_proj.weight" if i % 2 else f"layers.{i}.self_attn.q_proj.weight",
                x.size,
                x.shape[0],
                sample_rows(x),
            )
        )
    return out


def test_multipliers_are_normalized_and_clamped() -> None:
    samples = _samples()
    sens = {s.name: 10.0 ** (i - 1) for i, s in enumerate(samples)}
    sens[samples[0].name] = 1e-9  # an unused tensor: clamped, not infinite
    m = multipliers(samples, sens)
    numel = np.array([s.numel for s in samples], float)
    logs = np.log([m[s.name] for s in samples])
    assert m[samples[0].name] == MULTIPLIER_RANGE[1]
    unclamped = [i for i, s in enumerate(samples) if MULTIPLIER_RANGE[0] < m[s.name] < MULTIPLIER_RANGE[1]]
    assert unclamped
    # More sensitive per parameter → finer step.
    assert m[samples[3].name] < m[samples[2].name]
    assert abs(float((logs * numel).sum() / numel.sum())) < 2.1  # only the clamp moves the mean off 0


@pytest.mark.parametrize("target", [0.1, 0.14, 0.2])
def test_size_bisection_predicts_what_is_stored(target: float) -> None:
    """The global step found for ``size=S`` gives a predicted size of S, and encoding lands within 3 %."""
    tensors = {f"layers.{i}.mlp.up_proj.weight": _matrix(512, 256, seed=i) for i in range(3)}
    samples = [TensorSample(n, x.size, x.shape[0], sample_rows(x)) for n, x in tensors.items()]
    raw = sum(x.nbytes for x in tensors.values())
    sens = role_sensitivities(list(tensors))
    assert sens is not None
    alloc = allocate(samples, sens, "roles", Ecsq("size", target), kept_bytes=0, raw_bytes=raw)
    assert alloc.predicted_size == pytest.approx(target, rel=0.01)
    stored = sum(len(_encode(x, "F32", alloc.steps[n]).payload) for n, x in tensors.items())
    assert stored / raw == pytest.approx(target, rel=0.03)


def test_cos_bisection_is_monotonic() -> None:
    samples = _samples()
    sens = role_sensitivities([s.name for s in samples])
    assert sens is not None
    steps = [
        allocate(samples, sens, "roles", Ecsq("cos", c), kept_bytes=0, raw_bytes=1).step for c in (0.9, 0.99, 0.999)
    ]
    assert steps[0] > steps[1] > steps[2]
    fixed = allocate(samples, sens, "roles", Ecsq("step", 0.5), kept_bytes=0, raw_bytes=1)
    assert fixed.step == 0.5


def test_allocation_json_round_trip_and_validation() -> None:
    a = Allocation("roles", "size=0.14", 0.2, {"w": 0.3, "v": 0.1}, 0.14, 0.99)
    assert Allocation.from_json(a.to_json()) == a
    good = json.loads(a.to_json())
    bad_cases = [
        "not json",
        json.dumps({**good, "source": "magic"}),
        json.dumps({**good, "steps": {"w": -1}}),
        json.dumps({**good, "steps": {"w": True}}),
        json.dumps({**good, "steps": ["w"]}),
        json.dumps({**good, "step": 1e6}),
        json.dumps({**good, "predicted_cos": 2}),
        json.dumps({**good, "target": "x" * 100}),
        '{"source": "roles", "steps": {"w": NaN}, "step": 0.2, "target": "size=0.1"}',
    ]
    for text in bad_cases:
        with pytest.raises(InvalidArgument):
            Allocation.from_json(text)
    with pytest.raises(InvalidArgument, match="larger"):
        Allocation.from_json(a.to_json(), max_bytes=10)


# --- the push ------------------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(128, 256, generator=gen) * 0.05,
        "model.layers.0.self_attn.v_proj.weight": torch.randn(128, 256, generator=gen) * 0.05,
        "model.layers.0.mlp.down_proj.weight": (torch.randn(256, 128, generator=gen) * 0.05).to(torch.bfloat16),
        "model.embed_tokens.weight": torch.randn(512, 256, generator=gen) * 0.02,
        "model.norm.weight": torch.ones(256),
    }
    path = tmp_path / "src"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_server_refuses_an_allocation_that_misses_a_tensor(client: Client, root: Path, model_dir: Path) -> None:
    """A client that sends steps for some tensors only gets a clear error; no ref is written."""
    from mzstore.codecs.policy import parse_policy
    from mzstore.push.allocate import plan_allocation
    from mzstore.push.source import open_source
    from mzstore.push.upload import push_streamed

    src = open_source(model_dir)
    alloc = plan_allocation(src, parse_policy("ecsq:size=0.2"))
    del alloc.steps["model.layers.0.self_attn.v_proj.weight"]
    begin = begin_for(src, "m/x:v1", "ecsq:size=0.2", allocation=alloc.to_json())
    with pytest.raises(InvalidArgument, match=re.escape("no step for tensor 'model.layers.0.self_attn.v_proj.weight'")):
        push_streamed(client.transport, src, begin)
    assert client.ls() == []
    before = store_files(root)
    alloc.steps["model.layers.0.self_attn.v_proj.weight"] = 1e9
    with pytest.raises(InvalidArgument):
        push_streamed(client.transport, src, begin_for(src, "m/x:v1", "ecsq:size=0.2", allocation=alloc.to_json()))
    assert store_files(root) == before


def test_same_file_under_another_allocation_is_encoded_again(client: Client, model_dir: Path) -> None:
    """File reuse is keyed on the allocation too: a new target re-encodes, the same one reuses."""
    a = client.push(model_dir, "m/x:a", codec="ecsq:size=0.2")
    b = client.push(model_dir, "m/x:b", codec="ecsq:size=0.3")
    c = client.push(model_dir, "m/x:c", codec="ecsq:size=0.2")
    assert b.digest != a.digest and b.bytes_stored > a.bytes_stored
    assert c.digest == a.digest


def test_keep_quantized_refuses_an_ecsq_model_with_the_reason(client: Client, model_dir: Path, tmp_path: Path) -> None:
    """compressed-tensors has no entropy-coded scheme: an all-ECSQ model has nothing to keep quantized."""
    (model_dir / "config.json").write_text("{}")
    client.push(model_dir, "m/x:v1", codec="ecsq:size=0.2")
    out = tmp_path / "kq"
    with pytest.raises(InvalidArgument, match="no Linear weight is stored quantized") as info:
        client.pull("m/x:v1", out, keep_quantized=True)
    assert not out.exists() or not any(out.iterdir())
    from mzstore.pull.compressed_tensors import plan_export

    _, _, manifest = client.manifest("m/x:v1")
    notes = {p.entry.name: p.note for p in plan_export(manifest).tensors if p.action == "dense"}
    assert notes["model.layers.0.self_attn.q_proj.weight"] == "ecsq (entropy-coded) has no compressed-tensors scheme"
    assert "written dequantized" in str(info.value)


def test_cli_push_reports_the_allocation(tmp_path: Path, model_dir: Path) -> None:
    address, proc = start_serve(tmp_path / "data", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        env = {"MZSTORE_SERVER": address, "PATH": "/usr/bin:/bin", "MZSTORE_HOME": str(tmp_path / "home")}
        cmd = [sys.executable, "-m", "mzstore.cli", "push", str(model_dir), "m/x:v1", "--codec", "ecsq:size=0.2"]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "ecsq allocation by roles: size=0.2" in result.stdout
        # --probe on a directory transformers cannot build: the role table runs, and the report says why.
        result = subprocess.run([*cmd, "--probe", "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        info = json.loads(result.stdout)
        assert info["allocation"]["source"] == "roles"
        assert "probe not run" in info["allocation"]["note"] and "config.json" in info["allocation"]["note"]
    finally:
        stop_serve(proc)


def test_probe_measures_the_model(client: Client, minilm_dir: Path) -> None:
    """push --probe on a Hugging Face directory: sensitivities from random tokens, the measured cosine recorded."""
    info = client.push(minilm_dir, "m/probe:v1", codec="ecsq:cos=0.99", probe=True)
    a = info.allocation
    assert a is not None and a["source"] == "probe" and a["target"] == "cos=0.99"
    assert a["probe_cos"] >= 0.99
    _, _, manifest = client.manifest("m/probe:v1")
    assert manifest.allocation == a
    steps = {t.name: float(t.codec.split("=")[1]) for t in manifest.tensors if t.codec.startswith("ecsq")}
    # The pooler does not reach the last hidden state: the probe measures it as insensitive (coarsest step).
    assert steps["pooler.dense.weight"] == max(steps.values())


def test_names_without_a_role_get_a_uniform_allocation(tmp_path: Path) -> None:
    """No tensor name has a role: every tensor gets the same step, and the allocation says "uniform"."""
    from mzstore.push.allocate import plan_allocation
    from mzstore.push.source import open_source

    gen = torch.Generator().manual_seed(2)
    path = tmp_path / "conv.safetensors"
    save_file({f"conv{i}.weight": torch.randn(64, 3, 3, 32, generator=gen) * 0.1 for i in range(3)}, str(path))
    alloc = plan_allocation(open_source(path), parse_policy("ecsq:size=0.2"))
    assert alloc.source == "uniform"
    assert len(set(alloc.steps.values())) == 1 and set(alloc.steps) == {f"conv{i}.weight" for i in range(3)}
    assert alloc.predicted_size == pytest.approx(0.2, rel=0.01)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer LlamaForCausalLM saved as several safetensors shards with an index (bf16)."""
    out = save_tiny_llama(tmp_path_factory.mktemp("llama"), hidden=128, intermediate=256, max_shard_size="100KB")
    assert len(list(out.glob("*.safetensors"))) > 2
    return out


def test_sharded_model_with_the_probe(client: Client, sharded_llama: Path, tmp_path: Path) -> None:
    """One allocation over every shard; the probe builds the causal LM's base model and maps the file's
    names (``model.`` prefix) to its parameters; ``lm_head``, which that model lacks, keeps its role value."""
    info = client.push(sharded_llama, "llama/m:v1", codec="ecsq:size=0.25", probe=True)
    a = info.allocation
    assert a is not None and a["source"] == "probe", a
    _, _, manifest = client.manifest("llama/m:v1")
    lossy = [t for t in manifest.tensors if t.codec.startswith("ecsq")]
    assert len({t.file for t in lossy}) > 2  # one allocation spans the shards
    assert any(t.name == "lm_head.weight" for t in lossy)
    stored = sum(c.length for t in manifest.tensors for c in t.chunks)
    raw = sum(p.stat().st_size for p in sharded_llama.glob("*.safetensors"))
    assert stored / raw == pytest.approx(0.25, abs=0.02)
    out = tmp_path / "out"
    client.pull("llama/m:v1", out)
    loaded = client.load_state_dict("llama/m:v1")
    from safetensors.torch import load_file

    pulled = {}
    for f in out.glob("*.safetensors"):
        pulled.update(load_file(str(f)))
    assert set(pulled) == set(loaded)
    for name, tensor in loaded.items():
        assert torch.equal(tensor.view(torch.uint8), pulled[name].view(torch.uint8)), name
