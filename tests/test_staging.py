"""Staged pull output: one staging helper for every sink, and the sweep of what dead pulls left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.pull.staging import LEGACY_STALE_S, PARTIAL_PREFIX, StagedFiles, partial_owner, sweep_partials
from mzstore.server.app import RunningServer


def _quantizable(path: Path) -> Path:
    """A model a keep-quantized export writes as codes: a Linear weight and a config.json."""
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(5)
    save_file({"proj.weight": torch.randn(512, 256, generator=gen).to(torch.bfloat16)}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "custom"}))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_sweep_removes_dead_and_stale_folders_and_keeps_live_ones(tmp_path: Path) -> None:
    live = tmp_path / f"{PARTIAL_PREFIX}{os.getpid()}-{'a' * 12}"
    dead = tmp_path / f"{PARTIAL_PREFIX}{_dead_pid()}-{'b' * 12}"
    legacy_new = tmp_path / f"{PARTIAL_PREFIX}{'c' * 12}"  # no pid in the name (older mzstore)
    legacy_old = tmp_path / f"{PARTIAL_PREFIX}{'d' * 12}"
    impossible = tmp_path / f"{PARTIAL_PREFIX}99999999999-{'e' * 12}"  # no process has a pid that large
    digits = tmp_path / f"{PARTIAL_PREFIX}123456789012"  # an old export's random id that happens to be digits
    unrelated = tmp_path / "model.safetensors"
    for d in (live, dead, legacy_new, legacy_old, impossible, digits):
        d.mkdir()
    unrelated.write_bytes(b"x")
    old = time.time() - LEGACY_STALE_S - 60
    os.utime(legacy_old, (old, old))
    busy = tmp_path / f"{PARTIAL_PREFIX}{'f' * 12}"  # an old folder whose files are still being written
    (busy / "sub").mkdir(parents=True)
    (busy / "sub" / "model.safetensors").write_bytes(b"growing")
    os.utime(busy, (old, old))
    os.utime(busy / "sub", (old, old))
    assert partial_owner(live.name) == str(os.getpid()) and partial_owner(legacy_new.name) is None
    removed = sweep_partials(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, legacy_old.name, impossible.name])
    assert live.exists() and legacy_new.exists() and digits.exists() and busy.exists() and unrelated.exists()


def test_a_partial_folder_named_by_a_huge_number_does_not_break_a_pull(client: Client, tmp_path: Path) -> None:
    """The old sweep read any all-digit suffix as a pid and died in os.kill with OverflowError.

    Such a name is an older mzstore's keep-quantized export: it names no owner, so it is left
    alone until it is stale (that export may still be running).
    """
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(12, dtype=torch.float32)}, str(src))
    client.push(src, "st/m:v1")
    out = tmp_path / "out"
    (out / f"{PARTIAL_PREFIX}123456789012").mkdir(parents=True)
    client.pull("st/m:v1", out)
    assert (out / "m.safetensors").read_bytes() == src.read_bytes()
    assert [p.name for p in out.glob(f"{PARTIAL_PREFIX}*")] == [f"{PARTIAL_PREFIX}123456789012"]
    old = time.time() - LEGACY_STALE_S - 60
    os.utime(out / f"{PARTIAL_PREFIX}123456789012", (old, old))
    client.pull("st/m:v1", out)
    assert not list(out.glob(f"{PARTIAL_PREFIX}*"))


_KILLED_EXPORT = textwrap.dedent(
    """
    import sys, threading, time
    from mzstore.client import Client

    address, ref, out = sys.argv[1:]
    client = Client(address, cache=False)
    real = client.fetch
    seen = []

    def stalling(digest, offset, length):
        seen.append(1)
        if len(seen) > 1:
            time.sleep(3600)  # killed here, with the staging folder half written
        return real(digest, offset, length)

    client.fetch = stalling
    client.pull(ref, out, keep_quantized=True, workers=1)
    """
)


def test_a_killed_keep_quantized_export_is_swept_by_the_next_pull(
    client: Client, server: RunningServer, tmp_path: Path
) -> None:
    """Every sink stages through StagedFiles: a killed export's folder names its pid and is swept."""
    client.push(_quantizable(tmp_path / "src"), "st/q:v1", codec="int8")
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_EXPORT, server.address, "st/q:v1", str(out)])
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob(f"{PARTIAL_PREFIX}*")):
            assert child.poll() is None, "the export ended before it was killed"
            assert time.monotonic() < deadline, "the export never staged anything"
            time.sleep(0.05)
        (stage,) = out.glob(f"{PARTIAL_PREFIX}*")
        assert partial_owner(stage.name) == str(child.pid)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert stage.exists()  # what the killed process left
    client.pull("st/q:v1", out, keep_quantized=True)
    assert not stage.exists() and not list(out.glob(f"{PARTIAL_PREFIX}*"))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_staged_files_appear_together_or_not_at_all(tmp_path: Path) -> None:
    staged = StagedFiles(tmp_path / "out")
    staged.open()
    fd = staged.create("a/b.bin", 4)
    staged.write(fd, b"abcd", 0)
    staged.path("c.txt").write_text("whole")
    staged.adopt("c.txt")
    assert not (tmp_path / "out" / "a").exists()  # nothing under a final name before the commit
    finals = staged.commit()
    assert [p.relative_to(tmp_path / "out").as_posix() for p in finals] == ["a/b.bin", "c.txt"]
    assert (tmp_path / "out" / "a" / "b.bin").read_bytes() == b"abcd"
    assert not list((tmp_path / "out").glob(f"{PARTIAL_PREFIX}*"))

    failed = StagedFiles(tmp_path / "out")
    failed.open()
    failed.write(failed.create("a/b.bin", 3), b"new", 0)
    failed.abort()
    assert (tmp_path / "out" / "a" / "b.bin").read_bytes() == b"abcd"  # the old file stays
    assert not list((tmp_path / "out").glob(f"{PARTIAL_PREFIX}*"))


@pytest.mark.parametrize("how", ["plain", "tp", "keep-quantized"])
def test_every_directory_output_stages_the_same_way(client: Client, tmp_path: Path, how: str) -> None:
    """A failure in the middle of any directory output leaves no final file and no staging folder."""
    from mzstore.errors import Unavailable

    client.push(_quantizable(tmp_path / "src"), "st/all:v1", codec="int8")
    out = tmp_path / "out"
    real = client.fetch
    calls = []

    def failing(digest: str, offset: int, length: int) -> bytes | bytearray:
        calls.append(1)
        if len(calls) > 1:
            raise Unavailable("the network went away")
        return real(digest, offset, length)

    client.fetch = failing  # type: ignore[method-assign]
    kw = {"tp": {"tp_size": 2, "tp_rank": 1}, "keep-quantized": {"keep_quantized": True}}.get(how, {})
    with pytest.raises(Unavailable):
        client.pull("st/all:v1", out, workers=1, **kw)  # type: ignore[arg-type]
    assert out.exists() and list(out.iterdir()) == []


@pytest.mark.parametrize("how", ["plain", "tp", "keep-quantized"])
@pytest.mark.parametrize("fsync", [True, False])
def test_no_fsync_pulls_skip_every_sync_and_still_stage(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str, fsync: bool
) -> None:
    """MZSTORE_PULL_FSYNC=0 (pull --no-fsync): the same files, staged and moved, with no fsync at all."""
    import dataclasses

    client.push(_quantizable(tmp_path / "src"), "st/sync:v1", codec="int8")
    client.settings = dataclasses.replace(client.settings, pull_fsync=fsync)
    synced: list[int] = []
    real_fsync, real_fdatasync = os.fsync, os.fdatasync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real_fdatasync(fd))[1])
    kw = {"tp": {"tp_size": 2, "tp_rank": 1}, "keep-quantized": {"keep_quantized": True}}.get(how, {})
    info = client.pull("st/sync:v1", tmp_path / "out", **kw)  # type: ignore[arg-type]
    assert info.files and all(Path(f).is_file() for f in info.files)
    assert not list((tmp_path / "out").glob(f"{PARTIAL_PREFIX}*"))
    assert bool(synced) == fsync


def test_the_cli_takes_no_fsync(server: RunningServer, tmp_path: Path) -> None:
    src = _quantizable(tmp_path / "src")
    env = {**os.environ, "MZSTORE_HOME": str(tmp_path / "home"), "MZSTORE_SERVER": server.address}
    run = [sys.executable, "-m", "mzstore.cli"]
    assert subprocess.run([*run, "push", str(src), "st/cli:v1"], env=env, capture_output=True).returncode == 0
    # strace-free check: an fsync that fails would fail the pull, so make every fsync fail in the child
    probe = textwrap.dedent(
        """
        import os, sys
        def refuse(fd):
            raise OSError(5, "fsync refused by the test")
        os.fsync = os.fdatasync = refuse
        from mzstore.cli import main
        sys.argv = ["mzstore", *sys.argv[1:]]
        main()
        """
    )
    pull = [sys.executable, "-c", probe, "pull", "st/cli:v1", "--json"]
    quiet = subprocess.run([*pull, "-o", str(tmp_path / "a"), "--no-fsync"], env=env, capture_output=True, text=True)
    assert quiet.returncode == 0, quiet.stderr
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    synced = subprocess.run([*pull, "-o", str(tmp_path / "b")], env=env, capture_output=True, text=True)
    assert synced.returncode == 1 and "fsync refused" in synced.stderr, synced.stderr


# --- O_DIRECT for durable pulls ----------------------------------------------------------------


def _direct_refused(where: Path) -> bool:
    from mzstore.durable import open_direct

    probe = where / "probe"
    probe.write_bytes(b"")
    dfd = open_direct(probe)
    probe.unlink()
    if dfd is None:
        return True
    os.close(dfd)
    return False


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, int, int]]:
    """Every ``pwrite_all`` of the staging module as ``(O_DIRECT descriptor?, offset, length)``."""
    import fcntl

    from mzstore.durable import PAGE_CACHE_PIECE
    from mzstore.pull import staging

    calls: list[tuple[bool, int, int]] = []
    real = staging.pwrite_all

    def spy(fd: int, data: bytes | bytearray | memoryview, offset: int, piece: int = PAGE_CACHE_PIECE) -> None:
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        assert (piece == 0) == direct  # O_DIRECT writes go whole; page-cache ones in small pieces
        calls.append((direct, offset, len(memoryview(data).cast("B"))))
        real(fd, data, offset, piece)

    monkeypatch.setattr(staging, "pwrite_all", spy)
    return calls


def test_durable_staged_writes_send_whole_aligned_blocks_around_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buffer at its file offset's place in a page: the whole 4 KiB blocks go with O_DIRECT, the two
    partial ends through the page cache, and the file holds exactly the bytes written."""
    import mmap

    if _direct_refused(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    calls = _recording(monkeypatch)
    size, offset, n = 3 << 20, 4096 * 3 + 100, 1 << 20
    payload = os.urandom(n)
    paged = mmap.mmap(-1, n + 8192)
    paged[100 : 100 + n] = payload  # address % 4096 == offset % 4096
    staged = StagedFiles(tmp_path / "out")
    staged.open()
    fd = staged.create("m.bin", size)
    staged.write(fd, memoryview(paged)[100 : 100 + n], offset)
    unaligned = bytearray(os.urandom(n))  # malloc'd: not at the offset's place in a page
    staged.write(fd, unaligned, offset + n)
    staged.commit()
    head = 4096 - 100
    whole = (n - head) // 4096 * 4096
    assert calls[:3] == [
        (True, offset + head, whole),
        (False, offset, head),
        (False, offset + head + whole, n - head - whole),
    ]
    assert calls[3:] == [(False, offset + n, n)]
    data = (tmp_path / "out" / "m.bin").read_bytes()
    assert data[offset : offset + n] == payload and data[offset + n : offset + 2 * n] == unaligned
    assert data[:offset] == bytes(offset) and len(data) == size


def test_no_fsync_and_small_files_stay_in_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mmap

    calls = _recording(monkeypatch)
    paged = mmap.mmap(-1, 1 << 20)
    for durable, size in ((False, 4 << 20), (True, 64 << 10)):
        staged = StagedFiles(tmp_path / f"out-{durable}", durable=durable)
        staged.open()
        fd = staged.create("m.bin", size)
        staged.write(fd, memoryview(paged)[: min(size, 1 << 20)], 0)
        staged.commit()
    assert calls and not any(direct for direct, _, _ in calls)


def test_a_file_system_that_refuses_the_direct_write_gets_it_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EINVAL from an O_DIRECT write (an alignment larger than 4 KiB): that file is written through the
    page cache from then on, with the same bytes."""
    import errno
    import fcntl
    import mmap

    if _direct_refused(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    calls = _recording(monkeypatch)
    real_pwrite = os.pwrite

    def picky(fd: int, data: bytes | memoryview, offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", picky)
    n = 1 << 20
    paged = mmap.mmap(-1, 2 * n)
    paged[:] = os.urandom(2 * n)
    staged = StagedFiles(tmp_path / "out")
    staged.open()
    fd = staged.create("m.bin", 2 * n)
    staged.write(fd, memoryview(paged)[:n], 0)
    staged.write(fd, memoryview(paged)[n:], n)
    staged.commit()
    assert [c[0] for c in calls] == [True, False, False]  # tried once, then the page cache only
    assert (tmp_path / "out" / "m.bin").read_bytes() == paged[:]


@pytest.mark.parametrize("fsync", [True, False])
def test_a_failed_write_behind_fails_the_pull_and_leaves_nothing(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    """A pull's file writes run behind the decoders (with or without fsync): a disk error there fails
    the pull with that error, the staging folder goes, and no final file appears."""
    import dataclasses

    from mzstore.pull.staging import StagedFiles as Staged

    client.settings = dataclasses.replace(client.settings, pull_fsync=fsync)

    src = tmp_path / "src"
    src.mkdir()
    gen = torch.Generator().manual_seed(9)
    save_file({f"w{i}": torch.randn(1024, 1024, generator=gen) for i in range(3)}, str(src / "model.safetensors"))
    client.push(src, "st/behind:v1", codec="lossless")
    real = Staged.write
    writes = []

    def failing(self: Staged, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        writes.append(offset)
        if len(writes) == 2:
            raise OSError(28, "No space left on device")
        real(self, fd, data, offset)

    monkeypatch.setattr(Staged, "write", failing)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        client.pull("st/behind:v1", out)
    assert list(out.iterdir()) == []
    monkeypatch.setattr(Staged, "write", real)
    info = client.pull("st/behind:v1", out)
    assert Path(info.files[0]).read_bytes() == (src / "model.safetensors").read_bytes()
