"""Upload sessions over HTTP (``PUT /v1/uploads/<session>``): the default push's bytes, and what the route
does with bad, hostile, cut and unauthorised requests. curl and http.client are the judges of the route."""

from __future__ import annotations

import hashlib
import http.client
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import small_model_dir

from mzstore.client import Client
from mzstore.errors import IntegrityError, SessionBusy, SessionNotFound, Unavailable
from mzstore.push.protocol import UploadBegin
from mzstore.push.source import open_source
from mzstore.push.upload import begin_for, file_hashes
from mzstore.server import metrics
from mzstore.server.app import RunningServer, build_server
from mzstore.server.auth import new_token, token_line
from mzstore.settings import Settings
from mzstore.transport import uploads as client_uploads
from mzstore.transport.grpc import GrpcTransport

SMALL = Settings(chunk_bytes=64 * 1024, shard_bytes=256 * 1024)
ROUTE = "/v1/uploads/{session}"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[RunningServer]:
    running = build_server(tmp_path / "store", "127.0.0.1:0", SMALL, http="127.0.0.1:0")
    yield running
    running.stop(grace=0.5)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return small_model_dir(tmp_path / "src")


def _puts(status: str) -> float:
    return metrics.HTTP_REQUESTS.labels(ROUTE, status)._value.get()


def _pulled_same(c: Client, ref: str, model: Path, out: Path) -> None:
    c.pull(ref, out)
    for name in ("model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (model / name).read_bytes()


def _session(served: RunningServer, model: Path) -> tuple[GrpcTransport, str, UploadBegin, list[bytes]]:
    """A started upload session for ``model`` (hashed), with the files' bytes in order."""
    source = open_source(model)
    begin = begin_for(source, "u/m:v1", "lossless", None, (), file_hashes(source))
    transport = GrpcTransport(served.address)
    session = uuid.uuid4().hex
    status = transport.start_upload(session, begin)
    assert status.upload_url.endswith(f"/v1/uploads/{session}")
    data = [(model / f.path).read_bytes() for f in begin.files]
    return transport, session, begin, data


def _put(
    served: RunningServer, path: str, body: bytes | Iterator[bytes], headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    assert served.http is not None
    conn = http.client.HTTPConnection("127.0.0.1", served.http.port, timeout=30)
    try:
        conn.request("PUT", path, body=body, headers=headers or {}, encode_chunked=not isinstance(body, bytes))
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_a_push_sends_its_bytes_by_http_and_pulls_back_the_same(
    served: RunningServer, model: Path, tmp_path: Path
) -> None:
    ok = _puts("200")
    with Client(served.address, cache=False) as c:
        info = c.push(model, "u/m:v1")
        assert _puts("200") == ok + 1  # one PUT carried the files
        assert info.bytes_transferred == sum(p.stat().st_size for p in model.iterdir())
        _pulled_same(c, "u/m:v1", model, tmp_path / "out")
    # data_plane="grpc" keeps the bytes on the gRPC stream; the same model, the same manifest
    with Client(served.address, cache=False, data_plane="grpc") as c:
        again = c.push(model, "u/m:grpc")
        assert _puts("200") == ok + 1 and again.digest == info.digest


def test_without_an_http_plane_or_reachable_url_the_stream_carries_the_push(
    model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    running = build_server(tmp_path / "store", "127.0.0.1:0", SMALL)  # no HTTP plane: no upload URL
    try:
        with Client(running.address, cache=False) as c:
            c.push(model, "u/m:v1")
            _pulled_same(c, "u/m:v1", model, tmp_path / "out")
    finally:
        running.stop(grace=0.5)
    running = build_server(tmp_path / "store2", "127.0.0.1:0", SMALL, http="127.0.0.1:0")
    try:
        from conftest import free_port

        assert running.service is not None
        running.service.upload_url = f"http://127.0.0.1:{free_port()}/v1/uploads"  # told, but nothing listens there
        with Client(running.address, cache=False) as c:
            c.push(model, "u/m:v1")
            assert "uploading over gRPC instead" in caplog.text
            _pulled_same(c, "u/m:v1", model, tmp_path / "out2")
    finally:
        running.stop(grace=0.5)


def test_a_cut_put_resumes_where_the_server_got_to(
    served: RunningServer, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first PUT breaks after 100 KB: what arrived stays in the session, the next attempt sends the rest
    (at the offsets the server reports), and the commit stores the model whole."""
    real_send = client_uploads._send
    cuts: list[int] = []

    def cut_once(conn: http.client.HTTPConnection, events: Iterator, *args: object) -> None:
        if cuts:
            return real_send(conn, events, *args)  # type: ignore[arg-type]

        def until_cut() -> Iterator:
            sent = 0
            for e in events:
                if sent > 100_000:
                    cuts.append(sent)
                    conn.sock.close()  # type: ignore[union-attr]
                    raise ConnectionResetError("cut by the test")
                sent += len(getattr(e, "data", b""))
                yield e

        return real_send(conn, until_cut(), *args)  # type: ignore[arg-type]

    monkeypatch.setattr(client_uploads, "_send", cut_once)
    with Client(served.address, cache=False) as c:
        info = c.push(model, "u/m:v1")
        total = sum(p.stat().st_size for p in model.iterdir())
        assert cuts and total < info.bytes_transferred < total + cuts[0] + 2**20
        _pulled_same(c, "u/m:v1", model, tmp_path / "out")


def test_the_route_refuses_bad_requests_and_loses_nothing(served: RunningServer, model: Path) -> None:
    transport, session, begin, data = _session(served, model)
    body = b"".join(data)
    path = f"/v1/uploads/{session}"
    # wrong length, none (chunked), unknown session, hostile names: refused before a byte is taken
    status, answer = _put(served, path, body[:-1])
    assert status == 400 and answer["grpc_code"] == "INVALID_ARGUMENT" and f"{len(body)} bytes" in answer["error"]
    status, answer = _put(served, path, iter([body]), {"Transfer-Encoding": "chunked"})
    assert status == 400 and "Content-Length" in answer["error"]
    status, answer = _put(served, f"/v1/uploads/{uuid.uuid4().hex}", body)
    assert status == 404 and answer["code"] == "session-not-found"
    for name in ("..%2f..%2fetc", "a%00b", "x" * 200, "%2e%2e"):
        status, answer = _put(served, f"/v1/uploads/{name}", body)
        assert status in (400, 404) and "error" in answer, name
    assert transport.start_upload(session, begin).received == [0] * len(data)  # nothing taken
    # an altered byte fails the file's sha256: the session goes, nothing is stored
    bad = bytearray(body)
    bad[len(data[0]) // 2] ^= 1
    status, answer = _put(served, path, bytes(bad))
    assert status == 502 and answer["grpc_code"] == "DATA_LOSS" and "sha256 mismatch" in answer["error"]
    with pytest.raises(SessionNotFound):
        transport.commit_upload(session)
    with Client(served.address, cache=False) as c:
        assert c.ls() == []
    transport.close()


def test_curl_uploads_a_session_and_a_resume(served: RunningServer, model: Path, tmp_path: Path) -> None:
    """curl sends the first file and dies; a second curl sends the rest at the offsets the first answer's
    session reports; the commit stores the model."""
    transport, session, begin, data = _session(served, model)
    url = f"{served.http_url}/v1/uploads/{session}"
    head = tmp_path / "head"
    head.write_bytes(data[0])
    # Content-Length says the whole remainder, the body stops after the first file: a cut upload
    proc = subprocess.run(
        [
            "curl",
            "-s",
            "-m",
            "2",
            "-X",
            "PUT",
            "-H",
            f"Content-Length: {sum(map(len, data))}",
            "--data-binary",
            f"@{head}",
            url,
        ],
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode != 0 or b"error" in proc.stdout
    for _ in range(100):  # until the server has seen the connection close
        try:
            status = transport.start_upload(session, begin)
            break
        except SessionBusy:
            time.sleep(0.05)
    assert status.received[0] == len(data[0]) and status.received[1:] == [0] * (len(data) - 1)
    rest = tmp_path / "rest"
    rest.write_bytes(b"".join(data[1:]))
    out = subprocess.run(["curl", "-s", "-X", "PUT", "--data-binary", f"@{rest}", url], capture_output=True, timeout=30)
    answer = json.loads(out.stdout)
    assert answer["ended"] == [True] * len(data) and answer["committed"] is False
    result = transport.commit_upload(session)
    with Client(served.address, cache=False) as c:
        assert c.manifest("u/m:v1")[1] == result.digest
        _pulled_same(c, "u/m:v1", model, tmp_path / "out")
    transport.close()


def test_uploads_need_a_write_token(model: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    writer, reader = new_token(), new_token()
    tokens.write_text(token_line("w", writer, "write") + "\n" + token_line("r", reader, "read") + "\n")
    running = build_server(tmp_path / "store", "127.0.0.1:0", SMALL, auth=tokens, http="127.0.0.1:0")
    try:
        source = open_source(model)
        begin = begin_for(source, "u/m:v1", "lossless", None, (), file_hashes(source))
        transport = GrpcTransport(running.address, token=writer)
        session = uuid.uuid4().hex
        transport.start_upload(session, begin)
        body = b"".join((model / f.path).read_bytes() for f in begin.files)
        path = f"/v1/uploads/{session}"
        for headers, code in (({}, 401), ({"Authorization": f"Bearer {reader}"}, 403)):
            status, answer = _put(running, path, body, headers)
            assert status == code and "error" in answer
        assert transport.start_upload(session, begin).received == [0] * len(begin.files)
        with Client(running.address, cache=False, token=writer) as c:  # the client sends its token
            c.push(model, "u/m:v1")
            _pulled_same(c, "u/m:v1", model, tmp_path / "out")
        transport.close()
    finally:
        running.stop(grace=0.5)


def test_a_file_changed_after_hashing_fails_the_push(
    served: RunningServer, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store holds the model, so a second push hashes its files first (their sizes are held); a file
    that then changes is sent with the old sha256 and fails the file's check: nothing is stored."""
    from mzstore.push import upload

    with Client(served.address, cache=False) as c:
        first = c.push(model, "u/m:v1")
    (model / "config.json").write_text('{"a": 2}')  # same size, other bytes: not a known file
    real = upload.file_hashes

    def then_change(source: object, remembered: object = None, workers: int = 4, only: object = None) -> list[str]:
        out = real(source, remembered, workers, only)  # type: ignore[arg-type]
        assert all(out), "held sizes are hashed first"
        (model / "config.json").write_text('{"a": 3}')
        return out

    monkeypatch.setattr(upload, "file_hashes", then_change)
    with Client(served.address, cache=False) as c:
        with pytest.raises(IntegrityError, match="changed"):
            c.push(model, "u/m:v2")
        assert [r[0] for r in c.ls()] == ["u/m"] and c.manifest("u/m:v1")[1] == first.digest


def test_a_new_model_is_sent_at_once_and_a_copy_is_still_known(
    served: RunningServer, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only files whose size the store holds are hashed before the upload (FindFileSizes): a new model
    sends its bytes at once, each file's sha256 after it in the PUT body; a copy under another name is
    hashed first and sends nothing."""
    from mzstore.push import upload

    hashed: list[str] = []
    real = upload._sha256

    def counted(f: object) -> str:
        hashed.append(f.path)  # type: ignore[attr-defined]
        return real(f)  # type: ignore[arg-type]

    monkeypatch.setattr(upload, "_sha256", counted)
    home = tmp_path / "home"
    monkeypatch.setenv("MZSTORE_HOME", str(home))  # nothing remembered
    with Client(served.address, cache=False) as c:
        assert c.transport.held_sizes([1, 2]) == [False, False]
        first = c.push(model, "u/m:v1")
        assert hashed == [] and first.bytes_transferred > 0
        copy = tmp_path / "copy"
        copy.mkdir()
        for p in model.iterdir():
            (copy / p.name).write_bytes(p.read_bytes())
        again = c.push(copy, "u/copy:v1")
        assert sorted(hashed) == ["config.json", "model.safetensors"] and again.bytes_transferred == 0
        assert again.digest == first.digest
        _pulled_same(c, "u/copy:v1", model, tmp_path / "out")


def test_the_size_index_is_filled_once_for_a_store_indexed_before_it(
    served: RunningServer, model: Path, tmp_path: Path
) -> None:
    from mzstore.storage.store import SIZES_COMPLETE

    with Client(served.address, cache=False) as c:
        c.push(model, "u/m:v1")
    root = tmp_path / "store"
    sizes = sorted(p.stat().st_size for p in model.iterdir())
    assert sorted(int(p.name) for p in (root / "index" / "sizes").iterdir() if p.name.isdigit()) == sizes
    for p in (root / "index" / "sizes").iterdir():  # as a store from before the size index
        p.unlink()
    with Client(served.address, cache=False) as c:
        assert c.transport.held_sizes([*sizes, sizes[0] + 1]) == [True, True, False]
    assert (root / SIZES_COMPLETE).exists()


def test_client_checks_the_events_against_the_session() -> None:
    """Out-of-order data, a file that grew, an end that does not match the begin: refused before sending."""
    from mzstore.push.protocol import UploadData, UploadEnd

    sha = hashlib.sha256(b"abcd").hexdigest()

    class Sink:
        sent = b""

        def send(self, data: bytes) -> None:
            self.sent += bytes(data)

    cases = [
        [UploadData(1, 0, b"ab")],  # file 1 before file 0
        [UploadData(0, 0, b"abcde")],  # longer than the begin said
        [UploadData(0, 0, b"abcd"), UploadEnd(0, 4, "0" * 64)],  # another sha256 than the begin's
        [UploadData(0, 0, b"ab")],  # the events stop inside the file
    ]
    for events in cases:
        with pytest.raises(IntegrityError):
            client_uploads._send(Sink(), events, [4], [sha], [0], [False])  # type: ignore[arg-type]
    sink = Sink()
    client_uploads._send(sink, [UploadData(0, 2, b"cd"), UploadEnd(0, 4, sha)], [4], [sha], [2], [False])  # type: ignore[arg-type]
    assert sink.sent == b"cd"
    with pytest.raises(Unavailable):
        client_uploads.put_upload(
            "http://127.0.0.1:9/v1/uploads/x", [], sizes=[], hashes=[], received=[], ended=[], timeout=5
        )


def test_a_body_carries_the_sha256_the_begin_left_out() -> None:
    """After a file's bytes, its sha256 (32 bytes) when the begin did not give it: read across pieces;
    a body cut inside it ends the stream with the file's bytes in and its end not; bytes past it are refused."""
    from mzstore.errors import InvalidArgument
    from mzstore.push.protocol import UploadData, UploadEnd, UploadFile, UploadStatus
    from mzstore.server.uploads import body_events, remaining

    a, b = b"a" * 10, b"b" * 7
    sha_b = hashlib.sha256(b).hexdigest()
    begin = UploadBegin(
        ref="u/m:v1",
        codec="lossless",
        files=[UploadFile("a", 10, "file", hashlib.sha256(a).hexdigest()), UploadFile("b", 7, "file", "")],
        source_kind="dir",
    )
    status = UploadStatus("s", [4, 0], [False, False])
    body = a[4:] + b + bytes.fromhex(sha_b)
    assert remaining(begin, status) == len(body) == 6 + 7 + 32
    for cut in range(1, len(body)):  # every way of cutting it into two pieces
        events = list(body_events(begin, status, iter([body[:cut], body[cut:]]), None, 0))
        data = b"".join(bytes(e.data) for e in events if isinstance(e, UploadData))
        ends = [e for e in events if isinstance(e, UploadEnd)]
        assert data == a[4:] + b and [(e.file, e.size) for e in ends] == [(0, 10), (1, 7)]
        assert ends[1].sha256 == sha_b
    short = list(body_events(begin, status, iter([body[:-5]]), None, 0))
    assert [type(e).__name__ for e in short][-1] == "UploadData"  # no end for b: a broken stream
    with pytest.raises(InvalidArgument, match="more bytes"):
        list(body_events(begin, status, iter([body + b"x"]), None, 0))
