"""Model references: ``name[:tag][@sha256:<hex>]`` (Docker grammar).

Pure parsing and validation; runs before any storage path is built.

* name: one or more ``/``-separated components, each starting and ending
  with a letter or digit and containing only letters, digits, ``.``, ``_``
  and ``-``; no component is ``.`` or ``..``. Mixed case is accepted (as on
  Hugging Face Hub); at most 255 characters in all.
* tag: ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``, default ``latest``.
* digest: ``sha256:`` + 64 lowercase hex digits; when present it wins over
  the tag.

What a node stores for a tag is a :class:`RefValue`: the manifest digest (or
``null`` for a deleted tag) and the write's :class:`RefVersion`, as one line
of JSON; :mod:`mzstore.storage.tags` says how they converge.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mzstore.errors import FormatError, InvalidName
from mzstore.limits import MAX_NAME_LENGTH

DEFAULT_TAG = "latest"

_COMPONENT = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Ref:
    """A parsed reference. ``digest`` wins over ``tag`` when both are set."""

    name: str
    tag: str = DEFAULT_TAG
    digest: str | None = None

    def __str__(self) -> str:
        text = f"{self.name}:{self.tag}"
        return f"{text}@{self.digest}" if self.digest else text


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid model name.

    Raises:
        InvalidName: with a message saying which rule it breaks.
    """
    if not name:
        raise InvalidName("model name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"model name is longer than {MAX_NAME_LENGTH} characters")
    if "\x00" in name:
        raise InvalidName("model name contains a NUL byte")
    for component in name.split("/"):
        if component in ("", ".", ".."):
            raise InvalidName(f"invalid model name {name!r}: empty, '.' or '..' component")
        if not _COMPONENT.fullmatch(component) or ".." in component:
            raise InvalidName(
                f"invalid model name {name!r}: components use letters, digits, '.', '_', '-' "
                "and start and end with a letter or digit"
            )
    return name


def validate_tag(tag: str) -> str:
    """Return ``tag`` if valid, else raise :class:`InvalidName`."""
    if not _TAG.fullmatch(tag) or ".." in tag:
        raise InvalidName(
            f"invalid tag {tag[:140]!r}: up to 128 of letters, digits, '_', '.', '-', not starting with '.' or '-'"
        )
    return tag


def validate_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 hex>``, else raise :class:`InvalidName`."""
    if not _DIGEST.fullmatch(digest):
        raise InvalidName(f"invalid digest {digest[:80]!r}: expected sha256:<64 lowercase hex digits>")
    return digest


def parse_ref(text: str) -> Ref:
    """Parse ``name[:tag][@sha256:<hex>]``.

    Raises:
        InvalidName: if any part is malformed.
    """
    if not isinstance(text, str) or not text:
        raise InvalidName("reference is empty")
    if len(text) > MAX_NAME_LENGTH + 200:
        raise InvalidName("reference is too long")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        validate_digest(digest)
    tag = DEFAULT_TAG
    last = text.rsplit("/", 1)[-1]
    if ":" in last:
        text, tag = text.rsplit(":", 1)
        validate_tag(tag)
    return Ref(validate_name(text), tag, digest)


# --- tag values: a small replicated register (issue 16) ------------------------


@dataclass(frozen=True, order=True)
class RefVersion:
    """The version of one tag write; versions compare as ``(time_ms, counter, writer)``.

    ``time_ms`` and ``counter`` come from the writing server's hybrid logical
    clock (:class:`mzstore.storage.tags.HybridClock`): wall-clock milliseconds,
    never behind any version that server has read, and a counter that orders
    writes within one millisecond. ``writer`` (a random id per server process)
    breaks the tie between two servers that wrote in the same millisecond.
    Version zero is a ref written before versions existed.
    """

    time_ms: int = 0
    counter: int = 0
    writer: str = ""


ZERO = RefVersion()
_WRITER = re.compile(r"[A-Za-z0-9._-]{0,64}")


@dataclass(frozen=True)
class RefValue:
    """What a node holds for a tag: the manifest digest (``None``: deleted, a tombstone) and its version."""

    digest: str | None
    version: RefVersion = ZERO

    @property
    def deleted(self) -> bool:
        return self.digest is None

    def order(self) -> tuple[RefVersion, str]:
        """The total order of tag writes: the version, then the digest (a tombstone sorts first)."""
        return self.version, self.digest or ""

    def newer_than(self, other: RefValue | None) -> bool:
        return other is None or self.order() > other.order()

    def encode(self) -> bytes:
        """One line of JSON: ``{"digest": ..., "version": [time_ms, counter, writer]}``."""
        v = self.version
        body = {"digest": self.digest, "version": [v.time_ms, v.counter, v.writer]}
        return (json.dumps(body, separators=(",", ":")) + "\n").encode("ascii")

    @classmethod
    def decode(cls, data: bytes) -> RefValue:
        """Parse a ref object; a bare ``sha256:<hex>`` line (refs written before versions) is version zero.

        Raises:
            FormatError: the object is neither.
        """
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise FormatError("ref object is not ASCII") from None
        if text.startswith("sha256:"):
            try:
                return cls(validate_digest(text))
            except InvalidName as exc:
                raise FormatError(f"ref object: {exc}") from None
        try:
            body = json.loads(text)
            digest = body["digest"]
            time_ms, counter, writer = body["version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FormatError(f"ref object is not a digest or a versioned ref: {exc}") from None
        ok = (
            (digest is None or (isinstance(digest, str) and _DIGEST.fullmatch(digest)))
            and all(type(n) is int and 0 <= n < 2**63 for n in (time_ms, counter))
            and isinstance(writer, str)
            and _WRITER.fullmatch(writer)
        )
        if not ok:
            raise FormatError("ref object has a malformed digest or version")
        return cls(digest, RefVersion(time_ms, counter, writer))


def newest(values: Iterable[RefValue | None]) -> RefValue | None:
    """The value that wins: the highest :meth:`RefValue.order` (``None`` when there is none)."""
    best: RefValue | None = None
    for value in values:
        if value is not None and value.newer_than(best):
            best = value
    return best
