"""Disk full on a local node: a clear RESOURCE_EXHAUSTED, nothing lost, and it works again once space is freed.

The store lives on a small tmpfs the test mounts (root can; this sandbox and
CI run as root). Where mounting is refused, the same scenario runs on a node
whose writes fail with ENOSPC past a byte quota (injected, not mounted).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import ResourceExhausted
from mzstore.server.app import build_server
from mzstore.settings import Settings
from mzstore.storage import Store
from mzstore.storage.admin import fsck
from mzstore.storage.node import LocalNode

MiB = 1024 * 1024
SMALL = Settings(chunk_bytes=256 * 1024, shard_bytes=1 * MiB)


def _model(path: Path, seed: int, mib: int) -> Path:
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True)
    n = mib * MiB // (256 * 1024 * 2)
    # Random bf16 mantissas compress to about 0.7: the sizes below account for that.
    save_file(
        {f"w{i}": torch.randn(512, 256, generator=gen).to(torch.bfloat16) for i in range(n)},
        str(path / "model.safetensors"),
    )
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    return path


class QuotaNode(LocalNode):
    """A local node that runs out of space after ``quota`` bytes written (the injected fallback)."""

    quota = 0
    used = 0

    def stage(self, key: str, chunks: Iterable[bytes | memoryview]) -> Path:
        def counted() -> Iterator[bytes | memoryview]:
            for c in chunks:
                QuotaNode.used += len(c)
                if QuotaNode.used > QuotaNode.quota:
                    raise OSError(errno.ENOSPC, "No space left on device")
                yield c

        return super().stage(key, counted())


@pytest.fixture(params=["tmpfs", "injected"])
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, str]]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if request.param == "injected":
        yield mnt, "injected"
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if mounted.returncode == 0:
        yield mnt, "tmpfs"
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    else:
        yield mnt, "injected"


def _fill(mnt: Path, mode: str, leave: int) -> Path:
    """Take all but ``leave`` bytes of the disk with a filler file."""
    filler = mnt / "filler"
    if mode == "tmpfs":
        st = os.statvfs(mnt)
        free = st.f_bavail * st.f_frsize
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free - leave))
    else:
        QuotaNode.quota = QuotaNode.used + leave
        filler.write_bytes(b"")
    return filler


def _free(filler: Path, mode: str) -> None:
    filler.unlink()
    if mode == "injected":
        QuotaNode.quota = 1 << 40


def _visible(root: Path) -> list[str]:
    """Blobs, manifests and refs (the temp area is not part of the store's visible state)."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "tmp" != p.relative_to(root).parts[0]
    )


def test_disk_full_is_resource_exhausted_and_recoverable(small_disk: tuple[Path, str], tmp_path: Path) -> None:
    mnt, mode = small_disk
    root = mnt / "store"
    QuotaNode.used, QuotaNode.quota = 0, 1 << 40
    store = Store(QuotaNode(root) if mode == "injected" else root)
    running = build_server(store, "127.0.0.1:0", SMALL)
    try:
        with Client(running.address, cache=False) as c:
            a = _model(tmp_path / "a", 1, 2)
            c.push(a, "disk/a:v1")
            before = _visible(root)

            filler = _fill(mnt, mode, leave=1 * MiB)
            b = _model(tmp_path / "b", 2, 6)
            with pytest.raises(ResourceExhausted, match=r"full|space"):
                c.push(b, "disk/b:v1")
            # Nothing of the failed push is visible, nothing of the old model is lost; what arrived
            # waits in the upload session (tmp/uploads), nothing else is left in tmp.
            assert _visible(root) == before
            leftovers = [p.relative_to(root / "tmp").parts[0] for p in (root / "tmp").rglob("*") if p.is_file()]
            assert set(leftovers) <= {"uploads"}, leftovers
            assert [n for n, _, _ in c.ls()] == ["disk/a"]
            c.pull("disk/a:v1", tmp_path / "out-a")
            assert (tmp_path / "out-a" / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
            assert fsck(Store(root)).ok

            # The server keeps serving and takes the push once space is freed, resuming the session.
            _free(filler, mode)
            size_b = sum(p.stat().st_size for p in b.rglob("*") if p.is_file())
            resumed = c.push(b, "disk/b:v1")
            assert resumed.bytes_transferred <= size_b
            if mode == "injected":  # most of the upload had arrived when the shards ran out of space
                assert resumed.bytes_transferred < size_b
            c.pull("disk/b:v1", tmp_path / "out-b")
            assert (tmp_path / "out-b" / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    finally:
        running.stop(grace=1)
