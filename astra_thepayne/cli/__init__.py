"""The ``thepayne`` command line: a thin click layer over the library, one module per command.

Errors become one line on stderr: exit 2 for bad usage or configuration, 1 for anything unexpected
(with the traceback only under ``--verbose``).
"""
from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from .. import __version__
from ..errors import ConfigurationError

__all__ = ["main", "cli"]

# (module, attribute) of every subcommand; each module owns one command or command group.
_COMMANDS = {
    "fit": ("fit", "fit"),
    "init": ("db_commands", "init"),
    "astra-init": ("db_commands", "astra_init"),
    "ingest": ("db_commands", "ingest"),
    "run": ("db_commands", "run"),
    "export": ("db_commands", "export"),
    "products": ("products", "products"),
    "noise-model": ("db_commands", "noise_model"),
    "report": ("report", "report"),
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
# the version the package stamps on its results (v_thepayne), not the installed metadata, which an editable install
# freezes at install time
@click.version_option(version=__version__, prog_name="thepayne")
@click.pass_context
def cli(ctx, database_url, verbose):
    """The Payne: neural-network stellar labels for APOGEE spectra."""
    ctx.ensure_object(dict)
    if ctx.invoked_subcommand != "astra-init":
        # the standalone commands always use the project's own runner and tables: importing sdss-astra (where it is
        # installed) would only cost seconds and print Astra's configuration warnings; their workers inherit this
        os.environ.setdefault("THEPAYNE_NO_ASTRA", "1")
    ctx.obj["database_url"] = database_url
    ctx.obj["verbose"] = verbose
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


_RESUME = {
    "run": "the results committed so far are kept; run the same `thepayne run` command again to fit the rest",
    "slurm": "jobs already submitted keep running (see squeue); run `thepayne slurm` again to submit what is "
             "still pending",
    "fit": "nothing was written; run the same `thepayne fit` command again",
    "products": "files written so far are complete and kept; run the same `thepayne products` command again to "
                "write the rest",
    "ingest": "files registered so far are kept; run the same `thepayne ingest` command again (nothing is "
              "registered twice)",
    "demo": "the results committed so far are kept; run `thepayne demo` again to continue (nothing is fitted twice)",
    "export": "no catalogue was written; run the same `thepayne export` command again",
    "report": "no report was written; run the same `thepayne report` command again",
    "train": "no network was written; run the same `thepayne train` command again",
    "noise-model": "run the same `thepayne noise-model` command again (applying always starts from raw_e_*)",
}


def _interrupted_message(argv) -> str:
    """One line after Ctrl-C: what was kept and how to resume."""
    command = next((arg for arg in argv if arg in _COMMANDS), None)
    how = _RESUME.get(command or "", "run the command again")
    return f"thepayne{' ' + command if command else ''}: interrupted (Ctrl-C), workers stopped; {how}"


def _database_name() -> str:
    try:
        from ..db.database import database_proxy

        database = database_proxy.obj
    except Exception:
        return "the database"
    return getattr(database, "thepayne_url", None) or "the database"


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def explain(exc) -> str | None:
    """One line naming the cause, the file or server, and what to do, for failures whose own message hides it."""
    import errno

    # SQLite rolls a transaction back by itself when the disk is full; peewee's own rollback then fails with
    # "cannot rollback - no transaction is active", which hides the cause: look at the exception being handled
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__context__
    for item in chain:
        if isinstance(item, OSError) and item.errno in (errno.ENOSPC, errno.EDQUOT):
            where = item.filename or "a file"
            return (f"no space left on the device (or quota exceeded) writing {where}: free some space or point "
                    "THEPAYNE_OUTPUT_DIR (or MWM_ASTRA) at a larger disk, then run the same command again "
                    "(results committed so far are kept)")
    names = [f"{type(item).__module__}.{type(item).__name__}" for item in chain]
    texts = [_first_line(item).lower() for item in chain]
    for text in texts:
        if "database or disk is full" in text or "disk i/o error" in text:
            return (f"{_database_name()}: {text} (SQLite could not write its file): free space on that disk "
                    "or move the database, then run the same command again (committed results are kept)")
    for item, name, text in zip(chain, names, texts, strict=True):
        postgres = name.startswith("psycopg2") or "postgres" in _database_name()
        if postgres and (("interfaceerror" in name.lower() and "closed" in text)
                         or "server closed the connection" in text or "terminating connection" in text
                         or "could not connect" in text or "connection refused" in text
                         or "no connection to the server" in text):
            return (f"lost the connection to the database server {_database_name()} ({_first_line(item)}): check "
                    "that the server is running and reachable, then run the same command again (committed results "
                    "are kept)")
    return None


def main(argv=None) -> int:
    """Entry point of the ``thepayne`` script; returns the exit code."""
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    try:
        result = cli.main(args=argv, prog_name="thepayne", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            click.echo(_interrupted_message(argv if argv is not None else sys.argv[1:]), err=True)
            return 130
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
        click.echo(_interrupted_message(argv if argv is not None else sys.argv[1:]), err=True)
        return 130
    except Exception as exc:
        if verbose:
            raise
        explained = explain(exc)
        if explained:
            click.echo(f"Error: {explained}", err=True)
            return 1
        click.echo(f"Error: unexpected {type(exc).__name__}: {exc} (rerun with --verbose for the traceback)", err=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
