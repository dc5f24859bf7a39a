"""The S3 face: a read-only S3 API, so S3 clients load models from the store (issue 18).

``mzstore serve --s3 HOST:PORT`` (``MZSTORE_S3``; off by default) runs it on
its own listener. Point ``AWS_ENDPOINT_URL`` at it and boto3, s3fs, the AWS
CLI, the Run:ai Model Streamer and vLLM's ``--load-format runai_streamer``
read models as objects:

    s3://mzstore/<name>/<tag>/<path>        e.g. s3://mzstore/org/llama/v1/model-00001-of-00002.safetensors

The object is the file ``mzstore pull`` writes, decoded by the server from
its stored chunks by the same reader as the Hugging Face face
(:class:`~mzstore.server.files.ServedFiles`: a ``Range`` decodes only the
chunks it covers; a shared LRU of decoded chunks serves the many concurrent
ranged GETs a streamer issues). The bucket is ``mzstore`` (``--s3-bucket``
renames it). A key splits into name, tag and path at the one place where a
tag exists (a name cannot also be a tag path of another name, so the split is
unique).

Operations: ``ListBuckets``, ``HeadBucket``, ``GetBucketLocation``,
``ListObjectsV2`` (``prefix``, ``delimiter``, ``max-keys``,
``continuation-token``, ``start-after``, ``encoding-type=url``; ``ListObjects``
v1 with ``marker`` too), ``HeadObject`` and ``GetObject`` (one ``Range`` →
``206``; ``If-Match``, ``If-None-Match``, ``If-Modified-Since``,
``If-Unmodified-Since``). ``ETag`` is the sha256 of the object's bytes
(quoted hex; not an MD5, so clients do not take it for one),
``Last-Modified`` the time the tag was written. Every other verb or
sub-resource is refused: writes with ``AccessDenied`` (the face is
read-only), unknown operations with ``NotImplemented``. Errors are S3's XML
with its codes and statuses (``NoSuchBucket``, ``NoSuchKey``,
``InvalidRange``, ``AccessDenied``, ``SignatureDoesNotMatch`` …).

Addressing: path style (``http://host:port/mzstore/key``) and virtual-host
style (``Host: mzstore.<anything>``).

**Auth.** With no token file the server needs no credentials, here as
everywhere: signed and unsigned requests are served (signatures unchecked,
and so not taken as an identity). With a token file, every request must be
signed (SigV4, :mod:`mzstore.server.sigv4`) with an access key from the
file's ``s3:`` lines (``mzstore token add NAME --s3``) whose scope allows
``read``; ``serve --public-s3`` serves anonymous requests as well.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import quote
from xml.sax.saxutils import escape

from aiohttp import hdrs, web

from mzstore.errors import InvalidArgument, MzstoreError, NotFound, Unavailable
from mzstore.format.manifest import FileEntry, Manifest
from mzstore.format.refs import validate_name, validate_tag
from mzstore.pull.fileview import FileLayout
from mzstore.server import metrics
from mzstore.server.auth import TokenFile
from mzstore.server.files import ServedFiles, byte_range, iso_utc, start_body
from mzstore.server.http import Listener
from mzstore.server.sigv4 import SignatureError, is_signed, verify
from mzstore.storage.store import Store

#: The S3 operation a request is, for the request metric.
S3_OP = web.RequestKey("s3_op", str)
DEFAULT_BUCKET = "mzstore"
#: The most keys one ListObjects page returns (S3's own limit).
MAX_KEYS = 1000
XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
#: Sub-resources of a bucket GET that are answered (anything else is NotImplemented).
_BUCKET_READS = frozenset({"list-type", "prefix", "delimiter", "max-keys", "continuation-token", "start-after",
                           "encoding-type", "fetch-owner", "marker", "location", "x-id"})  # fmt: skip
#: S3 error codes and their statuses.
STATUS = {
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "InvalidRange": 416,
    "AccessDenied": 403,
    "InvalidAccessKeyId": 403,
    "SignatureDoesNotMatch": 403,
    "RequestTimeTooSkewed": 403,
    "AuthorizationHeaderMalformed": 400,
    "AuthorizationQueryParametersError": 400,
    "InvalidArgument": 400,
    "InvalidBucketName": 400,
    "MethodNotAllowed": 405,
    "NotImplemented": 501,
    "PreconditionFailed": 412,
    "ServiceUnavailable": 503,
    "InternalError": 500,
}


class S3Error(Exception):
    def __init__(self, code: str, message: str, resource: str = "", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.resource = resource
        self.headers = headers or {}

    def response(self, head: bool = False) -> web.Response:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{self.code}</Code>'
            f"<Message>{escape(str(self))}</Message><Resource>{escape(self.resource)}</Resource>"
            f"<RequestId>{time.time_ns():x}</RequestId></Error>"
        )
        return web.Response(
            status=STATUS.get(self.code, 400),
            body=None if head else body.encode(),
            content_type="application/xml",
            headers=self.headers,
        )


#: The S3 code of a domain error that reaches the face (subclasses included).
_S3_CODE: dict[type[MzstoreError], str] = {
    NotFound: "NoSuchKey",
    InvalidArgument: "InvalidArgument",
    Unavailable: "ServiceUnavailable",
}


@dataclass
class S3Options:
    """How the S3 face is set up: the bucket's name, the token file, anonymous reads."""

    bucket: str = DEFAULT_BUCKET
    tokens: TokenFile | None = None
    public: bool = False


@dataclass(frozen=True)
class Obj:
    """An object: the stored version and file it is."""

    key: str
    digest: str
    manifest: Manifest
    entry: FileEntry
    modified: float


class S3Plane(Listener):
    """The S3 listener (see the module docstring)."""

    name = "mzstore-s3"

    def __init__(
        self,
        store: Store,
        host: str,
        port: int,
        options: S3Options | None = None,
        files: ServedFiles | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(host, port, ssl_context)
        self.store = store
        self.options = options or S3Options()
        self._own_files = files is None
        self.files = files or ServedFiles(store)

    def build(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=1024)
        app.on_response_prepare.append(self._count)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def closed(self) -> None:
        if self._own_files:
            self.files.close()

    # -- plumbing -----------------------------------------------------------------------------
    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except S3Error as exc:
            error = exc
        except MzstoreError as exc:
            code = next((c for cls, c in _S3_CODE.items() if isinstance(exc, cls)), "InternalError")
            error = S3Error(code, str(exc), request.path)
        return error.response(head=request.method == "HEAD")

    async def _count(self, request: web.Request, response: web.StreamResponse) -> None:
        metrics.HTTP_REQUESTS.labels(f"s3:{request.get(S3_OP, 'unknown')}", str(response.status)).inc()

    def _authorize(self, request: web.Request) -> None:
        """Refuse a request this server cannot attribute to an access key with ``read`` (see the module docstring)."""
        tokens = self.options.tokens
        if tokens is None:
            return
        query = [(k, v) for k, v in request.query.items()]
        if self.options.public and not is_signed(request.headers, query):
            return
        target = request.raw_path
        if target.startswith(("http://", "https://")):  # absolute-form request-target (the AWS CRT sends it)
            rest = target.split("://", 1)[1]
            target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        raw_path, _, raw_query = target.partition("?")
        raw_pairs = [(k, v) for k, _, v in (p.partition("=") for p in raw_query.split("&") if p)]

        def secret_of(key: str) -> str | None:
            found = tokens.lookup_s3(key)
            return found[0] if found else None

        try:
            signed = verify(
                request.method, raw_path, raw_pairs, lambda name: list(request.headers.getall(name, [])), secret_of
            )
        except SignatureError as exc:
            raise S3Error(exc.code, str(exc), request.path) from None
        found = tokens.lookup_s3(signed.access_key)
        if found is None or not found[1].allows("read"):
            raise S3Error("AccessDenied", "this access key may not read", request.path)

    def _split(self, request: web.Request) -> tuple[str | None, str]:
        """``(bucket, key)`` of a request, path style or virtual-host style (bucket ``None``: the service)."""
        path = request.path
        host = request.host.split(":", 1)[0]
        bucket = self.options.bucket
        if host.startswith(bucket + "."):
            return bucket, path.lstrip("/")
        first, _, key = path.lstrip("/").partition("/")
        return (first or None), key

    # -- objects --------------------------------------------------------------------------------
    def lookup(self, key: str) -> Obj:
        """The object at ``key`` (blocking).

        Raises:
            S3Error: ``NoSuchKey``.
        """
        parts = key.split("/")
        for i in range(1, len(parts) - 1):
            name, tag, path = "/".join(parts[:i]), parts[i], "/".join(parts[i + 1 :])
            try:
                validate_name(name)
                validate_tag(tag)
                found = self.files.tag(name, tag)
            except (MzstoreError, ValueError):
                continue
            if found is None:
                continue
            digest, modified = found
            manifest = self.files.manifest(digest)
            entry = next((f for f in manifest.files if f.path == path), None)
            if entry is None:
                break
            return Obj(key, digest, manifest, entry, modified)
        raise S3Error("NoSuchKey", "The specified key does not exist.", key)

    def _describe(self, obj: Obj) -> tuple[FileLayout, str]:
        layout = self.files.layout(obj.digest, obj.manifest, obj.entry.path)
        return layout, self.files.sha256(obj.digest, layout)

    def all_objects(self) -> list[tuple[str, int, str, float]]:
        """``(key, size, etag, modified)`` of every object, sorted by key (blocking)."""
        out = []
        for ref in self.store.list_refs():
            try:
                found = self.files.tag(ref.name, ref.tag)
                if found is None:
                    continue
                digest, modified = found
                manifest = self.files.manifest(digest)
            except MzstoreError:
                continue
            for f in manifest.files:
                layout = self.files.layout(digest, manifest, f.path)
                sha = self.files.sha256(digest, layout)
                out.append((f"{ref.name}/{ref.tag}/{f.path}", layout.size, sha, modified))
        return sorted(out)

    # -- the handler ----------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self._authorize(request)
        bucket, key = self._split(request)
        method = request.method
        if method not in ("GET", "HEAD"):
            request[S3_OP] = "write"
            raise S3Error("AccessDenied", f"this S3 face is read-only ({method} refused)", request.path)
        if bucket is None:
            request[S3_OP] = "ListBuckets"
            return self._list_buckets()
        if bucket != self.options.bucket:
            raise S3Error("NoSuchBucket", "The specified bucket does not exist.", bucket)
        if not key:
            unknown = [k for k in request.query if k not in _BUCKET_READS]
            if unknown:
                request[S3_OP] = "unsupported"
                raise S3Error("NotImplemented", f"?{unknown[0]} is not supported by this S3 face", request.path)
            if method == "HEAD":
                request[S3_OP] = "HeadBucket"
                return web.Response(status=200, headers={"x-amz-bucket-region": "us-east-1"})
            if "location" in request.query:
                request[S3_OP] = "GetBucketLocation"
                return _xml(f'<LocationConstraint xmlns="{XMLNS}"></LocationConstraint>')
            request[S3_OP] = "ListObjects"
            return await self._list(request)
        if any(k in request.query for k in ("uploadId", "tagging", "acl", "attributes", "torrent", "retention")):
            request[S3_OP] = "unsupported"
            raise S3Error("NotImplemented", "this S3 face serves object bytes only", request.path)
        request[S3_OP] = "HeadObject" if method == "HEAD" else "GetObject"
        return await self._object(request, key)

    def _list_buckets(self) -> web.Response:
        b = escape(self.options.bucket)
        return _xml(
            f'<ListAllMyBucketsResult xmlns="{XMLNS}"><Owner><ID>mzstore</ID><DisplayName>mzstore</DisplayName>'
            f"</Owner><Buckets><Bucket><Name>{b}</Name><CreationDate>{iso_utc(0)}</CreationDate></Bucket></Buckets>"
            "</ListAllMyBucketsResult>"
        )

    async def _list(self, request: web.Request) -> web.Response:
        q = request.query
        v2 = q.get("list-type") == "2"
        prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
        try:
            max_keys = min(MAX_KEYS, max(0, int(q.get("max-keys", MAX_KEYS))))
        except ValueError:
            raise S3Error("InvalidArgument", "max-keys must be an integer", request.path) from None
        after = q.get("start-after", "") if v2 else q.get("marker", "")
        token = q.get("continuation-token")
        if v2 and token:
            try:
                after = base64.urlsafe_b64decode(token.encode()).decode()
            except ValueError:
                raise S3Error("InvalidArgument", "the continuation token is not valid", request.path) from None
        encode = q.get("encoding-type") == "url"
        objects = await self.files.run(self.all_objects)
        contents: list[tuple[str, int, str, float]] = []
        prefixes: list[str] = []
        last = ""
        truncated = False
        for key, size, etag, modified in objects:
            if not key.startswith(prefix) or key <= after:
                continue
            if delimiter and delimiter in key[len(prefix) :]:
                common = key[: len(prefix) + key[len(prefix) :].index(delimiter) + len(delimiter)]
                if common <= after or (prefixes and prefixes[-1] == common):
                    continue
                if len(contents) + len(prefixes) >= max_keys:
                    truncated = True
                    break
                prefixes.append(common)
                last = common
                continue
            if len(contents) + len(prefixes) >= max_keys:
                truncated = True
                break
            contents.append((key, size, etag, modified))
            last = key
        enc = (lambda k: quote(k, safe="/")) if encode else (lambda k: k)
        parts = [
            f'<ListBucketResult xmlns="{XMLNS}"><Name>{escape(self.options.bucket)}</Name>',
            f"<Prefix>{escape(enc(prefix))}</Prefix><MaxKeys>{max_keys}</MaxKeys>",
            f"<Delimiter>{escape(enc(delimiter))}</Delimiter>" if delimiter else "",
            "<EncodingType>url</EncodingType>" if encode else "",
            f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>",
        ]
        if v2:
            parts.append(f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>")
            if token:
                parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
            if q.get("start-after"):
                parts.append(f"<StartAfter>{escape(enc(q['start-after']))}</StartAfter>")
            if truncated:
                nxt = base64.urlsafe_b64encode(last.encode()).decode()
                parts.append(f"<NextContinuationToken>{nxt}</NextContinuationToken>")
        else:
            parts.append(f"<Marker>{escape(enc(after))}</Marker>")
            if truncated:
                parts.append(f"<NextMarker>{escape(enc(last))}</NextMarker>")
        for key, size, etag, modified in contents:
            parts.append(
                f"<Contents><Key>{escape(enc(key))}</Key><LastModified>{iso_utc(modified)}</LastModified>"
                f"<ETag>&quot;{etag}&quot;</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            )
        parts.extend(f"<CommonPrefixes><Prefix>{escape(enc(p))}</Prefix></CommonPrefixes>" for p in prefixes)
        parts.append("</ListBucketResult>")
        return _xml("".join(parts))

    async def _object(self, request: web.Request, key: str) -> web.StreamResponse:
        obj = await self.files.run(self.lookup, key)
        layout, sha = await self.files.run(self._describe, obj)
        etag = f'"{sha}"'
        size = layout.size
        headers = {
            hdrs.ETAG: etag,
            hdrs.LAST_MODIFIED: formatdate(obj.modified, usegmt=True),
            hdrs.ACCEPT_RANGES: "bytes",
            "x-amz-meta-mzstore-ref": f"{key.rsplit('/', 1)[0]}",
        }
        _preconditions(request, etag, obj.modified, key, headers)
        start, end, status = 0, size, 200
        if request.headers.get(hdrs.RANGE) is not None:
            try:
                start, end = byte_range(request, size)
            except ValueError as exc:
                raise S3Error("InvalidRange", str(exc), key, {hdrs.CONTENT_RANGE: f"bytes */{size}"}) from None
            status = 206
            headers[hdrs.CONTENT_RANGE] = f"bytes {start}-{end - 1}/{size}"
        response = await start_body(request, status, headers, end - start)
        if request.method == "GET":
            await self.files.send(request, response, layout, sha, start, end, "s3")
        await response.write_eof()
        return response


def _preconditions(request: web.Request, etag: str, modified: float, key: str, headers: dict[str, str]) -> None:
    """``If-Match`` / ``If-Unmodified-Since`` → 412; ``If-None-Match`` / ``If-Modified-Since`` → 304 (RFC 9110 order)."""
    h = request.headers

    def matches(value: str) -> bool:
        return any(t.strip() in ("*", etag) for t in value.split(","))

    def since(name: str) -> float | None:
        try:
            return parsedate_to_datetime(h[name]).timestamp() if name in h else None
        except (TypeError, ValueError):
            return None

    if hdrs.IF_MATCH in h and not matches(h[hdrs.IF_MATCH]):
        raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold", key)
    unmodified = since(hdrs.IF_UNMODIFIED_SINCE)
    if hdrs.IF_MATCH not in h and unmodified is not None and int(modified) > unmodified:
        raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold", key)
    if hdrs.IF_NONE_MATCH in h:
        if matches(h[hdrs.IF_NONE_MATCH]):
            raise _NotModified(headers)
    else:
        changed = since(hdrs.IF_MODIFIED_SINCE)
        if changed is not None and int(modified) <= changed:
            raise _NotModified(headers)


class _NotModified(S3Error):
    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__("NotModified", "not modified", headers=headers)

    def response(self, head: bool = False) -> web.Response:
        return web.Response(status=304, headers=self.headers)


def _xml(body: str) -> web.Response:
    return web.Response(
        body=('<?xml version="1.0" encoding="UTF-8"?>\n' + body).encode(), content_type="application/xml"
    )


__all__ = ["DEFAULT_BUCKET", "S3Error", "S3Options", "S3Plane"]
