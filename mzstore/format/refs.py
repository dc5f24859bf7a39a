"""Model references: ``name[:tag][@sha256:<hex>]`` (Docker grammar).

Pure parsing and validation; runs before any storage path is built.

* name: one or more ``/``-separated components, each starting and ending
  with a letter or digit and containing only letters, digits, ``.``, ``_``
  and ``-``; no component is ``.`` or ``..``. Mixed case is accepted (as on
  Hugging Face Hub); at most 255 characters in all.
* tag: ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``, default ``latest``.
* digest: ``sha256:`` + 64 lowercase hex digits; when present it wins over
  the tag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mzstore.errors import InvalidName
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
