"""The HTTP data plane (issue 14): blob URLs as curl, caches and CDNs see them, and the client using them.

curl is the judge of the HTTP semantics (status, headers, bytes); the client's
pulls go over the plane and fall back to gRPC per range; bad input is refused
before storage is touched.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import small_model_dir
from s3 import moto_server, s3_bucket_url, s3_env  # noqa: F401

from mzstore.client import Client
from mzstore.errors import Unavailable
from mzstore.server.app import RunningServer, build_server
from mzstore.server.auth import new_token, token_line
from mzstore.settings import Settings
from mzstore.storage import Store, open_node
from mzstore.storage.store import blob_key

SMALL = Settings(chunk_bytes=64 * 1024, shard_bytes=256 * 1024)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RunningServer]:
    running = build_server(tmp_path / "store", "127.0.0.1:0", SMALL, http="127.0.0.1:0")
    yield running
    running.stop(grace=0.5)


def _push_small(running: RunningServer, tmp_path: Path) -> Path:
    """Push the small model (``tmp_path/src``) as ``h/m:v1`` over gRPC; its directory."""
    src = small_model_dir(tmp_path / "src")
    with Client(running.address, cache=False, data_plane="grpc") as c:
        c.push(src, "h/m:v1")
    return src


def _blob(running: RunningServer, tmp_path: Path) -> tuple[str, bytes]:
    """Push a model; one of its blobs and that blob's bytes as stored."""
    with Client(running.address, cache=False, data_plane="grpc") as c:
        c.push(small_model_dir(tmp_path / "src"), "h/m:v1")
        blob = c.manifest("h/m:v1")[2].tensors[0].chunks[0].blob
    return blob, (tmp_path / "store" / blob_key(blob)).read_bytes()


def curl(*args: str) -> tuple[int, dict[str, str], bytes]:
    """``curl -s`` → (status, lower-cased headers of the last response, body)."""
    body_to = "/dev/null" if "-I" in args else "-"  # with -I, curl would print the headers as the body too
    out = subprocess.run(["curl", "-s", "-D", "-", "-o", body_to, *args], capture_output=True, timeout=60).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    while body.startswith(b"HTTP/"):  # a redirect followed (-L): the last response is the one that counts
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def test_blob_responses_are_what_caches_and_cdns_need(served: RunningServer, tmp_path: Path) -> None:
    blob, stored = _blob(served, tmp_path)
    url = f"{served.http_url}/v2/h/m/blobs/{blob}"
    etag = f'"{blob.split(":")[1]}"'
    status, h, body = curl("-H", "Accept-Encoding: gzip, br", url)
    assert status == 200 and body == stored
    assert h["etag"] == etag and h["cache-control"] == "public, max-age=31536000, immutable"
    assert h["accept-ranges"] == "bytes" and int(h["content-length"]) == len(stored)
    assert "content-encoding" not in h and h["docker-content-digest"] == blob
    assert hashlib.sha256(body).hexdigest() == blob.split(":")[1]
    status, h, body = curl("-I", url)
    assert status == 200 and body == b"" and int(h["content-length"]) == len(stored)
    assert curl(f"{served.http_url}/blobs/{blob}")[2] == stored  # the name-free alias

    n = len(stored)
    for spec, first, last in [
        ("0-99", 0, 99),
        ("100-", 100, n - 1),
        ("-50", n - 50, n - 1),
        (f"10-{n + 99}", 10, n - 1),
    ]:
        status, h, body = curl("-r", spec, url)
        assert status == 206 and body == stored[first : last + 1], spec
        assert h["content-range"] == f"bytes {first}-{last}/{n}" and int(h["content-length"]) == last - first + 1
    for spec in (f"{n}-", "99999999999999999999-", "abc", "20-10"):
        status, h, _ = curl("-H", f"Range: bytes={spec}", url)
        assert status == 416, spec
    status, h, body = curl("-r", "0-1,5-9", url)
    assert status == 416 and h["x-error-code"] == "MultipleRanges"
    status, h, _ = curl("-H", "Range: bytes=" + ",".join(f"{i}-{i}" for i in range(300)), url)
    assert status == 416

    assert curl("-H", f"If-None-Match: {etag}", url)[0] == 304
    assert curl("-H", 'If-None-Match: "something-else"', url)[0] == 200
    status, h, body = curl("-H", f"If-Range: {etag}", "-r", "0-9", url)
    assert status == 206 and body == stored[:10]
    status, h, body = curl("-H", 'If-Range: "another-version"', "-r", "0-9", url)
    assert status == 200 and body == stored  # another version's validator: the whole blob


def test_bad_paths_are_refused_before_storage(served: RunningServer, tmp_path: Path) -> None:
    blob, _ = _blob(served, tmp_path)
    base = served.http_url
    reads = served.store.counts.copy()
    for path, want in [
        ("/blobs/sha256:zz", 400),
        (f"/blobs/{blob.upper()}", 400),
        ("/blobs/md5:" + "0" * 32, 400),
        ("/v2/Bad Name!/blobs/" + blob, 400),
        ("/v2/a/../../etc/passwd", 404),
        ("/blobs/" + blob + "%00", 400),
        ("/v2/" + "a/" * 600 + "blobs/" + blob, 400),
        ("/nothing/here", 404),
    ]:
        status, _, _ = curl("--path-as-is", base + path.replace(" ", "%20"))
        assert status == want, (path[:60], status)
    assert curl(f"{base}/blobs/sha256:{'0' * 64}")[0] == 404  # well-formed, not stored
    assert served.store.counts == reads  # nothing was verified, repaired or fetched for them


def test_tokens_guard_blobs_and_public_blobs_opens_them(tmp_path: Path) -> None:
    reader, writer = new_token(), new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line("r", reader, "read") + "\n" + token_line("w", writer, "write") + "\n")
    running = build_server(tmp_path / "store", "127.0.0.1:0", SMALL, auth=tokens, http="127.0.0.1:0")
    try:
        with Client(running.address, cache=False, token=writer, data_plane="grpc") as c:
            c.push(small_model_dir(tmp_path / "src"), "h/m:v1")
            blob = c.manifest("h/m:v1")[2].tensors[0].chunks[0].blob
        url = f"{running.http_url}/blobs/{blob}"
        status, h, _ = curl(url)
        assert status == 401 and h["x-error-code"] == "Unauthenticated"
        assert curl("-H", "Authorization: Bearer not-a-token", url)[0] == 401
        assert curl("-H", "Authorization: Basic abc", url)[0] == 401
        assert curl("-H", f"Authorization: Bearer {reader}", url)[0] == 200
        absent = f"{running.http_url}/blobs/sha256:{'1' * 64}"
        assert curl(absent)[0] == 401  # refused before looking for the blob
        assert curl(f"{running.http_url}/healthz")[0] == 200 and curl(f"{running.http_url}/metrics")[0] == 200
        with Client(running.address, cache=False, token=reader) as c:  # the client sends its token over HTTP too
            info = c.pull("h/m:v1", tmp_path / "out")
            assert type(c.transport).__name__ == "HttpTransport" and info.bytes_transferred > 0
    finally:
        running.stop(grace=0.5)
    public = build_server(tmp_path / "store", "127.0.0.1:0", SMALL, auth=tokens, http="127.0.0.1:0", public_blobs=True)
    try:
        assert curl(f"{public.http_url}/blobs/{blob}")[0] == 200
    finally:
        public.stop(grace=0.5)


def test_a_corrupt_copy_is_never_served(tmp_path: Path) -> None:
    nodes = [open_node(tmp_path / "a"), open_node(tmp_path / "b")]
    running = build_server(Store(nodes, replicas=2), "127.0.0.1:0", SMALL, http="127.0.0.1:0")
    try:
        with Client(running.address, cache=False, data_plane="grpc") as c:
            c.push(small_model_dir(tmp_path / "src"), "h/m:v1")
            blob = c.manifest("h/m:v1")[2].tensors[0].chunks[0].blob
        first = Path(running.store.preference(blob)[0].root)  # type: ignore[attr-defined]  # the copy read first
        good = (first / blob_key(blob)).read_bytes()
        bad = b"X" + good[1:]
        (first / blob_key(blob)).write_bytes(bad)
        status, _, body = curl(f"{running.http_url}/blobs/{blob}")
        assert status == 200 and body == good  # the other copy is intact: it is served, the bad one repaired
        running.store.wait_repairs(30)
        assert (first / blob_key(blob)).read_bytes() == good
    finally:
        running.stop(grace=0.5)
    for root in (tmp_path / "a", tmp_path / "b"):
        (root / blob_key(blob)).write_bytes(bad)
    fresh = build_server(Store(nodes, replicas=2), "127.0.0.1:0", SMALL, http="127.0.0.1:0")  # no copy intact
    try:
        status, _, body = curl(f"{fresh.http_url}/blobs/{blob}")
        assert status == 502 and bad not in body and b"no intact copy" in body
    finally:
        fresh.stop(grace=0.5)


def test_the_client_pulls_over_http_and_falls_back_per_range(
    served: RunningServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mzstore.server import metrics

    src = _push_small(served, tmp_path)
    before_http = metrics.BLOB_BYTES.labels("http")._value.get()
    before_grpc = metrics.BLOB_BYTES.labels("grpc")._value.get()
    with Client(served.address, cache=False) as c:
        info = c.pull("h/m:v1", tmp_path / "a")
        assert type(c.transport).__name__ == "HttpTransport"
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert metrics.BLOB_BYTES.labels("http")._value.get() - before_http == info.bytes_transferred
    assert metrics.BLOB_BYTES.labels("grpc")._value.get() == before_grpc  # no byte over gRPC

    served.http.stop()  # type: ignore[union-attr]  # the HTTP plane goes away: every range falls back
    with caplog.at_level(logging.WARNING, logger="mzstore.transport.http"), Client(served.address, cache=False) as c:
        info = c.pull("h/m:v1", tmp_path / "b")
    assert "using the server for those ranges" in caplog.text
    assert metrics.BLOB_BYTES.labels("grpc")._value.get() - before_grpc == info.bytes_transferred
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def _blob_requests() -> float:
    from mzstore.server import metrics

    return sum(
        m.value
        for family in metrics.HTTP_REQUESTS.collect()
        for m in family.samples
        if m.name.endswith("_total") and "blobs" in m.labels["route"] and m.labels["status"] in ("200", "206")
    )


def test_a_pull_reads_each_run_of_chunks_in_one_request(
    served: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of adjacent chunks are one GET each (every request costs the server ~1 ms), decoded as they arrive."""
    from mzstore.pull.plan import plan_pull

    src = _push_small(served, tmp_path)
    with Client(served.address, cache=False, data_plane="grpc") as c:
        manifest = c.manifest("h/m:v1")[2]

    chunks = [t.chunk for t in plan_pull(manifest)]  # the tensors' and config.json's
    blobs = {ch.blob for ch in chunks}
    assert len(chunks) >= 4 * len(blobs) >= 8
    # Groups of about one chunk, as the 8 MiB default makes of 16 MiB chunks: alone, one request each.
    monkeypatch.setenv("MZSTORE_PULL_COALESCE", str(max(ch.length + ch.raw_length for ch in chunks)))
    before = _blob_requests()
    with Client(served.address, cache=False) as c:
        c.fetch = c.fetch  # type: ignore[method-assign]  # a wrapped fetch: every read goes through it, alone
        c.pull("h/m:v1", tmp_path / "alone")
    alone = _blob_requests() - before
    before = _blob_requests()
    with Client(served.address, cache=False) as c:
        info = c.pull("h/m:v1", tmp_path / "runs")
        assert type(c.transport).__name__ == "HttpTransport"
    runs = _blob_requests() - before
    assert alone >= len(chunks)
    assert runs <= len(blobs) + 1  # one per blob (+ the first read of safetensors' header bytes)
    assert info.bytes_transferred == sum(ch.length for ch in chunks)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "runs" / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("graceful", [True, False], ids=["closed", "reset"])
def test_a_run_cut_short_is_finished_chunk_by_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, graceful: bool):
    """A connection that dies part way through a run's body: the chunks already in are kept, the rest are
    read one by one, and the model comes out whole."""
    from faultproxy import FaultProxy

    running = build_server(tmp_path / "store", "127.0.0.1:0", SMALL, http="127.0.0.1:0")
    proxy = FaultProxy(running.http.port).start()  # type: ignore[union-attr]
    try:
        src = _push_small(running, tmp_path)
        monkeypatch.setenv("MZSTORE_BLOB_URL", f"http://{proxy.address}")
        proxy.reset_after(150_000, graceful=graceful)  # inside the first run (each is ~250 KiB)
        before = _blob_requests()
        with Client(running.address, cache=False) as c:
            c.pull("h/m:v1", tmp_path / "out")
        assert proxy.resets == 1
        assert _blob_requests() - before > 4  # the runs, then the cut run's remaining chunks alone
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    finally:
        proxy.stop()
        running.stop(grace=0.5)


class _NoControl:
    """The control plane of a bare :class:`HttpTransport` under test: there is none."""

    address = "nowhere:1"

    def read_blob(self, digest: str, offset: int, length: int) -> bytes:
        raise AssertionError("fell back to the control plane")

    def close(self) -> None:
        pass


def _range_server(data: bytes, keep_alive: bool, shift: list[int] | None = None, cut: list[int] | None = None):  # type: ignore[no-untyped-def]
    """A bare HTTP/1.1 server of ``data``'s ranges on loopback: (its listener, one entry per connection accepted).

    ``keep_alive=False`` closes each connection after one response without saying so (as a server whose
    idle timeout is short does); ``shift[0]`` answers a range that many bytes off, ``cut[0]`` sends that
    many bytes fewer than announced and hangs up.
    """
    import threading

    shift = shift or [0]
    cut = cut or [0]
    accepted: list[int] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def answer(conn: socket.socket) -> None:
        with conn:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    piece = conn.recv(4096)
                    if not piece:
                        return
                    head += piece
                rng = next(line for line in head.decode().split("\r\n") if line.lower().startswith("range:"))
                first, last = (int(x) + shift[0] for x in rng.split("=")[1].split("-"))
                body = data[first : last + 1]
                try:
                    conn.sendall(
                        f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                        f"Content-Range: bytes {first}-{last}/{len(data)}\r\n\r\n".encode()
                        + body[: len(body) - cut[0]]
                    )
                except OSError:
                    return
                if cut[0] or not keep_alive:
                    return

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener, accepted


def test_read_parts_checks_what_the_server_sends(tmp_path: Path) -> None:
    """``read_parts`` yields exactly the parts asked for; another range or a short body is an IntegrityError,
    and a reader closed early does not leave its connection for the next read."""
    from mzstore.errors import IntegrityError
    from mzstore.transport.http import HttpTransport

    blob = "sha256:" + "cd" * 32
    data = bytes(range(256)) * 64
    shift = [0]  # answer a range this far off
    cut = [0]  # send this many bytes fewer
    listener, accepted = _range_server(data, keep_alive=True, shift=shift, cut=cut)
    transport = HttpTransport(_NoControl(), f"http://127.0.0.1:{listener.getsockname()[1]}", Settings())  # type: ignore[arg-type]
    try:
        parts = [bytes(p) for p in transport.read_parts(blob, 100, [10, 2000, 1])]
        assert parts == [data[100:110], data[110:2110], data[2110:2111]]
        assert [bytes(p) for p in transport.read_parts(blob, 0, [5])] == [data[:5]]
        assert len(accepted) == 1  # both on one kept-alive connection
        reader = transport.read_parts(blob, 0, [100, 100])
        assert bytes(next(reader)) == data[:100]
        reader.close()  # the second part is unread: that connection must not serve the next read
        assert bytes(transport.read_blob(blob, 7, 3)) == data[7:10]
        assert len(accepted) == 2
        shift[0] = 1
        with pytest.raises(IntegrityError, match="another range"):
            list(transport.read_parts(blob, 0, [10, 10]))
        shift[0], cut[0] = 0, 5
        got = []
        with pytest.raises(IntegrityError, match="got 5 of 10"):
            for part in transport.read_parts(blob, 0, [10, 10]):
                got.append(bytes(part))
        assert got == [data[:10]]  # the part that was whole came through
    finally:
        transport.close()
        listener.close()


def test_forced_transports_and_a_blob_url_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from faultproxy import FaultProxy

    running = build_server(tmp_path / "store", "127.0.0.1:0", SMALL, http="127.0.0.1:0")
    plain = build_server(tmp_path / "store", "127.0.0.1:0", SMALL)  # no HTTP plane
    proxy = FaultProxy(running.http.port).start()  # type: ignore[union-attr]  # a "site cache" in front of it
    try:
        with Client(running.address, cache=False, data_plane="grpc") as c:
            c.push(small_model_dir(tmp_path / "src"), "h/m:v1")
        with Client(plain.address, cache=False, data_plane="http") as c, pytest.raises(Unavailable, match="no HTTP"):
            c.pull("h/m:v1", tmp_path / "x")
        monkeypatch.setenv("MZSTORE_BLOB_URL", f"http://{proxy.address}")
        with Client(plain.address, cache=False) as c:  # the override works even where nothing is advertised
            info = c.pull("h/m:v1", tmp_path / "y")
        assert proxy.forwarded >= info.bytes_transferred > 0
        monkeypatch.setenv("MZSTORE_TRANSPORT", "grpc")
        sent = proxy.forwarded
        with Client(running.address, cache=False) as c:
            c.pull("h/m:v1", tmp_path / "z")
            assert type(c.transport).__name__ == "GrpcTransport"
        assert proxy.forwarded == sent
    finally:
        proxy.stop()
        plain.stop(grace=0.5)
        running.stop(grace=0.5)


def test_metrics_health_and_readiness(served: RunningServer, tmp_path: Path) -> None:
    _blob(served, tmp_path)
    with Client(served.address, cache=False) as c:
        c.pull("h/m:v1", tmp_path / "out")
    status, h, body = curl(f"{served.http_url}/metrics")
    text = body.decode()
    assert status == 200 and h["content-type"].startswith("text/plain")
    for needle in (
        'mzstore_blob_bytes_served_total{plane="http"}',
        'mzstore_blob_bytes_served_total{plane="grpc"}',
        'mzstore_grpc_requests_total{code="OK",method="GetManifest"}',
        'mzstore_http_requests_total{route="/blobs/{digest}",status="206"}',
        'mzstore_push_bytes_total{kind="raw"}',
        "mzstore_push_seconds_count",
        "mzstore_blobs_repaired_total",
        "mzstore_integrity_failures_total",
        'mzstore_pull_through_total{result="hit"}',
        "mzstore_grpc_in_flight",
    ):
        assert needle in text, needle
    assert curl(f"{served.http_url}/healthz")[0] == 200
    assert curl(f"{served.http_url}/readyz")[0] == 200


def test_blobs_on_s3_are_a_redirect_to_a_presigned_url(tmp_path: Path, s3_bucket_url: str) -> None:  # noqa: F811
    running = build_server(Store([open_node(s3_bucket_url)]), "127.0.0.1:0", SMALL, http="127.0.0.1:0")
    streamed = build_server(Store([open_node(s3_bucket_url)]), "127.0.0.1:0", SMALL, http="127.0.0.1:0", presign=False)
    try:
        src = small_model_dir(tmp_path / "src")
        with Client(running.address, cache=False, data_plane="grpc") as c:
            c.push(src, "h/m:v1")
            blob = c.manifest("h/m:v1")[2].tensors[0].chunks[0].blob
        status, h, _ = curl(f"{running.http_url}/blobs/{blob}")
        assert status == 307 and "Signature=" in h["location"] and h["etag"] == f'"{blob.split(":")[1]}"'
        status, _, body = curl("-L", "-r", "0-99", f"{running.http_url}/blobs/{blob}")
        assert (
            status == 206 and hashlib.sha256(curl("-L", f"{running.http_url}/blobs/{blob}")[2]).hexdigest() == blob[7:]
        )
        status, h, body = curl("-r", "0-99", f"{streamed.http_url}/blobs/{blob}")  # presigning off: streamed
        assert status == 206 and len(body) == 100 and h["content-range"].startswith("bytes 0-99/")
        whole = curl(f"{streamed.http_url}/blobs/{blob}")[2]
        status, h, body = curl("-r", "-10", f"{streamed.http_url}/blobs/{blob}")  # a suffix: the last 10 bytes
        assert (status, body) == (206, whole[-10:])
        assert h["content-range"] == f"bytes {len(whole) - 10}-{len(whole) - 1}/{len(whole)}"
        with Client(running.address, cache=False) as c:  # the client follows the redirect
            c.pull("h/m:v1", tmp_path / "out")
        assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    finally:
        streamed.stop(grace=0.5)
        running.stop(grace=0.5)


def test_slow_clients_do_not_hold_the_server(served: RunningServer, tmp_path: Path) -> None:
    blob, stored = _blob(served, tmp_path)
    stalled = []
    for _ in range(64):  # connections that send half a request and then nothing
        s = socket.create_connection(("127.0.0.1", served.http.port))  # type: ignore[union-attr]
        s.sendall(f"GET /blobs/{blob} HTTP/1.1\r\nHost: x\r\n".encode())
        stalled.append(s)
    try:
        start = time.monotonic()
        status, _, body = curl("-r", "0-9", f"{served.http_url}/blobs/{blob}")
        assert status == 206 and body == stored[:10] and time.monotonic() - start < 5
    finally:
        for s in stalled:
            s.close()


def test_a_kept_alive_connection_the_server_closed_is_replaced(tmp_path: Path) -> None:
    """A server that closes idle keep-alive connections (as nginx and CDNs do) costs a reconnect, not a fallback."""
    from mzstore.transport.http import HttpTransport

    blob = "sha256:" + "ab" * 32
    data = bytes(range(256)) * 16
    # closed after one response, though the client was told nothing: its pooled copy is stale
    listener, accepted = _range_server(data, keep_alive=False)
    transport = HttpTransport(_NoControl(), f"http://127.0.0.1:{listener.getsockname()[1]}", Settings())  # type: ignore[arg-type]
    try:
        assert transport.read_blob(blob, 0, 100) == data[:100]
        time.sleep(0.1)  # the server has closed that connection by now
        assert transport.read_blob(blob, 100, 200) == data[100:300]
        assert len(accepted) == 2
    finally:
        transport.close()
        listener.close()


def test_blob_reads_go_through_a_forward_proxy(
    served: RunningServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MZSTORE_BLOB_PROXY (a Dragonfly dfdaemon, a corporate proxy) carries the range reads, and only them."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    seen: list[str] = []

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(self.path)
            url = urlsplit(self.path)  # absolute form: the proxy is told the whole URL
            upstream = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
            upstream.request(
                "GET", url.path, headers={k: v for k, v in self.headers.items() if k != "Proxy-Connection"}
            )
            answer = upstream.getresponse()
            body = answer.read()
            self.send_response(answer.status)
            for k, v in answer.getheaders():
                if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            upstream.close()

        def log_message(self, *args: object) -> None:
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    src = small_model_dir(tmp_path / "src")
    try:
        with Client(served.address, cache=False, data_plane="grpc") as c:
            c.push(src, "h/m:v1")
        monkeypatch.setenv("MZSTORE_BLOB_PROXY", f"http://127.0.0.1:{proxy.server_address[1]}")
        with Client(served.address, cache=False) as c:
            info = c.pull("h/m:v1", tmp_path / "out")
            assert type(c.transport).__name__ == "HttpTransport"
    finally:
        proxy.shutdown()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert seen and all(p.startswith(f"{served.http_url}/blobs/sha256:") for p in seen)
    assert info.bytes_transferred > 0
