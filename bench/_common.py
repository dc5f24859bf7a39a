"""Helpers shared by the benchmark scripts (plain-text tables, logging, hashing)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

MIB = 1024 * 1024


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(8 * MIB):
            h.update(block)
    return h.hexdigest()


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def table(title: str, headers: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([title, line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)
