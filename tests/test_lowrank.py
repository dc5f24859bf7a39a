"""The lowrank stage: a truncated SVD per chunk, factors exact or int8, decoded with the same bits everywhere."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mzstore.client import Client
from mzstore.codecs.lossless import LosslessCodec
from mzstore.codecs.policy import LowRank, Quant, Spec, parse_policy
from mzstore.codecs.quant import (
    QuantCodec,
    _top_energy_may_reach,
    encode_auto,
    encode_spec,
    expand,
    lowrank_product,
    unpack,
)
from mzstore.errors import CodecError, InvalidArgument
from mzstore.format.dtypes import DTYPES
from mzstore.pull.device import torch_expand

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _low_rank(rows: int, cols: int, rank: int, noise: float = 1e-4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) * 0.02
    return (x + rng.standard_normal((rows, cols)) * noise).astype(np.float32)


def _raw(x: np.ndarray, dtype: str) -> bytes:
    return torch.from_numpy(x).to(TORCH[dtype]).reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("lowrank:energy=0.99", Spec(lowrank=LowRank(energy=0.99))),
        ("lowrank:rank=16", Spec(lowrank=LowRank(rank=16))),
        ("lowrank:energy=0.999,int8", Spec(quant=Quant("int8"), lowrank=LowRank(energy=0.999))),
    ],
)
def test_policy(text: str, spec: Spec) -> None:
    policy = parse_policy(text)
    assert policy.spec == spec and policy.text == text and policy.lossy


@pytest.mark.parametrize(
    "text",
    ["lowrank", "lowrank:energy=1", "lowrank:energy=0", "lowrank:rank=0", "lowrank:rank=x", "lowrank:rank=99999",
     "lowrank:bits=3", "lowrank:rank=4,int4", "lowrank:rank=4,fp8", "int8,lowrank:rank=4", "prune:0.5,lowrank:rank=4",
     "lowrank:rank=4,lowrank:rank=8"],
)  # fmt: skip
def test_bad_policies(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_policy(text)


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
@pytest.mark.parametrize("text", ["lowrank:energy=0.9999", "lowrank:rank=8", "lowrank:energy=0.9999,int8"])
def test_a_low_rank_matrix_is_stored_small_and_decodes_the_same_everywhere(dtype: str, text: str) -> None:
    x = _low_rank(96, 160, 8)
    raw = _raw(x, dtype)
    enc = encode_spec(raw, DTYPES[dtype], 96, parse_policy(text).spec)
    assert enc.params["rank"] == 8 and enc.params["spec"] == text
    lossless = len(LosslessCodec().encode(raw, DTYPES[dtype])[0])
    assert len(enc.payload) < 0.4 * lossless
    assert enc.stats.cosine > 0.999
    c = unpack(enc.payload, len(raw), DTYPES[dtype])
    assert np.array_equal(expand(c, DTYPES[dtype]), enc.decoded)
    assert np.array_equal(QuantCodec().decode(enc.payload, DTYPES[dtype], len(raw)), enc.decoded)
    assert np.array_equal(torch_expand(c, dtype, torch.device("cpu")).numpy(), enc.decoded)


def test_the_product_is_summed_in_order() -> None:
    """Not a BLAS matmul: one rounded multiply and add per rank term, so torch gives the same bits."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((40, 12)).astype(np.float32)
    b = rng.standard_normal((12, 50)).astype(np.float32)
    y = lowrank_product(a, b)
    ref = np.zeros((40, 50), np.float32)
    for k in range(12):
        ref = (ref + (a[:, k : k + 1] * b[k : k + 1, :]).astype(np.float32)).astype(np.float32)
    assert np.array_equal(y, ref)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t = torch.zeros(40, 50)
    for k in range(12):
        t.add_(ta[:, k : k + 1] * tb[k : k + 1, :])
    assert np.array_equal(t.numpy(), y)


def test_auto_uses_lowrank_only_where_it_is_smaller() -> None:
    low = _low_rank(128, 256, 4, noise=1e-6)
    enc = encode_auto(low.tobytes(), DTYPES["F32"], 128, 0.99)
    assert enc.params["spec"].startswith("lowrank:rank=") and enc.params["rank"] <= 8
    full = (np.random.default_rng(1).standard_normal((128, 256)) * 0.02).astype(np.float32)
    enc = encode_auto(full.tobytes(), DTYPES["F32"], 128, 0.99)
    assert not enc.params.get("spec", "").startswith("lowrank")
    servable = encode_auto(low.tobytes(), DTYPES["F32"], 128, 0.99, servable=True)
    assert not servable.params.get("spec", "").startswith("lowrank")


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(2, 40),
    decay=st.floats(0.0, 3.0),
    energy=st.floats(0.5, 0.999),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_energy_bound_never_rules_out_a_rank_that_reaches_it(
    m: int, decay: float, energy: float, seed: int
) -> None:
    """auto skips the eigenvalues only when no rank up to k can keep the energy: whenever the bound says
    "cannot", the true top-k eigenvalues fall short; and it does rule out some flat spectra."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, 3 * m)) * np.exp(-decay * np.arange(m))[:, None]  # decaying spectra too
    gram = x @ x.T
    eig = np.sort(np.linalg.eigvalsh(gram))[::-1]
    for k in range(0, m + 1):
        if not _top_energy_may_reach(gram, k, energy):
            assert eig[:k].sum() < energy * eig.sum(), (k, eig[:k].sum() / eig.sum())
    flat = rng.standard_normal((40, 400))
    assert not _top_energy_may_reach(flat @ flat.T, 10, 0.95)


def _with_header(payload: bytes, **fields: int) -> bytes:
    head = struct.Struct("<4sBBHQQB3x")
    magic, method, pruned, group, rows, cols, n = head.unpack_from(payload, 0)
    values = {"method": method, "pruned": pruned, "group": group, "rows": rows, "cols": cols, "n": n} | fields
    out = head.pack(
        magic, values["method"], values["pruned"], values["group"], values["rows"], values["cols"], values["n"]
    )
    return out + payload[head.size :]


def test_malformed_payloads_are_refused() -> None:
    x = _low_rank(32, 48, 4)
    for text in ("lowrank:rank=4", "lowrank:rank=4,int8"):
        enc = encode_spec(x.tobytes(), DTYPES["F32"], 32, parse_policy(text).spec)
        for bad in (
            _with_header(enc.payload, group=0),
            _with_header(enc.payload, group=33),
            _with_header(enc.payload, pruned=1),
            _with_header(enc.payload, group=5),  # the factors no longer have the sizes the rank says
            enc.payload + b"\0",
            enc.payload[:-3],
        ):
            with pytest.raises(CodecError):
                expand(unpack(bad, x.nbytes, DTYPES["F32"]), DTYPES["F32"])


@pytest.mark.parametrize("policy", ["lowrank:energy=0.999", "lowrank:rank=6,int8"])
def test_push_pull_and_device_agree(small_client: Client, tmp_path, policy: str) -> None:
    from safetensors.torch import save_file

    src = tmp_path / "src"
    src.mkdir()
    tensors = {
        "layers.0.proj.weight": torch.from_numpy(_low_rank(256, 128, 6)).to(torch.bfloat16),
        "layers.0.proj.bias": torch.zeros(256),
    }
    save_file(tensors, str(src / "model.safetensors"))
    small_client.push(src, "lr/m:v1", codec=policy)
    _, _, m = small_client.manifest("lr/m:v1")
    (t,) = [t for t in m.tensors if t.name == "layers.0.proj.weight"]
    assert t.codec == policy and all(c.params["spec"] == policy for c in t.chunks)
    host = small_client.load_state_dict("lr/m:v1")
    device = small_client.load_state_dict("lr/m:v1", expand_on_device=True)
    out = tmp_path / "out"
    small_client.pull("lr/m:v1", out)
    from safetensors.torch import load_file

    pulled = load_file(str(out / "model.safetensors"))
    for name in tensors:
        assert torch.equal(host[name].view(torch.uint8), device[name].view(torch.uint8)), name
        assert torch.equal(host[name].view(torch.uint8), pulled[name].view(torch.uint8)), name
    cos = torch.nn.functional.cosine_similarity(
        host["layers.0.proj.weight"].float().reshape(-1), tensors["layers.0.proj.weight"].float().reshape(-1), dim=0
    )
    assert float(cos) > 0.999
