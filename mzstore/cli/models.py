"""The model registry commands: ``ls``, ``inspect``, ``rm``, ``tag``."""

from __future__ import annotations

import json
import math

import click

from mzstore.cli.base import cli, connect, emit, human, json_option, server_option, with_server
from mzstore.errors import MzstoreError

#: Columns of ``mzstore ls``: the ref, the digest cut to 12 hex digits (as ``docker images``), sizes, age.
LS_HEADER = ("REF", "DIGEST", "SIZE", "STORED", "UPDATED")


def _age(when: float, now: float | None = None) -> str:
    """``3 minutes ago`` (``-`` when the store could not say)."""
    import time

    if not when:
        return "-"
    seconds = max(0.0, (time.time() if now is None else now) - when)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


@cli.command(name="ls")
@click.argument("name", required=False)
@server_option
@json_option
@click.pass_context
def ls_cmd(ctx: click.Context, name: str | None, server: str | None, as_json: bool) -> None:
    """List models, the tags of NAME, or one NAME:TAG: size, stored size and when the tag was last written."""
    from mzstore.format.refs import parse_ref

    tag = None
    if name:
        server, (name,) = with_server(server, name)
        parsed = parse_ref(name)
        if parsed.digest:
            raise click.UsageError(f"ls lists tags; to look at {name}, use `mzstore inspect {name}`")
        if ":" in name.rsplit("/", 1)[-1]:
            tag = parsed.tag
        name = parsed.name
    refs = [r for r in connect(ctx, server).refs(name) if tag is None or r.tag == tag]
    if tag is not None and not refs:
        raise MzstoreError(f"{name}:{tag} not found")
    if as_json:
        emit({"refs": [{"name": r.name, "tag": r.tag, "digest": r.digest} for r in refs]})
        return
    if not refs:
        return
    rows = [
        [
            f"{r.name}:{r.tag}",
            r.digest[: len("sha256:") + 12],
            human(r.bytes_raw),
            human(r.bytes_stored),
            _age(r.updated),
        ]
        for r in refs
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(LS_HEADER)]
    for row in [list(LS_HEADER), *rows]:
        cells = [c.ljust(w) if i in (0, 1, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        click.echo("  ".join(cells).rstrip())


@cli.command()
@click.argument("ref")
@server_option
@json_option
@click.pass_context
def inspect(ctx: click.Context, ref: str, server: str | None, as_json: bool) -> None:
    """Show a model's files, tensors, codecs and sizes."""
    from mzstore.format.refs import parse_ref

    server, (ref,) = with_server(server, ref)
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
    if m.base is not None:
        deltas = sum(c.codec == "delta" for t in m.tensors for c in t.chunks)
        click.echo(f"base: {m.base} ({deltas} chunks stored as deltas against it)")
    if m.allocation is not None:
        a = m.allocation
        click.echo(
            f"ecsq allocation: by {a.get('source')}, {a.get('target')}, global step {a.get('step')}"
            + "".join(
                f", {k.replace('_', ' ')} {a[k]}" for k in ("predicted_size", "predicted_cos", "probe_cos") if k in a
            )
        )
    for k, v in sorted(m.annotations.items()):
        click.echo(f"annotation {k}: {v}")
    click.echo("files:")
    for f in m.files:
        stored = sum(c.length for c in f.chunks) + sum(c.length for t in m.tensors_of(f.path) for c in t.chunks)
        click.echo(f"  {f.path:<40} {f.kind:<12} {human(f.size):>10} → {human(stored):>10}")
    click.echo(f"tensors ({len(m.tensors)}):")
    click.echo(
        f"  {'name':<48} {'dtype':<5} {'shape':<14} {'codec':<28} {'raw':>9} {'stored':>9} {'ratio':>6} "
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
        # What was used where: auto's choice (lowrank, ecsq, a grid) without the target, a delta marked.
        codec = ("auto→" + t.codec.split("→", 1)[1]) if "→" in t.codec else t.codec
        codec += " Δ" if any(c.codec == "delta" for c in t.chunks) else ""
        click.echo(
            f"  {_cut(t.name, 48):<48} {t.dtype:<5} {'x'.join(map(str, t.shape)) or 'scalar':<14} {_cut(codec, 28):<28} "
            f"{human(raw):>9} {human(stored):>9} {stored / raw if raw else 1.0:>6.3f} "
            f"{8 * stored / numel if numel else 0:>6.2f} {cos:>9} {snr:>7} {err:>9}"
        )


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, a cut one marked with ``…``."""
    return text if len(text) <= width else text[: width - 1] + "…"


@cli.command()
@click.argument("ref")
@server_option
@json_option
@click.pass_context
def rm(ctx: click.Context, ref: str, server: str | None, as_json: bool) -> None:
    """Remove a tag (blobs are reclaimed by garbage collection)."""
    from mzstore.format.refs import parse_ref

    server, (ref,) = with_server(server, ref)
    if parse_ref(ref).digest:
        raise click.UsageError(f"rm removes a tag: give NAME[:TAG], not a digest ({ref})")
    name, digest = connect(ctx, server).rm(ref)
    if as_json:
        emit({"ref": name, "digest": digest})
    else:
        click.echo(f"removed {name} (was {digest})")


@cli.command()
@click.argument("source")
@click.argument("target")
@server_option
@json_option
@click.pass_context
def tag(ctx: click.Context, source: str, target: str, server: str | None, as_json: bool) -> None:
    """Point TARGET at the model SOURCE resolves to."""
    from mzstore.format.refs import parse_ref

    server, (source, target) = with_server(server, source, target)
    parse_ref(source)
    if parse_ref(target).digest:
        raise click.UsageError(f"the target of a tag is NAME[:TAG], not a digest ({target})")
    name, digest = connect(ctx, server).tag(source, target)
    if as_json:
        emit({"ref": name, "digest": digest})
    else:
        click.echo(f"tagged {name} → {digest}")
