"""An upload session's bytes over HTTP: one ``PUT`` to the ``upload_url`` that ``StartUpload`` gave.

The body is each file the session has not ended, from the offset the server
holds to its end, in file order, each followed by its sha256 (32 bytes) when
the begin did not give it (the server's side, and why: see
:mod:`mzstore.server.uploads`). The events handed to :func:`put_upload` are
the ones an ``Upload`` stream would carry; each is checked against what the
session said before it goes out: data in order and within its file, and an
end with the file's size and the sha256 the begin gave, if it gave one. A file that changed
since it was hashed is an :class:`~mzstore.errors.IntegrityError` here, as
the server's check would make it. A connection that breaks is
:class:`~mzstore.errors.Unavailable` (the push resumes at the server's
offsets); an error the server answers is raised as the class the same
failure of an ``Upload`` stream raises.
"""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from mzstore.errors import (
    ERROR_FOR_CODE,
    ERROR_FOR_REASON,
    IntegrityError,
    MzstoreError,
    Unavailable,
)
from mzstore.push.protocol import DIGEST_BYTES, UploadData, UploadEvent, UploadStatus, upload_body_bytes

#: Seconds to open the connection; a refused or unreachable upload URL means: use the gRPC stream.
CONNECT_TIMEOUT = 5.0


class UploadUrlUnreachable(Unavailable):
    """The upload URL could not be connected to (the HTTP listener is not reachable from here)."""


def put_upload(
    url: str,
    events: Iterable[UploadEvent],
    *,
    sizes: Sequence[int],
    hashes: Sequence[str],
    received: Sequence[int],
    ended: Sequence[bool],
    timeout: float,
    token: str | None = None,
    context: ssl.SSLContext | None = None,
) -> UploadStatus:
    """Send the session's remaining bytes as the body of one ``PUT url``; the session's status after it.

    Args:
        sizes, hashes: every file's size and sha256, as the begin gave them ("": hashed as it is sent).
        received, ended: the session's status from ``StartUpload``: where each file's bytes resume.
        timeout: seconds a send or the answer may take (the answer comes once the last bytes are ingested).
        token: sent as ``Authorization: Bearer``.

    Raises:
        UploadUrlUnreachable: no connection could be opened.
        Unavailable: the connection broke.
        IntegrityError: an event does not match the session (a file changed after it was hashed).
    """
    parts = urlsplit(url)
    total = upload_body_bytes(sizes, hashes, received, ended)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=CONNECT_TIMEOUT, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=CONNECT_TIMEOUT)
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise UploadUrlUnreachable(f"cannot connect to the upload URL {url}: {exc}") from None
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        conn.putrequest("PUT", parts.path or "/", skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(total))
        if token:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        try:
            _send(conn, events, sizes, hashes, received, ended)
            response = conn.getresponse()
            body = response.read()
        except OSError as exc:
            failed = _answer_after_failure(conn)  # the server may have refused the rest with a reason
            if failed is not None:
                raise failed from None
            raise Unavailable(f"the upload to {url} broke off: {exc}") from None
        except http.client.HTTPException as exc:
            raise Unavailable(f"the upload to {url} got no answer: {exc}") from None
        if response.status != 200:
            raise _error(response.status, body)
        return _status(body)
    finally:
        conn.close()


def _send(
    conn: http.client.HTTPConnection,
    events: Iterable[UploadEvent],
    sizes: Sequence[int],
    hashes: Sequence[str],
    received: Sequence[int],
    ended: Sequence[bool],
) -> None:
    todo = [i for i in range(len(sizes)) if not ended[i]]
    pos = {i: received[i] for i in todo}
    for e in events:
        if not todo or e.file != todo[0]:
            raise IntegrityError(f"file {e.file} is not the next one the upload session expects")
        if isinstance(e, UploadData):
            if e.offset != pos[e.file] or e.offset + len(e.data) > sizes[e.file]:
                raise IntegrityError(f"file {e.file} grew or moved since it was hashed")
            conn.send(e.data)
            pos[e.file] += len(e.data)
            continue
        if e.size != sizes[e.file] or pos[e.file] != e.size or (hashes[e.file] and e.sha256 != hashes[e.file]):
            raise IntegrityError(f"file {e.file} changed since it was hashed")
        if not hashes[e.file]:  # hashed as it was read: its sha256 follows its bytes
            digest = bytes.fromhex(e.sha256)
            if len(digest) != DIGEST_BYTES:
                raise IntegrityError(f"file {e.file}: {e.sha256!r} is not a sha256")
            conn.send(digest)
        todo.pop(0)
    if todo:
        raise IntegrityError(f"file {todo[0]} ended early: it changed since it was hashed")


def _answer_after_failure(conn: http.client.HTTPConnection) -> MzstoreError | None:
    """The error a server answered before it stopped reading the body, if one can still be read."""
    try:
        response = conn.getresponse()
        return _error(response.status, response.read())
    except (OSError, http.client.HTTPException):
        return None


def _error(status: int, body: bytes) -> MzstoreError:
    try:
        answer = json.loads(body)
        message, reason, code = str(answer["error"]), str(answer.get("code", "")), str(answer.get("grpc_code", ""))
    except (ValueError, KeyError, TypeError):
        return Unavailable(f"the upload got HTTP {status}: {body[:200]!r}")
    cls = ERROR_FOR_REASON.get(reason) or ERROR_FOR_CODE.get(code) or Unavailable
    return cls(message)


def _status(body: bytes) -> UploadStatus:
    try:
        answer = json.loads(body)
        return UploadStatus(
            session=str(answer["session"]),
            received=[int(x) for x in answer["received"]],
            ended=[bool(x) for x in answer["ended"]],
            committed=bool(answer["committed"]),
            known=[bool(x) for x in answer["known"]],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise Unavailable(f"the upload's answer is not a session status: {exc}") from None
