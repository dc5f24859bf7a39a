"""The one error module.

Every failure mzstore reports is a :class:`MzstoreError`. Each subclass also
derives from the builtin exception a Python user would catch for that kind
of failure (``FileNotFoundError``, ``ValueError``…), in the manner of
huggingface_hub's ``errors.py``. On the gRPC wire an error is its status
code plus, for the errors a client must tell apart from others of the same
code (a busy upload session from another conflict), a machine-readable
``reason`` sent as ``mzstore-reason`` trailing metadata, as huggingface_hub
sends ``X-Error-Code``. Each side translates in one place: domain → status in
the server (:func:`mzstore.server.service.abort_with`), status → domain in
the client (:func:`mzstore.transport.grpc.translate`). Both use the tables at
the bottom of this module, so the mapping is defined once; nothing branches
on an error's text.
"""

from __future__ import annotations

from types import ModuleType


class MzstoreError(Exception):
    """Base class of every error mzstore raises on purpose."""

    #: gRPC status code name used when this error crosses the wire.
    grpc_code: str = "INTERNAL"
    #: Machine-readable reason sent beside the code (``mzstore-reason``), for errors a client acts on.
    reason: str | None = None


class InvalidArgument(MzstoreError, ValueError):
    """A request or an input is malformed (bad name, bad policy, bad option)."""

    grpc_code = "INVALID_ARGUMENT"


class UsageError(InvalidArgument):
    """An option that does not apply, or options that cannot be combined (the CLI exits 2)."""


class InvalidName(InvalidArgument):
    """A model name, tag or digest does not follow the reference grammar."""


class FormatError(InvalidArgument):
    """Input bytes are not what they claim to be (malformed safetensors, manifest…)."""


class NotFound(MzstoreError, FileNotFoundError):
    """A ref, manifest, blob or source file does not exist."""

    grpc_code = "NOT_FOUND"


class Conflict(MzstoreError, FileExistsError):
    """The request conflicts with what is stored (e.g. a name clashes with a tag path)."""

    grpc_code = "FAILED_PRECONDITION"


class IntegrityError(MzstoreError, ValueError):
    """Bytes failed verification: a hash mismatch, a truncated or altered transfer."""

    grpc_code = "DATA_LOSS"


class CodecError(MzstoreError, ValueError):
    """A codec could not encode or decode a chunk."""

    grpc_code = "INTERNAL"


class ResourceExhausted(MzstoreError, OSError):
    """A limit was hit: disk full, message or header too large."""

    grpc_code = "RESOURCE_EXHAUSTED"


class Unavailable(MzstoreError, ConnectionError):
    """The server or a storage node cannot be reached."""

    grpc_code = "UNAVAILABLE"


class Cancelled(MzstoreError):
    """The other side went away before the operation finished."""

    grpc_code = "CANCELLED"


class DeadlineExceeded(MzstoreError, TimeoutError):
    """The operation did not finish in time."""

    grpc_code = "DEADLINE_EXCEEDED"


class Unauthenticated(MzstoreError, PermissionError):
    """The server wants a token and got none, or one it does not know."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(MzstoreError, PermissionError):
    """The token is known but lacks the scope or name prefix the call needs."""

    grpc_code = "PERMISSION_DENIED"


class SessionBusy(Conflict):
    """Another stream holds the upload session (a dead client's, not yet noticed): wait and ask again."""

    reason = "session-busy"


class SessionMismatch(Conflict):
    """The upload session id exists for another push (other ref, policy or files)."""

    reason = "session-mismatch"


class SessionNotFound(NotFound):
    """No such upload session on this server: swept, committed, or another server's."""

    reason = "session-not-found"


class MissingDependency(MzstoreError, ImportError):
    """A feature needs an optional package that is not installed; the message names the extra to install."""

    grpc_code = "FAILED_PRECONDITION"


def requires(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or fail in one line naming the pip extra that provides it.

    Raises:
        MissingDependency: ``module`` is not installed.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{feature} needs {module}: pip install 'mzstore[{extra}]'") from None


#: Name of the gRPC trailing-metadata entry that carries :attr:`MzstoreError.reason`.
REASON_KEY = "mzstore-reason"

#: ``reason`` → the error class a client raises for it (wins over the status code).
ERROR_FOR_REASON: dict[str, type[MzstoreError]] = {
    cls.reason: cls for cls in (SessionBusy, SessionMismatch, SessionNotFound) if cls.reason is not None
}

#: gRPC status code name → the error class a client raises for it.
ERROR_FOR_CODE: dict[str, type[MzstoreError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": NotFound,
    "FAILED_PRECONDITION": Conflict,
    "ALREADY_EXISTS": Conflict,
    "DATA_LOSS": IntegrityError,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "UNAVAILABLE": Unavailable,
    "CANCELLED": Cancelled,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "OUT_OF_RANGE": InvalidArgument,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
}
