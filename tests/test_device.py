"""Device placement: compact chunks expanded with torch give the host decoder's bits.

The CPU tests force the device path (``expand_on_device=True``) so the torch
expansion is checked everywhere; the CUDA tests run where a GPU is present.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import IntegrityError

POLICIES = [
    "lossless",
    "int8",
    "int4",
    "int4:g32",
    "fp8",
    "prune:0.5",
    "prune:2:4,int4:g64",
    "prune:0.5,fp8",
    "auto:cos=0.99",
    "ecsq:size=0.2",
    "ecsq:step=0.02",  # fine enough that some codes need the second byte plane
]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(5)
    tensors = {
        "layers.0.q_proj.weight": torch.randn(192, 256, generator=gen).to(torch.bfloat16) * 0.05,
        "layers.0.o_proj.weight": torch.randn(256, 200, generator=gen).to(torch.float16) * 0.02,
        "layers.0.mlp.weight": torch.randn(300, 128, generator=gen) * 0.1,
        "layers.0.mlp.bias": torch.randn(300, generator=gen),
        "norm.weight": torch.ones(256),
        "steps": torch.tensor(7, dtype=torch.int64),
    }
    path = tmp_path / "src"
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("policy", POLICIES)
def test_device_path_matches_host_decode_bit_for_bit(small_client: Client, model_dir: Path, policy: str) -> None:
    small_client.push(model_dir, "dev/m:v1", codec=policy)
    host = small_client.load_state_dict("dev/m:v1")
    device = small_client.load_state_dict("dev/m:v1", expand_on_device=True)
    assert set(host) == set(device)
    for name in host:
        assert host[name].dtype == device[name].dtype and host[name].shape == device[name].shape
        assert torch.equal(_bits(host[name]), _bits(device[name])), name


def test_device_path_verifies_stored_bytes(small_client: Client, model_dir: Path, root: Path) -> None:
    small_client.push(model_dir, "dev/m:v1", codec="int8")
    _, _, manifest = small_client.manifest("dev/m:v1")
    chunk = next(c for t in manifest.tensors for c in t.chunks if c.codec == "quant")
    blob = root / "blobs" / "sha256" / chunk.blob[7:9] / chunk.blob[7:]
    data = bytearray(blob.read_bytes())
    data[chunk.offset + chunk.length - 1] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        small_client.load_state_dict("dev/m:v1", expand_on_device=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["lossless", "int8", "int4", "fp8", "ecsq:size=0.2", "ecsq:step=0.02"])
def test_cuda_load_matches_cpu(small_client: Client, model_dir: Path, policy: str) -> None:
    small_client.push(model_dir, "dev/m:v1", codec=policy)
    cpu = small_client.load_state_dict("dev/m:v1")
    gpu = small_client.load_state_dict("dev/m:v1", device="cuda:0")
    for name, tensor in cpu.items():
        assert gpu[name].device.type == "cuda"
        assert torch.equal(_bits(tensor), _bits(gpu[name].cpu())), name
