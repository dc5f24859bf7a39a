"""One storage-node conformance suite, run against every backend.

:class:`NodeSuite` holds the behaviour the store relies on; each backend's
test class only says how to open a node on a fresh root and how to open a
second instance over the same root (another server), in the manner of
fsspec's ``tests/abstract``. S3 runs against moto's server on loopback,
reached through s3fs/boto3 exactly as in production.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3 import dead_endpoint, moto_server, s3_bucket_url, s3_client, s3_env  # noqa: F401

from mzstore.errors import InvalidArgument, MzstoreError, NotFound, Unavailable
from mzstore.storage.node import WRITE_PART_BYTES, FsspecNode, LocalNode, Node, open_node

MiB = 1024 * 1024


def blocks(size: int) -> list[bytes]:
    """``size`` bytes as 1 MiB chunks (one chunk when smaller)."""
    return [b"n" * MiB] * (size // MiB) or [b"n" * size]


def failing(chunks: list[bytes]) -> Iterator[bytes]:
    """Yield ``chunks``, then fail as a client that disconnects mid-upload would."""
    yield from chunks
    raise RuntimeError("client went away")


class NodeSuite:
    """Behaviour every :class:`~mzstore.storage.node.Node` must have.

    Subclasses provide a ``node`` fixture (a node on a fresh, empty root) and
    :meth:`reopen` (a second, independent instance over the same root).
    """

    @pytest.fixture
    def node(self) -> Node:
        raise NotImplementedError

    def reopen(self, node: Node) -> Node:
        raise NotImplementedError

    # -- write / read -----------------------------------------------------
    def test_write_read_roundtrip(self, node: Node) -> None:
        node.write("blobs/k", [b"hello ", memoryview(b"world"), b""])
        assert node.read("blobs/k") == b"hello world"

    def test_read_range(self, node: Node) -> None:
        data = bytes(range(256)) * 4
        node.write("k", [data])
        assert node.read("k", 10, 20) == data[10:30]
        assert node.read("k", 0, 1) == data[:1]
        assert node.read("k", 1000) == data[1000:]
        assert node.read("k", 1000, 100) == data[1000:]  # past the end: truncated
        assert node.read("k", len(data) - 1, 1) == data[-1:]
        assert node.read("k", len(data)) == b""
        assert node.read("k", len(data), 10) == b""
        assert node.read("k", len(data) + 50, 10) == b""
        assert node.read("k", 5, 0) == b""

    def test_size(self, node: Node) -> None:
        node.write("a/b", [b"x" * 1234])
        assert node.size("a/b") == 1234

    def test_exists(self, node: Node) -> None:
        assert not node.exists("refs/org/m/latest")
        node.write("refs/org/m/latest", [b"sha256:0\n"])
        assert node.exists("refs/org/m/latest")
        # A "directory" (a prefix of other keys) is not a key.
        assert not node.exists("refs/org/m")
        assert not node.exists("refs/org")

    def test_write_if_asks_about_the_current_value(self, node: Node) -> None:
        seen: list[bytes | None] = []

        def accept_if(ok: bool):  # type: ignore[no-untyped-def]
            def accept(current: bytes | None) -> bool:
                seen.append(current)
                return ok

            return accept

        assert node.write_if("refs/m/t", b"one", accept_if(True))
        assert not node.write_if("refs/m/t", b"two", accept_if(False))
        assert node.read("refs/m/t") == b"one"
        assert node.write_if("refs/m/t", b"three", accept_if(True))
        assert node.read("refs/m/t") == b"three"
        assert seen == [None, b"one", b"one"]

    def test_overwrite_replaces_whole_value(self, node: Node) -> None:
        node.write("refs/m/latest", [b"a much longer first value"])
        node.write("refs/m/latest", [b"short"])
        assert node.read("refs/m/latest") == b"short"
        assert node.size("refs/m/latest") == 5

    @pytest.mark.parametrize("size", [1024, WRITE_PART_BYTES + 2 * MiB], ids=["small", "multipart"])
    def test_failed_write_keeps_old_value(self, node: Node, size: int) -> None:
        node.write("blobs/x", [b"old"])
        with pytest.raises(RuntimeError, match="went away"):
            node.write("blobs/x", failing(blocks(size)))
        assert node.read("blobs/x") == b"old"

    @pytest.mark.parametrize("size", [1024, WRITE_PART_BYTES + 2 * MiB], ids=["small", "multipart"])
    def test_failed_write_leaves_no_key(self, node: Node, size: int) -> None:
        with pytest.raises(RuntimeError, match="went away"):
            node.write("blobs/new", failing(blocks(size)))
        assert not node.exists("blobs/new")
        assert list(node.walk("blobs")) == []

    def test_large_write_in_chunks(self, node: Node) -> None:
        block = os.urandom(MiB)
        chunks = [bytes([i]) + block[1:] for i in range(20)]
        digest = hashlib.sha256(b"".join(chunks)).hexdigest()
        node.write("blobs/big", iter(chunks))
        assert node.size("blobs/big") == 20 * MiB
        assert hashlib.sha256(node.read("blobs/big")).hexdigest() == digest
        # A range across the first part boundary of a multipart upload.
        start = WRITE_PART_BYTES - 10
        assert node.read("blobs/big", start, 20) == b"".join(chunks)[start : start + 20]
        assert node.read("blobs/big", 19 * MiB, 1) == bytes([19])

    def test_empty_write(self, node: Node) -> None:
        node.write("empty/none", [])
        node.write("empty/one", [b""])
        for key in ("empty/none", "empty/one"):
            assert node.exists(key)
            assert node.size(key) == 0
            assert node.read(key) == b""
            assert node.read(key, 0, 10) == b""
        assert sorted(node.walk("empty")) == ["empty/none", "empty/one"]

    @pytest.mark.parametrize(
        "key",
        ["a/b.c/d.e.f", "x/.hidden", "v1.2.3/model-00001-of-00002.safetensors", "refs/org_a/m-b/v.1"],
    )
    def test_keys_with_slashes_and_dots(self, node: Node, key: str) -> None:
        node.write(key, [key.encode()])
        assert node.exists(key)
        assert node.read(key) == key.encode()
        top = key.split("/", 1)[0]
        assert list(node.walk(top)) == [key]
        node.delete(key)
        assert not node.exists(key)

    # -- delete -----------------------------------------------------------
    def test_delete(self, node: Node) -> None:
        node.write("refs/m/latest", [b"x"])
        node.write("refs/m/v1", [b"y"])
        node.delete("refs/m/latest")
        assert not node.exists("refs/m/latest")
        assert list(node.walk("refs")) == ["refs/m/v1"]
        with pytest.raises(NotFound):
            node.read("refs/m/latest")

    # -- missing keys -----------------------------------------------------
    @pytest.mark.parametrize("op", ["read", "read_range", "read_empty_range", "size", "delete", "mtime"])
    def test_missing_key_raises_not_found(self, node: Node, op: str) -> None:
        node.write("blobs/other", [b"x"])  # the root exists; the key does not
        calls = {
            "read": lambda: node.read("blobs/missing"),
            "read_range": lambda: node.read("blobs/missing", 3, 5),
            "read_empty_range": lambda: node.read("blobs/missing", 3, 0),
            "size": lambda: node.size("blobs/missing"),
            "delete": lambda: node.delete("blobs/missing"),
            "mtime": lambda: node.mtime("blobs/missing"),
        }
        with pytest.raises(NotFound) as info:
            calls[op]()
        assert isinstance(info.value, FileNotFoundError)
        assert "blobs/missing" in str(info.value)

    # -- walk -------------------------------------------------------------
    def test_walk_nested(self, node: Node) -> None:
        keys = ["refs/org/m/latest", "refs/org/m/v1.0", "refs/a/b", "refs2/x", "blobs/sha256/ab/abcd"]
        for key in keys:
            node.write(key, [key.encode()])
        assert sorted(node.walk("refs")) == ["refs/a/b", "refs/org/m/latest", "refs/org/m/v1.0"]
        assert sorted(node.walk("refs/org")) == ["refs/org/m/latest", "refs/org/m/v1.0"]
        assert list(node.walk("blobs/sha256")) == ["blobs/sha256/ab/abcd"]
        assert list(node.walk("nothing/here")) == []
        assert list(node.walk("refs/a/b")) == []  # a key, not a prefix of keys
        # Walked keys are usable as keys.
        for key in node.walk("refs"):
            assert node.read(key) == key.encode()

    def test_mtime(self, node: Node) -> None:
        before = time.time()
        node.write("blobs/t", [b"x"])
        assert before - 5 <= node.mtime("blobs/t") <= time.time() + 5

    # -- another server over the same root --------------------------------
    def test_second_instance_sees_writes_at_once(self, node: Node) -> None:
        other = self.reopen(node)
        # Prime whatever listing caches the first instance keeps.
        node.write("refs/m/v0", [b"0"])
        assert list(node.walk("refs")) == ["refs/m/v0"]
        assert not node.exists("refs/m/v1")
        assert not node.exists("refs/n/latest")

        other.write("refs/m/v1", [b"1"])
        other.write("refs/n/latest", [b"2"])
        assert node.exists("refs/m/v1")
        assert node.read("refs/n/latest") == b"2"
        assert sorted(node.walk("refs")) == ["refs/m/v0", "refs/m/v1", "refs/n/latest"]
        assert sorted(node.walk("refs/m")) == ["refs/m/v0", "refs/m/v1"]

        other.delete("refs/m/v0")
        assert not node.exists("refs/m/v0")
        assert sorted(node.walk("refs")) == ["refs/m/v1", "refs/n/latest"]
        with pytest.raises(NotFound):
            node.read("refs/m/v0")


class TestLocalNode(NodeSuite):
    @pytest.fixture
    def node(self, tmp_path: Path) -> Node:
        return LocalNode(tmp_path / "node")

    def reopen(self, node: Node) -> Node:
        assert isinstance(node, LocalNode)
        return LocalNode(node.root)


class FsspecNodeChecks:
    """Checks for :class:`FsspecNode` on any file system, beyond the suite."""

    @pytest.mark.parametrize("size", [1024, WRITE_PART_BYTES + 2 * MiB], ids=["small", "multipart"])
    def test_source_errors_are_not_node_errors(self, node: Node, size: int) -> None:
        def source() -> Iterator[bytes]:
            yield from blocks(size)
            raise OSError(errno.EIO, "source disk failed")

        with pytest.raises(OSError, match="source disk failed") as info:
            node.write("blobs/x", source())
        assert not isinstance(info.value, MzstoreError)
        assert not node.exists("blobs/x")


class TestMemoryNode(NodeSuite, FsspecNodeChecks):
    @pytest.fixture
    def node(self) -> Iterator[Node]:
        # fsspec's memory file system is one process-wide store: a unique root
        # per test, removed afterwards.
        node = FsspecNode(f"memory://mzstore-test-{uuid.uuid4().hex}")
        yield node
        if node.fs.exists(node.base):
            node.fs.rm(node.base, recursive=True)
        assert not any(path.startswith(node.base + "/") for path in node.fs.store)

    def reopen(self, node: Node) -> Node:
        return FsspecNode(node.url, skip_instance_cache=True)

    def test_access_denied_is_a_clear_unavailable(self, node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
        assert isinstance(node, FsspecNode)

        def denied(*args: object, **kwargs: object) -> bytes:
            raise PermissionError("Access Denied")

        monkeypatch.setattr(node.fs, "cat_file", denied)
        with pytest.raises(Unavailable, match="denied access to blobs/k") as info:
            node.read("blobs/k")
        assert node.url in str(info.value)


class TestS3Node(NodeSuite, FsspecNodeChecks):
    @pytest.fixture
    def node(self, s3_bucket_url: str) -> Node:  # noqa: F811
        return open_node(s3_bucket_url)

    def reopen(self, node: Node) -> Node:
        # A separate S3FileSystem (own connection pool and caches), as in another server process.
        return FsspecNode(node.url, skip_instance_cache=True)

    def test_keys_live_under_the_url_prefix(self, node: Node, s3_env: str) -> None:  # noqa: F811
        node.write("blobs/sha256/ab/abcd", [b"payload"])
        bucket = node.url.removeprefix("s3://").split("/")[0]
        body = s3_client(s3_env).get_object(Bucket=bucket, Key="prefix/blobs/sha256/ab/abcd")["Body"].read()
        assert body == b"payload"

    def test_small_write_is_one_put_large_write_is_multipart(self, node: Node, s3_env: str) -> None:  # noqa: F811
        node.write("small", [b"x" * 1000, b"y" * 1000])
        node.write("large", [b"z" * MiB] * (WRITE_PART_BYTES // MiB + 4))
        bucket = node.url.removeprefix("s3://").split("/")[0]
        client = s3_client(s3_env)
        # S3 marks a multipart object's ETag with "-<number of parts>".
        assert "-" not in client.head_object(Bucket=bucket, Key="prefix/small")["ETag"]
        assert client.head_object(Bucket=bucket, Key="prefix/large")["ETag"].strip('"').endswith("-2")
        assert node.size("large") == WRITE_PART_BYTES + 4 * MiB

    def test_failed_multipart_write_is_aborted(self, node: Node, s3_env: str) -> None:  # noqa: F811
        with pytest.raises(RuntimeError):
            node.write("blobs/new", failing([b"n" * MiB] * (WRITE_PART_BYTES // MiB + 2)))
        bucket = node.url.removeprefix("s3://").split("/")[0]
        assert s3_client(s3_env).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    def test_endpoint_url_argument_without_environment(
        self,
        s3_bucket_url: str,  # noqa: F811
        s3_env: str,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.delenv("AWS_ENDPOINT_URL")
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
        node = open_node(s3_bucket_url, endpoint_url=s3_env, skip_instance_cache=True)
        assert isinstance(node, FsspecNode)
        node.write("k", [b"v"])
        assert node.read("k") == b"v"
        assert list(node.walk("")) == ["k"]

    def test_missing_bucket_is_unavailable(self, s3_env: str) -> None:  # noqa: F811
        node = open_node(f"s3://mzstore-no-such-bucket-{uuid.uuid4().hex[:8]}/p")
        for call in (
            lambda: node.exists("k"),
            lambda: node.write("k", [b"v"]),
            lambda: list(node.walk("refs")),
            lambda: node.read("k"),
        ):
            with pytest.raises(Unavailable, match="bucket does not exist"):
                call()

    def test_unreachable_endpoint_is_unavailable_quickly(self, s3_env: str) -> None:  # noqa: F811
        endpoint = dead_endpoint()
        node = open_node("s3://bucket/prefix", endpoint_url=endpoint)
        calls = {
            "exists": lambda: node.exists("k"),
            "read": lambda: node.read("k"),
            "read_range": lambda: node.read("k", 1, 2),
            "size": lambda: node.size("k"),
            "write": lambda: node.write("k", [b"v"]),
            "write_large": lambda: node.write("k", [b"v" * MiB] * (WRITE_PART_BYTES // MiB + 1)),
            "delete": lambda: node.delete("k"),
            "walk": lambda: list(node.walk("refs")),
            "mtime": lambda: node.mtime("k"),
        }
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(Unavailable) as info:
                call()
            assert time.monotonic() - started < 10, name
            message = str(info.value)
            assert "s3://bucket/prefix" in message, message
            assert endpoint in message, message
            assert "\n" not in message and "Traceback" not in message, message
            assert isinstance(info.value, ConnectionError)

    def test_default_options_can_be_overridden(self, s3_env: str) -> None:  # noqa: F811
        node = FsspecNode("s3://bucket/p")
        fs = node.fs
        assert fs.config_kwargs["connect_timeout"] == 2
        assert fs.config_kwargs["retries"]["mode"] == "standard"
        assert not fs.dircache.use_listings_cache
        tuned = FsspecNode("s3://bucket/p", config_kwargs={"read_timeout": 60})
        assert tuned.fs.config_kwargs["read_timeout"] == 60
        assert tuned.fs.config_kwargs["connect_timeout"] == 2


def test_open_node_picks_the_adapter(tmp_path: Path) -> None:
    assert isinstance(open_node(tmp_path / "a"), LocalNode)
    assert isinstance(open_node(str(tmp_path / "b")), LocalNode)
    assert isinstance(open_node((tmp_path / "c").as_uri()), LocalNode)
    memory = open_node(f"memory://mzstore-test-{uuid.uuid4().hex}")
    assert isinstance(memory, FsspecNode)
    with pytest.raises(InvalidArgument):
        open_node(tmp_path / "d", endpoint_url="http://127.0.0.1:9000")
