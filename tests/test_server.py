"""The server as operators meet it: health, reflection, shared roots, shutdown, stubs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from conftest import free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.server.app import RunningServer, build_server

REPO = Path(__file__).resolve().parent.parent


def test_health_check_reports_serving(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "mzstore.v1.Store"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as exc:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_store_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"mzstore.v1.Store", "grpc.health.v1.Health"} <= names


def test_two_servers_over_one_root_see_the_same_models(root: Path, tmp_path: Path) -> None:
    a = build_server(root, "127.0.0.1:0")
    b = build_server(root, "127.0.0.1:0")
    try:
        src = tmp_path / "m.safetensors"
        save_file({"w": torch.arange(10, dtype=torch.float32)}, str(src))
        with Client(a.address) as ca, Client(b.address) as cb:
            pushed = ca.push(src, "shared/model:v1")
            assert cb.ls() == [("shared/model", "v1", pushed.digest)]
            assert torch.equal(cb.load_state_dict("shared/model:v1")["w"], torch.arange(10, dtype=torch.float32))
            cb.tag("shared/model:v1", "shared/model:prod")
            assert ("shared/model", "prod", pushed.digest) in ca.ls()
    finally:
        a.stop(1)
        b.stop(1)


def test_a_generated_stub_reads_blobs(server: RunningServer, root: Path, tmp_path: Path) -> None:
    """ReadBlob replies are encoded by hand (mzstore.transport.wire); any gRPC client's protobuf must read them."""
    from mzstore.storage.store import blob_key
    from mzstore.v1 import store_pb2, store_pb2_grpc

    src = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(700, 1024)}, str(src))  # ~2.9 MB: three 1 MiB replies
    with Client(server.address) as c:
        c.push(src, "stub/model:v1")
        (blob,) = c.manifest("stub/model:v1")[2].blobs()
    want = (root / blob_key(blob)).read_bytes()
    with grpc.insecure_channel(server.address) as ch:
        stub = store_pb2_grpc.StoreStub(ch)
        for offset, length in ((0, 0), (5, 1_500_000), (len(want) - 3, 3)):
            pieces = list(stub.ReadBlob(store_pb2.ReadBlobRequest(digest=blob, offset=offset, length=length)))
            assert all(isinstance(p, store_pb2.BlobChunk) for p in pieces)
            got = b"".join(p.data for p in pieces)
            assert got == want[offset : offset + length if length else None]
            assert [p.offset for p in pieces] == [
                offset + sum(len(q.data) for q in pieces[:i]) for i in range(len(pieces))
            ]


def test_committed_stubs_match_the_protos() -> None:
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_stub_check_detects_drift(tmp_path: Path) -> None:
    """The drift check fails when a proto changes and the stubs are not regenerated."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(REPO / "protos", copy / "protos")
    shutil.copytree(REPO / "mzstore" / "v1", copy / "mzstore" / "v1")
    shutil.copytree(REPO / "scripts", copy / "scripts")
    proto = copy / "protos" / "mzstore" / "v1" / "store.proto"
    proto.write_text(proto.read_text().replace("message BlobChunk {", "message BlobChunk {\n  string extra = 9;"))
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=copy, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "stale" in result.stderr


def _wait_serving(address: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            with grpc.insecure_channel(address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            time.sleep(0.1)
    raise AssertionError("server did not become healthy")


def test_serve_subprocess_shuts_down_gracefully_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, MZSTORE_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen(
        # the HTTP plane on a free port of its own (the default, the gRPC port + 1, may be taken here)
        [sys.executable, "-m", "mzstore.cli", "serve", "--listen", f"127.0.0.1:{port}", "--http", "127.0.0.1:0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_serving(f"127.0.0.1:{port}", proc)
        # Default root is $MZSTORE_HOME/data.
        assert (tmp_path / "home" / "data" / "tmp").is_dir()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "shutting down" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_server_on_a_taken_port_fails_clearly(server: RunningServer, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mzstore.cli", "serve", "--root", str(tmp_path / "r"), "--listen", server.address],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot serve on")
    assert "Traceback" not in result.stderr


def test_server_caps_malloc_arenas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the cap, per-thread glibc arenas made server RSS creep under load (bench_load)."""
    import sys

    from mzstore.server.app import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False  # the operator's setting wins
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert limit_malloc_arenas() is sys.platform.startswith("linux")
