"""The read-only S3 face (issue 18), judged by S3's own clients: boto3, s3fs and the Run:ai Model Streamer.

A real server on loopback runs the face (``build_server(..., s3=...)``) over
all-MiniLM-L6-v2 pushed lossless (``st/minilm:v1``) and int8
(``st/minilm:int8``); objects are compared byte for byte with what
``mzstore pull`` writes. The Run:ai Model Streamer runs in a subprocess with
``AWS_ENDPOINT_URL`` pointing at the face, exactly as vLLM's
``runai_streamer`` loader runs it. Signatures are checked with the AWS
documentation's own SigV4 example and with credentials issued by the
server's token file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from mzstore.client import Client
from mzstore.server import metrics
from mzstore.server.app import RunningServer, build_server
from mzstore.server.auth import new_s3_credentials, new_token, parse_s3_credentials, s3_line, token_line
from mzstore.server.sigv4 import SignatureError, verify
from mzstore.settings import Settings

MODEL = "st/minilm"
KEY = f"{MODEL}/v1/model.safetensors"


@dataclass
class Face:
    server: RunningServer
    url: str
    pulled: dict[str, Path]
    source: Path


@pytest.fixture(scope="module")
def face(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Iterator[Face]:
    base = tmp_path_factory.mktemp("s3face")
    server = build_server(base / "store", "127.0.0.1:0", Settings(chunk_bytes=1024 * 1024), s3="127.0.0.1:0")
    pulled = {}
    with Client(server.address, cache=False) as c:
        for tag, codec in (("v1", "lossless"), ("int8", "int8")):
            c.push(minilm_dir, f"{MODEL}:{tag}", codec=codec)
            c.pull(f"{MODEL}:{tag}", base / tag)
            pulled[tag] = base / tag
    assert server.s3_url
    yield Face(server, server.s3_url, pulled, minilm_dir)
    server.stop(1)


def s3(url: str, key: str = "anything", secret: str = "anything", **config: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, **config),
    )


def code_of(call: Any) -> tuple[str, int]:
    with pytest.raises(ClientError) as exc:
        call()
    err = exc.value.response
    return err["Error"]["Code"], err["ResponseMetadata"]["HTTPStatusCode"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- boto3 ------------------------------------------------------------------------


def test_head_and_ranged_gets_are_the_pulled_bytes(face: Face) -> None:
    c = s3(face.url)
    for tag in ("v1", "int8"):
        data = (face.pulled[tag] / "model.safetensors").read_bytes()
        key = f"{MODEL}/{tag}/model.safetensors"
        head = c.head_object(Bucket="mzstore", Key=key)
        assert head["ContentLength"] == len(data) and head["AcceptRanges"] == "bytes"
        assert head["ETag"] == '"' + __import__("hashlib").sha256(data).hexdigest() + '"'
        assert abs(head["LastModified"].timestamp() - time.time()) < 3600
        for rng, want in (
            ("bytes=0-7", data[:8]),
            ("bytes=8-100007", data[8:100008]),
            (f"bytes={len(data) - 100}-", data[-100:]),
            ("bytes=-5", data[-5:]),
            ("bytes=1000000-99999999999", data[1000000:]),
        ):
            got = c.get_object(Bucket="mzstore", Key=key, Range=rng)
            assert got["Body"].read() == want, rng
            assert got["ResponseMetadata"]["HTTPStatusCode"] == 206
        assert c.get_object(Bucket="mzstore", Key=key)["Body"].read() == data


def test_download_file_in_parallel_parts(face: Face, tmp_path: Path) -> None:
    c = s3(face.url)
    config = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024, max_concurrency=4)
    c.download_file("mzstore", KEY, str(tmp_path / "m"), Config=config)
    assert (tmp_path / "m").read_bytes() == (face.pulled["v1"] / "model.safetensors").read_bytes()


def test_listing_pages_prefixes_and_delimiters(face: Face) -> None:
    c = s3(face.url)
    want = sorted(f"{MODEL}/{tag}/{p}" for tag in ("int8", "v1") for p in _files(face.source))
    keys = [
        o["Key"]
        for page in c.get_paginator("list_objects_v2").paginate(Bucket="mzstore", PaginationConfig={"PageSize": 3})
        for o in page.get("Contents", [])
    ]
    assert keys == want
    page = c.list_objects_v2(Bucket="mzstore", MaxKeys=3)
    assert page["IsTruncated"] and page["KeyCount"] == 3 and "NextContinuationToken" in page
    top = c.list_objects_v2(Bucket="mzstore", Prefix=f"{MODEL}/", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == [f"{MODEL}/int8/", f"{MODEL}/v1/"] and "Contents" not in top
    inner = c.list_objects_v2(Bucket="mzstore", Prefix=f"{MODEL}/v1/", Delimiter="/")
    assert f"{MODEL}/v1/1_Pooling/" in [p["Prefix"] for p in inner["CommonPrefixes"]]
    assert f"{MODEL}/v1/config.json" in [o["Key"] for o in inner["Contents"]]
    sizes = {o["Key"]: o["Size"] for o in inner["Contents"]}
    assert sizes[f"{MODEL}/v1/model.safetensors"] == (face.source / "model.safetensors").stat().st_size
    v1 = [o["Key"] for o in c.list_objects(Bucket="mzstore", Prefix=f"{MODEL}/v1/1_")["Contents"]]
    assert v1 == [f"{MODEL}/v1/1_Pooling/config.json"]
    assert c.list_buckets()["Buckets"][0]["Name"] == "mzstore"
    assert c.head_bucket(Bucket="mzstore")["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert c.get_bucket_location(Bucket="mzstore").get("LocationConstraint") in (None, "")


def test_errors_are_s3_errors(face: Face) -> None:
    c = s3(face.url)
    size = (face.source / "model.safetensors").stat().st_size
    assert code_of(lambda: c.get_object(Bucket="mzstore", Key=f"{MODEL}/v1/nope.bin")) == ("NoSuchKey", 404)
    assert code_of(lambda: c.get_object(Bucket="mzstore", Key=f"{MODEL}/v9/config.json")) == ("NoSuchKey", 404)
    assert code_of(lambda: c.get_object(Bucket="other", Key=KEY)) == ("NoSuchBucket", 404)
    assert code_of(lambda: c.head_bucket(Bucket="other"))[1] == 404
    assert code_of(lambda: c.get_object(Bucket="mzstore", Key=KEY, Range=f"bytes={size}-")) == ("InvalidRange", 416)
    assert code_of(lambda: c.get_object(Bucket="mzstore", Key=KEY, Range="bytes=9-1")) == ("InvalidRange", 416)
    assert code_of(lambda: c.put_object(Bucket="mzstore", Key="x/y/z", Body=b"1")) == ("AccessDenied", 403)
    assert code_of(lambda: c.delete_object(Bucket="mzstore", Key=KEY)) == ("AccessDenied", 403)
    assert code_of(lambda: c.create_multipart_upload(Bucket="mzstore", Key="x/y/z")) == ("AccessDenied", 403)
    assert code_of(lambda: c.get_object(Bucket="mzstore", Key=KEY, IfMatch='"nope"')) == ("PreconditionFailed", 412)
    etag = c.head_object(Bucket="mzstore", Key=KEY)["ETag"]
    assert code_of(lambda: c.get_object(Bucket="mzstore", Key=KEY, IfNoneMatch=etag))[1] == 304
    for hostile in (
        "../../etc/passwd",
        f"{MODEL}/v1/../../x",
        f"{MODEL}/v1/%2e%2e/x",
        "x" * 2000,
        f"{MODEL}/../v1/config.json",
    ):
        assert code_of(lambda k=hostile: c.get_object(Bucket="mzstore", Key=k))[1] in (400, 404), hostile
    assert c.head_object(Bucket="mzstore", Key=KEY)["ContentLength"] == size  # still serving


def test_virtual_host_addressing(face: Face) -> None:
    port = face.url.rsplit(":", 1)[1]
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/{KEY}", method="HEAD", headers={"Host": f"mzstore.s3.example:{port}"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert int(resp.headers["Content-Length"]) == (face.source / "model.safetensors").stat().st_size


def test_s3fs_reads_and_lists(face: Face) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(
        key="a",
        secret="b",
        client_kwargs={"endpoint_url": face.url, "region_name": "us-east-1"},
        skip_instance_cache=True,
    )
    assert fs.cat_file(f"mzstore/{MODEL}/v1/config.json") == (face.source / "config.json").read_bytes()
    assert fs.cat_file(f"mzstore/{KEY}", start=10, end=20) == (face.source / "model.safetensors").read_bytes()[10:20]
    names = fs.ls(f"mzstore/{MODEL}/v1", detail=False)
    assert f"mzstore/{MODEL}/v1/1_Pooling" in names and f"mzstore/{MODEL}/v1/model.safetensors" in names


def test_the_aws_cli_lists_and_copies(face: Face, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ENDPOINT_URL": face.url,
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    aws = str(Path(sys.executable).with_name("aws"))

    def run(*args: str) -> str:
        done = subprocess.run([aws, "s3", *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    listed = run("ls", f"s3://mzstore/{MODEL}/int8/")
    assert "PRE 1_Pooling/" in listed and "model.safetensors" in listed
    run("cp", "--recursive", f"s3://mzstore/{MODEL}/int8/", str(tmp_path / "copy"))
    assert _files(tmp_path / "copy") == _files(face.pulled["int8"])


# --- the Run:ai Model Streamer (what vLLM's runai_streamer loader calls) -----------------------------

STREAM = """
import json, sys, torch
from runai_model_streamer import SafetensorsStreamer
from safetensors.torch import load_file
want = load_file(sys.argv[2])
seen, same = 0, 0
with SafetensorsStreamer() as streamer:
    streamer.stream_file(sys.argv[1])
    for name, tensor in streamer.get_tensors():
        seen += 1
        same += int(torch.equal(tensor, want[name]))
print(json.dumps([seen, same, len(want)]))
"""


def stream(url: str, key: str, want: Path, access: str = "a", secret: str = "b") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
    }
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(STREAM), f"s3://mzstore/{key}", str(want)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("tag", ["v1", "int8"])
def test_the_runai_streamer_loads_every_tensor(face: Face, tag: str) -> None:
    before = metrics.BLOB_BYTES.labels("s3")._value.get()  # type: ignore[attr-defined]
    want = face.pulled[tag] / "model.safetensors"  # lossless: the original; int8: what a pull writes
    done = stream(face.url, f"{MODEL}/{tag}/model.safetensors", want)
    assert done.returncode == 0, done.stderr[-2000:]
    seen, same, total = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == same == total > 100
    assert metrics.BLOB_BYTES.labels("s3")._value.get() > before  # type: ignore[attr-defined]


# --- auth -----------------------------------------------------------------------------------------


def test_the_aws_documentation_example_signature_verifies() -> None:
    """GET /test.txt with Range: bytes=0-9, from AWS's "Signature Calculations for the Authorization Header"."""
    headers = {
        "host": ["examplebucket.s3.amazonaws.com"],
        "range": ["bytes=0-9"],
        "x-amz-content-sha256": ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"],
        "x-amz-date": ["20130524T000000Z"],
        "authorization": [
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
            "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
            "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        ],
    }
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    when = 1369353600.0  # 2013-05-24T00:00:00Z
    lookup = lambda h: headers.get(h.lower(), [])  # noqa: E731
    known = lambda k: secret if k == "AKIAIOSFODNN7EXAMPLE" else None  # noqa: E731
    assert verify("GET", "/test.txt", [], lookup, known, now=when).access_key == "AKIAIOSFODNN7EXAMPLE"
    with pytest.raises(SignatureError, match="does not match"):
        verify("GET", "/test.txt", [], lookup, lambda k: secret + "x", now=when)
    with pytest.raises(SignatureError, match="does not match"):
        verify("GET", "/other.txt", [], lookup, known, now=when)
    with pytest.raises(SignatureError, match="too far"):
        verify("GET", "/test.txt", [], lookup, known, now=when + 3600)
    tampered = dict(headers, range=["bytes=0-99"])
    with pytest.raises(SignatureError, match="does not match"):
        verify("GET", "/test.txt", [], lambda h: tampered.get(h.lower(), []), known, now=when)


def test_credentials_from_the_token_file_are_checked(minilm_dir: Path, tmp_path: Path) -> None:
    key, secret = new_s3_credentials()
    admin = new_token()
    tokens = tmp_path / "tokens"
    tokens.write_text(s3_line("reader", key, secret, "read") + "\n" + token_line("admin", admin, "admin") + "\n")
    assert parse_s3_credentials(tokens.read_text())[key][0] == secret
    server = build_server(tmp_path / "store", "127.0.0.1:0", auth=tokens, s3="127.0.0.1:0")
    try:
        with Client(server.address, cache=False, token=admin) as c:
            c.push(minilm_dir, f"{MODEL}:v1")
        url = server.s3_url or ""
        good = s3(url, key, secret)
        assert (
            good.get_object(Bucket="mzstore", Key=f"{MODEL}/v1/config.json")["Body"].read()
            == (minilm_dir / "config.json").read_bytes()
        )
        assert code_of(lambda: s3(url, key, "x" * 40).head_object(Bucket="mzstore", Key=KEY))[1] == 403
        assert (
            code_of(lambda: s3(url, key, "x" * 40).get_object(Bucket="mzstore", Key=KEY))[0] == "SignatureDoesNotMatch"
        )
        assert (
            code_of(lambda: s3(url, "MZS3AAAAAAAAAAAAAAAA", secret).get_object(Bucket="mzstore", Key=KEY))[0]
            == "InvalidAccessKeyId"
        )
        anonymous = boto3.client(
            "s3", endpoint_url=url, region_name="us-east-1", config=Config(signature_version=UNSIGNED)
        )
        assert code_of(lambda: anonymous.get_object(Bucket="mzstore", Key=KEY))[0] == "AccessDenied"
        presigned = s3(url, key, secret, signature_version="s3v4").generate_presigned_url(
            "get_object", Params={"Bucket": "mzstore", "Key": f"{MODEL}/v1/config.json"}, ExpiresIn=60
        )
        with urllib.request.urlopen(presigned, timeout=30) as resp:
            assert resp.read() == (minilm_dir / "config.json").read_bytes()
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(presigned.replace("X-Amz-Signature=", "X-Amz-Signature=0"), timeout=30)
        assert denied.value.code == 403
        done = stream(url, KEY, minilm_dir / "model.safetensors", key, secret)  # the AWS CRT signs too
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])[1] > 100
        assert stream(url, KEY, minilm_dir / "model.safetensors", key, "x" * 40).returncode != 0
    finally:
        server.stop(1)
    public = build_server(tmp_path / "store", "127.0.0.1:0", auth=tokens, s3="127.0.0.1:0", public_s3=True)
    try:
        anonymous = boto3.client(
            "s3", endpoint_url=public.s3_url, region_name="us-east-1", config=Config(signature_version=UNSIGNED)
        )
        assert anonymous.head_object(Bucket="mzstore", Key=KEY)["ContentLength"] > 0
        assert code_of(lambda: s3(public.s3_url, key, "x" * 40).head_object(Bucket="mzstore", Key=KEY))[1] == 403
    finally:
        public.stop(1)


def test_token_add_s3_prints_credentials(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    done = subprocess.run(
        [sys.executable, "-m", "mzstore.cli", "token", "add", "loader", "--s3", "--token-file", str(tokens)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = dict(line.split("=", 1) for line in done.stdout.split())
    creds = parse_s3_credentials(tokens.read_text())
    assert creds[lines["AWS_ACCESS_KEY_ID"]][0] == lines["AWS_SECRET_ACCESS_KEY"]
    assert oct(tokens.stat().st_mode & 0o777) == "0o600"


def test_a_pull_through_cache_serves_upstream_tags_on_both_faces(minilm_dir: Path, tmp_path: Path) -> None:
    """The faces resolve tags through Store.resolve, as gRPC does: a cache answers for tags only upstream has."""
    from mzstore.server.upstream import PullThroughStore

    upstream = build_server(tmp_path / "upstream", "127.0.0.1:0")
    cache = build_server(
        tmp_path / "cache", "127.0.0.1:0", upstream=upstream.address, http="127.0.0.1:0", s3="127.0.0.1:0"
    )
    try:
        with Client(upstream.address, cache=False) as c:
            c.push(minilm_dir, f"{MODEL}:v1")
        data = s3(cache.s3_url or "").get_object(Bucket="mzstore", Key=f"{MODEL}/v1/config.json")["Body"].read()
        assert data == (minilm_dir / "config.json").read_bytes()
        with urllib.request.urlopen(f"{cache.http_url}/{MODEL}/resolve/v1/tokenizer.json", timeout=60) as resp:
            assert resp.read() == (minilm_dir / "tokenizer.json").read_bytes()
    finally:
        cache.stop(1)
        if isinstance(cache.store, PullThroughStore):
            cache.store.close()
        upstream.stop(1)
