"""Device maps (pure planning): which device each tensor of a model goes to.

How it works: :func:`plan_devices` takes the tensors to load — names in the
*model's* order with their byte sizes — and a ``device_map``, and returns
``{name: device label}``. Nothing here touches torch; labels are plain
strings (``"cpu"``, ``"cuda:1"``) that the adapter
(:mod:`mzstore.pull.device`) turns into devices, so the rules are table-tested
over any labels.

The forms of ``device_map``:

* ``None`` or one device (``"cpu"``, ``"cuda:1"``, ``1``, a ``torch.device``):
  everything there.
* ``{prefix: device}``, module-name prefixes as in accelerate / Hugging Face
  ``device_map``. A key matches a tensor when it *is* the name or a prefix
  ending at a dot: ``"encoder.layer.1"`` matches
  ``"encoder.layer.1.attention.self.query.weight"`` but not
  ``"encoder.layer.10.…"``. The longest matching key wins; ``""`` matches
  every tensor (accelerate's whole-model key), so it is the fallback. A
  trailing dot in a key is ignored. Every tensor must be matched.
* ``"balanced"`` over ``devices``: the tensors are cut into *blocks* that
  stay on one device (a layer of a list of layers, or a module outside such
  lists; see :func:`blocks_of`), and runs of consecutive blocks, in model
  order, go to the devices in the order given, with byte totals as even as
  the blocks allow (:func:`balanced_split`). Sizes are the tensors' decoded
  bytes; free memory on each device is not consulted. As with accelerate,
  a model spread over devices needs its activations moved between them
  (accelerate's ``dispatch_model`` hooks, or the model's own code).

Device values: a string, an ``int`` ``n`` (``"cuda:n"``, as in accelerate), or
anything whose ``str`` names a device (``torch.device``). ``"disk"`` and
``"meta"`` are refused: a load puts real tensors in memory.

Names: :func:`name_mapping` matches checkpoint tensor names to the model's
own names (exactly, or with one prefix added or removed, e.g. a
sentence-transformers model holds the checkpoint's ``encoder.…`` as
``0.model.encoder.…``, a checkpoint of ``BertForMaskedLM`` has ``bert.…``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mzstore.errors import InvalidArgument

#: The ``device_map`` string that spreads blocks over ``devices``.
BALANCED = "balanced"
_REFUSED = {"disk", "meta"}


def device_label(device: Any) -> str:
    """The label of one device value: ``1`` → ``"cuda:1"``, ``torch.device("cpu")`` → ``"cpu"``.

    Raises:
        InvalidArgument: a negative index, an empty name, ``"disk"`` or ``"meta"``.
    """
    if isinstance(device, bool):
        raise InvalidArgument(f"{device!r} is not a device")
    if isinstance(device, int):
        if device < 0:
            raise InvalidArgument(f"device index {device} is negative")
        return f"cuda:{device}"
    label = str(device).strip()
    if not label:
        raise InvalidArgument("empty device name in device_map")
    if label.split(":")[0] in _REFUSED:
        raise InvalidArgument(f"device {label!r} is not supported: load_into places tensors in memory")
    return label


def few_names(names: Iterable[str], n: int = 5) -> str:
    items = list(names)
    shown = ", ".join(items[:n])
    return shown + (f" … ({len(items)} in all)" if len(items) > n else "")


def match_prefix(name: str, keys: Collection[str]) -> str | None:
    """The longest key of ``keys`` that is ``name`` or a dotted prefix of it (``""`` matches all)."""
    if name in keys:
        return name
    pos = len(name)
    while pos > 0:
        pos = name.rfind(".", 0, pos)
        if pos < 0:
            break
        if name[:pos] in keys:
            return name[:pos]
    return "" if "" in keys else None


def _layer_lists(names: Sequence[str]) -> set[tuple[str, ...]]:
    """Module paths holding two or more numbered children: lists of layers (``encoder.layer``)."""
    children: dict[tuple[str, ...], set[str]] = {}
    for name in names:
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part.isdigit():
                children.setdefault(tuple(parts[:i]), set()).add(part)
    return {parent for parent, kids in children.items() if len(kids) > 1}


def _common(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def blocks_of(names: Sequence[str]) -> list[str]:
    """The block of each name: what ``"balanced"`` never splits across devices.

    * Inside a list of layers (a module path with several numbered children),
      the block is the layer: ``encoder.layer.3``, ``model.layers.12`` (experts
      stay with their layer; a lone ``0.``, a sentence-transformers module
      index, is not a list).
    * Elsewhere it is the module one level below where the name leaves the
      path to the layer lists: ``embeddings``, ``0.model.embeddings``,
      ``model.norm``, ``lm_head``; so a module such as BERT's embeddings, whose
      forward adds its tables together, stays on one device.
    * With no list of layers, the same rule against the path all names share.
    """
    lists = _layer_lists(names)
    split = [n.split(".") for n in names]
    if lists:
        paths: list[Sequence[str]] = list(lists)
    else:
        trunk = split[0][:-1] if split else []
        for parts in split:
            trunk = trunk[: _common(trunk, parts[:-1])]
        paths = [trunk]
    out = []
    for parts in split:
        block = None
        for i, part in enumerate(parts[:-1]):
            if part.isdigit() and tuple(parts[:i]) in lists:
                block = ".".join(parts[: i + 1])
                break
        if block is None:
            depth = max(_common(parts[:-1], path) for path in paths)
            block = ".".join(parts[: min(depth + 1, len(parts) - 1)])
        out.append(block)
    return out


def balanced_split(sizes: Sequence[int], bins: int) -> list[int]:
    """Cut ``sizes`` into ``bins`` consecutive runs (some may be empty); return each run's start.

    The cut minimizes the sum of the squared run totals, which for a fixed
    total is the most even split (dynamic programming over cut points,
    O(bins · n²) done as numpy rows; n is a number of blocks, not tensors).
    """
    if bins < 1:
        raise InvalidArgument("balanced device_map needs at least one device")
    n = len(sizes)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(sizes, dtype=np.float64))])
    # cost[i]: best cost of the first i blocks over the runs so far; cut[j][i]: where run j starts.
    cost = prefix**2
    cuts = []
    for _ in range(1, bins):
        new = np.empty(n + 1)
        arg = np.empty(n + 1, dtype=np.int64)
        for i in range(n + 1):
            cand = cost[: i + 1] + (prefix[i] - prefix[: i + 1]) ** 2
            arg[i] = i - int(np.argmin(cand[::-1]))  # ties: the later cut, so earlier devices fill first
            new[i] = cand[arg[i]]
        cuts.append(arg)
        cost = new
    starts = [n]
    for arg in reversed(cuts):
        starts.append(int(arg[starts[-1]]))
    starts.append(0)
    return list(reversed(starts))[:bins]


def plan_devices(
    tensors: Mapping[str, int] | Iterable[tuple[str, int]],
    device_map: Any = None,
    devices: Sequence[Any] | None = None,
) -> dict[str, str]:
    """Choose a device label for every tensor.

    Args:
        tensors: ``{name: bytes}`` or ``(name, bytes)`` pairs, in the model's order
            (that order is what ``"balanced"`` keeps contiguous).
        device_map: ``None``, one device, ``{prefix: device}`` or ``"balanced"`` (module docstring).
        devices: the devices ``"balanced"`` spreads over, in order; labels must be distinct.

    Returns:
        ``{name: label}`` for every tensor, in the order given.

    Raises:
        InvalidArgument: a tensor that no key matches, an unknown ``device_map``
            string form, ``"balanced"`` without devices or with repeated ones.
    """
    items = list(tensors.items()) if isinstance(tensors, Mapping) else list(tensors)
    names = [n for n, _ in items]
    if device_map is None:
        return dict.fromkeys(names, "cpu")
    if isinstance(device_map, Mapping):
        table = {str(k).rstrip("."): device_label(v) for k, v in device_map.items()}
        out: dict[str, str] = {}
        unmatched = []
        for name in names:
            key = match_prefix(name, table)
            if key is None:
                unmatched.append(name)
            else:
                out[name] = table[key]
        if unmatched:
            raise InvalidArgument(
                f"device_map matches no key for {len(unmatched)} tensor(s): {few_names(unmatched)};"
                ' add their module prefixes, or "" for everything else'
            )
        return out
    if isinstance(device_map, str) and device_map == BALANCED:
        labels = [device_label(d) for d in devices or ()]
        if not labels:
            raise InvalidArgument('device_map="balanced" needs devices=[...]')
        if len(set(labels)) != len(labels):
            raise InvalidArgument(f"balanced devices repeat: {labels}")
        blocks: list[str] = []
        block_bytes: dict[str, int] = {}
        name_block = dict(zip(names, blocks_of(names), strict=True))
        for name, size in items:
            b = name_block[name]
            if b not in block_bytes:
                blocks.append(b)
                block_bytes[b] = 0
            block_bytes[b] += size
        starts = [*balanced_split([block_bytes[b] for b in blocks], len(labels)), len(blocks)]
        block_device = {b: label for d, label in enumerate(labels) for b in blocks[starts[d] : starts[d + 1]]}
        return {name: block_device[name_block[name]] for name in names}
    if isinstance(device_map, str) and device_map in ("auto", "sequential", "balanced_low_0"):
        raise InvalidArgument(f'device_map="{device_map}" is not supported; use "balanced" with devices=[...]')
    label = device_label(device_map)
    return dict.fromkeys(names, label)


def device_totals(placement: Mapping[str, str], sizes: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """``{label: {"tensors": n, "bytes": b}}`` of a placement, devices in first-use order."""
    out: dict[str, dict[str, int]] = {}
    for name, label in placement.items():
        entry = out.setdefault(label, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += sizes[name]
    return out


@dataclass(frozen=True)
class NameMapping:
    """Checkpoint name → model name: drop ``strip`` from the front, then add ``add``."""

    strip: str = ""
    add: str = ""

    def __call__(self, name: str) -> str | None:
        if not name.startswith(self.strip):
            return None
        return self.add + name[len(self.strip) :]

    def describe(self) -> str:
        if not self.strip and not self.add:
            return "names as stored"
        return " and ".join(
            part
            for part in (f"without {self.strip!r}" if self.strip else "", f"with {self.add!r}" if self.add else "")
            if part
        )


def name_mapping(checkpoint: Sequence[str], model: Collection[str], prefix: str | None = None) -> NameMapping:
    """How checkpoint names become model names.

    Args:
        checkpoint: the checkpoint's tensor names.
        model: every name the model can take (state-dict keys and buffers).
        prefix: added to every checkpoint name; ``None`` picks, among the names
            as they are and one dotted prefix added to or removed from all of
            them, the mapping that hits the most model names (ties: as they are).
    """
    if prefix is not None:
        return NameMapping(add=prefix)
    model_set = set(model)
    adds: set[str] = set()
    strips: set[str] = set()
    by_suffix: dict[str, set[str]] = {}
    for key in model_set:
        pos = key.find(".")
        while pos >= 0:
            by_suffix.setdefault(key[pos + 1 :], set()).add(key[: pos + 1])
            pos = key.find(".", pos + 1)
    for name in checkpoint:
        adds |= by_suffix.get(name, set())
        pos = name.find(".")
        while pos >= 0:
            if name[pos + 1 :] in model_set:
                strips.add(name[: pos + 1])
            pos = name.find(".", pos + 1)
    candidates = [NameMapping()]
    candidates += [NameMapping(add=a) for a in sorted(adds)]
    candidates += [NameMapping(strip=s) for s in sorted(strips)]

    def hits(m: NameMapping) -> int:
        return sum(1 for n in checkpoint if m(n) in model_set)

    return max(candidates, key=hits)  # max keeps the first of equals: exact names first
