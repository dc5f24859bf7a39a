"""What every command shares: the ``mzstore`` group, its one error formatter, common options, rendering."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click

from mzstore import __version__
from mzstore.errors import InvalidName, MzstoreError, Unavailable, UsageError
from mzstore.settings import Settings, load_settings


def cli_settings() -> Settings:
    try:
        return load_settings()
    except MzstoreError as exc:
        raise click.UsageError(str(exc)) from None


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextmanager
def progress(total: int, label: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar on a terminal; nothing when stderr is not a TTY or with --json."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False, file=sys.stderr) as bar:
        yield bar.update


def emit(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, sort_keys=True))


def describe_oserror(exc: OSError) -> str:
    """One line for an OS error: what failed and on which path (``Permission denied: /models/x``)."""
    what = exc.strerror or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    return f"{what}{where}"


def run(group: click.Group, args: Sequence[str] | None = None) -> int:
    """Run ``group`` as the ``mzstore`` command; return its exit code.

    Every expected failure is one ``error: …`` line on stderr: usage errors (bad flags,
    a malformed reference) exit 2, failures 1, an interrupt 130. Domain errors are turned
    into lines by :class:`Group`; this adds click's own usage errors (which click would
    print with a usage banner), OS errors (a folder one cannot write, a full disk), and a
    closed pipe (``mzstore ls | head``), which ends quietly.
    """
    try:
        code = group.main(args, prog_name="mzstore", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except click.UsageError as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("interrupted", err=True)
        return 130
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the reader is gone: nothing more to say
        return 141
    except OSError as exc:
        click.echo(f"error: {describe_oserror(exc)}", err=True)
        return 1


class Group(click.Group):
    """Turns domain errors into one line and the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (InvalidName, UsageError) as exc:
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
        "--server",
        "server",
        metavar="HOST[:PORT]",
        help="Server address; port 50051 when none is given [env MZSTORE_SERVER, default 127.0.0.1:50051].",
    )(fn)


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
quiet_option = click.option(
    "-q", "--quiet", is_flag=True, help="No progress bar and no summary: print only the result (a digest, a path)."
)


def file_filters(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--include`` / ``--exclude`` globs over the files of a model (as ``hf download``)."""
    fn = click.option(
        "--exclude", multiple=True, metavar="GLOB", help="Leave out files matching GLOB (e.g. '*.onnx'). Repeatable."
    )(fn)
    return click.option(
        "--include",
        multiple=True,
        metavar="GLOB",
        help="Only files matching GLOB (e.g. '*.json', 'onnx/'); repeatable; default all.",
    )(fn)


def split_server(ref: str) -> tuple[str | None, str]:
    """``HOST:PORT/name[:tag]`` → ``("HOST:PORT", "name[:tag]")``, as ``docker pull`` reads a registry.

    The first ``/``-component names a server when it holds a ``:`` (a port, or an IPv6
    address) or is ``localhost``; model names never do (``a.b/model`` stays a name).
    Other refs come back as they are, with no server.
    """
    first, sep, rest = ref.partition("/")
    if sep and rest and (":" in first or first == "localhost") and "@" not in first:
        return first, rest
    return None, ref


def with_server(server: str | None, *refs: str) -> tuple[str | None, list[str]]:
    """The server the refs name (``HOST:PORT/…``) or ``--server``, and the refs without it.

    Raises:
        click.UsageError: the refs name different servers, or one other than ``--server``.
    """
    named: set[str] = set()
    plain = []
    for ref in refs:
        host, rest = split_server(ref)
        if host is not None:
            named.add(host)
        plain.append(rest)
    if len(named) > 1:
        raise click.UsageError(f"the refs name different servers ({', '.join(sorted(named))})")
    if named and server is not None and named != {server}:
        raise click.UsageError(f"the ref names server {named.pop()} but --server says {server}")
    return (named.pop() if named else server), plain


def connect(
    ctx: click.Context,
    server: str | None,
    cache: bool | None = None,
    direct: bool = False,
    offline: bool | None = None,
    data_plane: str | None = None,
    fsync: bool = True,
) -> Any:
    import dataclasses

    from mzstore.client import Client
    from mzstore.settings import server_address

    settings = cli_settings()
    if not fsync:
        settings = dataclasses.replace(settings, pull_fsync=False)
    try:
        address = server_address(server or settings.server)
    except MzstoreError as exc:
        raise click.UsageError(str(exc)) from None
    ctx.meta["mzstore.server"] = address
    tls_ca = ctx.meta.get("mzstore.tls_ca")
    client = Client(
        address,
        settings=settings,
        cache=cache,
        direct=direct,
        tls_ca=tls_ca,
        offline=offline or None,
        data_plane=data_plane,
    )
    return ctx.with_resource(client)


#: What this build reads and writes, for ``--version`` (constants kept here so ``--version`` imports
#: nothing; ``tests/test_cli_ux.py`` checks them against the modules that define them).
SPEAKS = {
    "manifest": "mzstore.manifest.v1",
    "wire": "mzstore.v1 (gRPC)",
    "codecs": "lossless MZL1, quant MZQ1 (int8, int4, fp8, ecsq, prune), zstd, delta",
    "shards": "safetensors",
}


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(
    version=__version__,
    prog_name="mzstore",
    message="%(prog)s, version %(version)s\n" + "\n".join(f"  {k}: {v}" for k, v in SPEAKS.items()),
)
def cli() -> None:
    """mzstore: push, pull and serve compressed, sharded models."""
