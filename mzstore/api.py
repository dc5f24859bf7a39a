"""Module-level shortcuts: ``mzstore.pull``, ``mzstore.push``, ``mzstore.load_state_dict``, ``mzstore.load_into``.

Each opens a :class:`~mzstore.client.Client` for one call and forwards every
option of the ``Client`` method of the same name, plus the ``Client``'s own
(``server``, ``settings``, ``timeout``, ``cache``, ``direct``, ``token``,
``tls_ca``, ``offline``, ``data_plane``). ``tests/test_api.py`` fails when a ``Client`` method gains a
parameter its twin here lacks. Nothing heavy is imported until a function
is called, so ``import mzstore`` stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mzstore.client import Client, ProgressFn, PullInfo, PushInfo, TpRules
    from mzstore.push.source import Source
    from mzstore.settings import Settings


def _client(
    server: str | None,
    settings: Settings | None,
    timeout: float | None,
    cache: bool | None,
    direct: bool,
    token: str | None,
    tls_ca: str | os.PathLike[str] | None,
    offline: bool | None,
    data_plane: str | None,
) -> Client:
    from mzstore.client import Client

    return Client(
        server,
        settings=settings,
        timeout=timeout,
        cache=cache,
        direct=direct,
        token=token,
        tls_ca=tls_ca,
        offline=offline,
        data_plane=data_plane,
    )


def load_state_dict(
    ref: str,
    *,
    device: str | Any = "cpu",
    files: list[str] | None = None,
    workers: int | None = None,
    expand_on_device: bool | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
    tp_rules: TpRules | None = None,
    progress: ProgressFn | None = None,
    server: str | None = None,
    settings: Settings | None = None,
    timeout: float | None = None,
    cache: bool | None = None,
    direct: bool = False,
    token: str | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    data_plane: str | None = None,
) -> dict[str, Any]:
    """Load the tensors of ``ref`` (see :meth:`mzstore.client.Client.load_state_dict`)."""
    with _client(server, settings, timeout, cache, direct, token, tls_ca, offline, data_plane) as client:
        return client.load_state_dict(
            ref,
            device=device,
            files=files,
            workers=workers,
            expand_on_device=expand_on_device,
            tp_size=tp_size,
            tp_rank=tp_rank,
            tp_rules=tp_rules,
            progress=progress,
        )


def load_into(
    model: Any,
    ref: str,
    *,
    device_map: Any = None,
    devices: list[Any] | None = None,
    strict: bool = True,
    prefix: str | None = None,
    files: list[str] | None = None,
    workers: int | None = None,
    expand_on_device: bool | None = None,
    in_place: bool = True,
    progress: ProgressFn | None = None,
    server: str | None = None,
    settings: Settings | None = None,
    timeout: float | None = None,
    cache: bool | None = None,
    direct: bool = False,
    token: str | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    data_plane: str | None = None,
) -> dict[str, Any]:
    """Load the tensors of ``ref`` into ``model`` on the mapped devices (see :meth:`mzstore.client.Client.load_into`)."""
    with _client(server, settings, timeout, cache, direct, token, tls_ca, offline, data_plane) as client:
        return client.load_into(
            model,
            ref,
            device_map=device_map,
            devices=devices,
            strict=strict,
            prefix=prefix,
            files=files,
            workers=workers,
            expand_on_device=expand_on_device,
            in_place=in_place,
            progress=progress,
        )


def pull(
    ref: str,
    out_dir: str | os.PathLike[str],
    *,
    progress: ProgressFn | None = None,
    workers: int | None = None,
    keep_quantized: bool = False,
    tp_size: int = 1,
    tp_rank: int = 0,
    tp_rules: TpRules | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    server: str | None = None,
    settings: Settings | None = None,
    timeout: float | None = None,
    cache: bool | None = None,
    direct: bool = False,
    token: str | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    data_plane: str | None = None,
) -> PullInfo:
    """Pull ``ref`` into ``out_dir`` (see :meth:`mzstore.client.Client.pull`)."""
    with _client(server, settings, timeout, cache, direct, token, tls_ca, offline, data_plane) as client:
        return client.pull(
            ref,
            out_dir,
            progress=progress,
            workers=workers,
            keep_quantized=keep_quantized,
            tp_size=tp_size,
            tp_rank=tp_rank,
            tp_rules=tp_rules,
            include=include,
            exclude=exclude,
        )


def push(
    source: str | os.PathLike[str] | Source,
    ref: str,
    *,
    codec: str = "lossless",
    keep: tuple[str, ...] | list[str] = (),
    annotations: dict[str, str] | None = None,
    progress: ProgressFn | None = None,
    resumable: bool = True,
    retries: int = 5,
    origin: str | os.PathLike[str] | None = None,
    allow_no_weights: bool = False,
    probe: bool = False,
    base: str | None = None,
    server: str | None = None,
    settings: Settings | None = None,
    timeout: float | None = None,
    cache: bool | None = None,
    direct: bool = False,
    token: str | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    data_plane: str | None = None,
) -> PushInfo:
    """Push ``source`` as ``ref`` (see :meth:`mzstore.client.Client.push`)."""
    with _client(server, settings, timeout, cache, direct, token, tls_ca, offline, data_plane) as client:
        return client.push(
            source,
            ref,
            codec=codec,
            keep=keep,
            annotations=annotations,
            progress=progress,
            resumable=resumable,
            retries=retries,
            origin=origin,
            allow_no_weights=allow_no_weights,
            probe=probe,
            base=base,
        )


__all__ = ["load_into", "load_state_dict", "pull", "push"]
