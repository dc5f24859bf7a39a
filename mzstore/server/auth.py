"""Bearer tokens with scopes, checked by a server interceptor (issue #6).

How it works:

* **Token file** (``mzstore serve --token-file F``): one token per line,
  whitespace-separated, ``#`` starts a comment::

      # name    scopes       sha256 of the token       [name prefixes it may write]
      ci-bot    read,write   sha256:9f86d081884c7d65…  team-a/
      reader    read         sha256:2c26b46b68ffc68f…

  A line whose third field is ``s3:<ACCESS KEY ID>:<SECRET>`` is an S3
  credential for the S3 face (``mzstore token add NAME --s3``): S3 clients
  sign requests with SigV4, an HMAC keyed by the secret, so the server must
  hold the secret itself to check them (:mod:`mzstore.server.sigv4`), as
  every S3 server does; keep the file 0600 (``token add`` creates it so).
  Only the sha256 of each bearer token is stored. Tokens are 256-bit random strings
  (``mzstore token add``), so a fast unsalted hash is enough: nobody can
  guess a preimage, and a hash lookup costs nothing per request (scrypt or
  argon2 are for low-entropy passwords). The file is re-read when its
  modification time changes, so adding or revoking a token needs no restart.
* **Scopes** nest: ``admin`` ⊇ ``write`` ⊇ ``read``. GetManifest, ReadBlob,
  List and GetTopology need ``read``; Push and Tag need ``write``; Delete
  (``rm``) needs ``admin``, so a CI token that pushes cannot remove tags.
  Methods of the Store service not in :data:`REQUIRED_SCOPE` need ``admin``
  (fail closed); other services (health checking, reflection) stay open.
* **Where the checks run.** :class:`TokenInterceptor` resolves the token and
  checks the scope from the method name and the metadata alone, before the
  handler runs, so a refused Push has not read one message of its body. A
  token with name prefixes may only write under them: the ref is in the
  request (Tag's target, Delete's ref) or in Push's first message, so the
  interceptor wraps those handlers and checks the ref before handing the
  request (and, for Push, the rest of the stream, unread) to the servicer.
  Prefixes do not limit reads: blobs are addressed by digest, not by name.
* Errors: ``UNAUTHENTICATED`` (no token, unknown token) and
  ``PERMISSION_DENIED`` (scope or prefix), each with a one-line message.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from mzstore.errors import InvalidArgument, MzstoreError, PermissionDenied, Unauthenticated
from mzstore.format.refs import parse_ref
from mzstore.v1.store_pb2 import PushRequest

SCOPES = ("read", "write", "admin")
_RANK = {s: i for i, s in enumerate(SCOPES)}
_STORE = "/mzstore.v1.Store/"
#: Store method → the scope it needs. Anything else in the Store service needs ``admin``.
REQUIRED_SCOPE = {
    "GetManifest": "read",
    "ReadBlob": "read",
    "List": "read",
    "GetTopology": "read",
    "Push": "write",
    "StartUpload": "write",
    "Upload": "write",
    "CommitUpload": "write",
    "FindFileSizes": "write",
    "Tag": "write",
    "Delete": "admin",
}
HASH_PREFIX = "sha256:"


def hash_token(token: str) -> str:
    """The at-rest form of a token: ``sha256:<hex>``."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return "mzs_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Grant:
    """What one token may do."""

    name: str
    scope: str
    prefixes: tuple[str, ...] = ()

    def allows(self, scope: str) -> bool:
        return _RANK[self.scope] >= _RANK[scope]

    def may_write(self, name: str) -> bool:
        return not self.prefixes or any(name.startswith(p.rstrip("*")) for p in self.prefixes)


def _parse_scopes(text: str, where: str) -> str:
    """``read,write`` → the highest scope listed."""
    names = [s for s in text.split(",") if s]
    bad = [s for s in names if s not in _RANK]
    if not names or bad:
        raise InvalidArgument(f"{where}: scopes are a comma list of {', '.join(SCOPES)}, got {text!r}")
    return max(names, key=_RANK.__getitem__)


def token_line(name: str, token: str, scopes: str, prefixes: tuple[str, ...] = ()) -> str:
    """One token-file line for ``token`` (stored hashed)."""
    if not name or any(c.isspace() for c in name) or name.startswith("#"):
        raise InvalidArgument(f"token name must be one word, got {name!r}")
    _parse_scopes(scopes, "--scope")
    for p in prefixes:
        if not p or any(c.isspace() for c in p):
            raise InvalidArgument(f"a name prefix must be one word, got {p!r}")
    return " ".join([name, scopes, hash_token(token), *prefixes])


S3_PREFIX = "s3:"
_ACCESS_KEY = re.compile(r"[A-Z0-9]{16,128}")
_SECRET = re.compile(r"[A-Za-z0-9_+/=-]{20,128}")


def new_s3_credentials() -> tuple[str, str]:
    """A fresh S3 access key id (``MZS3`` + 16 upper-case letters and digits) and secret (240 bits)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    return "MZS3" + "".join(secrets.choice(alphabet) for _ in range(16)), secrets.token_urlsafe(30)


def s3_line(name: str, access_key: str, secret: str, scopes: str, prefixes: tuple[str, ...] = ()) -> str:
    """One token-file line for an S3 credential (the secret is stored: SigV4 checks need it)."""
    token_line(name, "x", scopes, prefixes)  # the same checks of name, scopes and prefixes
    if not _ACCESS_KEY.fullmatch(access_key) or not _SECRET.fullmatch(secret):
        raise InvalidArgument("an S3 access key id is 16+ upper-case letters and digits; a secret 20+ characters")
    return " ".join([name, scopes, f"{S3_PREFIX}{access_key}:{secret}", *prefixes])


def parse_s3_credentials(text: str, source: str = "token file") -> dict[str, tuple[str, Grant]]:
    """Access key id → (secret, :class:`Grant`) of the ``s3:`` lines.

    Raises:
        InvalidArgument: a malformed ``s3:`` line, or an access key listed twice.
    """
    creds: dict[str, tuple[str, Grant]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if len(fields) < 3 or not fields[2].startswith(S3_PREFIX):
            continue
        where = f"{source}:{number}"
        key, _, secret = fields[2][len(S3_PREFIX) :].partition(":")
        if not _ACCESS_KEY.fullmatch(key) or not _SECRET.fullmatch(secret):
            raise InvalidArgument(f"{where}: expected 'NAME SCOPES s3:<ACCESS KEY ID>:<SECRET> [PREFIX …]'")
        if key in creds:
            raise InvalidArgument(f"{where}: the same access key is listed twice")
        creds[key] = (secret, Grant(fields[0], _parse_scopes(fields[1], where), tuple(fields[3:])))
    return creds


def parse_token_file(text: str, source: str = "token file") -> dict[str, Grant]:
    """Token hash → :class:`Grant` (``s3:`` lines are read by :func:`parse_s3_credentials`).

    Raises:
        InvalidArgument: a malformed line (named by its number), or a duplicate hash.
    """
    parse_s3_credentials(text, source)  # a malformed s3: line fails the file as well
    grants: dict[str, Grant] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields or (len(fields) >= 3 and fields[2].startswith(S3_PREFIX)):
            continue
        where = f"{source}:{number}"
        if len(fields) < 3 or not fields[2].startswith(HASH_PREFIX) or len(fields[2]) != len(HASH_PREFIX) + 64:
            raise InvalidArgument(f"{where}: expected 'NAME SCOPES sha256:<64 hex> [PREFIX …]'")
        name, scopes, digest, *prefixes = fields
        if digest in grants:
            raise InvalidArgument(f"{where}: the same token is listed twice")
        grants[digest] = Grant(name, _parse_scopes(scopes, where), tuple(prefixes))
    return grants


class TokenFile:
    """The grants of a token file, re-read when the file changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._grants: dict[str, Grant] = {}
        self._s3: dict[str, tuple[str, Grant]] = {}
        self._reload()

    def _reload(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return
            text = self.path.read_text()
        except OSError as exc:
            raise InvalidArgument(f"cannot read token file {self.path}: {exc.strerror or exc}") from None
        self._grants = parse_token_file(text, str(self.path))
        self._s3 = parse_s3_credentials(text, str(self.path))
        self._stamp = stamp

    def _fresh(self) -> None:
        with self._lock:
            try:
                self._reload()
            except MzstoreError:
                pass  # a half-written or removed file keeps the last good grants

    def lookup(self, token: str) -> Grant | None:
        self._fresh()
        return self._grants.get(hash_token(token))

    def lookup_s3(self, access_key: str) -> tuple[str, Grant] | None:
        """The secret and grant of an S3 access key id, or ``None``."""
        self._fresh()
        return self._s3.get(access_key)


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip() or None
    return None


def _refuse(handler: grpc.RpcMethodHandler | None, exc: MzstoreError) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape that fails the call with ``exc``.

    A streaming request (Push) is never iterated, so not one message of its body is read.
    """
    code = getattr(grpc.StatusCode, exc.grpc_code)

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, str(exc))

    if handler is not None and handler.request_streaming:
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(abort)
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler is not None and handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def _check_write(grant: Grant, ref: str) -> None:
    name = parse_ref(ref).name  # an invalid ref fails here (INVALID_ARGUMENT), as the servicer would fail it
    if not grant.may_write(name):
        raise PermissionDenied(f"token {grant.name!r} may not write {name!r} (only under {', '.join(grant.prefixes)})")


def _guard_unary(handler: grpc.RpcMethodHandler, ref_of: Callable[[Any], str], grant: Grant) -> grpc.RpcMethodHandler:
    behavior = handler.unary_unary

    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            _check_write(grant, ref_of(request))
        except MzstoreError as exc:
            context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))
        return behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(guarded, handler.request_deserializer, handler.response_serializer)


def _guard_push(handler: grpc.RpcMethodHandler, grant: Grant) -> grpc.RpcMethodHandler:
    behavior = handler.stream_unary

    def guarded(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        first = next(requests, None)
        # The servicer refuses a push that does not begin with its begin message (a data message
        # arrives as a FileDataMessage, see mzstore.transport.wire): only a begin has a ref to check.
        if isinstance(first, PushRequest) and first.WhichOneof("msg") == "begin":
            try:
                _check_write(grant, first.begin.ref)
            except MzstoreError as exc:
                context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))
        head = [first] if first is not None else []
        return behavior(itertools.chain(head, requests), context)

    return grpc.stream_unary_rpc_method_handler(guarded, handler.request_deserializer, handler.response_serializer)


class TokenInterceptor(grpc.ServerInterceptor):
    """Checks ``authorization: Bearer <token>`` on every Store call (see the module docstring)."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = details.method  # type: ignore[attr-defined]
        if not method.startswith(_STORE):
            return continuation(details)  # health checking and reflection stay open
        rpc = method[len(_STORE) :]
        needed = REQUIRED_SCOPE.get(rpc, "admin")
        token = _bearer(details.invocation_metadata)  # type: ignore[attr-defined]
        handler = continuation(details)  # a lookup only: nothing runs, nothing is read
        if token is None:
            return _refuse(handler, Unauthenticated("this server needs a token: set MZSTORE_TOKEN"))
        grant = self.tokens.lookup(token)
        if grant is None:
            return _refuse(handler, Unauthenticated("the token is not known to this server"))
        if not grant.allows(needed):
            return _refuse(
                handler, PermissionDenied(f"token {grant.name!r} has scope {grant.scope}; {rpc} needs {needed}")
            )
        if handler is None or not grant.prefixes:
            return handler
        if rpc == "Push":
            return _guard_push(handler, grant)
        if rpc == "StartUpload":  # a session's later calls carry only its (random, unguessable) id
            return _guard_unary(handler, lambda r: r.begin.ref, grant)
        if rpc == "Tag":
            return _guard_unary(handler, lambda r: r.target, grant)
        if rpc == "Delete":
            return _guard_unary(handler, lambda r: r.ref, grant)
        return handler
