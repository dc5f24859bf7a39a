"""Tokens with scopes, TLS and mutual TLS (issue #6), against real servers on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
import trustme
from conftest import start_serve, stop_serve, store_files
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from mzstore.client import Client
from mzstore.errors import InvalidArgument, PermissionDenied, Unauthenticated, Unavailable
from mzstore.server.app import RunningServer, TlsConfig, build_server
from mzstore.server.auth import hash_token, new_token, parse_token_file, token_line
from mzstore.settings import Settings

READ, WRITE, TEAM_A, ADMIN = (new_token() for _ in range(4))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    lines = [
        token_line("reader", READ, "read"),
        token_line("writer", WRITE, "read,write"),
        token_line("team-a-ci", TEAM_A, "write", ("team-a/",)),
        token_line("root", ADMIN, "admin"),
    ]
    path.write_text("# test tokens\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture
def auth_server(root: Path, token_file: Path) -> Iterator[RunningServer]:
    running = build_server(root, "127.0.0.1:0", auth=token_file)
    yield running
    running.stop(grace=1)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}, str(path))
    return path


def _client(server: RunningServer, token: str | None = None, **kw: object) -> Client:
    return Client(server.address, settings=Settings(), timeout=10, token=token, **kw)  # type: ignore[arg-type]


def test_no_token_is_unauthenticated_and_health_stays_open(auth_server: RunningServer, root: Path, model: Path) -> None:
    with _client(auth_server) as c:
        with pytest.raises(Unauthenticated, match="MZSTORE_TOKEN"):
            c.ls()
        with pytest.raises(Unauthenticated):
            c.push(model, "org/m:v1")
        with pytest.raises(Unauthenticated):
            c.load_state_dict("org/m:v1")
    with _client(auth_server, "mzs_not-a-known-token") as c, pytest.raises(Unauthenticated, match="not known"):
        c.ls()
    with grpc.insecure_channel(auth_server.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert store_files(root) == {}


def test_scopes_read_write_admin(auth_server: RunningServer, root: Path, model: Path) -> None:
    with _client(auth_server, WRITE) as w:
        pushed = w.push(model, "org/m:v1")
        w.tag("org/m:v1", "org/m:prod")
        with pytest.raises(PermissionDenied, match="Delete needs admin"):
            w.rm("org/m:prod")
    before = store_files(root)
    with _client(auth_server, READ) as r:
        assert torch.equal(r.load_state_dict("org/m:v1")["w"], torch.arange(4096, dtype=torch.float32).reshape(64, 64))
        assert ("org/m", "v1", pushed.digest) in r.ls()
        with pytest.raises(PermissionDenied, match=r"scope read; (Push|StartUpload) needs write") as exc:
            r.push(model, "org/other:v1")
        assert isinstance(exc.value, PermissionError)
        with pytest.raises(PermissionDenied):
            r.tag("org/m:v1", "org/m:evil")
    assert store_files(root) == before  # refused calls stored nothing
    with _client(auth_server, ADMIN) as a:
        a.rm("org/m:prod")
    assert ("org/m", "prod", pushed.digest) not in _client(auth_server, READ).ls()


def test_prefix_grant_limits_writes(auth_server: RunningServer, root: Path, model: Path) -> None:
    with _client(auth_server, TEAM_A) as c:
        c.push(model, "team-a/x:v1")
        before = store_files(root)
        with pytest.raises(PermissionDenied, match="may not write 'team-b/x'"):
            c.push(model, "team-b/x:v1")
        with pytest.raises(PermissionDenied):
            c.tag("team-a/x:v1", "team-b/x:v1")
        c.tag("team-a/x:v1", "team-a/x:prod")
        assert {(n, t) for n, t, _ in c.ls()} == {("team-a/x", "v1"), ("team-a/x", "prod")}
    after = store_files(root)
    assert set(after) - set(before) == {"refs/team-a/x/prod"}  # the refused push left no blob or ref
    assert not [p for p in (root / "tmp").rglob("*") if p.is_file()]


def test_push_is_refused_before_its_body_is_read(auth_server: RunningServer, root: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.safetensors"
    size = 64 * 1024 * 1024
    save_file({"w": torch.zeros(size // 4, dtype=torch.float32)}, str(big))
    sent: list[int] = []
    with _client(auth_server, READ) as c, pytest.raises(PermissionDenied):
        c.push(big, "org/big:v1", progress=sent.append)
    # The server never asked for a message: flow control stopped the client after a few windows.
    print(f"client read {sum(sent)} of {size} bytes before the refusal")
    assert sum(sent) < size // 4
    assert store_files(root) == {}
    assert not (root / "tmp").exists() or not list((root / "tmp").iterdir())


def test_token_file_stores_hashes_only(token_file: Path) -> None:
    text = token_file.read_text()
    for token in (READ, WRITE, TEAM_A, ADMIN):
        assert token not in text
        assert hash_token(token) in text
    grants = parse_token_file(text)
    assert grants[hash_token(TEAM_A)].prefixes == ("team-a/",)
    assert grants[hash_token(WRITE)].scope == "write"
    with pytest.raises(InvalidArgument, match="tokens:1"):
        parse_token_file("bob read plaintext-token\n", "tokens")
    with pytest.raises(InvalidArgument, match="scopes"):
        parse_token_file(f"bob superuser {hash_token('x')}\n")


def test_token_with_plaintext_remote_server_is_refused_before_connecting() -> None:
    with pytest.raises(InvalidArgument, match="clear text"):
        Client("10.1.2.3:50051", settings=Settings(), token=READ)
    with pytest.raises(InvalidArgument, match="plaintext"):
        build_server(Path("/nonexistent"), "0.0.0.0:0", auth=Path("/nonexistent/tokens"))
    Client("10.1.2.3:50051", settings=Settings()).close()  # no token: nothing to protect


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _tls_files(tmp_path: Path, ca: trustme.CA, client_ca: trustme.CA | None = None) -> TlsConfig:
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    (tmp_path / "server.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_ca_path = None
    if client_ca is not None:
        client_ca_path = tmp_path / "client-ca.pem"
        client_ca.cert_pem.write_to_path(str(client_ca_path))
    return TlsConfig(tmp_path / "server.pem", tmp_path / "server.key", client_ca_path)


def test_tls_with_and_without_the_ca(root: Path, tmp_path: Path, ca: trustme.CA, model: Path) -> None:
    tls = _tls_files(tmp_path, ca)
    running = build_server(root, "127.0.0.1:0", auth=None, tls=tls)
    try:
        with _client(running, tls_ca=tmp_path / "ca.pem") as c:
            c.push(model, "org/m:v1")
            assert c.load_state_dict("org/m:v1")["w"].shape == (64, 64)
        with _client(running) as plain, pytest.raises(Unavailable):
            plain.ls()
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
        with _client(running, tls_ca=tmp_path / "other-ca.pem") as wrong, pytest.raises(Unavailable):
            wrong.ls()
    finally:
        running.stop(1)


def test_tokens_over_tls_on_any_address(root: Path, tmp_path: Path, ca: trustme.CA, token_file: Path) -> None:
    tls = _tls_files(tmp_path, ca)
    running = build_server(root, "127.0.0.1:0", auth=token_file, tls=tls)
    try:
        with _client(running, READ, tls_ca=tmp_path / "ca.pem") as c:
            assert c.ls() == []
        with _client(running, tls_ca=tmp_path / "ca.pem") as c, pytest.raises(Unauthenticated):
            c.ls()
    finally:
        running.stop(1)


def test_mutual_tls(root: Path, tmp_path: Path, ca: trustme.CA) -> None:
    client_ca = trustme.CA()
    tls = _tls_files(tmp_path, ca, client_ca)
    running = build_server(root, "127.0.0.1:0", tls=tls)
    try:
        with _client(running, tls_ca=tmp_path / "ca.pem") as anonymous, pytest.raises(Unavailable):
            anonymous.ls()
        leaf = client_ca.issue_cert("client.example")
        leaf.private_key_pem.write_to_path(str(tmp_path / "client.key"))
        leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
        settings = Settings(tls_cert=tmp_path / "client.pem", tls_key=tmp_path / "client.key")
        with Client(running.address, settings=settings, timeout=10, tls_ca=tmp_path / "ca.pem") as c:
            assert c.ls() == []
        stranger = ca.issue_cert("stranger.example")  # issued by the server's CA, not the client CA
        stranger.private_key_pem.write_to_path(str(tmp_path / "s.key"))
        stranger.cert_chain_pems[0].write_to_path(str(tmp_path / "s.pem"))
        settings = Settings(tls_cert=tmp_path / "s.pem", tls_key=tmp_path / "s.key")
        with Client(running.address, settings=settings, timeout=10, tls_ca=tmp_path / "ca.pem") as c:
            with pytest.raises(Unavailable):
                c.ls()
    finally:
        running.stop(1)


def _mz(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mzstore.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_token_add_serve_and_ls(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MZSTORE_TOKEN")}
    tokens = tmp_path / "tokens"
    added = _mz(
        "token", "add", "ci", "--scope", "read,write", "--prefix", "team-a/", "--token-file", str(tokens), env=env
    )
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token and token not in tokens.read_text() and hash_token(token) in tokens.read_text()
    assert oct(tokens.stat().st_mode & 0o777) == "0o600"
    address, proc = start_serve(tmp_path / "data", env=env, args=("--token-file", str(tokens)))
    try:
        refused = _mz("ls", "--server", address, env=env)
        assert refused.returncode == 1
        assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: "), refused.stderr
        assert "MZSTORE_TOKEN" in refused.stderr
        ok = _mz("ls", "--server", address, env={**env, "MZSTORE_TOKEN": token})
        assert ok.returncode == 0, ok.stderr
    finally:
        assert stop_serve(proc) == 0


def test_cli_serve_tls_and_ls_with_tls_ca(tmp_path: Path, ca: trustme.CA) -> None:
    tls = _tls_files(tmp_path, ca)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MZSTORE_TOKEN", "MZSTORE_TLS"))}
    args = ("--tls-cert", str(tls.cert), "--tls-key", str(tls.key))
    address, proc = start_serve(tmp_path / "data", env=env, args=args)
    try:
        ok = _mz("ls", "--server", address, "--tls-ca", str(tmp_path / "ca.pem"), env=env)
        assert ok.returncode == 0, ok.stderr
        plain = _mz("ls", "--server", address, env=env)
        assert plain.returncode == 1 and plain.stderr.startswith("error: cannot reach"), plain.stderr
    finally:
        assert stop_serve(proc) == 0


def test_pull_through_cache_sends_its_token_upstream(auth_server: RunningServer, tmp_path: Path, model: Path) -> None:
    with _client(auth_server, WRITE) as w:
        w.push(model, "org/m:v1")
    cache = build_server(tmp_path / "cache", "127.0.0.1:0", Settings(token=READ), upstream=auth_server.address)
    try:
        with _client(cache) as c:
            assert c.load_state_dict("org/m:v1")["w"].shape == (64, 64)
    finally:
        cache.stop(1)
    tokenless = build_server(tmp_path / "cache2", "127.0.0.1:0", Settings(), upstream=auth_server.address)
    try:
        with _client(tokenless) as c, pytest.raises(Unauthenticated):
            c.load_state_dict("org/m:v1")
    finally:
        tokenless.stop(1)


def test_the_http_plane_uses_the_same_tls_and_client_certificates(root: Path, tmp_path: Path, ca: trustme.CA) -> None:
    from mzstore.server import metrics

    client_ca = trustme.CA()
    tls = _tls_files(tmp_path, ca, client_ca)
    running = build_server(root, "127.0.0.1:0", tls=tls, http="127.0.0.1:0")
    leaf = client_ca.issue_cert("client.example")
    leaf.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    settings = Settings(tls_cert=tmp_path / "client.pem", tls_key=tmp_path / "client.key")
    src = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(256, 256)}, str(src))
    try:
        assert running.http_url is not None and running.http_url.startswith("https://")
        puts = metrics.HTTP_REQUESTS.labels("/v1/uploads/{session}", "200")
        put_before = puts._value.get()
        with Client(running.address, settings=settings, timeout=10, tls_ca=tmp_path / "ca.pem") as c:
            c.push(src, "org/m:v1")
            assert puts._value.get() == put_before + 1  # the push's bytes went by HTTPS, with the certificate
            blob = c.manifest("org/m:v1")[2].tensors[0].chunks[0].blob
            before = metrics.BLOB_BYTES.labels("http")._value.get()
            got = c.load_state_dict("org/m:v1")
            assert type(c.transport).__name__ == "HttpTransport"
        assert torch.equal(got["w"], load_file(str(src))["w"])
        assert metrics.BLOB_BYTES.labels("http")._value.get() > before  # the bytes came over HTTPS
        url = f"{running.http_url}/blobs/{blob}"
        curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(tmp_path / "ca.pem")]
        mutual = [*curl, "--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key"), url]
        assert subprocess.run(mutual, capture_output=True, text=True, timeout=30).stdout == "200"
        anonymous = subprocess.run([*curl, url], capture_output=True, text=True, timeout=30)
        assert anonymous.stdout == "000"  # no client certificate: the handshake fails, nothing is served
        plain = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url.replace("https", "http")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert plain.stdout in ("000", "400")  # no plaintext HTTP on the TLS listener
    finally:
        running.stop(1)
