"""``thepayne demo``: the whole pipeline on the embedded default, in one working folder."""
from __future__ import annotations

from pathlib import Path

import click

__all__ = ["demo"]


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("thepayne-demo"), show_default=True,
              help="Folder for the database, spectra, catalogues, plots and model arrays.")
@click.option("--synthetic", type=click.IntRange(min=0, max=100), default=6, show_default=True,
              help="Number of synthetic stars drawn from the demonstration network.")
@click.pass_context
def demo(ctx, workdir, synthetic):
    """Run the pipeline end to end: SQLite database, real APOGEE files, synthetic stars with known labels,
    fit, catalogue, plots. Uses the bundled demonstration network (a toy model, not for science)."""
    from ..pipeline.demo import format_report, run_demo

    database_url = ctx.obj.get("database_url") if ctx.obj else None
    click.echo("The Payne demo, with the bundled DEMONSTRATION network (toy line model, not for science).", err=True)
    report = run_demo(workdir, database_url=database_url, n_synthetic=synthetic)
    click.echo(format_report(report))
    return 0
