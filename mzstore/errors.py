"""The one error module.

Every failure mzstore reports is a :class:`MzstoreError`. Each subclass also
derives from the builtin exception a Python user would catch for that kind
of failure (``FileNotFoundError``, ``ValueError``…), in the manner of
huggingface_hub's ``errors.py``. There are exactly two translation points:
domain → ``grpc.StatusCode`` in the server (``mzstore.server.service``) and
``grpc.RpcError`` → domain in the client (``mzstore.client``). Both use the
table at the bottom of this module, so the mapping is defined once.
"""

from __future__ import annotations


class MzstoreError(Exception):
    """Base class of every error mzstore raises on purpose."""

    #: gRPC status code name used when this error crosses the wire.
    grpc_code: str = "INTERNAL"


class InvalidArgument(MzstoreError, ValueError):
    """A request or an input is malformed (bad name, bad policy, bad option)."""

    grpc_code = "INVALID_ARGUMENT"


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
