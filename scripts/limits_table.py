"""Write the table of every limit in ``mzstore/limits.py`` into ``docs/architecture.md``.

The table sits between ``<!-- limits:begin -->`` and ``<!-- limits:end -->``;
each row is a constant, its value and the ``#:`` comment above it. With
``--check`` nothing is written: the exit code is 1 when the document is
stale (``make lint`` runs that).
"""

from __future__ import annotations

import argparse
import ast
import operator
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "mzstore" / "limits.py"
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- limits:begin -->", "<!-- limits:end -->"


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Pow: operator.pow}


def _value(node: ast.expr, known: dict[str, int]) -> int:
    """Evaluate a constant expression of the limits module (numbers, names defined above, + - * / **)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return known[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_value(node.left, known), _value(node.right, known))
    raise ValueError(f"not a constant: {ast.dump(node)}")


def _human(n: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n:_}".replace("_", " ")


def table() -> str:
    """The markdown table of ``mzstore/limits.py``."""
    text = SOURCE.read_text()
    lines = text.splitlines()
    known: dict[str, int] = {}
    rows = ["| constant | value | what it bounds |", "| --- | --- | --- |"]
    for node in ast.parse(text).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        known[name] = value = _value(node.value, known)
        doc = []
        i = node.lineno - 2
        while i >= 0 and lines[i].startswith("#:"):
            doc.insert(0, lines[i][2:].strip())
            i -= 1
        shown = "2⁶³−1" if value == 2**63 - 1 else _human(value)
        text_doc = " ".join(doc).replace("``", "`")
        rows.append(f"| `{name}` | {shown} | {text_doc} |")
    return "\n".join(rows) + "\n"


def render(doc: str) -> str:
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    return doc[:start] + "\n\n" + table() + "\n" + doc[end:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if docs/architecture.md is stale")
    args = parser.parse_args()
    doc = DOC.read_text()
    new = render(doc)
    if args.check:
        if new != doc:
            print(
                "docs/architecture.md: the limits table is stale; run python scripts/limits_table.py", file=sys.stderr
            )
            return 1
        return 0
    DOC.write_text(new)
    print(f"wrote the limits table into {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
