"""Regenerate the Python gRPC stubs from ``protos/`` (or check they are current).

Usage::

    python scripts/gen_protos.py           # rewrite mzstore/v1/*_pb2*.py(i)
    python scripts/gen_protos.py --check   # exit 1 if the committed stubs are stale

The proto package ``mzstore.v1`` maps onto the Python package ``mzstore.v1``,
so the generated ``import`` lines work without any path rewriting. The output
depends on the grpcio-tools version, which is pinned in ``pyproject.toml``.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT_PACKAGE = Path("mzstore") / "v1"


def generate(out_root: Path) -> list[Path]:
    """Run protoc over every .proto file, writing under ``out_root``.

    Returns:
        The generated files, relative to ``out_root``.
    """
    from grpc_tools import protoc  # dev dependency, imported only here

    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_root) for p in (out_root / OUT_PACKAGE).glob("*_pb2*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        committed = sorted(p.relative_to(ROOT) for p in (ROOT / OUT_PACKAGE).glob("*_pb2*"))
        stale = [
            str(f) for f in files if not (ROOT / f).exists() or not filecmp.cmp(Path(tmp) / f, ROOT / f, shallow=False)
        ]
        extra = [str(f) for f in committed if f not in files]
        if args.check:
            if stale or extra:
                print("stale generated stubs: " + ", ".join(stale + extra), file=sys.stderr)
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print("generated stubs are current")
            return 0
        for f in extra:
            (ROOT / f).unlink()
        for f in files:
            shutil.copyfile(Path(tmp) / f, ROOT / f)
        print("wrote " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
