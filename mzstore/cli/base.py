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


def connect(
    ctx: click.Context,
    server: str | None,
    cache: bool | None = None,
    direct: bool = False,
    offline: bool | None = None,
) -> Any:
    from mzstore.client import Client
    from mzstore.settings import server_address

    settings = cli_settings()
    try:
        address = server_address(server or settings.server)
    except MzstoreError as exc:
        raise click.UsageError(str(exc)) from None
    ctx.meta["mzstore.server"] = address
    tls_ca = ctx.meta.get("mzstore.tls_ca")
    client = Client(address, settings=settings, cache=cache, direct=direct, tls_ca=tls_ca, offline=offline or None)
    return ctx.with_resource(client)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="mzstore")
def cli() -> None:
    """mzstore: push, pull and serve compressed, sharded models."""
