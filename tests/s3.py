"""S3 for tests: a real S3-speaking server (moto) on loopback, reached through boto3/s3fs.

Nothing is mocked in-process: production code talks HTTP to the server exactly
as it would to AWS S3, MinIO or Ceph RGW. Import the fixtures into a test
module to use them::

    from s3 import moto_server, s3_bucket_url, s3_env  # noqa: F401
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Iterator

import pytest

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port for the session; yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # One access-log line per request otherwise.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 and s3fs at the moto server through the standard AWS variables; return the endpoint.

    botocore (and so s3fs through aiobotocore) reads ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL`` itself, so code under test needs no endpoint argument.
    """
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    return moto_server


def s3_client(endpoint_url: str):  # type: ignore[no-untyped-def]
    """A plain boto3 S3 client on ``endpoint_url`` (for setup and for checking what is stored)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )


@pytest.fixture
def s3_bucket_url(s3_env: str) -> Iterator[str]:
    """A fresh bucket per test; yields ``s3://<bucket>/prefix`` and empties and removes the bucket after."""
    client = s3_client(s3_env)
    bucket = f"mzstore-test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/prefix"
    for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)


def dead_endpoint() -> str:
    """An http URL on a loopback port where nothing listens (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
