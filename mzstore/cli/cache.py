"""``cache ls | verify | prune``: the local chunk cache."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import click

from mzstore.cli.base import cli, cli_settings, emit, human, json_option


@cli.group()
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


#: Size units of ``--max-size`` (decimal as ``du --si`` and ``hf``; ``KiB``/``MiB``/``GiB``/``TiB`` binary).
SIZE_UNITS: dict[str, float] = {
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
}
SIZE_UNITS |= {"tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
#: Duration units of ``--older-than``.
DURATION_UNITS: dict[str, float] = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _with_unit(text: str, units: dict[str, float], what: str, example: str) -> float:
    """A number with one of ``units`` (required: a bare ``20`` is refused, it is too easy to misread)."""
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num) :].strip()
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in units or not value >= 0:
        hint = "give a unit" if num == t and value >= 0 else "not a " + what
        raise click.BadParameter(f"{hint}: {text!r} (e.g. {example})")
    return value * units[unit]


def _size(text: str) -> int:
    return int(_with_unit(text, SIZE_UNITS, "size", "500M, 20G, 1T"))


def _duration(text: str) -> float:
    return _with_unit(text, DURATION_UNITS, "duration", "90s, 12h, 7d")


@cache.command(name="prune")
@click.option(
    "--max-size",
    "max_bytes",
    callback=lambda _ctx, _param, value: _size(value) if value else None,
    help="Drop least recently used chunks until the cache fits (e.g. 20G).",
)
@click.option(
    "--older-than",
    "older_than",
    callback=lambda _ctx, _param, value: _duration(value) if value else None,
    help="Drop models and chunks unused for this long (e.g. 7d).",
)
@click.option("--all", "everything", is_flag=True, help="Empty the cache.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@json_option
def cache_prune(
    max_bytes: int | None, older_than: float | None, everything: bool, dry_run: bool, as_json: bool
) -> None:
    """Free space: always drops chunks no cached model names and leftovers of dead pulls.

    Sizes and ages need a unit: --max-size 20G (B, K, M, G, T; KiB…TiB), --older-than 7d (s, m, h, d, w).
    """
    report = _cache().prune(max_bytes=max_bytes, older_than=older_than, everything=everything, dry_run=dry_run)
    if as_json:
        emit(asdict(report) | {"dry_run": dry_run})
    elif dry_run:
        click.echo(f"cache prune --dry-run: would remove {len(report.removed)} entries, {human(report.bytes_removed)}")
    else:
        click.echo(f"cache prune: removed {len(report.removed)} entries, {human(report.bytes_removed)} freed")
