"""Reading what the user pushes (client side).

SOURCE may be:

* a ``.safetensors`` file → one file, kind ``safetensors``;
* a directory (a Hugging Face model folder, single-file or sharded with
  ``model.safetensors.index.json``) → every regular file under it, with
  ``*.safetensors`` parsed and encoded and everything else (configs,
  tokenizers, READMEs) stored as plain files; ``.git`` and ``.cache`` are
  skipped; pickle weights (``*.bin``/``*.pt``/``*.pth``) are skipped when
  safetensors weights are present (they hold the same tensors);
* a PyTorch ``.bin``/``.pt``/``.pth`` state dict, or a directory holding
  only such weights → each is loaded with ``torch.load(weights_only=True)``
  (never plain pickle) and converted to safetensors *on the client*, so the
  server never parses pickle. ``pytorch_model*.bin`` become
  ``model*.safetensors`` and ``pytorch_model.bin.index.json`` becomes
  ``model.safetensors.index.json`` (Hugging Face's own naming), which is
  what a pull writes back.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from mzstore.codecs.policy import LOSSY_DTYPES, MIN_LOSSY_NUMEL, Policy
from mzstore.errors import FormatError, InvalidArgument, NotFound, requires
from mzstore.format.manifest import path_selected
from mzstore.format.safetensors import Header, parse_header, read_header_len

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SKIP_DIRS = {".git", ".cache", "__pycache__"}


@dataclass
class SourceFile:
    """One file to upload: its path in the model, kind, size and how to open it."""

    path: str
    kind: str
    size: int
    opener: Callable[[], BinaryIO]
    disk_path: Path | None = None  # where it is read from, when it is a file on disk


@dataclass
class Source:
    kind: str
    files: list[SourceFile]
    skipped: list[str] = field(default_factory=list)

    @property
    def bytes_raw(self) -> int:
        return sum(f.size for f in self.files)


def _disk_file(root: Path, path: Path) -> SourceFile:
    rel = path.relative_to(root).as_posix()
    kind = "safetensors" if path.suffix == ".safetensors" else "file"
    return SourceFile(rel, kind, path.stat().st_size, lambda p=path: open(p, "rb"), path)  # type: ignore[misc]


def _memory_file(rel: str, kind: str, data: bytes) -> SourceFile:
    return SourceFile(rel, kind, len(data), lambda: io.BytesIO(data))


def torch_to_safetensors(path: Path) -> bytes:
    """Load a PyTorch state dict safely and serialize it as safetensors.

    Raises:
        FormatError: if the file is not a state dict of tensors.
    """
    torch = requires("torch", "torch", f"pushing {path.name} (a PyTorch checkpoint)")
    from safetensors.torch import save

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FormatError(f"{path.name}: not a loadable PyTorch state dict ({first[:200]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise FormatError(f"{path.name}: expected a dict of name → tensor")
    # safetensors refuses shared storage (tied weights); store each tensor on its own.
    seen: set[int] = set()
    tensors = {}
    for name, t in obj.items():
        key = t.untyped_storage().data_ptr() if t.numel() else -1
        t = t.detach()
        if key in seen or not t.is_contiguous():
            t = t.clone().contiguous()
        seen.add(key)
        tensors[name] = t
    return save(tensors)


def _converted_name(rel: str) -> str:
    parent, _, name = rel.rpartition("/")
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("pytorch_model"):
        stem = "model" + stem[len("pytorch_model") :]
    new = stem + ".safetensors"
    return f"{parent}/{new}" if parent else new


def open_source(path: str | os.PathLike[str], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Source:
    """Describe what pushing ``path`` uploads.

    Args:
        include, exclude: globs over the paths inside a model directory (see
            :func:`~mzstore.format.manifest.path_selected`); only selected files are pushed.

    Raises:
        NotFound: if ``path`` does not exist.
        InvalidArgument: if it is not a supported source, or the patterns leave no file.
    """
    p = Path(path)
    if not p.exists():
        raise NotFound(f"source {p} does not exist")
    if p.is_file():
        if p.suffix == ".safetensors":
            return Source("safetensors", [_disk_file(p.parent, p)])
        if p.suffix in PICKLE_SUFFIXES:
            return Source("torch", [_memory_file(_converted_name(p.name), "safetensors", torch_to_safetensors(p))])
        raise InvalidArgument(f"{p.name}: push a .safetensors file, a .bin/.pt state dict or a model directory")
    if not p.is_dir():
        raise InvalidArgument(f"{p} is neither a file nor a directory")
    files: list[Path] = []
    for dirpath, dirs, names in os.walk(p, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        files.extend(Path(dirpath) / n for n in sorted(names))
    files = [f for f in files if f.is_file()]
    if not files:
        raise InvalidArgument(f"{p} holds no files")
    if include or exclude:
        files = [f for f in files if path_selected(f.relative_to(p).as_posix(), include, exclude)]
        if not files:
            raise InvalidArgument(f"{p}: no file matches --include/--exclude")
    has_safetensors = any(f.suffix == ".safetensors" for f in files)
    out: list[SourceFile] = []
    skipped: list[str] = []
    kind = "hf-dir"
    for f in files:
        rel = f.relative_to(p).as_posix()
        if f.suffix in PICKLE_SUFFIXES:
            if has_safetensors:
                skipped.append(rel)
                continue
            kind = "torch"
            out.append(_memory_file(_converted_name(rel), "safetensors", torch_to_safetensors(f)))
        elif f.name == "pytorch_model.bin.index.json" and not has_safetensors:
            index = json.loads(f.read_text())
            index["weight_map"] = {k: _converted_name(v) for k, v in index.get("weight_map", {}).items()}
            new = rel.replace("pytorch_model.bin.index.json", "model.safetensors.index.json")
            out.append(_memory_file(new, "file", json.dumps(index, indent=2).encode()))
        else:
            out.append(_disk_file(p, f))
    paths = [f.path for f in out]
    if len(set(paths)) != len(paths):
        raise InvalidArgument(f"{p}: converting pickle weights would overwrite an existing file")
    return Source(kind, out, skipped)


def safetensors_files(source: Source) -> Iterator[tuple[SourceFile, BinaryIO, Header]]:
    """Each safetensors file of ``source``, open, with its parsed header (the file closes when the next one
    is asked for).

    Raises:
        FormatError: if a header is malformed (the server would refuse it too).
    """
    for f in source.files:
        if f.kind != "safetensors":
            continue
        with f.opener() as fh:
            n = read_header_len(fh.read(8), f.size)
            yield f, fh, parse_header(fh.read(n), f.size)


def source_tensors(source: Source) -> list[tuple[str, str, str, tuple[int, ...]]]:
    """``(file, tensor, dtype, shape)`` of every tensor, read from the safetensors headers.

    Raises:
        FormatError: if a header is malformed (the server would refuse it too).
    """
    return [
        (f.path, t.name, t.dtype.name, t.shape) for f, _, header in safetensors_files(source) for t in header.tensors
    ]


#: How many file names :func:`check_has_weights` lists before summarizing.
SHOWN_FILES = 5


def check_has_weights(source: Source, where: str = "the source") -> None:
    """Refuse a source with no weights (a config-only folder, ONNX or GGUF files), before any upload.

    Raises:
        InvalidArgument: listing what was found.
    """
    if any(f.kind == "safetensors" for f in source.files):
        return
    names = [f.path for f in source.files]
    shown = ", ".join(names[:SHOWN_FILES]) + (
        f" and {len(names) - SHOWN_FILES} more" if len(names) > SHOWN_FILES else ""
    )
    raise InvalidArgument(
        f"no weights in {where} (found {shown}): mzstore stores .safetensors and .bin/.pt weights; "
        "to store these files anyway, pass --allow-no-weights (allow_no_weights=True)"
    )


def check_policy_applies(source: Source, policy: Policy) -> None:
    """Refuse a lossy policy that would change nothing, before any upload.

    Raises:
        InvalidArgument: naming the dtypes found when no tensor can take the policy.
    """
    if not policy.lossy:
        return
    tensors = source_tensors(source)
    if any(policy.mode_for(name, dtype, shape) != "lossless" for _, name, dtype, shape in tensors):
        return
    dtypes = sorted({dtype for _, _, dtype, _ in tensors}) or ["no tensors"]
    raise InvalidArgument(
        f"policy {policy.text} applies to {', '.join(LOSSY_DTYPES)} matrices of at least {MIN_LOSSY_NUMEL} "
        f"elements that are not norms, biases or --keep matches; this source has none "
        f"(dtypes: {', '.join(dtypes)})"
    )
