"""The package as a new user installs it: a fresh venv, the stock pip of this Python, no extras.

``pip install mzstore`` must give a working ``mzstore serve``, ``push`` and
``pull -o DIR`` without torch, s3fs or boto3 (an edge device that pulls to
disk has none of them), and every feature that needs an extra must say which
one in one line. The venv's pip is the one ``python -m venv`` ships
(ensurepip's), never upgraded: an install that only works with a newer pip
fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "s3fs", "boto3", "botocore")


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload,no-any-return]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with ``pip install <this repo>``, by the pip ``venv`` put there."""
    where = tmp_path_factory.mktemp("fresh") / "venv"
    made = _run([sys.executable, "-m", "venv", str(where)])
    assert made.returncode == 0, made.stderr
    pip = _run([str(where / "bin" / "python"), "-m", "pip", "--version"])
    print("stock pip:", pip.stdout.strip())
    # Built from a copy of the project's files (what git tracks or would add), as a clone has them:
    # no .venv, no build leftovers, and nothing written into the working tree.
    files = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT).stdout
    source = where.parent / "src"
    for rel in filter(None, files.split("\0")):
        if (ROOT / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, source / rel)
    installed = _run(
        [str(where / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(source)],
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return where


def test_a_fresh_install_with_the_stock_pip_runs_without_the_extras(venv: Path, tmp_path: Path) -> None:
    exe = venv / "bin" / "mzstore"
    python = str(venv / "bin" / "python")
    version = _run([str(exe), "--version"])
    assert version.returncode == 0 and "mzstore, version" in version.stdout, version.stderr
    probe = _run(
        [python, "-c", f"import importlib.util as u, json; print(json.dumps([m for m in {HEAVY!r} if u.find_spec(m)]))"]
    )
    assert json.loads(probe.stdout) == [], "the base install pulled in an extra"
    if shutil.which("cc") or shutil.which("gcc"):  # the package's own build compiles the native codec core
        probe_env = {k: v for k, v in os.environ.items() if k != "MZSTORE_NATIVE"}  # the build, not the switch
        code = "from mzstore.codecs import native; print(native.enabled())"
        core = _run([python, "-W", "error", "-c", code], env=probe_env)
        assert core.stdout.strip() == "True", core.stderr

    gen = torch.Generator().manual_seed(3)
    model = tmp_path / "model"
    model.mkdir()
    save_file(
        {"proj.weight": torch.randn(256, 256, generator=gen).to(torch.bfloat16), "proj.bias": torch.randn(256)},
        str(model / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (model / "config.json").write_text(json.dumps({"hidden_size": 256}))
    env = {**os.environ, "MZSTORE_HOME": str(tmp_path / "home")}
    port = free_port()
    server = subprocess.Popen(
        [
            str(exe),
            "serve",
            "--root",
            str(tmp_path / "store"),
            "--listen",
            f"127.0.0.1:{port}",
            "--http",
            "127.0.0.1:0",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = ["--server", f"127.0.0.1:{port}"]
        import time

        deadline = time.monotonic() + 30
        while _run([str(exe), "ls", *address], env=env).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, "the fresh install's server did not start"
            time.sleep(0.2)
        for codec in ("lossless", "int8"):  # int8 decodes through the numpy path: no torch here
            pushed = _run([str(exe), "push", str(model), f"edge/m:{codec}", "--codec", codec, *address], env=env)
            assert pushed.returncode == 0, pushed.stderr
            out = tmp_path / f"out-{codec}"
            pulled = _run([str(exe), "pull", f"edge/m:{codec}", "-o", str(out), "--json", *address], env=env)
            assert pulled.returncode == 0, pulled.stderr
            assert json.loads(pulled.stdout)["files"]
            assert (out / "config.json").read_bytes() == (model / "config.json").read_bytes()
            if codec == "lossless":
                assert (out / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
        # What needs an extra says which, in one line, with exit code 1.
        (tmp_path / "ckpt.bin").write_bytes(b"not really")
        refused = _run([str(exe), "push", str(tmp_path / "ckpt.bin"), "edge/bin:v1", *address], env=env)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
        assert "pip install 'mzstore[torch]'" in refused.stderr
        load = _run(
            [python, "-c", f"import mzstore; mzstore.load_state_dict('edge/m:int8', server='127.0.0.1:{port}')"],
            env=env,
        )
        assert load.returncode != 0 and "MissingDependency" in load.stderr and "mzstore[torch]" in load.stderr
        s3 = _run([str(exe), "fsck", "--node", "s3://bucket/prefix"], env=env)
        assert s3.returncode in (1, 2) and "pip install 'mzstore[s3]'" in s3.stderr, s3.stderr
        assert "Traceback" not in s3.stderr + refused.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
