"""The ``cryodeploy`` command line: one click group whose subcommands are imported lazily.

Each subcommand lives in ``cryodeploy/cli/<name>.py`` as a thin wrapper over a library
function. Library errors (:class:`~cryodeploy.errors.CryoDeployError`) become one line on
stderr and a non-zero exit here, at the edge.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import sys
from typing import Any

import click

from cryodeploy._version import __version__
from cryodeploy.errors import CryoDeployError, one_line

__all__ = ["cli", "main"]

#: command name -> module under cryodeploy.cli holding a click command of the same name.
COMMANDS: dict[str, str] = {
    "bench": "bench",
    "export": "export",
    "denoise": "denoise",
    "evaluate": "evaluate",
    "info": "info",
    "parity": "parity",
    "preprocess": "preprocess",
    "reference": "reference",
    "train": "train",
    "synth": "synth",
}


class LazyGroup(click.Group):
    """A group that imports a subcommand's module only when that subcommand runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        mod = importlib.import_module(f"{__name__}.{module}")
        cmd = getattr(mod, cmd_name.replace("-", "_"))
        assert isinstance(cmd, click.Command)
        return cmd

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and name not in COMMANDS:
            close = difflib.get_close_matches(name, COMMANDS, n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            ctx.fail(f"No such command {name!r}.{hint} (commands: {', '.join(sorted(COMMANDS))})")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CryoDeployError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {one_line(str(err))}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cryodeploy")
@click.option("--debug", is_flag=True, help="Show full tracebacks and debug logging.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Train, export and deploy cryo-EM micrograph denoising networks."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``cryodeploy`` script and ``python -m cryodeploy``."""
    try:
        cli.main(args=argv, prog_name="cryodeploy", standalone_mode=True)
    except SystemExit:
        raise
    except Exception as err:  # the last line of defence: never a traceback for the user
        if "--debug" in (argv if argv is not None else sys.argv):
            raise
        click.echo(
            f"error: internal error ({type(err).__name__}: {err}); rerun with --debug for details", err=True
        )
        sys.exit(70)
