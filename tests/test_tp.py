"""Tensor-parallel slices: the ranks' slices put back together are the full tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import InvalidArgument
from mzstore.pull.tp import DEFAULT_RULES, rank_range, split_dim


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    h, ffn, vocab = 96, 250, 1003  # odd sizes: uneven splits
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, h, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(h, h, generator=gen),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(h, h, generator=gen),
        "model.layers.0.mlp.gate_proj.weight": torch.randn(ffn, h, generator=gen),
        "model.layers.0.mlp.down_proj.weight": torch.randn(h, ffn, generator=gen),
        "model.layers.0.mlp.down_proj.bias": torch.randn(h, generator=gen),
        "model.layers.0.input_layernorm.weight": torch.ones(h),
        "lm_head.weight": torch.randn(vocab, h, generator=gen).to(torch.bfloat16),
    }
    path = tmp_path / "llama"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("tp_size", [1, 2, 3, 4])
@pytest.mark.parametrize("codec", ["lossless", "int8", "ecsq:size=0.2"])
def test_union_of_rank_slices_is_the_full_tensor(
    small_client: Client, llama_dir: Path, tp_size: int, codec: str
) -> None:
    small_client.push(llama_dir, "tp/m:v1", codec=codec)
    full = small_client.load_state_dict("tp/m:v1")
    ranks = [small_client.load_state_dict("tp/m:v1", tp_size=tp_size, tp_rank=r) for r in range(tp_size)]
    for name, tensor in full.items():
        dim = split_dim(name, tensor.shape)
        if dim is None:
            for r in ranks:
                assert torch.equal(r[name], tensor), name
        else:
            assert torch.equal(torch.cat([r[name] for r in ranks], dim=dim), tensor), name
            sizes = [r[name].shape[dim] for r in ranks]
            assert max(sizes) - min(sizes) <= 1


def test_a_rank_fetches_about_its_share(small_client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    big = tmp_path / "big"
    big.mkdir()
    save_file(
        {
            "model.embed_tokens.weight": torch.randn(8000, 128, generator=gen).to(torch.bfloat16),  # 32 chunks
            "lm_head.weight": torch.randn(8000, 128, generator=gen).to(torch.bfloat16),
            "model.layers.0.self_attn.o_proj.weight": torch.randn(128, 128, generator=gen),
        },
        str(big / "model.safetensors"),
    )
    small_client.push(big, "tp/m:v1")
    fetched: list[int] = []
    real = small_client.fetch

    def counting(blob: str, offset: int, length: int) -> bytearray:
        fetched.append(length)
        return real(blob, offset, length)

    monkeypatch.setattr(small_client, "fetch", counting)
    monkeypatch.setattr(small_client, "cache", None)  # count network reads, not cache hits
    small_client.load_state_dict("tp/m:v1")
    everything = sum(fetched)
    fetched.clear()
    small_client.load_state_dict("tp/m:v1", tp_size=4, tp_rank=1)
    share = sum(fetched) / everything
    # Embeddings and lm_head (dim 0) are most of the bytes: a rank reads a quarter of them (plus
    # chunk granularity), and the whole dim-1 o_proj.
    assert 0.22 < share < 0.36, share


def test_rank_ranges_and_rules() -> None:
    assert [rank_range(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [rank_range(2, 4, r) for r in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(InvalidArgument):
        rank_range(10, 2, 2)
    assert split_dim("model.layers.3.self_attn.k_proj.weight", (8, 8)) == 0
    assert split_dim("model.layers.3.mlp.down_proj.weight", (8, 8)) == 1
    assert split_dim("model.layers.3.mlp.down_proj.bias", (8,)) is None
    assert split_dim("encoder.layer.0.attention.self.query.weight", (8, 8)) == 0
    assert split_dim("encoder.layer.0.output.dense.weight", (8, 8)) == 1
    assert split_dim("model.norm.weight", (8,)) is None
    assert split_dim("x.q_proj.weight", (8, 8), rules=[(r"q_proj", None)]) is None


def test_custom_rules(small_client: Client, llama_dir: Path) -> None:
    small_client.push(llama_dir, "tp/m:v1")
    rank = small_client.load_state_dict("tp/m:v1", tp_size=2, tp_rank=0, tp_rules=[(r"norm", 0)])
    assert rank["model.layers.0.input_layernorm.weight"].shape == (48,)
    assert rank["model.layers.0.self_attn.q_proj.weight"].shape == (96, 96)  # no rule matches: replicated


def test_splits_that_cut_heads_or_fused_projections_are_warned_about(
    small_client: Client, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    gen = torch.Generator().manual_seed(1)
    src = tmp_path / "m"
    src.mkdir()
    save_file(
        {
            "model.layers.0.self_attn.q_proj.weight": torch.randn(768, 64, generator=gen),  # 12 heads of 64
            "model.layers.0.self_attn.qkv_proj.weight": torch.randn(3 * 768, 64, generator=gen),
        },
        str(src / "model.safetensors"),
    )
    (src / "config.json").write_text(json.dumps({"num_attention_heads": 12, "num_key_value_heads": 4}))
    small_client.push(src, "tp/heads:v1")
    with caplog.at_level("WARNING", logger="mzstore.pull"):
        small_client.load_state_dict("tp/heads:v1", tp_size=4, tp_rank=0)
    assert "num_attention_heads" not in caplog.text  # 12 and 4 heads split evenly over 4 ranks
    assert "fused projections split contiguously: model.layers.0.self_attn.qkv_proj.weight" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mzstore.pull"):
        small_client.pull("tp/heads:v1", tmp_path / "out", tp_size=8, tp_rank=1)
    assert "num_attention_heads 12 is not split evenly over 8 ranks" in caplog.text
    assert "num_key_value_heads" not in caplog.text  # 4 KV heads over 8 ranks: each replicated twice
    caplog.clear()
    whole = [(r"qkv_proj\.", None), *DEFAULT_RULES]  # load the fused tensor whole: no warning for it
    with caplog.at_level("WARNING", logger="mzstore.pull"):
        sd = small_client.load_state_dict("tp/heads:v1", tp_size=4, tp_rank=0, tp_rules=whole)
    assert "fused" not in caplog.text and sd["model.layers.0.self_attn.qkv_proj.weight"].shape == (3 * 768, 64)
