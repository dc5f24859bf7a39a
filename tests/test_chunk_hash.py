"""Decoded-chunk hashes: BLAKE3 in new manifests, sha256 in older ones, both verified."""

from __future__ import annotations

import hashlib
from pathlib import Path

import blake3
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import IntegrityError
from mzstore.format.manifest import Chunk, parse_manifest
from mzstore.pull.device import payload_matches
from mzstore.pull.pipeline import decode_verified
from mzstore.storage.store import Store


def _zstd_chunk(raw: bytes, **hashes: str | None) -> tuple[Chunk, bytes]:
    import zstandard

    payload = zstandard.ZstdCompressor().compress(raw)
    fields = {"sha256": None} | hashes
    chunk = Chunk("sha256:" + "0" * 64, 0, len(payload), [0, len(raw)], len(raw), codec="zstd", **fields)
    return chunk, payload


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_decode_verified_checks_either_hash(algo: str) -> None:
    raw = bytes(range(256)) * 64
    good = blake3.blake3(raw).hexdigest() if algo == "blake3" else hashlib.sha256(raw).hexdigest()
    chunk, payload = _zstd_chunk(raw, **{algo: good})
    assert chunk.hash_name == algo and chunk.decoded_hash == f"{algo}:{good}"
    out = np.empty(len(raw), np.uint8)
    assert decode_verified(chunk, "U8", "t", payload, out).tobytes() == raw

    other = bytearray(raw)
    other[1000] ^= 1  # one flipped bit in what the payload decodes to
    bad, bad_payload = _zstd_chunk(bytes(other), **{algo: good})
    with pytest.raises(IntegrityError, match=f"fail their {algo} check"):
        decode_verified(bad, "U8", "t", bad_payload, np.empty(len(raw), np.uint8))


def test_quantized_payload_hash_blake3_and_legacy_sha256() -> None:
    payload = b"compact codes" * 100
    assert payload_matches({"payload_blake3": blake3.blake3(payload).hexdigest()}, payload)
    assert payload_matches({"payload_sha256": hashlib.sha256(payload).hexdigest()}, payload)
    assert not payload_matches({"payload_blake3": blake3.blake3(payload).hexdigest()}, payload[:-1] + b"x")
    assert not payload_matches({"payload_sha256": hashlib.sha256(payload).hexdigest()}, payload[:-1] + b"x")
    assert not payload_matches({}, payload)  # no recorded hash: never trusted


def test_new_pushes_carry_blake3_and_legacy_sha256_manifests_still_pull(
    client: Client, tmp_path: Path, root: Path
) -> None:
    gen = torch.Generator().manual_seed(3)
    src = tmp_path / "src"
    src.mkdir()
    tensors = {"a": torch.randn(300, 64, generator=gen), "b": torch.randn(40, generator=gen).to(torch.bfloat16)}
    save_file(tensors, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"hidden": 64}')
    client.push(src, "h/m:v1")
    manifest = client.manifest("h/m:v1")[2]
    chunks = manifest.chunks()
    assert chunks and all(c.blake3 is not None and c.sha256 is None for c in chunks)

    # The decoded bytes of every chunk, from the source, to describe the model as a pre-BLAKE3 manifest did.
    decoded: dict[tuple[int, int], bytes] = {}
    for t in manifest.tensors:
        flat = tensors[t.name].contiguous().view(torch.uint8).numpy().reshape(-1)
        row = flat.nbytes // t.shape[0]
        for c in t.chunks:
            decoded[(c.offset, c.length)] = flat[c.rows[0] * row : c.rows[1] * row].tobytes()
    cfg = (src / "config.json").read_bytes()
    for f in manifest.files:
        for c in f.chunks:
            decoded[(c.offset, c.length)] = cfg[c.rows[0] : c.rows[1]]
    for c in chunks:
        assert c.matches(decoded[(c.offset, c.length)])
        c.sha256, c.blake3 = hashlib.sha256(decoded[(c.offset, c.length)]).hexdigest(), None
    legacy = manifest.to_json()
    assert b'"blake3"' not in legacy
    assert parse_manifest(legacy).to_json() == legacy  # re-serializes byte for byte

    store = Store(root)
    store.set_ref("h/m", "legacy", store.put_manifest(legacy))
    client.pull("h/m:legacy", tmp_path / "out")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()

    # A wrong sha256 in a legacy manifest is caught like a wrong BLAKE3.
    chunks[0].sha256 = hashlib.sha256(b"something else").hexdigest()
    store.set_ref("h/m", "bad", store.put_manifest(manifest.to_json()))
    with pytest.raises(IntegrityError, match="sha256 check"):
        client.pull("h/m:bad", tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()
