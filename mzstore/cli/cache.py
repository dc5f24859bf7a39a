"""``cache ls | verify | prune``: the local chunk cache."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from mzstore.cli.base import cli_settings, emit, human, json_option, main


@main.group()
def cache() -> None:
    """Inspect and trim the local chunk cache ($MZSTORE_HOME/cache, else ~/.cache/mzstore)."""


def _cache() -> Any:
    from mzstore.pull.cache import ChunkCache

    return ChunkCache(cli_settings().cache_dir)


@cache.command(name="ls")
@json_option
def cache_ls(as_json: bool) -> None:
    """Models whose manifests are cached, and how much of each is present."""
    c = _cache()
    models = c.ls()
    if as_json:
        emit({"root": str(c.root), "bytes": c.size(), "models": [asdict(m) for m in models]})
        return
    click.echo(f"cache {c.root}: {human(c.size())} of chunks")
    for m in models:
        share = m.bytes_present / m.bytes_stored if m.bytes_stored else 1.0
        click.echo(
            f"  {m.ref:<32} {m.digest[:19]}  {human(m.bytes_raw):>9} model, "
            f"{human(m.bytes_present):>9} cached ({share:.0%}, {m.chunks_present}/{m.chunks} chunks)  {m.server}"
        )


@cache.command(name="verify")
@json_option
@click.pass_context
def cache_verify(ctx: click.Context, as_json: bool) -> None:
    """Decode and check every cached chunk; remove bad ones (exit 1 if any)."""
    report = _cache().verify()
    if as_json:
        emit(asdict(report))
    else:
        for problem in report.problems:
            click.echo(f"  removed {problem}")
        click.echo(f"cache verify: {report.checked} chunks checked, {len(report.removed)} bad removed")
    if report.removed:
        ctx.exit(1)


def _size(text: str) -> int:
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9}
    units |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        return int(float(num) * units[t[len(num) :].strip()])
    except (KeyError, ValueError):
        raise click.BadParameter(f"not a size: {text!r} (e.g. 500M, 20G)") from None


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise click.BadParameter(f"not a duration: {text!r} (e.g. 90s, 12h, 7d)") from None


@cache.command(name="prune")
@click.option("--max-size", help="Drop least recently used chunks until the cache fits (e.g. 20G).")
@click.option("--older-than", help="Drop models and chunks unused for this long (e.g. 7d).")
@click.option("--all", "everything", is_flag=True, help="Empty the cache.")
@json_option
def cache_prune(max_size: str | None, older_than: str | None, everything: bool, as_json: bool) -> None:
    """Free space: always drops chunks no cached model names and leftovers of dead pulls."""
    report = _cache().prune(
        max_bytes=_size(max_size) if max_size else None,
        older_than=_duration(older_than) if older_than else None,
        everything=everything,
    )
    if as_json:
        emit(asdict(report))
    else:
        click.echo(f"cache prune: removed {len(report.removed)} entries, {human(report.bytes_removed)} freed")
