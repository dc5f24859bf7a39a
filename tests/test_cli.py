"""The ``mzstore`` CLI against a real ``mzstore serve`` process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import free_port, start_serve, stop_serve
from safetensors.torch import load_file, save_file

from mzstore.errors import IntegrityError
from mzstore.server.app import RunningServer

JSON_KEYS = {"ref", "digest", "bytes_raw", "bytes_stored", "bytes_transferred", "seconds"}


@pytest.fixture
def cli_server(tmp_path: Path) -> Iterator[str]:
    address, proc = start_serve(tmp_path / "data", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    yield address
    stop_serve(proc)


def mz(*args: str, server: str | None = None, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if server:
        env["MZSTORE_SERVER"] = server
    result = subprocess.run(
        [sys.executable, "-m", "mzstore.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "model.safetensors"
    path.parent.mkdir()
    save_file({"w": torch.randn(256, 64), "b": torch.zeros(64)}, str(path))
    return path


def test_push_pull_json_and_human(cli_server: str, model_file: Path, tmp_path: Path) -> None:
    pushed = mz("push", str(model_file), "org/m:v1", "--json", server=cli_server, check=True)
    info = json.loads(pushed.stdout)
    assert JSON_KEYS <= set(info)
    assert info["ref"] == "org/m:v1" and info["digest"].startswith("sha256:")
    assert info["bytes_raw"] == model_file.stat().st_size
    assert pushed.stderr == ""  # no progress bar when not a terminal

    out = tmp_path / "out"
    pulled = mz("pull", "org/m:v1", "-o", str(out), "--json", server=cli_server, check=True)
    pinfo = json.loads(pulled.stdout)
    assert JSON_KEYS <= set(pinfo)
    assert pinfo["digest"] == info["digest"]
    assert 0 < pinfo["bytes_transferred"] <= info["bytes_stored"]
    assert (out / "model.safetensors").read_bytes() == model_file.read_bytes()

    human = mz("push", str(model_file), "org/m:v2", server=cli_server, check=True)
    assert "ratio" in human.stdout and "org/m:v2" in human.stdout

    listed = mz("ls", "--json", server=cli_server, check=True)
    assert [(r["name"], r["tag"]) for r in json.loads(listed.stdout)["refs"]] == [("org/m", "v1"), ("org/m", "v2")]
    mz("tag", "org/m:v1", "org/m:prod", server=cli_server, check=True)
    assert "org/m:prod" in mz("ls", "org/m", server=cli_server, check=True).stdout
    inspected = json.loads(mz("inspect", "org/m:prod", "--json", server=cli_server, check=True).stdout)
    assert inspected["digest"] == info["digest"]
    assert {t["name"] for t in inspected["manifest"]["tensors"]} == {"w", "b"}
    assert "tensors (2)" in mz("inspect", "org/m:prod", server=cli_server, check=True).stdout
    mz("rm", "org/m:prod", server=cli_server, check=True)
    assert "org/m:prod" not in mz("ls", server=cli_server, check=True).stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["pull", "org/missing:v1", "-o", "x"], 1, "not found"),
        (["pull", "bad..name", "-o", "x"], 2, "invalid model name"),
        (["push", "/nonexistent/file.safetensors", "org/m:v1"], 1, "does not exist"),
        (["pull"], 2, "Missing argument"),
        (["frobnicate"], 2, "No such command"),
        (["rm", "org/missing:v1"], 1, "not found"),
    ],
)
def test_errors_are_one_line_with_exit_codes(cli_server: str, args: list[str], code: int, message: str) -> None:
    result = mz(*args, server=cli_server)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_is_a_clear_error(tmp_path: Path, model_file: Path) -> None:
    result = mz("push", str(model_file), "org/m:v1", server=f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot reach mzstore server")
    assert "Traceback" not in result.stderr


def test_malformed_push_via_cli(cli_server: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    result = mz("push", str(bad), "org/bad:v1", server=cli_server)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: bad.safetensors")
    assert mz("ls", server=cli_server, check=True).stdout == ""


def test_corrupt_blob_is_never_returned_as_data(
    server: RunningServer, client, model_file: Path, root: Path, tmp_path: Path
) -> None:
    info = client.push(model_file, "org/m:v1")
    _, _, manifest = client.manifest("org/m:v1")
    chunk = manifest.tensors[0].chunks[0]
    blob = root / "blobs" / "sha256" / chunk.blob[7:9] / chunk.blob[7:]
    data = bytearray(blob.read_bytes())
    data[chunk.offset + chunk.length // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(IntegrityError):
        client.pull("org/m:v1", out)
    # Nothing under the final name, no staging left behind.
    assert not (out / "model.safetensors").exists()
    assert list(out.iterdir()) == []
    with pytest.raises(IntegrityError):
        client.load_state_dict("org/m:v1")
    assert info.digest == client.manifest("org/m:v1")[1]


def _kill_mid_push(args: list[str], env: dict[str, str], spool: Path, at_least: int = 1) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "mzstore.cli", "push", *args], env=env)
    deadline = time.monotonic() + 60

    def held() -> int:
        try:
            return sum(p.stat().st_size for p in spool.rglob("*") if p.is_file())
        except FileNotFoundError:  # renamed or removed under the scan
            return 0

    while time.monotonic() < deadline and held() < at_least:
        time.sleep(0.005)  # wait until the server holds some of the upload
    assert proc.poll() is None, "push finished before it could be killed"
    proc.kill()
    proc.wait()


def test_killed_streaming_push_leaves_store_unchanged(cli_server: str, tmp_path: Path) -> None:
    src = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.randn(1024, 1024) for i in range(24)}, str(src))  # ~100 MB
    env = dict(os.environ, MZSTORE_SERVER=cli_server)
    spool = tmp_path / "data" / "tmp"
    _kill_mid_push([str(src), "org/killed:v1", "--no-resume"], env, spool)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(spool.iterdir()):
        time.sleep(0.05)
    assert not any(spool.iterdir()), "the dead push's spool and staged shards are cleaned up"
    assert [p for p in (tmp_path / "data").rglob("*") if p.is_file()] == []  # no blob, manifest or ref
    # The server stays healthy, stores no ref, and serves the next push.
    assert mz("ls", server=cli_server, check=True).stdout == ""
    small = tmp_path / "small.safetensors"
    save_file({"x": torch.ones(3)}, str(small))
    mz("push", str(small), "org/ok:v1", server=cli_server, check=True)
    assert "org/ok:v1" in mz("ls", server=cli_server, check=True).stdout
    out = tmp_path / "o"
    mz("pull", "org/ok:v1", "-o", str(out), server=cli_server, check=True)
    assert torch.equal(load_file(str(out / "small.safetensors"))["x"], torch.ones(3))


def _big_push_killed(cli_server: str, tmp_path: Path, ref: str) -> tuple[Path, int, Path]:
    """Kill a push of a ~100 MB file once the server holds 16 MiB of it; ``(file, size, uploads dir)``."""
    src = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.randn(1024, 1024) for i in range(24)}, str(src))  # ~100 MB
    env = dict(os.environ, MZSTORE_SERVER=cli_server)
    uploads = tmp_path / "data" / "tmp" / "uploads"
    _kill_mid_push([str(src), ref], env, uploads, at_least=16 * 1024 * 1024)
    return src, src.stat().st_size, uploads


def test_killed_push_resumes_where_the_server_copy_ends(cli_server: str, tmp_path: Path) -> None:
    src, size, uploads = _big_push_killed(cli_server, tmp_path, "org/resumed:v1")
    # Nothing is visible: the received bytes wait in the upload session, outside blobs/manifests/refs.
    visible = [p for p in (tmp_path / "data").rglob("*") if p.is_file() and "tmp" not in p.parts]
    assert visible == []
    assert mz("ls", server=cli_server, check=True).stdout == ""
    rerun = mz("push", str(src), "org/resumed:v1", "--json", server=cli_server, check=True)
    sent = json.loads(rerun.stdout)["bytes_transferred"]
    assert 0 < sent < size, f"the rerun sent {sent} of {size} bytes: it did not resume ({rerun.stderr})"
    assert not any(p.is_file() for p in uploads.rglob("*")), "the committed session is removed"
    out = tmp_path / "o"
    mz("pull", "org/resumed:v1", "-o", str(out), server=cli_server, check=True)
    assert (out / "big.safetensors").read_bytes() == src.read_bytes()


def test_a_rerun_waits_while_the_dead_push_still_holds_its_session(cli_server: str, tmp_path: Path) -> None:
    """The server may see the killed push's stream end late (a loaded machine, a silent network):
    the rerun waits for the session instead of giving up or uploading everything again."""
    import fcntl
    import threading

    src, size, uploads = _big_push_killed(cli_server, tmp_path, "org/held:v1")
    (session,) = [p for p in uploads.iterdir() if p.is_dir()]
    fd = os.open(session / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as the dead push's stream would, until the server notices
    hold = 7.0  # longer than the 5 one-second retries the client used to give a busy session
    threading.Timer(hold, os.close, args=(fd,)).start()
    start = time.monotonic()
    rerun = mz("push", str(src), "org/held:v1", "--json", server=cli_server, check=True)
    assert time.monotonic() - start >= hold
    sent = json.loads(rerun.stdout)["bytes_transferred"]
    assert 0 < sent < size, f"the rerun sent {sent} of {size} bytes: it did not resume ({rerun.stderr})"
    out = tmp_path / "o"
    mz("pull", "org/held:v1", "-o", str(out), server=cli_server, check=True)
    assert (out / "big.safetensors").read_bytes() == src.read_bytes()


def test_pull_on_a_terminal_pulls_the_manifest_its_bar_counts(model_file: Path, tmp_path: Path) -> None:
    """With stderr on a terminal the CLI reads the manifest for the bar's total; the pull is pinned to
    that manifest, so a tag moved right after (a push of v2 landing) cannot swap the bytes under it."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    from tqdm import tqdm

    from mzstore.server.app import build_server
    from mzstore.storage.store import Store

    class MovingTag(Store):  # the tag moves to v2 right after its first resolve
        moved: str | None = None

        def resolve(self, ref):  # type: ignore[no-untyped-def]
            parsed, digest = super().resolve(ref)
            if self.moved and not parsed.digest:
                self.set_ref("org/tty", "latest", self.moved)
                self.moved = None
            return parsed, digest

    store = MovingTag(tmp_path / "data")
    running = build_server(store, "127.0.0.1:0")
    try:
        v1 = json.loads(mz("push", str(model_file), "org/tty", "--json", server=running.address, check=True).stdout)
        v2_file = tmp_path / "v2" / "model.safetensors"
        v2_file.parent.mkdir()
        save_file({"w": torch.ones(256, 64), "b": torch.ones(64)}, str(v2_file))
        v2 = json.loads(mz("push", str(v2_file), "org/tty:v2", "--json", server=running.address, check=True).stdout)
        store.moved = v2["digest"]

        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a width, or tqdm draws nothing
        shown = bytearray()

        def read_terminal() -> None:
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the terminal's other side is closed
                    return
                if not data:
                    return
                shown.extend(data)

        reader = threading.Thread(target=read_terminal)
        reader.start()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "mzstore.cli", "pull", "org/tty", "-o", str(tmp_path / "out")],
                env=dict(os.environ, MZSTORE_SERVER=running.address),
                stdout=subprocess.PIPE,
                stderr=slave,
                text=True,
                timeout=120,
            )
        finally:
            os.close(slave)
            reader.join(10)
            os.close(master)
    finally:
        running.stop(1)
    assert store.moved is None, "the tag was resolved"
    assert proc.returncode == 0, bytes(shown).decode(errors="replace")
    assert f"/{tqdm.format_sizeof(v1['bytes_raw'])} ".encode() in shown, bytes(shown)  # the bar counts v1
    assert proc.stdout.startswith(f"pulled org/tty:latest {v1['digest']} → ")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == model_file.read_bytes()  # and v1 is pulled


def test_pull_keep_quantized_writes_compressed_tensors_layout(cli_server: str, tmp_path: Path) -> None:
    src = tmp_path / "llm"
    src.mkdir()
    save_file(
        {"model.layers.0.mlp.down_proj.weight": torch.randn(256, 256), "model.norm.weight": torch.ones(256)},
        str(src / "model.safetensors"),
    )
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    mz("push", str(src), "org/llm:int4", "--codec", "int4", server=cli_server, check=True)
    out = tmp_path / "out"
    result = mz("pull", "org/llm:int4", "-o", str(out), "--keep-quantized", "--json", server=cli_server, check=True)
    assert json.loads(result.stdout)["ref"] == "org/llm:int4"
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    names = set(load_file(str(out / "model.safetensors")))
    assert "model.layers.0.mlp.down_proj.weight_packed" in names and "model.norm.weight" in names

    mz("push", str(src), "org/llm:pruned", "--codec", "prune:0.5", server=cli_server, check=True)
    refused = mz("pull", "org/llm:pruned", "-o", str(tmp_path / "o2"), "--keep-quantized", server=cli_server)
    assert refused.returncode == 1
    assert refused.stderr.startswith("error:") and "prune" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_push_annotate_records_lineage_that_inspect_shows(cli_server: str, model_file: Path) -> None:
    mz(
        "push",
        str(model_file),
        "org/tuned:v1",
        "--annotate",
        "fine-tuned-from=org/base:v1",
        "--annotate",
        "distilled-from=org/teacher@sha256:" + "a" * 64,
        server=cli_server,
        check=True,
    )
    shown = mz("inspect", "org/tuned:v1", server=cli_server, check=True).stdout
    assert "annotation fine-tuned-from: org/base:v1" in shown
    assert f"annotation distilled-from: org/teacher@sha256:{'a' * 64}" in shown
    manifest = json.loads(mz("inspect", "org/tuned:v1", "--json", server=cli_server, check=True).stdout)["manifest"]
    assert manifest["annotations"] == {
        "fine-tuned-from": "org/base:v1",
        "distilled-from": "org/teacher@sha256:" + "a" * 64,
    }
    for bad, why in [
        ("no-equals-sign", "KEY=VALUE"),
        ("=empty-key", "annotation key"),
        ("bad key=x", "annotation key"),
    ]:
        refused = mz("push", str(model_file), "org/tuned:v2", "--annotate", bad, server=cli_server)
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr
    twice = mz("push", str(model_file), "org/tuned:v2", "--annotate", "a=1", "--annotate", "a=2", server=cli_server)
    assert twice.returncode == 2 and "given twice" in twice.stderr
    assert mz("ls", "org/tuned", server=cli_server, check=True).stdout.count("org/tuned:") == 1  # v2 never stored
