"""AWS Signature Version 4, checked: how the S3 face knows who sent a request (issue 18).

S3 clients (boto3, the AWS CLI, s3fs, the Run:ai Model Streamer's C++ SDK)
sign every request with SigV4: an HMAC-SHA256 chain keyed by the secret
access key over a canonical form of the request. The server holds the
secret of every access key it issued (the token file's ``s3:`` lines, see
:mod:`mzstore.server.auth`), rebuilds the canonical request from what
arrived, and compares signatures in constant time. A request whose
signature was not checked is never taken as authenticated.

Two forms are read, as AWS documents them
(https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-authenticating-requests.html):

* the ``Authorization: AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…,
  Signature=…`` header, with ``X-Amz-Date`` (and ``X-Amz-Content-SHA256``,
  the payload hash the client signed; the face serves reads, which have no
  body);
* presigned URLs: ``X-Amz-Algorithm``, ``X-Amz-Credential``, ``X-Amz-Date``,
  ``X-Amz-Expires``, ``X-Amz-SignedHeaders`` and ``X-Amz-Signature`` in the
  query, payload ``UNSIGNED-PAYLOAD``.

The canonical request uses the path exactly as sent (S3 does not normalize
it), the query's pairs decoded and re-encoded with the unreserved set
``A-Za-z0-9-_.~`` and sorted, and exactly the headers the client listed as
signed. Requests dated more than :data:`MAX_SKEW_S` from the server's
clock, and presigned URLs past their expiry, are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from calendar import timegm
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
#: How far a request's date may be from the server's clock (AWS allows 15 minutes).
MAX_SKEW_S = 15 * 60
#: Longest validity of a presigned URL (AWS: 7 days).
MAX_EXPIRES_S = 7 * 24 * 3600
_AUTH = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+)\s*,\s*SignedHeaders=(?P<signed>[^,\s]+)\s*,\s*Signature=(?P<sig>[0-9a-f]{64})\s*$"
)
_DATE = re.compile(r"\d{8}T\d{6}Z")


class SignatureError(Exception):
    """A request whose signature does not hold; ``code`` is the S3 error code to answer with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Signed:
    """A checked request: the access key that signed it."""

    access_key: str


def is_signed(headers: Mapping[str, str], query: Sequence[tuple[str, str]]) -> bool:
    """Whether the request carries a SigV4 signature (header or presigned)."""
    return headers.get("Authorization", "").startswith(ALGORITHM) or any(k == "X-Amz-Algorithm" for k, _ in query)


def _enc(text: str) -> str:
    return quote(text, safe="-_.~")


def _canonical_query(query: Sequence[tuple[str, str]], drop: str | None = None) -> str:
    pairs = sorted((_enc(unquote(k)), _enc(unquote(v))) for k, v in query if k != drop)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _header_value(values: list[str]) -> str:
    return ",".join(" ".join(v.strip().split()) for v in values)


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    key = hmac.new(f"AWS4{secret}".encode(), date.encode(), hashlib.sha256).digest()
    for part in (region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def verify(
    method: str,
    raw_path: str,
    query: Sequence[tuple[str, str]],
    headers: Callable[[str], list[str]],
    secret_of: Callable[[str], str | None],
    now: float | None = None,
) -> Signed:
    """Check the request's SigV4 signature.

    Args:
        method: the HTTP method.
        raw_path: the path as sent (still percent-encoded), without the query.
        query: the query's ``(key, value)`` pairs as sent (percent-encoded).
        headers: all values of a header by name (case-insensitive), ``[]`` when absent.
        secret_of: the secret of an access key the server issued, ``None`` for an unknown one.
        now: the server's clock (seconds), for tests.

    Raises:
        SignatureError: unsigned, malformed, unknown key, stale, or a signature that does not match.
    """
    now = time.time() if now is None else now
    auth = _header_value(headers("Authorization"))
    q = dict(query)
    if auth.startswith(ALGORITHM):
        m = _AUTH.match(auth)
        if m is None:
            raise SignatureError("AuthorizationHeaderMalformed", "the Authorization header is not SigV4's form")
        cred, signed_text, signature = m.group("cred"), m.group("signed"), m.group("sig")
        amz_date = _header_value(headers("X-Amz-Date"))
        payload = _header_value(headers("X-Amz-Content-SHA256")) or hashlib.sha256(b"").hexdigest()
        drop = None
        expires = None
    elif q.get("X-Amz-Algorithm") == ALGORITHM:
        try:
            cred, signed_text, signature = (
                unquote(q["X-Amz-Credential"]),
                unquote(q["X-Amz-SignedHeaders"]),
                q["X-Amz-Signature"],
            )
            amz_date, expires = q["X-Amz-Date"], int(q["X-Amz-Expires"])
        except (KeyError, ValueError):
            raise SignatureError("AuthorizationQueryParametersError", "the presigned URL lacks a SigV4 field") from None
        payload, drop = "UNSIGNED-PAYLOAD", "X-Amz-Signature"
        if not 0 < expires <= MAX_EXPIRES_S:
            raise SignatureError("AuthorizationQueryParametersError", "X-Amz-Expires is out of range")
    else:
        raise SignatureError("AccessDenied", "the request is not signed (SigV4) and this server needs credentials")
    parts = cred.split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise SignatureError("AuthorizationHeaderMalformed", "the credential scope is malformed")
    access_key, date, region, service, _ = parts
    if not _DATE.fullmatch(amz_date) or amz_date[:8] != date:
        raise SignatureError("AuthorizationHeaderMalformed", "X-Amz-Date is missing or does not match the scope")
    when = timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
    if expires is None and abs(now - when) > MAX_SKEW_S:
        raise SignatureError("RequestTimeTooSkewed", "the request's date is too far from the server's clock")
    if expires is not None and not when - MAX_SKEW_S <= now <= when + expires:
        raise SignatureError("AccessDenied", "the presigned URL has expired (or is not valid yet)")
    secret = secret_of(access_key)
    if secret is None:
        raise SignatureError("InvalidAccessKeyId", "the access key id is not known to this server")
    signed = signed_text.split(";")
    if "host" not in signed or signed != sorted(signed):
        raise SignatureError("AuthorizationHeaderMalformed", "SignedHeaders must be sorted and include host")
    canonical = "\n".join(
        [
            method.upper(),
            raw_path or "/",
            _canonical_query(query, drop),
            "".join(f"{name}:{_header_value(headers(name))}\n" for name in signed),
            signed_text,
            payload,
        ]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    expected = hmac.new(signing_key(secret, date, region, service), to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        raise SignatureError("SignatureDoesNotMatch", "the request signature does not match (wrong secret?)")
    return Signed(access_key)
