"""``serve``, ``token`` and the storage admin commands (``fsck``, ``rebalance``, ``gc``)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from mzstore.cli.base import cli, cli_settings, emit, json_option
from mzstore.errors import MzstoreError
from mzstore.settings import DEFAULT_LISTEN


def _check_port_free(listen: str, flag: str = "--listen") -> None:
    """Fail with one clear line when the port is taken (before gRPC logs its own noise)."""
    import socket

    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise click.UsageError(f"{flag} must be HOST:PORT with a port from 0 to 65535, got {listen!r}")
    if int(port) == 0:
        return
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # as the servers themselves bind: connections of a killed predecessor still in TIME_WAIT do not
        # count, a listener does
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except OSError as exc:
            raise MzstoreError(
                f"cannot serve on {listen} ({flag}): {exc.strerror or exc}"
                + ("; give --http HOST:PORT or --http off" if flag.startswith("--http") else "")
            ) from None


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


def _open_store(
    root: str | None, nodes: tuple[str, ...], replicas: int, s3_endpoint_url: str | None, *, existing: bool = False
) -> Any:
    """The store the flags name.

    With ``existing`` (the admin commands) the store must be there already: ``--root`` (or the
    default root) must exist, and of ``--node`` directories at least one (a new, empty node is
    what ``rebalance`` fills), so a typo is an error instead of a healthy empty store.
    """
    from pathlib import Path

    from mzstore.storage import Store, open_node

    if root and nodes:
        raise click.UsageError("give either --root or --node, not both")
    urls = list(nodes) or [root or str(cli_settings().default_root)]
    if existing:
        local = [
            u[len("file://") :] if u.startswith("file://") else u
            for u in urls
            if "://" not in u or u.startswith("file://")
        ]
        if local and len(local) == len(urls) and not any(Path(p).is_dir() for p in local):
            shown = local[0] if len(local) == 1 else ", ".join(local)
            raise MzstoreError(f"no store at {shown}: the directory does not exist (give --root or --node)")
    opened = [
        open_node(u, endpoint_url=s3_endpoint_url) if s3_endpoint_url and u.startswith("s3://") else open_node(u)
        for u in urls
    ]
    try:
        return Store(opened, replicas)
    except MzstoreError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command()
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
@click.option(
    "--http",
    envvar="MZSTORE_HTTP",
    default="auto",
    show_default=True,
    metavar="HOST:PORT|auto|off",
    help="The HTTP data plane (blobs, /metrics, /healthz): auto = the gRPC port + 1 on the same host [env MZSTORE_HTTP].",
)
@click.option(
    "--http-advertise",
    envvar="MZSTORE_HTTP_ADVERTISE",
    metavar="URL",
    help="Blob URL base told to clients (a proxy, CDN or site cache in front of the HTTP plane) "
    "[env MZSTORE_HTTP_ADVERTISE].",
)
@click.option(
    "--public-blobs", is_flag=True, help="Let anonymous clients read blobs over HTTP (digests are capabilities)."
)
@click.option(
    "--public-hub",
    is_flag=True,
    help="Let anonymous clients read models through the Hugging Face face (HF_ENDPOINT=http://HOST:PORT).",
)
@click.option(
    "--s3",
    "s3",
    envvar="MZSTORE_S3",
    metavar="HOST:PORT",
    default=None,
    help="Serve a read-only S3 API here (AWS_ENDPOINT_URL for boto3, the Run:ai streamer…) [env MZSTORE_S3].",
)
@click.option("--s3-bucket", default="mzstore", show_default=True, help="The S3 face's bucket name.")
@click.option("--public-s3", is_flag=True, help="Serve unsigned S3 requests even with a token file.")
@click.option("--no-presign", is_flag=True, help="Stream blobs on S3 nodes instead of redirecting to presigned URLs.")
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
    http: str,
    http_advertise: str | None,
    public_blobs: bool,
    public_hub: bool,
    s3: str | None,
    s3_bucket: str,
    public_s3: bool,
    no_presign: bool,
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
    settings = cli_settings()
    if upstream is not None:
        from mzstore.settings import server_address

        try:
            upstream = server_address(upstream)
        except MzstoreError as exc:
            raise click.UsageError(f"--upstream: {exc}") from None
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
    http_at: str | None = None if http.lower() == "off" else http
    if http_at is not None and http_at != "auto":
        _check_port_free(http_at, "--http")
    elif http_at == "auto" and int(listen.rpartition(":")[2]):
        _check_port_free(
            f"{listen.rpartition(':')[0]}:{int(listen.rpartition(':')[2]) + 1}", "--http (auto: the gRPC port + 1)"
        )
    try:
        run(
            store,
            listen,
            settings,
            upstream=upstream,
            upstream_ttl=upstream_ttl,
            auth=token_file,
            tls=tls,
            http=http_at,
            http_advertise=http_advertise,
            public_blobs=public_blobs,
            public_hub=public_hub,
            s3=s3,
            s3_bucket=s3_bucket,
            public_s3=public_s3,
            presign=not no_presign,
        )
    except OSError as exc:
        raise MzstoreError(f"cannot serve on {listen}: {exc}") from None
    # The grace period is over: work still running (an ingest whose push was cut off) must not keep
    # the process alive, as its pool threads would at interpreter exit. Everything acknowledged was
    # fsynced at its commit; a cut-off push leaves only temp files, which the next start sweeps.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@cli.group()
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
@click.option(
    "--s3",
    "s3",
    is_flag=True,
    help="An S3 access key and secret for the S3 face (SigV4; the secret is stored in the file) instead of a token.",
)
def token_add(name: str, scopes: str, prefixes: tuple[str, ...], token_file: str, s3: bool) -> None:
    """Create a token NAME, append its hash to the token file and print the token (shown once).

    With --s3: create an S3 access key id and secret, append them, and print them as AWS_* variables.
    """
    import os

    from mzstore.server.auth import new_s3_credentials, new_token, parse_token_file, s3_line, token_line

    try:
        if s3:
            key, secret = new_s3_credentials()
            line = s3_line(name, key, secret, scopes, prefixes)
            shown = f"AWS_ACCESS_KEY_ID={key}\nAWS_SECRET_ACCESS_KEY={secret}"
        else:
            secret = new_token()
            line = token_line(name, secret, scopes, prefixes)
            shown = secret
    except MzstoreError as exc:
        raise click.UsageError(str(exc)) from None
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")
    with open(token_file) as f:
        parse_token_file(f.read(), token_file)  # fail now, not at the server's next start
    click.echo(shown)


def _admin_report(report: Any, as_json: bool, summary: str) -> None:
    if as_json:
        emit(report.to_dict())
    else:
        click.echo(summary)
        for label in ("missing", "corrupt", "lost", "diverged", "repaired", "deleted"):
            for item in getattr(report, label):
                click.echo(f"  {label}: {item}")
    if not report.ok:
        raise MzstoreError(
            f"{len(report.lost)} lost, {len(report.missing)} missing, {len(report.corrupt)} corrupt, "
            f"{len(report.diverged)} tags disagreeing"
        )


@cli.command()
@storage_options
@click.option(
    "--repair",
    is_flag=True,
    help="Rewrite missing or corrupt copies from intact ones; give every node each tag's winner.",
)
@json_option
def fsck(
    root: str | None, nodes: tuple[str, ...], replicas: int, s3_endpoint_url: str | None, repair: bool, as_json: bool
) -> None:
    """Verify every blob and manifest on every node, and that the nodes agree on every tag
    (exit 1 if anything is missing or corrupt, or a tag's nodes disagree)."""
    from mzstore.storage.admin import fsck as run

    report = run(_open_store(root, nodes, replicas, s3_endpoint_url, existing=True), repair=repair)
    if repair and report.repaired and not report.lost:
        report.missing.clear()
        report.corrupt.clear()
        report.diverged.clear()
    _admin_report(
        report,
        as_json,
        f"checked {report.manifests} manifests, {report.blobs} blobs and {report.tags} tags: "
        f"{len(report.missing)} missing, {len(report.corrupt)} corrupt, {len(report.lost)} lost, "
        f"{len(report.diverged)} tags disagreeing, {len(report.repaired)} repaired",
    )


@cli.command()
@storage_options
@json_option
def rebalance(
    root: str | None, nodes: tuple[str, ...], replicas: int, s3_endpoint_url: str | None, as_json: bool
) -> None:
    """Move blobs to the nodes placement now assigns them (after adding or removing nodes)."""
    from mzstore.storage.admin import rebalance as run

    report = run(_open_store(root, nodes, replicas, s3_endpoint_url, existing=True))
    share = report.moved / report.copies if report.copies else 0.0
    _admin_report(
        report, as_json, f"{report.blobs} blobs: moved {report.moved} of {report.copies} copies ({share:.1%})"
    )


@cli.command()
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

    report = run(_open_store(root, nodes, replicas, s3_endpoint_url, existing=True), grace_s=grace)
    _admin_report(
        report,
        as_json,
        f"deleted {len(report.deleted)} objects, kept {report.kept_young} younger than the grace period",
    )
