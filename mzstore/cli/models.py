"""The model registry commands: ``ls``, ``inspect``, ``rm``, ``tag``."""

from __future__ import annotations

import json
import math

import click

from mzstore.cli.base import connect, emit, human, json_option, main, server_option


@main.command(name="ls")
@click.argument("name", required=False)
@server_option
@json_option
@click.pass_context
def ls_cmd(ctx: click.Context, name: str | None, server: str | None, as_json: bool) -> None:
    """List models, or the tags of NAME."""
    from mzstore.format.refs import validate_name

    if name:
        validate_name(name)
    refs = connect(ctx, server).ls(name)
    if as_json:
        emit({"refs": [{"name": n, "tag": t, "digest": d} for n, t, d in refs]})
        return
    for n, t, d in refs:
        click.echo(f"{n}:{t}\t{d}")


@main.command()
@click.argument("ref")
@server_option
@json_option
@click.pass_context
def inspect(ctx: click.Context, ref: str, server: str | None, as_json: bool) -> None:
    """Show a model's files, tensors, codecs and sizes."""
    from mzstore.format.refs import parse_ref

    parse_ref(ref)
    name, digest, m = connect(ctx, server).manifest(ref)
    if as_json:
        emit({"ref": name, "digest": digest, "manifest": json.loads(m.to_json())})
        return
    ratio = m.stored_total / m.bytes_raw if m.bytes_raw else 1.0
    click.echo(f"{name}  {digest}")
    click.echo(
        f"source: {m.source_kind}   codec: {m.codec}   raw {human(m.bytes_raw)} → stored {human(m.stored_total)} "
        f"(ratio {ratio:.3f}, manifest {human(m.manifest_bytes)})"
    )
    click.echo(f"blobs: {len(m.blobs())}")
    for k, v in sorted(m.annotations.items()):
        click.echo(f"annotation {k}: {v}")
    click.echo("files:")
    for f in m.files:
        stored = sum(c.length for c in f.chunks) + sum(c.length for t in m.tensors_of(f.path) for c in t.chunks)
        click.echo(f"  {f.path:<40} {f.kind:<12} {human(f.size):>10} → {human(stored):>10}")
    click.echo(f"tensors ({len(m.tensors)}):")
    click.echo(
        f"  {'name':<48} {'dtype':<5} {'shape':<14} {'codec':<18} {'raw':>9} {'stored':>9} {'ratio':>6} "
        f"{'bits/w':>6} {'cosine':>9} {'SNR dB':>7} {'max err':>9}"
    )
    for t in m.tensors:
        raw = t.data_offsets[1] - t.data_offsets[0]
        stored = sum(c.length for c in t.chunks)
        numel = math.prod(t.shape)
        fid = t.fidelity or {}
        cos = f"{fid['cosine']:.6f}" if "cosine" in fid else "exact"
        snr = "-" if fid.get("snr_db") is None else f"{fid['snr_db']:.1f}"
        err = f"{fid['max_abs_err']:.3g}" if "max_abs_err" in fid else "-"
        click.echo(
            f"  {t.name[:48]:<48} {t.dtype:<5} {'x'.join(map(str, t.shape)) or 'scalar':<14} {t.codec[:18]:<18} "
            f"{human(raw):>9} {human(stored):>9} {stored / raw if raw else 1.0:>6.3f} "
            f"{8 * stored / numel if numel else 0:>6.2f} {cos:>9} {snr:>7} {err:>9}"
        )


@main.command()
@click.argument("ref")
@server_option
@json_option
@click.pass_context
def rm(ctx: click.Context, ref: str, server: str | None, as_json: bool) -> None:
    """Remove a tag (blobs are reclaimed by garbage collection)."""
    from mzstore.format.refs import parse_ref

    parse_ref(ref)
    name, digest = connect(ctx, server).rm(ref)
    if as_json:
        emit({"ref": name, "digest": digest})
    else:
        click.echo(f"removed {name} (was {digest})")


@main.command()
@click.argument("source")
@click.argument("target")
@server_option
@json_option
@click.pass_context
def tag(ctx: click.Context, source: str, target: str, server: str | None, as_json: bool) -> None:
    """Point TARGET at the model SOURCE resolves to."""
    from mzstore.format.refs import parse_ref

    parse_ref(source)
    parse_ref(target)
    name, digest = connect(ctx, server).tag(source, target)
    if as_json:
        emit({"ref": name, "digest": digest})
    else:
        click.echo(f"tagged {name} → {digest}")
