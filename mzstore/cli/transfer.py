"""``push`` and ``pull``."""

from __future__ import annotations

import sys
from dataclasses import asdict

import click

from mzstore.cli.base import (
    cli,
    connect,
    emit,
    file_filters,
    human,
    json_option,
    progress,
    quiet_option,
    server_option,
    with_server,
)
from mzstore.errors import MzstoreError


@cli.command()
@click.argument("source", type=click.Path(exists=False))
@click.argument("ref")
@click.option(
    "--codec",
    default="lossless",
    show_default=True,
    help="Policy: lossless, int8, int4[:g32|g64|g128], fp8, prune:AMOUNT, prune:N:M, prune:…,int8, auto[:cos=X], "
    "ecsq:size=S (stored/raw), ecsq:cos=C (output cosine), ecsq:step=D.",
)
@click.option(
    "--base",
    metavar="REF",
    help="Store lossless tensors as exact deltas against this model's (a fine-tune of REF costs what changed).",
)
@click.option(
    "--probe",
    is_flag=True,
    help="ecsq: measure each tensor's sensitivity with random tokens through the model (a Hugging Face "
    "directory; needs torch and transformers) instead of the role table by tensor name.",
)
@click.option(
    "--keep", multiple=True, metavar="PATTERN", help="Keep matching tensors exact (glob, or re:REGEX). Repeatable."
)
@click.option(
    "--annotate",
    "annotations",
    multiple=True,
    metavar="KEY=VALUE",
    help="Record a note in the manifest, shown by `inspect` (e.g. fine-tuned-from=org/base:v1). Repeatable.",
)
@click.option(
    "--allow-no-weights",
    is_flag=True,
    help="Store a source with no weights (only configs, ONNX, GGUF…); refused by default.",
)
@file_filters
@quiet_option
@click.option(
    "--no-resume",
    is_flag=True,
    help="Stream straight into the server's ingest instead of a resumable upload session.",
)
@server_option
@json_option
@click.pass_context
def push(
    ctx: click.Context,
    source: str,
    ref: str,
    codec: str,
    keep: tuple[str, ...],
    annotations: tuple[str, ...],
    allow_no_weights: bool,
    probe: bool,
    base: str | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    quiet: bool,
    no_resume: bool,
    server: str | None,
    as_json: bool,
) -> None:
    """Push SOURCE (.safetensors, model directory, .bin/.pt) as REF.

    The upload is a resumable session: a dropped connection is resumed
    automatically, and rerunning a push that was killed sends only what the
    server does not have yet.
    """
    from mzstore.codecs.policy import parse_policy
    from mzstore.format.refs import parse_ref
    from mzstore.push.protocol import validate_annotations
    from mzstore.push.source import open_source

    server, (ref, *bases) = with_server(server, ref, *([base] if base else []))
    parse_ref(ref)
    base = bases[0] if bases else None
    if base:
        parse_ref(base)
    notes: dict[str, str] = {}
    for item in annotations:
        key, sep, value = item.partition("=")
        if not sep or key in notes:
            why = "is given twice" if sep else "is not KEY=VALUE"
            raise click.UsageError(f"--annotate {item!r} {why}")
        notes[key] = value
    try:
        validate_annotations(notes)
    except MzstoreError as exc:
        raise click.UsageError(f"--annotate: {exc}") from None
    try:
        parse_policy(codec, keep)
    except MzstoreError as exc:  # a bad --codec is a usage error: one line, exit 2
        click.echo(f"error: --codec {codec}: {exc}", err=True)
        ctx.exit(2)
    client = connect(ctx, server)
    src = open_source(source, include, exclude)
    with progress(src.bytes_raw, "push", not (as_json or quiet)) as bar:
        info = client.push(
            src,
            ref,
            codec=codec,
            keep=keep,
            annotations=notes,
            progress=bar,
            resumable=not no_resume,
            origin=source,
            allow_no_weights=allow_no_weights,
            probe=probe,
            base=base,
        )
    if as_json:
        emit(asdict(info))
        return
    if quiet:
        click.echo(info.digest)
        return
    ratio = info.bytes_stored / info.bytes_raw if info.bytes_raw else 1.0
    click.echo(f"pushed {info.ref} {info.digest}")
    click.echo(
        f"  raw {human(info.bytes_raw)} → stored {human(info.bytes_stored)} (ratio {ratio:.3f}), "
        f"{info.tensors} tensors, {info.chunks} chunks, {info.shards} shard(s), "
        f"{info.seconds:.2f} s ({info.bytes_raw / max(info.seconds, 1e-9) / 1e6:.0f} MB/s)"
    )
    if info.allocation:
        a = info.allocation
        predicted = ", ".join(
            f"{label} {a[key]:.4f}"
            for key, label in (
                ("predicted_size", "size"),
                ("predicted_cos", "cos"),
                ("probe_cos", "probe-measured cos"),
            )
            if key in a
        )
        click.echo(
            f"  ecsq allocation by {a['source']}: {a['target']}, global step {a['step']:g} (predicted {predicted})"
        )
        if a.get("note"):
            click.echo(f"  note: {a['note']}")
    if info.worst:
        w = info.worst
        snr = "exact" if w.get("snr_db") is None else f"SNR {w['snr_db']:.1f} dB"
        click.echo(
            f"  worst tensor: {w['tensor']} ({w['codec']}): cosine {w['cosine']:.5f}, {snr}, max error {w['max_abs_err']:.3g}"
        )
    for path in info.skipped:
        click.echo(f"  skipped {path} (pickle weights beside safetensors weights)")


@cli.command()
@click.argument("ref")
@click.option("-o", "--output", "out", type=click.Path(file_okay=False), help="Output directory [default: ./<name>].")
@click.option(
    "--keep-quantized",
    is_flag=True,
    help="Write quantized weights in the compressed-tensors layout (vLLM) instead of dequantizing them.",
)
@click.option("--tp-size", type=click.IntRange(min=1), default=1, show_default=True, help="Tensor-parallel ranks.")
@click.option(
    "--tp-rank", type=click.IntRange(min=0), default=0, show_default=True, help="Write only this rank's slices."
)
@click.option("--workers", type=click.IntRange(min=1), help="Parallel fetch/decode streams [env MZSTORE_PULL_WORKERS].")
@click.option("--no-cache", is_flag=True, help="Neither read nor fill the local chunk cache.")
@click.option(
    "--no-fsync",
    is_flag=True,
    help="Do not fsync the files before moving them into place (scratch disks: faster, not crash-safe) "
    "[env MZSTORE_PULL_FSYNC=0].",
)
@click.option(
    "--direct",
    is_flag=True,
    help="Read blobs straight from the storage nodes (same S3 / local disk); the server only sends the manifest.",
)
@click.option(
    "--transport",
    "data_plane",
    type=click.Choice(["auto", "http", "grpc", "direct"]),
    help="Where blob bytes come from: the server's HTTP plane when it has one (auto), http, grpc, or the "
    "storage nodes (direct) [env MZSTORE_TRANSPORT; MZSTORE_BLOB_URL replaces the advertised HTTP base].",
)
@click.option(
    "--force",
    is_flag=True,
    help="Pull into a non-empty folder that holds other files; the model's files are replaced, others left.",
)
@click.option(
    "--clean",
    is_flag=True,
    help="With --force: also remove weight files there that are not this model's (implies --force).",
)
@file_filters
@quiet_option
@click.option(
    "--offline",
    is_flag=True,
    help="Use only the local cache: the cached tag → digest mapping and cached chunks [env MZSTORE_OFFLINE=1].",
)
@server_option
@json_option
@click.pass_context
def pull(
    ctx: click.Context,
    ref: str,
    out: str | None,
    keep_quantized: bool,
    tp_size: int,
    tp_rank: int,
    workers: int | None,
    no_cache: bool,
    no_fsync: bool,
    direct: bool,
    data_plane: str | None,
    force: bool,
    clean: bool,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    quiet: bool,
    offline: bool,
    server: str | None,
    as_json: bool,
) -> None:
    """Pull REF into a directory in its source layout, verified.

    Chunks already in the local cache ($MZSTORE_HOME/cache) are not fetched
    again, so a repeated, resumed or new-version pull moves only what is missing.
    A folder that holds an earlier pull of the same model is updated in place;
    one that holds anything else is refused unless --force.
    """
    from pathlib import Path

    from mzstore.format.refs import parse_ref
    from mzstore.pull.destination import check_destination, settle, write_record

    server, (ref,) = with_server(server, ref)
    asked = ref
    parsed = parse_ref(ref)
    if tp_rank >= tp_size:
        raise click.UsageError(f"--tp-rank {tp_rank} must be below --tp-size {tp_size}")
    if (include or exclude) and (keep_quantized or tp_size > 1):
        raise click.UsageError("--include/--exclude work for a plain pull, not with --keep-quantized or --tp-size")
    if keep_quantized and tp_size > 1:
        raise click.UsageError(
            "--keep-quantized and --tp-size cannot be combined (vLLM shards a quantized model itself)"
        )
    if offline and (no_cache or direct):
        raise click.UsageError(
            "--offline reads only the local cache: it cannot be combined with --no-cache or --direct"
        )
    out = out or parsed.name.rsplit("/", 1)[-1]
    dest = check_destination(out, parsed.name, force=force or clean)
    client = connect(
        ctx,
        server,
        cache=False if no_cache else None,
        direct=direct,
        offline=offline,
        data_plane=data_plane,
        fsync=not no_fsync,
    )
    total = 0
    if not (as_json or quiet) and tp_size == 1 and sys.stderr.isatty():
        # The bar's total comes from the manifest; the pull is pinned to its digest, so a tag
        # moved meanwhile cannot make the bar count one version and the pull fetch another.
        _, digest, manifest = client.manifest(ref)
        ref, total = f"{parsed.name}@{digest}", manifest.bytes_raw
    with progress(total, "pull", not (as_json or quiet) and tp_size == 1 and not (include or exclude)) as bar:
        info = client.pull(
            ref,
            out,
            progress=bar,
            keep_quantized=keep_quantized,
            tp_size=tp_size,
            tp_rank=tp_rank,
            workers=workers,
            include=include,
            exclude=exclude,
        )
    written = [Path(f).relative_to(out).as_posix() for f in info.files]
    left = settle(dest, written, clean=clean)
    write_record(Path(out), parsed.name, info.ref, info.digest, written, durable=client.settings.pull_fsync)
    if as_json:
        emit(asdict(info) | {"output": str(out)} | asdict(left))
        return
    if quiet:
        click.echo(out)  # as hf download --quiet: the path of what was pulled
        return
    rank = f" (tensor-parallel rank {tp_rank} of {tp_size})" if tp_size > 1 else ""
    # a digest pull says what was typed; a tag pull says name:tag and the digest it resolved to
    shown = asked if parsed.digest else f"{parsed.name}:{parsed.tag} {info.digest}"
    click.echo(f"pulled {shown} → {out}{rank}")
    cached = f", {human(info.bytes_cached)} from cache" if info.bytes_cached else ""
    click.echo(
        f"  {len(info.files)} files, {human(info.bytes_raw)} written, {human(info.bytes_transferred)} transferred"
        f"{cached}, {info.seconds:.2f} s ({info.bytes_raw / max(info.seconds, 1e-9) / 1e6:.0f} MB/s), verified"
    )
    for label, paths in (("removed (from the earlier pull)", left.removed), ("removed (--clean)", left.cleaned)):
        if paths:
            click.echo(f"  {label}: {', '.join(paths)}")
    if left.stale:
        click.echo(
            f"  warning: weight files that are not this model's are still there: {', '.join(left.stale)}"
            " (--clean removes them)",
            err=True,
        )
