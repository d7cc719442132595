"""``thepayne report``: a self-contained HTML page on a run (see :mod:`astra_thepayne.pipeline.report`)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigurationError

__all__ = ["report"]


@click.command("report")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tag", default="", show_default=True, help="Report on results with this tag.")
@click.option("--any-tag", is_flag=True, help="Report on results of every tag.")
@click.option("--model", default=None, help="Only results of this network file (or 'demo').")
@click.option("--no-gallery", is_flag=True, help="Leave out the best/median/worst fit plots (they read the "
                                                  "spectrum files and the network).")
@click.pass_context
def report(ctx, path, tag, any_tag, model, no_gallery):
    """Write one HTML page (plots embedded, opens offline) on the results: counts, flags, Kiel diagram,
    [X/Fe], errors against S/N, reduced chi2, v_rel, noise-model z-scores and the best, median and worst fits."""
    from ..core.emulator import PayneEmulator
    from ..pipeline.catalogue import tag_counts
    from ..pipeline.report import report_counts, write_report
    from .db_commands import _database

    if path.suffix.lower() not in (".html", ".htm"):
        raise ConfigurationError(f"{path}: the report is an .html file")
    database = _database(ctx)
    sha256 = PayneEmulator.load(model).sha256 if model else None
    selected = None if any_tag else tag
    if report_counts(selected, sha256)["total"] == 0:
        others = {name: n for name, n in tag_counts(sha256).items() if name != tag}
        hint = (f"; results exist with tag(s) {', '.join(map(repr, sorted(others)))}: add --tag NAME or --any-tag"
                if others and not any_tag else "")
        raise ConfigurationError(f"no results to report on in {database.thepayne_url} for tag {tag!r}{hint}")
    written = write_report(path, tag=selected, model_sha256=sha256, database_url=database.thepayne_url,
                           gallery=not no_gallery)
    click.echo(f"wrote {written}")
