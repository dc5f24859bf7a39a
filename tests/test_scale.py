"""Scale: memory stays bounded on 1 GiB and 3 GiB checkpoints (marked slow; `make test-slow`).

Peak memory is read from ``VmHWM`` in ``/proc`` of separate processes (a
server process and client processes), which, unlike ``ru_maxrss``, starts
afresh at ``exec``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import start_serve, stop_serve
from safetensors.torch import save_file

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")]

MiB = 1024 * 1024


def _vmhwm(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "model.safetensors"
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"layers.{i}.weight": (torch.randn(4096, 8192, generator=gen) * 0.02).to(torch.bfloat16) for i in range(16)
    }
    save_file(tensors, str(path))  # 16 × 64 MiB = 1 GiB of bf16
    return path


@pytest.fixture(scope="module")
def serve_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen]]:
    address, proc = start_serve(tmp_path_factory.mktemp("root"))
    yield address, proc
    stop_serve(proc)


CHILD = """
import sys
from mzstore.client import Client
mode, address, out = sys.argv[1:4]
with Client(address) as c:
    if mode == "dir":
        c.pull("scale/big:v1", out)
    else:
        sd = c.load_state_dict("scale/big:v1")
        assert len(sd) == 16
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(int(line.split()[1]) * 1024)
"""


def _child_peak(mode: str, address: str, out: Path) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, mode, address, str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip().splitlines()[-1])


def test_memory_stays_bounded_on_a_1gb_checkpoint(
    big_checkpoint: Path, serve_process: tuple[str, subprocess.Popen], tmp_path: Path
) -> None:
    from mzstore.client import Client

    address, server = serve_process
    size = big_checkpoint.stat().st_size
    with Client(address) as client:
        info = client.push(big_checkpoint, "scale/big:v1")
    assert info.bytes_raw == size
    # Server: ingest is a stream, its peak stays far below the model size.
    server_peak = _vmhwm(server.pid)
    assert server_peak < 512 * MiB, f"server peak {server_peak / MiB:.0f} MiB"

    out = tmp_path / "out"
    dir_peak = _child_peak("dir", address, out)
    assert dir_peak < 512 * MiB, f"pull to disk peak {dir_peak / MiB:.0f} MiB"
    h = hashlib.sha256()
    with open(out / "model.safetensors", "rb") as fh:
        while block := fh.read(8 * MiB):
            h.update(block)
    src = hashlib.sha256()
    with open(big_checkpoint, "rb") as fh:
        while block := fh.read(8 * MiB):
            src.update(block)
    assert h.hexdigest() == src.hexdigest()
    os.remove(out / "model.safetensors")

    mem_peak = _child_peak("memory", address, tmp_path / "unused")
    assert mem_peak < 1.5 * size, f"load_state_dict peak {mem_peak / MiB:.0f} MiB for a {size / MiB:.0f} MiB model"


CLI_CHILD = """
import json, sys
from mzstore.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(json.dumps({"peak": int(line.split()[1]) * 1024}))
"""


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * MiB):
            h.update(block)
    return h.hexdigest()


def test_pull_to_disk_stays_flat_on_a_3gb_checkpoint(
    serve_process: tuple[str, subprocess.Popen], tmp_path: Path
) -> None:
    """3 GiB bf16 through the CLI, cold and then from the local cache: the client stays under 512 MiB."""
    from mzstore.client import Client

    address, _ = serve_process
    src = tmp_path / "src" / "model.safetensors"
    src.parent.mkdir()
    gen = torch.Generator().manual_seed(1)
    save_file(
        {f"blocks.{i}.w": (torch.randn(4096, 8192, generator=gen) * 0.02).to(torch.bfloat16) for i in range(48)},
        str(src),
    )
    size = src.stat().st_size
    assert size > 3 * 1024 * MiB
    with Client(address) as client:
        client.push(src, "scale/huge:v1")
    want = _file_sha(src)
    for run in ("cold", "cached"):
        out = tmp_path / run
        result = subprocess.run(
            [sys.executable, "-c", CLI_CHILD, "pull", "scale/huge:v1", "-o", str(out), "--server", address, "--json"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.strip().splitlines()
        info, peak = json.loads(lines[0]), json.loads(lines[-1])["peak"]
        assert peak < 512 * MiB, f"{run} pull to disk peaked at {peak / MiB:.0f} MiB for a {size / MiB:.0f} MiB model"
        assert _file_sha(out / "model.safetensors") == want
        if run == "cached":
            assert info["bytes_transferred"] == 0
        os.remove(out / "model.safetensors")
