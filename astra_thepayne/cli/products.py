"""``thepayne products DIR``: astraStarThePayne / astraVisitThePayne files, one pair per source."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigurationError

__all__ = ["products"]


@click.command("products")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--tag", default="", show_default=True, help="Results with this tag.")
@click.option("--model", default=None, help="Only results of this network file (or 'demo'); default: the most "
                                            "recent result of each spectrum.")
@click.option("--source-pk-min", type=click.IntRange(min=0), default=None,
              help="Smallest source primary key to write (for slicing the work).")
@click.option("--source-pk-max", type=click.IntRange(min=0), default=None,
              help="Largest source primary key to write.")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes reading model arrays and writing files.")
@click.option("--force", is_flag=True, help="Rewrite files that are up to date too.")
@click.pass_context
def products(ctx, directory, tag, model, source_pk_min, source_pk_max, processes, force):
    """Write one astraStarThePayne and one astraVisitThePayne FITS file per source with results, under DIR/star/
    and DIR/visit/. Files that are up to date with the database are left alone; re-running writes only what is
    missing or stale."""
    from ..core.emulator import PayneEmulator
    from ..io.intermediate import check_tag
    from ..pipeline.products import write_products
    from .db_commands import _database

    try:
        check_tag(tag)
    except ValueError as exc:
        raise click.UsageError(f"--tag: {exc}") from None
    if source_pk_min is not None and source_pk_max is not None and source_pk_min > source_pk_max:
        raise click.UsageError(f"--source-pk-min {source_pk_min} is above --source-pk-max {source_pk_max}")
    if directory.exists() and not directory.is_dir():
        raise ConfigurationError(f"{directory}: exists and is not a folder")
    _database(ctx)
    sha256 = PayneEmulator.load(model).sha256 if model else None
    summary = write_products(directory, tag=tag, model_sha256=sha256, processes=processes,
                             source_pk_min=source_pk_min, source_pk_max=source_pk_max, force=force, progress=True)
    for path, reason in summary.failed[:5]:
        click.echo(f"thepayne products: could not write {path}: {reason}", err=True)
    click.echo(f"thepayne products: {summary} in {directory}")
    if summary.sources == 0:
        click.echo(f"thepayne products: no results with tag {tag!r}{' for that network' if model else ''}", err=True)
    return 1 if summary.failed else 0
