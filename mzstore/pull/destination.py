"""Where ``mzstore pull -o DIR`` may write, and what it leaves behind.

The CLI's pull writes the model's files under their names in ``DIR`` and
records what it wrote in ``DIR/.mzstore/pull.json`` (model name, ref,
digest, files), as ``hf download --local-dir`` keeps ``.cache/huggingface/``.
That record decides the next pull into the same folder:

* an empty or new folder, or one holding an earlier pull of the **same
  model name**: the pull goes ahead and updates it in place; files of the
  earlier pull that the new version does not have (a shard of a differently
  sharded version) are removed, since that pull wrote them;
* a non-empty folder holding anything else (the user's files, another
  model): refused before any byte moves, unless ``--force``. With
  ``--force`` exactly the model's files are replaced; weight files that do
  not belong to the model (an old ``pytorch_model.bin`` beside the new
  ``model.safetensors``, stale shards of another model) are listed, and
  removed with ``--clean``, so transformers and vLLM never load a mix.

Hidden entries (a name starting with ``.``) do not make a folder foreign.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mzstore.durable import write_json
from mzstore.errors import InvalidArgument

#: The record of the last pull into a folder, relative to it.
RECORD = Path(".mzstore") / "pull.json"
#: Files a model loader would pick up as weights (or their index).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5", ".msgpack")
#: How many names a message lists before summarizing.
SHOWN = 5


def _names(paths: list[str]) -> str:
    shown = ", ".join(paths[:SHOWN])
    return shown + (f" and {len(paths) - SHOWN} more" if len(paths) > SHOWN else "")


def is_weight_file(rel: str) -> bool:
    """Whether a loader could take ``rel`` for weights: a weights file or a weight index."""
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith((".safetensors.index.json", ".bin.index.json"))


def _files(out: Path) -> list[str]:
    """Every file under ``out`` (relative, '/'-separated), hidden entries left out."""
    found = []
    for dirpath, dirs, names in os.walk(out):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith("."):
                found.append((Path(dirpath) / name).relative_to(out).as_posix())
    return found


def read_record(out: Path) -> dict[str, Any] | None:
    """The record of the last pull into ``out``, or ``None`` (none, or unreadable)."""
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("files"), list) else None


@dataclass
class Destination:
    """What is in ``out`` before a pull of ``name``.

    Attributes:
        previous: files an earlier pull of the same name wrote (and its record says so).
        foreign: files no earlier pull of this name wrote (the user's, another model's).
    """

    out: Path
    name: str
    previous: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)


def check_destination(out: str | os.PathLike[str], name: str, *, force: bool = False) -> Destination:
    """Look at ``out`` before pulling ``name`` into it; refuse a foreign non-empty folder unless ``force``.

    Raises:
        InvalidArgument: ``out`` is a file, or a non-empty folder with files that are not an earlier
            pull of ``name`` (and not ``force``). Nothing has been fetched.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InvalidArgument(f"{path} exists and is not a directory")
    dest = Destination(path, name)
    if not path.exists():
        return dest
    record = read_record(path)
    ours = {str(f) for f in record["files"]} if record is not None and record.get("name") == name else set()
    for rel in _files(path):
        (dest.previous if rel in ours else dest.foreign).append(rel)
    if dest.foreign and not force:
        other = f" (it holds a pull of {record['name']})" if record is not None and record.get("name") else ""
        raise InvalidArgument(
            f"{path} is not empty{other}: found {_names(dest.foreign)}; pull into an empty or new folder, "
            "or pass --force to replace the model's files there (--clean also removes weight files that are not its)"
        )
    return dest


@dataclass
class Leftovers:
    """What a pull into an existing folder did with the files already there."""

    removed: list[str] = field(default_factory=list)  # files of the earlier pull the new version lacks
    stale: list[str] = field(default_factory=list)  # weight files not of this model, left (no --clean)
    cleaned: list[str] = field(default_factory=list)  # weight files not of this model, removed (--clean)


def settle(dest: Destination, written: list[str], *, clean: bool = False) -> Leftovers:
    """After a pull wrote ``written`` (relative paths): drop what the earlier pull left, deal with stale weights."""
    now = set(written)
    result = Leftovers()
    for rel in dest.previous:
        if rel not in now:
            (dest.out / rel).unlink(missing_ok=True)
            result.removed.append(rel)
    for rel in dest.foreign:
        if rel in now or not is_weight_file(rel):
            continue
        if clean:
            (dest.out / rel).unlink(missing_ok=True)
            result.cleaned.append(rel)
        else:
            result.stale.append(rel)
    return result


def write_record(out: Path, name: str, ref: str, digest: str, files: list[str], durable: bool = True) -> None:
    """Record a finished pull into ``out`` (``.mzstore/pull.json``)."""
    record = {"name": name, "ref": ref, "digest": digest, "files": sorted(files)}
    write_json(out / RECORD, record, indent=2, durable=durable)
