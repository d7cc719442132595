"""The ``thepayne`` command line: a thin click layer over the library, one module per command.

Errors become one line on stderr: exit 2 for bad usage or configuration, 1 for anything unexpected
(with the traceback only under ``--verbose``).
"""
from __future__ import annotations

import importlib
import logging
import sys

import click

from ..errors import ConfigurationError

__all__ = ["main", "cli"]

# (module, attribute) of every subcommand; each module owns one command or command group.
_COMMANDS = {
    "fit": ("fit", "fit"),
    "init": ("db_commands", "init"),
    "ingest": ("db_commands", "ingest"),
    "run": ("db_commands", "run"),
    "export": ("db_commands", "export"),
    "noise-model": ("db_commands", "noise_model"),
    "slurm": ("slurm", "slurm"),
    "train": ("train", "train"),
    "demo": ("demo", "demo"),
}


class _LazyGroup(click.Group):
    """Imports a subcommand's module only when it is used, so `thepayne --help` stays fast."""

    def list_commands(self, ctx):
        return sorted(_COMMANDS)

    def get_command(self, ctx, name):
        if name not in _COMMANDS:
            return None
        module, attr = _COMMANDS[name]
        try:
            return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        except (ImportError, AttributeError) as exc:  # one broken command must not break the others
            reason = str(exc)

            @click.command(name, help=f"(unavailable: {reason})")
            def _unavailable():
                raise click.ClickException(f"`thepayne {name}` is unavailable: {reason}")

            return _unavailable


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--database", "database_url", metavar="URL", default=None,
              help="sqlite:///path.db or postgresql://user:pass@host:port/dbname[?schema=NAME]. "
                   "Default: $THEPAYNE_DATABASE_URL, else $ASTRA_DATABASE_PATH, else sqlite:///thepayne.db.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
@click.version_option(package_name="astra-thepayne", prog_name="thepayne")
@click.pass_context
def cli(ctx, database_url, verbose):
    """The Payne: neural-network stellar labels for APOGEE spectra."""
    ctx.ensure_object(dict)
    ctx.obj["database_url"] = database_url
    ctx.obj["verbose"] = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main(argv=None) -> int:
    """Entry point of the ``thepayne`` script; returns the exit code."""
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        result = cli.main(args=argv, prog_name="thepayne", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 1
    except click.UsageError as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        return 2
    except ConfigurationError as exc:
        if verbose:
            raise
        click.echo(f"Error: {exc}", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"Error: {exc.format_message()}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        return 130
    except Exception as exc:
        if verbose:
            raise
        click.echo(f"Error: unexpected {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)", err=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
