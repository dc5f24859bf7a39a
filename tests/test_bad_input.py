"""Bad input gets a clear error, leaves the store unchanged, and the server keeps serving.

Malformed files are sent through the real client (which does not parse
safetensors) so the server's strict parser is what rejects them; protocol
violations the client would never send go through the raw gRPC stub.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import store_files
from safetensors.torch import save_file

from mzstore.client import Client
from mzstore.errors import IntegrityError, InvalidArgument, InvalidName
from mzstore.server.app import RunningServer
from mzstore.v1 import store_pb2 as pb
from mzstore.v1 import store_pb2_grpc as pb_grpc


def _st(header: dict | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if n is None else n) + text + data


GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

MALFORMED: dict[str, tuple[bytes, str]] = {
    "not safetensors at all": (b"hello, this is a text file, not weights\n" * 4, "header length|not a safetensors"),
    "shorter than 8 bytes": (b"\x01\x02", "at least 8"),
    "header longer than file": (_st({"a": GOOD_ENTRY}, b"\0" * 8, n=10_000), "longer than the file"),
    "header not json": (_st(b"{not json at all}"), "not valid JSON"),
    "overlapping offsets": (
        _st(
            {"a": GOOD_ENTRY, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
            b"\0" * 12,
        ),
        "overlaps",
    ),
    "gap between tensors": (
        _st(
            {"a": GOOD_ENTRY, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
            b"\0" * 16,
        ),
        "gap",
    ),
    "trailing bytes": (_st({"a": GOOD_ENTRY}, b"\0" * 12), "trailing bytes"),
    "duplicate names": (
        _st(
            b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}',
            b"\0" * 8,
        ),
        "duplicate",
    ),
    "unknown dtype": (_st({"a": {"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype"),
    "shape size mismatch": (
        _st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
        "needs 4 bytes",
    ),
}


def _pickle_renamed(tmp_path: Path) -> bytes:
    path = tmp_path / "w.pt"
    torch.save({"w": torch.ones(4)}, path)
    return path.read_bytes()


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_safetensors_is_rejected_and_store_unchanged(
    case: str, client: Client, server: RunningServer, root: Path, tmp_path: Path
) -> None:
    data, message = MALFORMED[case]
    src = tmp_path / "model.safetensors"
    src.write_bytes(data)
    before = store_files(root)
    with pytest.raises(InvalidArgument, match=message) as exc:
        client.push(src, "test/bad:v1")
    assert "\n" not in str(exc.value)  # one line a user understands
    assert store_files(root) == before
    _assert_still_serving(client, tmp_path)


def test_pickle_renamed_to_safetensors_is_rejected(client: Client, root: Path, tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    src.write_bytes(_pickle_renamed(tmp_path))
    before = store_files(root)
    with pytest.raises(InvalidArgument, match="not a safetensors file"):
        client.push(src, "test/bad:v1")
    assert store_files(root) == before


def test_bad_file_inside_a_directory_rejects_the_whole_push(client: Client, root: Path, tmp_path: Path) -> None:
    src = tmp_path / "dir"
    src.mkdir()
    save_file({"ok": torch.ones(3)}, str(src / "model-00001-of-00002.safetensors"))
    (src / "model-00002-of-00002.safetensors").write_bytes(MALFORMED["trailing bytes"][0])
    (src / "config.json").write_text("{}")
    before = store_files(root)
    with pytest.raises(InvalidArgument, match=r"model-00002-of-00002\.safetensors|trailing"):
        client.push(src, "test/bad:v1")
    assert store_files(root) == before
    assert client.ls() == []


@pytest.mark.parametrize(
    "ref",
    ["../escape", "a/../../b", "name\x00nul", "x" * 300, "Org//double", "a/b:bad/tag", "a@sha256:1234"],
)
def test_invalid_names_rejected_before_upload(ref: str, client: Client, root: Path, tmp_path: Path) -> None:
    src = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(2)}, str(src))
    before = store_files(root)
    with pytest.raises(InvalidName):
        client.push(src, ref)
    assert store_files(root) == before


def _raw_push(address: str, messages: Iterator[pb.PushRequest]) -> pb.PushResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.StoreStub(channel).Push(messages, timeout=30)


def _begin(
    ref: str = "test/raw:v1", path: str = "m.safetensors", size: int = 0, codec: str = "lossless"
) -> pb.PushRequest:
    return pb.PushRequest(
        begin=pb.PushBegin(
            ref=ref,
            codec=codec,
            files=[pb.FileInfo(path=path, size=size, kind="safetensors")],
            source_kind="safetensors",
        )
    )


def _file_messages(data: bytes, *, sha: str | None = None, size: int | None = None) -> list[pb.PushRequest]:
    out = [
        pb.PushRequest(data=pb.FileData(file=0, offset=o, data=data[o : o + 1000])) for o in range(0, len(data), 1000)
    ]
    out.append(
        pb.PushRequest(
            end=pb.FileEnd(
                file=0, size=len(data) if size is None else size, sha256=sha or hashlib.sha256(data).hexdigest()
            )
        )
    )
    return out


def _valid_file(tmp_path: Path) -> bytes:
    path = tmp_path / "v.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(10)}, str(path))
    return path.read_bytes()


@pytest.mark.parametrize(
    ("begin_kwargs", "code", "message"),
    [
        ({"ref": "../../etc/passwd"}, grpc.StatusCode.INVALID_ARGUMENT, "invalid model name"),
        (
            {"ref": "ok/name:v1", "path": "../outside.safetensors"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid file path",
        ),
        ({"ref": "ok/name:v1", "path": "/abs.safetensors"}, grpc.StatusCode.INVALID_ARGUMENT, "invalid file path"),
        ({"ref": "ok/name:v1", "codec": "int3"}, grpc.StatusCode.INVALID_ARGUMENT, "unknown codec stage"),
    ],
)
def test_server_validates_begin(
    begin_kwargs: dict, code: grpc.StatusCode, message: str, server: RunningServer, root: Path, tmp_path: Path
) -> None:
    data = _valid_file(tmp_path)
    before = store_files(root)
    with pytest.raises(grpc.RpcError) as exc:
        _raw_push(server.address, iter([_begin(size=len(data), **begin_kwargs), *_file_messages(data)]))
    assert exc.value.code() == code
    assert message in exc.value.details()
    assert store_files(root) == before


def test_a_plain_protobuf_client_pushes_as_ours_does(client: Client, server: RunningServer, tmp_path: Path) -> None:
    """The server reads data messages in place (mzstore.transport.wire); the generated stub's messages, and
    ones whose fields another protobuf library wrote in another order, store the same model."""
    data = _valid_file(tmp_path)
    msgs = _file_messages(data)
    reply = _raw_push(server.address, iter([_begin("test/raw:v1", size=len(data)), *msgs]))
    # FileData's fields reversed: valid protobuf, which the in-place reader hands to protobuf.
    reordered = [m.SerializeToString() for m in msgs]
    for i, m in enumerate(msgs[:-1]):
        inner = b"\x1a" + _varint(len(m.data.data)) + m.data.data + b"\x10" + _varint(m.data.offset)
        reordered[i] = b"\x12" + _varint(len(inner)) + inner
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_unary("/mzstore.v1.Store/Push", response_deserializer=pb.PushResponse.FromString)
        other = call(iter([_begin("test/raw:v2", size=len(data)).SerializeToString(), *reordered]), timeout=30)
    assert other.digest == reply.digest
    out = tmp_path / "out"
    client.pull("test/raw:v2", out)
    assert (out / "m.safetensors").read_bytes() == data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes([*out, n])


def test_truncated_upload_is_rejected(server: RunningServer, root: Path, tmp_path: Path) -> None:
    data = _valid_file(tmp_path)
    before = store_files(root)
    msgs = _file_messages(data)[:-3]  # stream ends before the file does, no FileEnd
    with pytest.raises(grpc.RpcError) as exc:
        _raw_push(server.address, iter([_begin(size=len(data)), *msgs]))
    assert exc.value.code() == grpc.StatusCode.DATA_LOSS
    assert "ended early" in exc.value.details()
    assert store_files(root) == before


def test_altered_upload_fails_its_sha256(server: RunningServer, root: Path, tmp_path: Path) -> None:
    data = _valid_file(tmp_path)
    before = store_files(root)
    with pytest.raises(grpc.RpcError) as exc:
        _raw_push(server.address, iter([_begin(size=len(data)), *_file_messages(data, sha="0" * 64)]))
    assert exc.value.code() == grpc.StatusCode.DATA_LOSS
    assert "sha256 mismatch" in exc.value.details()
    assert store_files(root) == before


def test_wrong_offsets_are_rejected(server: RunningServer, root: Path, tmp_path: Path) -> None:
    data = _valid_file(tmp_path)
    msgs = _file_messages(data)
    msgs[1], msgs[2] = msgs[2], msgs[1]
    with pytest.raises(grpc.RpcError) as exc:
        _raw_push(server.address, iter([_begin(size=len(data)), *msgs]))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "offset" in exc.value.details()


def test_client_disconnect_mid_upload_leaves_nothing(
    small_server: RunningServer, small_client: Client, root: Path, tmp_path: Path
) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.randn(512, 1024)}, str(path))  # 2 MiB: many 64 KiB chunks, spool in use
    data = path.read_bytes()
    before = store_files(root)
    sent = []

    def messages() -> Iterator[pb.PushRequest]:
        yield _begin(size=len(data))
        for msg in _file_messages(data)[:1500]:
            sent.append(msg)
            yield msg
        deadline = time.monotonic() + 20  # let the server encode and spool what it has
        while time.monotonic() < deadline and not list((root / "tmp").iterdir()):
            time.sleep(0.05)
        assert list((root / "tmp").iterdir()), "the spool should be in use mid-upload"
        raise ConnectionResetError("client died")

    with pytest.raises(grpc.RpcError) as exc:
        _raw_push(small_server.address, messages())
    assert len(sent) == 1500
    assert exc.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    # The handler notices and cleans its spool; give it a moment.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and list((root / "tmp").iterdir()):
        time.sleep(0.05)
    assert list((root / "tmp").iterdir()) == []
    assert store_files(root) == before
    _assert_still_serving(small_client, tmp_path)


def test_client_checks_names_and_sources_before_upload(client: Client, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"push a \.safetensors"):
        (tmp_path / "notes.txt").write_text("hi")
        client.push(tmp_path / "notes.txt", "test/x:v1")
    from mzstore.errors import NotFound

    with pytest.raises(NotFound):
        client.push(tmp_path / "missing.safetensors", "test/x:v1")


def _assert_still_serving(client: Client, tmp_path: Path) -> None:
    ok = tmp_path / "ok" / "ok.safetensors"
    ok.parent.mkdir(exist_ok=True)
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(ok))
    info = client.push(ok, "test/after-error:v1")
    assert info.tensors == 1
    assert torch.equal(client.load_state_dict("test/after-error:v1")["w"], torch.arange(6, dtype=torch.float32))


def test_integrity_error_type_is_client_visible(server: RunningServer, tmp_path: Path) -> None:
    """DATA_LOSS from the server becomes IntegrityError in the client."""
    from mzstore.transport.grpc import translate as _translate

    class Fake(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.DATA_LOSS

        def details(self) -> str:
            return "x: sha256 mismatch"

    assert isinstance(_translate(Fake()), IntegrityError)


def test_a_reason_in_trailing_metadata_picks_the_error_class() -> None:
    """``mzstore-reason`` wins over the status code; an unknown reason falls back to the code."""
    from mzstore.errors import Conflict, SessionBusy, SessionMismatch, SessionNotFound
    from mzstore.transport.grpc import translate

    class Fake(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode, reason: str | None) -> None:
            self._code, self._reason = code, reason

        def code(self) -> grpc.StatusCode:
            return self._code

        def details(self) -> str:
            return "anything at all"

        def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("mzstore-reason", self._reason),) if self._reason else ()

    precondition, not_found = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND
    assert type(translate(Fake(precondition, "session-busy"))) is SessionBusy
    assert type(translate(Fake(precondition, "session-mismatch"))) is SessionMismatch
    assert type(translate(Fake(not_found, "session-not-found"))) is SessionNotFound
    assert type(translate(Fake(precondition, None))) is Conflict
    assert type(translate(Fake(precondition, "from-a-future-server"))) is Conflict


def test_a_busy_upload_session_says_so_in_trailing_metadata(server: RunningServer, tmp_path: Path) -> None:
    """The server sends the reason beside the status, and the client raises the typed error for it."""
    import fcntl
    import os
    import uuid

    from mzstore.errors import SessionBusy
    from mzstore.push.source import open_source
    from mzstore.push.upload import begin_for
    from mzstore.transport.grpc import begin_proto, translate
    from mzstore.v1 import store_pb2 as pb
    from mzstore.v1 import store_pb2_grpc as pb_grpc

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    begin = begin_for(open_source(path), "test/busy:v1", "lossless")
    session = uuid.uuid4().hex
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.StoreStub(channel)
        stub.StartUpload(pb.StartUploadRequest(session=session, begin=begin_proto(begin)), timeout=10)
        # Another stream holds the session: it keeps the session's lock file flock'ed while it appends.
        lock = server.store.nodes[0].tempdir() / "uploads" / session / "lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with pytest.raises(grpc.RpcError) as err:
                stub.StartUpload(pb.StartUploadRequest(session=session, begin=begin_proto(begin)), timeout=10)
        finally:
            os.close(fd)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert ("mzstore-reason", "session-busy") in tuple(err.value.trailing_metadata())
    assert isinstance(translate(err.value), SessionBusy)


def test_an_upload_stream_that_stops_early_keeps_its_session_for_a_resume(
    server: RunningServer, client: Client, tmp_path: Path
) -> None:
    """A fresh upload whose stream closes before its file ends (a killed client can look like that to
    gRPC) is not malformed: the server answers CANCELLED, keeps what arrived, and a resume sends the rest."""
    import uuid

    from mzstore.push.source import open_source
    from mzstore.push.upload import begin_for, push_resumable
    from mzstore.transport.grpc import begin_proto

    path = tmp_path / "m.safetensors"
    save_file({f"w{i}": torch.randn(256, 256) for i in range(8)}, str(path))
    data = path.read_bytes()
    begin = begin_for(open_source(path), "test/early:v1", "lossless")
    session = uuid.uuid4().hex
    half = len(data) // 2
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.StoreStub(channel)
        stub.StartUpload(pb.StartUploadRequest(session=session, begin=begin_proto(begin)), timeout=10)
        first = pb.UploadRequest(session=session, data=pb.FileData(file=0, offset=0, data=data[:half]))
        with pytest.raises(grpc.RpcError) as err:
            stub.Upload(iter([first]), timeout=10)
        assert err.value.code() == grpc.StatusCode.CANCELLED, err.value.details()
        status = stub.StartUpload(pb.StartUploadRequest(session=session, begin=begin_proto(begin)), timeout=10)
    assert list(status.received) == [half], "what arrived is kept"
    record = tmp_path / "record.json"
    record.write_text(json.dumps({"session": session, "ref": begin.ref}))
    result, sent = push_resumable(client.transport, open_source(path), begin, record=record)
    assert result.ref == "test/early:v1"
    assert sent == len(data) - half
    assert client.load_state_dict("test/early:v1")["w3"].shape == (256, 256)
