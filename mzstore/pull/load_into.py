"""The model side of ``load_into``: match a checkpoint to a model, then put the loaded tensors in.

:func:`plan_load` checks names, tied weights, strictness and shapes and
places every tensor on a device (:mod:`mzstore.pull.device_map`) before
anything is fetched; the pull then runs into a
:class:`~mzstore.pull.device.DeviceMapSink`, and :func:`apply_loaded` puts
the tensors in with ``model.load_state_dict(..., assign=True)``, which also
materializes a model built on the ``meta`` device. Tensors the model already
holds in the right form are filled in place (:func:`in_place_targets`); the
sink hands back the model's own tensors for those, so ``assign`` keeps them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mzstore.errors import InvalidArgument
from mzstore.format.manifest import Manifest, TensorEntry
from mzstore.pull.device_map import BALANCED, NameMapping, device_totals, few_names, name_mapping, plan_devices
from mzstore.pull.sinks import select_tensors, torch_dtype, torch_module


@dataclass
class LoadPlan:
    """What ``load_into`` will fetch and where it goes; made before any byte is fetched.

    Attributes:
        placement: checkpoint name → device label, for every tensor to fetch.
        model_name: checkpoint name → the model's name for it.
        missing: model state-dict keys the checkpoint does not provide.
        unexpected: checkpoint names the model has no place for (not fetched).
        tied: model name → the name it shares its tensor with, for tied names
            that are not fetched themselves.
        names: the name mapping used (see :func:`~mzstore.pull.device_map.name_mapping`).
        sizes: checkpoint name → bytes.
        into: checkpoint name → the model's own tensor, for the tensors loaded in place
            (see :func:`in_place_targets`).
    """

    placement: dict[str, str]
    model_name: dict[str, str]
    missing: list[str]
    unexpected: list[str]
    tied: dict[str, str]
    names: NameMapping
    sizes: dict[str, int]
    state_keys: set[str] = field(default_factory=set)
    into: dict[str, Any] = field(default_factory=dict)


def _model_slots(model: Any) -> dict[str, Any]:
    """Every parameter and buffer of ``model`` by every name it has, in model order (tied ones repeat)."""
    out: dict[str, Any] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        pre = f"{mod_name}." if mod_name else ""
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                out.setdefault(pre + attr, t)
    return out


def _owner(model: Any, name: str) -> tuple[Any, str]:
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _set_slot(model: Any, name: str, value: Any) -> None:
    module, attr = _owner(model, name)
    if attr in module._parameters:
        module._parameters[attr] = value
    else:
        module._buffers[attr] = value


def _get_slot(model: Any, name: str) -> Any:
    module, attr = _owner(model, name)
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]


def default_devices() -> list[str]:
    """The devices ``"balanced"`` spreads over when none are named: every visible GPU, else the CPU."""
    torch = torch_module("load_into")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def plan_load(
    model: Any,
    manifest: Manifest,
    *,
    device_map: Any = None,
    devices: Sequence[Any] | None = None,
    strict: bool = True,
    prefix: str | None = None,
    files: list[str] | None = None,
    in_place: bool = True,
) -> LoadPlan:
    """Match the checkpoint to ``model`` and place every tensor (see :meth:`Client.load_into`).

    Raises:
        InvalidArgument: with ``strict``, model keys the checkpoint lacks or checkpoint
            tensors the model has no place for; in any mode, shape mismatches and
            device-map errors. Nothing has been fetched yet.
    """
    entries = select_tensors(manifest, files)
    by_name = {t.name: t for t in entries}
    slots = _model_slots(model)
    state_order = list(model.state_dict(keep_vars=True))
    state_keys = set(state_order)
    names = name_mapping([t.name for t in entries], slots, prefix)

    heads: dict[int, str] = {}  # id(tensor) → its first name in model order
    group_of: dict[str, str] = {}
    for name, t in slots.items():
        group_of[name] = heads.setdefault(id(t), name)
    unexpected: list[str] = []
    provided: dict[str, str] = {}  # model name → checkpoint name
    for t in entries:
        m = names(t.name)
        if m is None or (m not in slots and m not in state_keys):
            unexpected.append(t.name)
        else:
            provided[m] = t.name
    order = [*slots, *(k for k in state_order if k not in slots)]  # a module may save extra keys
    source: dict[str, str] = {}  # group head → the model name it is loaded through
    for name in order:
        if name in provided:
            source.setdefault(group_of.get(name, name), name)
    tied = {n: source[g] for n, g in group_of.items() if g in source and source[g] != n}
    missing = [k for k in state_order if group_of.get(k, k) not in source]
    mismatched = []
    for m in source.values():
        if m not in slots:
            continue
        want, have = tuple(slots[m].shape), tuple(by_name[provided[m]].shape)
        if want != have:
            mismatched.append(f"{m} (model {list(want)}, checkpoint {list(have)})")
    if mismatched:
        raise InvalidArgument(f"shapes differ for {len(mismatched)} tensor(s): {few_names(mismatched, 3)}")
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {few_names(missing)}")
        if unexpected:
            parts.append(f"not in the model: {few_names(unexpected)}")
        raise InvalidArgument(
            f"checkpoint does not match the model ({names.describe()}): {'; '.join(parts)};"
            " pass prefix=... to rename, or strict=False to load what matches"
        )
    loaded = set(source.values())
    order = [m for m in order if m in loaded]
    sizes = {provided[m]: by_name[provided[m]].data_offsets[1] - by_name[provided[m]].data_offsets[0] for m in order}
    if device_map is None:  # where each tensor is now; the CPU for the meta device
        device_map = {"": "cpu"} | {m: "cpu" if slots[m].is_meta else str(slots[m].device) for m in order if m in slots}
    elif isinstance(device_map, str) and device_map == BALANCED and devices is None:
        devices = default_devices()
    by_model = plan_devices([(m, sizes[provided[m]]) for m in order], device_map, devices)
    placement = {provided[m]: label for m, label in by_model.items()}
    return LoadPlan(
        placement=placement,
        model_name={provided[m]: m for m in order},
        missing=missing,
        unexpected=unexpected,
        tied=tied,
        names=names,
        sizes=sizes,
        state_keys=state_keys,
        into=in_place_targets(slots, [(m, by_name[provided[m]], label) for m, label in by_model.items()])
        if in_place
        else {},
    )


def _same_device(tensor: Any, label: str) -> bool:
    """Whether ``tensor`` lives on the device ``label`` names (``cpu:N`` labels are the CPU)."""
    import torch

    try:
        want = torch.device(label)
    except RuntimeError:
        return False  # refused with a clear error when the sink is built
    have = tensor.device
    if want.type != have.type:
        return False
    if want.type == "cuda":
        index = want.index if want.index is not None else torch.cuda.current_device()
        return bool(have.index == index)
    return want.type == "cpu"


def in_place_targets(slots: Mapping[str, Any], loads: Sequence[tuple[str, TensorEntry, str]]) -> dict[str, Any]:
    """The model tensors a load can fill where they are: ``{checkpoint name: model tensor}``.

    Why: putting a freshly pulled tensor in (``assign``) holds the model twice in
    memory at the peak, and fresh memory is not free (on the 2-core test VM, first
    touching 1 GiB costs about 0.5 CPU-s). A model tensor that is already
    materialized on its mapped device, with the checkpoint's dtype and shape, in
    one contiguous block that no other loaded tensor overlaps, has its chunks
    decoded straight into its memory; the module keeps the same ``Parameter``
    objects (an optimizer made before the load still holds them). Every other
    tensor (on ``meta``, another dtype or device, a strided view, a tensor
    subclass) is pulled into new memory and assigned, as before.

    Args:
        slots: the model's tensors by model name.
        loads: ``(model name, checkpoint entry, device label)`` of every tensor to load.
    """
    import torch

    out: dict[str, Any] = {}
    spans: list[tuple[int, int, str]] = []
    for m, entry, label in loads:
        t = slots.get(m)
        if t is None or type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_meta or not t.is_contiguous():
            continue
        if not _same_device(t, label) or t.dtype != torch_dtype(entry.dtype) or tuple(t.shape) != tuple(entry.shape):
            continue
        nbytes = t.numel() * t.element_size()
        if nbytes != entry.data_offsets[1] - entry.data_offsets[0]:
            continue
        out[entry.name] = t
        if nbytes:
            spans.append((t.data_ptr(), t.data_ptr() + nbytes, entry.name))
    spans.sort()
    reach, last = 0, ""
    for start, end, name in spans:  # two loaded tensors that share bytes: neither is written in place
        if start < reach:
            out.pop(name, None)
            out.pop(last, None)
        if end > reach:
            reach, last = end, name
    return out


def apply_loaded(model: Any, plan: LoadPlan, tensors: Mapping[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """Put the fetched ``{checkpoint name: tensor}`` into ``model``; return the load report.

    State-dict keys go through ``model.load_state_dict(..., assign=True)`` (module
    hooks run; parameters keep ``requires_grad``; tensors keep the checkpoint's
    dtype and their mapped device). Non-persistent buffers the checkpoint holds
    (e.g. an old ``position_ids``) are set directly. Tied names then point at the
    one tensor again: ``assign`` would otherwise leave each name its own parameter.
    """
    state: dict[str, Any] = {}
    direct: dict[str, Any] = {}
    for ckpt, tensor in tensors.items():
        m = plan.model_name[ckpt]
        (state if m in plan.state_keys else direct)[m] = tensor
    by_model = {**state, **direct}
    for alias, src in plan.tied.items():
        if alias in plan.state_keys:
            state[alias] = by_model[src]
    model.load_state_dict(state, strict=strict, assign=True)
    for name, tensor in direct.items():
        _set_slot(model, name, tensor)
    for alias, src in plan.tied.items():
        _set_slot(model, alias, _get_slot(model, src))
    meta = [name for name, t in _model_slots(model).items() if t.is_meta]
    placed = {plan.model_name[c]: label for c, label in plan.placement.items()}
    return {
        "devices": device_totals(placed, {plan.model_name[c]: s for c, s in plan.sizes.items()}),
        "missing": plan.missing,
        "unexpected": plan.unexpected,
        "tied": plan.tied,
        "names": plan.names.describe(),
        "meta": meta,
        "in_place": [plan.model_name[c] for c in plan.into],
    }
