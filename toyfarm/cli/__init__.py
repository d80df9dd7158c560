"""The ``toyfarm`` command: a thin click group; each area's subcommands live in their own file."""

from __future__ import annotations

import logging
import sys

import click

from toyfarm.cli.generate import generate
from toyfarm.cli.plot import plot
from toyfarm.cli.results import cls, limit
from toyfarm.cli.store import combine, info
from toyfarm.workspace import InputError

__all__ = ["cli", "main"]


@click.group()
@click.version_option(package_name="toyfarm")
def cli() -> None:
    """Toy-based test statistics for pyhf workspaces, thousands of toys per call."""


cli.add_command(generate)
cli.add_command(info)
cli.add_command(cls)
cli.add_command(limit)
cli.add_command(combine)
cli.add_command(plot)


def _quiet_shutdown() -> None:
    # A read that failed on a damaged Zarr chunk leaves zarr's other pending reads behind; asyncio
    # would log each of them at exit, burying the one line that says what is wrong.
    logging.getLogger("asyncio").disabled = True
    sys.unraisablehook = lambda _: None


def main() -> None:
    """Entry point: bad input is one line on stderr and exit status 2, never a traceback."""
    try:
        cli(prog_name="toyfarm", standalone_mode=False)
    except InputError as err:
        click.echo(f"toyfarm: error: {err}", err=True)
        _quiet_shutdown()
        raise SystemExit(2) from None
    except click.exceptions.Abort:
        raise SystemExit(130) from None
    except click.exceptions.NoArgsIsHelpError as err:  # bare `toyfarm`: its message is the help
        err.show()
        raise SystemExit(2) from None
    except click.ClickException as err:
        # click's own form is four lines (usage, hint, blank, error): the error and where to look
        click.echo(f"toyfarm: error: {err.format_message()}", err=True)
        ctx = getattr(err, "ctx", None)
        if ctx is not None:
            click.echo(f"(see {ctx.command_path} --help)", err=True)
        raise SystemExit(2) from None
