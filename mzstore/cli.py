"""``mzstore`` command line: flags → library call → render.

Each command parses its flags, calls the library (:mod:`mzstore.client`,
:mod:`mzstore.server`) and renders the result either for people or, with
``--json``, as one JSON object. Errors are rendered by one formatter as a
single ``error: …`` line. Exit codes: 0 ok, 1 failed, 2 usage (bad flags or
an invalid reference).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import click

from mzstore.errors import InvalidName, MzstoreError, Unavailable
from mzstore.settings import DEFAULT_LISTEN, Settings, load_settings


def _settings() -> Settings:
    try:
        return load_settings()
    except MzstoreError as exc:
        raise click.UsageError(str(exc)) from None


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextmanager
def _progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar on a terminal; nothing when stderr is not a TTY or with --json."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False, file=sys.stderr) as bar:
        yield bar.update


def _emit(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, sort_keys=True))


class _Group(click.Group):
    """Turns domain errors into one line and the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvalidName as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)
        except Unavailable as exc:
            server = ctx.meta.get("mzstore.server", "the server")
            click.echo(f"error: cannot reach mzstore server at {server}; is `mzstore serve` running? ({exc})", err=True)
            ctx.exit(1)
        except MzstoreError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _remember_tls_ca(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.meta["mzstore.tls_ca"] = value


def server_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--server`` (passed to the command) and ``--tls-ca`` (kept in ``ctx.meta`` for :func:`_client`)."""
    fn = click.option(
        "--tls-ca",
        metavar="PEM",
        type=click.Path(dir_okay=False),
        expose_value=False,
        callback=_remember_tls_ca,
        help="Speak TLS, trusting this CA bundle [env MZSTORE_TLS_CA; client cert: MZSTORE_TLS_CERT/_KEY].",
    )(fn)
    return click.option(
        "--server", "server", metavar="HOST:PORT", help="Server address [env MZSTORE_SERVER, default 127.0.0.1:50051]."
    )(fn)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


def _client(ctx: click.Context, server: str | None, cache: bool | None = None, direct: bool = False) -> Any:
    from mzstore.client import Client

    settings = _settings()
    address = server or settings.server
    ctx.meta["mzstore.server"] = address
    tls_ca = ctx.meta.get("mzstore.tls_ca")
    return ctx.with_resource(Client(address, settings=settings, cache=cache, direct=direct, tls_ca=tls_ca))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mzstore")
def main() -> None:
    """mzstore: push, pull and serve compressed, sharded models."""


def _check_port_free(listen: str) -> None:
    """Fail with one clear line when the port is taken (before gRPC logs its own noise)."""
    import socket

    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise click.UsageError(f"--listen must be HOST:PORT, got {listen!r}")
    if int(port) == 0:
        return
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except OSError as exc:
            raise MzstoreError(f"cannot serve on {listen}: {exc.strerror or exc}") from None


def storage_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The flags that say where the data lives (shared by serve and the admin commands)."""
    fn = click.option(
        "--s3-endpoint-url",
        metavar="URL",
        help="Endpoint of an S3-compatible store (MinIO, Ceph RGW); credentials come from the AWS environment.",
    )(fn)
    fn = click.option("--replicas", type=click.IntRange(1), default=1, show_default=True, help="Copies of every blob.")(
        fn
    )
    fn = click.option(
        "--node",
        "nodes",
        multiple=True,
        metavar="URL",
        help="Storage node (file:///path or s3://bucket/prefix). Repeatable; replaces --root.",
    )(fn)
    fn = click.option(
        "--root",
        type=click.Path(file_okay=False),
        help="Storage directory, the one-node default [default $MZSTORE_HOME/data or ./mzstore-data].",
    )(fn)
    return fn


def _open_store(root: str | None, nodes: tuple[str, ...], replicas: int, s3_endpoint_url: str | None) -> Any:
    from mzstore.storage import Store, open_node

    if root and nodes:
        raise click.UsageError("give either --root or --node, not both")
    urls = list(nodes) or [root or str(_settings().default_root)]
    opened = [
        open_node(u, endpoint_url=s3_endpoint_url) if s3_endpoint_url and u.startswith("s3://") else open_node(u)
        for u in urls
    ]
    try:
        return Store(opened, replicas)
    except MzstoreError as exc:
        raise click.UsageError(str(exc)) from None


@main.command()
@storage_options
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT")
@click.option(
    "--upstream",
    metavar="HOST:PORT",
    help="Serve as a read-only pull-through cache of this server: the first pull fills the local store.",
)
@click.option(
    "--upstream-ttl",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="How long a tag resolved upstream is trusted before asking again (0: every time).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False, exists=True),
    help="Require tokens (see `mzstore token add`); re-read when it changes.",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True), metavar="PEM", help="Serve TLS: certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), metavar="PEM", help="Serve TLS: private key.")
@click.option(
    "--tls-client-ca",
    type=click.Path(dir_okay=False, exists=True),
    metavar="PEM",
    help="Mutual TLS: clients must present a certificate issued by this CA.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def serve(
    root: str | None,
    nodes: tuple[str, ...],
    replicas: int,
    s3_endpoint_url: str | None,
    listen: str,
    upstream: str | None,
    upstream_ttl: float,
    token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_client_ca: str | None,
    verbose: bool,
) -> None:
    """Run a server over a local directory or over storage nodes (or a cache of another server).

    A pull-through cache (--upstream) reaches its upstream with MZSTORE_TOKEN and MZSTORE_TLS_CA
    (MZSTORE_TLS_CERT/_KEY) from its own environment.
    """
    from pathlib import Path

    from mzstore.server.app import TlsConfig
    from mzstore.server.app import serve as run

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    settings = _settings()
    if upstream is not None and not upstream.rpartition(":")[2].isdigit():
        raise click.UsageError(f"--upstream must be HOST:PORT, got {upstream!r}")
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_client_ca and not tls_cert:
        raise click.UsageError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = (
        TlsConfig(Path(tls_cert), Path(tls_key), Path(tls_client_ca) if tls_client_ca else None)
        if tls_cert and tls_key
        else None
    )
    store = _open_store(root, nodes, replicas, s3_endpoint_url)
    _check_port_free(listen)
    try:
        run(store, listen, settings, upstream=upstream, upstream_ttl=upstream_ttl, auth=token_file, tls=tls)
    except OSError as exc:
        raise MzstoreError(f"cannot serve on {listen}: {exc}") from None


@main.group()
def token() -> None:
    """Manage the server's token file (stores sha256 hashes, never tokens)."""


@token.command(name="add")
@click.argument("name")
@click.option(
    "--scope", "scopes", default="read", show_default=True, help="read, write or admin (admin ⊇ write ⊇ read)."
)
@click.option(
    "--prefix", "prefixes", multiple=True, metavar="NAME/", help="Only write models under this prefix. Repeatable."
)
@click.option("--token-file", type=click.Path(dir_okay=False), required=True, help="File to append to (created 0600).")
def token_add(name: str, scopes: str, prefixes: tuple[str, ...], token_file: str) -> None:
    """Create a token NAME, append its hash to the token file and print the token (shown once)."""
    import os

    from mzstore.server.auth import new_token, parse_token_file, token_line

    secret = new_token()
    try:
        line = token_line(name, secret, scopes, prefixes)
    except MzstoreError as exc:
        raise click.UsageError(str(exc)) from None
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")
    with open(token_file) as f:
        parse_token_file(f.read(), token_file)  # fail now, not at the server's next start
    click.echo(secret)


def _admin_report(report: Any, as_json: bool, summary: str) -> None:
    if as_json:
        _emit(report.to_dict())
    else:
        click.echo(summary)
        for label in ("missing", "corrupt", "lost", "repaired", "deleted"):
            for item in getattr(report, label):
                click.echo(f"  {label}: {item}")
    if not report.ok:
        raise MzstoreError(f"{len(report.lost)} lost, {len(report.missing)} missing, {len(report.corrupt)} corrupt")


@main.command()
@storage_options
@click.option("--repair", is_flag=True, help="Rewrite missing or corrupt copies from intact ones.")
@json_option
def fsck(
    root: str | None, nodes: tuple[str, ...], replicas: int, s3_endpoint_url: str | None, repair: bool, as_json: bool
) -> None:
    """Verify every blob and manifest on every node (exit 1 if anything is missing or corrupt)."""
    from mzstore.storage.admin import fsck as run

    report = run(_open_store(root, nodes, replicas, s3_endpoint_url), repair=repair)
    if repair and report.repaired and not report.lost:
        report.missing.clear()
        report.corrupt.clear()
    _admin_report(
        report,
        as_json,
        f"checked {report.manifests} manifests and {report.blobs} blobs: {len(report.missing)} missing, "
        f"{len(report.corrupt)} corrupt, {len(report.lost)} lost, {len(report.repaired)} repaired",
    )


@main.command()
@storage_options
@json_option
def rebalance(
    root: str | None, nodes: tuple[str, ...], replicas: int, s3_endpoint_url: str | None, as_json: bool
) -> None:
    """Move blobs to the nodes placement now assigns them (after adding or removing nodes)."""
    from mzstore.storage.admin import rebalance as run

    report = run(_open_store(root, nodes, replicas, s3_endpoint_url))
    share = report.moved / report.copies if report.copies else 0.0
    _admin_report(
        report, as_json, f"{report.blobs} blobs: moved {report.moved} of {report.copies} copies ({share:.1%})"
    )


@main.command()
@storage_options
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=24 * 3600,
    show_default=True,
    help="Seconds an unreferenced object is kept.",
)
@json_option
def gc(
    root: str | None, nodes: tuple[str, ...], replicas: int, s3_endpoint_url: str | None, grace: float, as_json: bool
) -> None:
    """Delete blobs no manifest references and manifests no tag points at, older than --grace."""
    from mzstore.storage.admin import gc as run

    report = run(_open_store(root, nodes, replicas, s3_endpoint_url), grace_s=grace)
    _admin_report(
        report,
        as_json,
        f"deleted {len(report.deleted)} objects, kept {report.kept_young} younger than the grace period",
    )


@main.command()
@click.argument("source", type=click.Path(exists=False))
@click.argument("ref")
@click.option(
    "--codec",
    default="lossless",
    show_default=True,
    help="Policy: lossless, int8, int4[:g32|g64|g128], fp8, prune:AMOUNT, prune:N:M, prune:…,int8, auto[:cos=X].",
)
@click.option(
    "--keep", multiple=True, metavar="PATTERN", help="Keep matching tensors exact (glob, or re:REGEX). Repeatable."
)
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
    from mzstore.push.source import open_source

    parse_ref(ref)
    try:
        parse_policy(codec, keep)
    except MzstoreError as exc:  # a bad --codec is a usage error: one line, exit 2
        click.echo(f"error: --codec {codec}: {exc}", err=True)
        ctx.exit(2)
    client = _client(ctx, server)
    src = open_source(source)
    with _progress(src.bytes_raw, "push", not as_json) as bar:
        info = client.push(src, ref, codec=codec, keep=keep, progress=bar, resumable=not no_resume, origin=source)
    if as_json:
        _emit(asdict(info))
        return
    ratio = info.bytes_stored / info.bytes_raw if info.bytes_raw else 1.0
    click.echo(f"pushed {info.ref} {info.digest}")
    click.echo(
        f"  raw {_human(info.bytes_raw)} → stored {_human(info.bytes_stored)} (ratio {ratio:.3f}), "
        f"{info.tensors} tensors, {info.chunks} chunks, {info.shards} shard(s), "
        f"{info.seconds:.2f} s ({info.bytes_raw / max(info.seconds, 1e-9) / 1e6:.0f} MB/s)"
    )
    if info.worst:
        w = info.worst
        snr = "exact" if w.get("snr_db") is None else f"SNR {w['snr_db']:.1f} dB"
        click.echo(
            f"  worst tensor: {w['tensor']} ({w['codec']}): cosine {w['cosine']:.5f}, {snr}, max error {w['max_abs_err']:.3g}"
        )
    for path in info.skipped:
        click.echo(f"  skipped {path} (pickle weights beside safetensors weights)")


@main.command()
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
    "--direct",
    is_flag=True,
    help="Read blobs straight from the storage nodes (same S3 / local disk); the server only sends the manifest.",
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
    direct: bool,
    server: str | None,
    as_json: bool,
) -> None:
    """Pull REF into a directory in its source layout, verified.

    Chunks already in the local cache ($MZSTORE_HOME/cache) are not fetched
    again, so a repeated, resumed or new-version pull moves only what is missing.
    """
    from mzstore.format.refs import parse_ref

    parsed = parse_ref(ref)
    if tp_rank >= tp_size:
        raise click.UsageError(f"--tp-rank {tp_rank} must be below --tp-size {tp_size}")
    client = _client(ctx, server, cache=False if no_cache else None, direct=direct)
    out = out or parsed.name.rsplit("/", 1)[-1]
    shown, total = None, 0
    if not as_json and tp_size == 1 and sys.stderr.isatty():
        # The bar's total comes from the manifest; the pull is pinned to its digest, so a tag
        # moved meanwhile cannot make the bar count one version and the pull fetch another.
        shown, digest, manifest = client.manifest(ref)
        ref, total = f"{parsed.name}@{digest}", manifest.bytes_raw
    with _progress(total, "pull", not as_json and tp_size == 1) as bar:
        info = client.pull(
            ref, out, progress=bar, keep_quantized=keep_quantized, tp_size=tp_size, tp_rank=tp_rank, workers=workers
        )
    if as_json:
        _emit(asdict(info) | {"output": str(out)})
        return
    rank = f" (tensor-parallel rank {tp_rank} of {tp_size})" if tp_size > 1 else ""
    click.echo(f"pulled {shown or info.ref} {info.digest} → {out}{rank}")
    cached = f", {_human(info.bytes_cached)} from cache" if info.bytes_cached else ""
    click.echo(
        f"  {len(info.files)} files, {_human(info.bytes_raw)} written, {_human(info.bytes_transferred)} transferred"
        f"{cached}, {info.seconds:.2f} s ({info.bytes_raw / max(info.seconds, 1e-9) / 1e6:.0f} MB/s), verified"
    )


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
    refs = _client(ctx, server).ls(name)
    if as_json:
        _emit({"refs": [{"name": n, "tag": t, "digest": d} for n, t, d in refs]})
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
    name, digest, m = _client(ctx, server).manifest(ref)
    if as_json:
        _emit({"ref": name, "digest": digest, "manifest": json.loads(m.to_json())})
        return
    ratio = m.stored_total / m.bytes_raw if m.bytes_raw else 1.0
    click.echo(f"{name}  {digest}")
    click.echo(
        f"source: {m.source_kind}   codec: {m.codec}   raw {_human(m.bytes_raw)} → stored {_human(m.stored_total)} "
        f"(ratio {ratio:.3f}, manifest {_human(m.manifest_bytes)})"
    )
    click.echo(f"blobs: {len(m.blobs())}")
    for k, v in sorted(m.annotations.items()):
        click.echo(f"annotation {k}: {v}")
    click.echo("files:")
    for f in m.files:
        stored = sum(c.length for c in f.chunks) + sum(c.length for t in m.tensors_of(f.path) for c in t.chunks)
        click.echo(f"  {f.path:<40} {f.kind:<12} {_human(f.size):>10} → {_human(stored):>10}")
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
            f"{_human(raw):>9} {_human(stored):>9} {stored / raw if raw else 1.0:>6.3f} "
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
    name, digest = _client(ctx, server).rm(ref)
    if as_json:
        _emit({"ref": name, "digest": digest})
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
    name, digest = _client(ctx, server).tag(source, target)
    if as_json:
        _emit({"ref": name, "digest": digest})
    else:
        click.echo(f"tagged {name} → {digest}")


@main.group()
def cache() -> None:
    """Inspect and trim the local chunk cache ($MZSTORE_HOME/cache, else ~/.cache/mzstore)."""


def _cache() -> Any:
    from mzstore.pull.cache import ChunkCache

    return ChunkCache(_settings().cache_dir)


@cache.command(name="ls")
@json_option
def cache_ls(as_json: bool) -> None:
    """Models whose manifests are cached, and how much of each is present."""
    c = _cache()
    models = c.ls()
    if as_json:
        _emit({"root": str(c.root), "bytes": c.size(), "models": [asdict(m) for m in models]})
        return
    click.echo(f"cache {c.root}: {_human(c.size())} of chunks")
    for m in models:
        share = m.bytes_present / m.bytes_stored if m.bytes_stored else 1.0
        click.echo(
            f"  {m.ref:<32} {m.digest[:19]}  {_human(m.bytes_raw):>9} model, "
            f"{_human(m.bytes_present):>9} cached ({share:.0%}, {m.chunks_present}/{m.chunks} chunks)  {m.server}"
        )


@cache.command(name="verify")
@json_option
@click.pass_context
def cache_verify(ctx: click.Context, as_json: bool) -> None:
    """Decode and check every cached chunk; remove bad ones (exit 1 if any)."""
    report = _cache().verify()
    if as_json:
        _emit(asdict(report))
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
        _emit(asdict(report))
    else:
        click.echo(f"cache prune: removed {len(report.removed)} entries, {_human(report.bytes_removed)} freed")


if __name__ == "__main__":  # pragma: no cover
    main()
