"""Database commands: ``init``, ``astra-init``, ``ingest``, ``run``, ``export`` and ``noise-model apply``.

Each is a thin layer over the library (:mod:`astra_thepayne.db`, :mod:`astra_thepayne.pipeline.ingest`,
:mod:`astra_thepayne.pipeline.work_queue`, :mod:`astra_thepayne.pipeline.catalogue`,
:mod:`astra_thepayne.pipeline.noise_model`); the database comes from the global ``--database`` option, else the
lookup order of README.md's "Commands" section (:func:`astra_thepayne.config.resolve_database_url`).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import click

from ..errors import ConfigurationError
from .options import fit_options, single_process_hint

__all__ = ["init", "astra_init", "ingest", "run", "export", "noise_model"]


def _database(ctx, check_schema=True):
    from ..db.database import connect
    from ..db.migrate import require_schema

    database = connect(ctx.obj.get("database_url") if ctx.obj else None)
    if check_schema:
        require_schema(database)
    return database


@click.command("init")
@click.pass_context
def init(ctx):
    """Create or upgrade the database schema (idempotent)."""
    from ..db.migrate import available_migrations, upgrade

    database = _database(ctx, check_schema=False)
    try:
        applied = upgrade(database)
    except ConfigurationError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"cannot initialise {database.thepayne_url}: {str(exc).strip().splitlines()[0]}") \
            from None
    latest = available_migrations()[-1]
    if applied:
        click.echo(f"{database.thepayne_url}: applied {', '.join(applied)}; schema at {latest}")
    else:
        click.echo(f"{database.thepayne_url}: schema up to date ({latest})")


@click.command("astra-init")
@click.pass_context
def astra_init(ctx):
    """Create, in Astra's database (from Astra's own configuration), the tables the_payne needs under Astra.

    Run it once, where sdss-astra is installed, before the first `astra execute` / `astra run` of
    astra_thepayne.the_payne: it creates the result table (the_payne, or $THEPAYNE_ASTRA_TABLE), the spectrum tables
    the task reads by default and the tables they refer to, each only if missing (idempotent).
    """
    from ..pipeline.astra_binding import integration
    from ..pipeline.astra_setup import prepare_astra_database

    if ctx.obj and ctx.obj.get("database_url"):
        raise click.UsageError("astra-init uses Astra's own configuration ($ASTRA_DATABASE_PATH or Astra's config "
                               "file); --database does not apply to it")
    astra = integration()
    if not astra.available:
        raise ConfigurationError(f"astra-init needs the Astra integration: {astra.reason}; install "
                                 "sdss-astra in this environment (the standalone schema is made by `thepayne init`)")
    database = astra.result_model._meta.database
    where = str(getattr(database, "database", "") or "Astra's database")
    try:
        summary = prepare_astra_database(astra.result_model, astra.input_models, where=f"Astra's database {where}")
    except ConfigurationError:
        raise
    except Exception as exc:
        raise ConfigurationError(f"cannot prepare Astra's database {where}: {str(exc).strip().splitlines()[0]}") \
            from None
    click.echo(f"thepayne astra-init: {summary}")


@click.command("ingest")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.pass_context
def ingest(ctx, paths):
    """Register the spectra in PATHS (files, or folders searched recursively for *.fits[.gz]) and their sources.

    Re-ingesting a file adds nothing. Unreadable files are reported and skipped.
    """
    from ..pipeline.ingest import ingest as _ingest

    _database(ctx)
    summary = _ingest(paths, progress=True)
    if summary.skipped and not summary.files:
        raise ConfigurationError(f"none of the {len(summary.skipped)} file(s) is a readable spectrum file "
                                 f"(first: {summary.skipped[0][1]})")
    click.echo(str(summary))


#: Spectra that `thepayne run` claims, fits and commits together by default (numpy engine)
DEFAULT_RUN_BATCH = 100


@click.command("run")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Fit at most N spectra (the page size with --page).")
@click.option("--page", type=click.IntRange(min=1), default=None,
              help="1-based page of --limit registered spectra, in primary-key order (stable slices).")
@click.option("--tag", default="", show_default=True, help="Tag of the results (part of their uniqueness key).")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Spectra claimed, fitted and committed together [default: 100; with a --device, at least the "
                   "device's batch: 2048 on a GPU, so that it fits thousands at once].")
@click.option("--pk-min", type=int, default=None, help="Smallest spectrum primary key to consider.")
@click.option("--pk-max", type=int, default=None, help="Largest spectrum primary key to consider.")
@click.option("--retry-failed", is_flag=True,
              help="Also refit the spectra whose result failed (flag_bad), once each; the new row replaces the "
                   "failed one.")
@fit_options
@click.pass_context
def run(ctx, limit, page, tag, processes, batch_size, pk_min, pk_max, retry_failed, model, mask, continuum_pixels,
        v_rad_tolerance, opt_tolerance, sky_lines, persistence, littrow_ghost, error_floor, device):
    """Fit the registered spectra that have no result yet for this model and tag.

    Stores one row per spectrum and its intermediate pickle; safe to run from several processes at once.
    """
    from ..core.pixel_weights import PixelWeights
    from ..pipeline.task import load_fitter
    from ..pipeline.work_queue import run_pending

    if page is not None and limit is None:
        raise click.UsageError("--page needs --limit (the page size)")
    _database(ctx)
    started = time.perf_counter()
    fitter = load_fitter(model, mask, continuum_pixels, opt_tolerance, v_rad_tolerance,
                         PixelWeights.from_options(sky_lines, persistence, littrow_ghost, error_floor), device)
    setup_seconds = time.perf_counter() - started
    hint = single_process_hint("run", device, processes)
    if hint:
        click.echo(hint, err=True)
    if batch_size is None:  # a device fits a whole claimed batch at once: a GPU needs thousands to run at speed
        batch_size = max(DEFAULT_RUN_BATCH, getattr(fitter, "batch_size", 0))
    if fitter.emulator.is_demo:
        click.echo("thepayne run: using the DEMONSTRATION network: results are marked demonstration=true and are "
                   "not for science", err=True)
    summary = run_pending(fitter, tag=tag, limit=limit, page=page, pk_min=pk_min, pk_max=pk_max,
                          batch_size=batch_size, processes=processes, progress=True, setup_seconds=setup_seconds,
                          retry_failed=retry_failed)
    click.echo(f"thepayne run: {summary}")


@click.command("export")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--visits", is_flag=True, help="All-visit catalogue (one row per visit spectrum) instead of all-star.")
@click.option("--tag", default="", show_default=True, help="Export results with this tag.")
@click.option("--any-tag", is_flag=True, help="Export results of every tag (the most recent per source/spectrum).")
@click.option("--model", default=None, help="Only results of this network file (or 'demo').")
@click.pass_context
def export(ctx, path, visits, tag, any_tag, model):
    """Write an astraAllStarThePayne-style FITS catalogue to PATH (HDU1 BOSS empty, HDU2 APOGEE)."""
    from ..core.emulator import PayneEmulator
    from ..pipeline.catalogue import export_catalogue

    _database(ctx)
    sha256 = PayneEmulator.load(model).sha256 if model else None
    n = export_catalogue(path, visits=visits, tag=None if any_tag else tag, model_sha256=sha256)
    click.echo(f"wrote {n} {'visit' if visits else 'star'} row(s) to {path}")
    if n == 0 and not any_tag:
        _hint_other_tags(tag, sha256)


def _hint_other_tags(tag, sha256):
    """After an empty export: name the tags that do have results (the demo's are tagged 'demo')."""
    from ..pipeline.catalogue import tag_counts

    others = {name: count for name, count in tag_counts(sha256).items() if name != tag}
    if others:
        listed = ", ".join(f"{name!r} ({count} results)" for name, count in sorted(others.items()))
        example = next(iter(sorted(others)))
        click.echo(f"hint: no results with tag {tag!r}; the database has results with tag {listed}: add "
                   f"--tag {example or chr(39) * 2} (or --any-tag)", err=True)


@click.group("noise-model")
def noise_model():
    """Apply a noise model (Astra corrections file) to the stored errors."""


@noise_model.command("apply")
@click.argument("corrections_path", metavar="CORRECTIONS.pkl", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tag", default=None, help="Only rows with this tag (default: all rows).")
@click.option("--model", default=None, help="Only rows of this network file (or 'demo').")
@click.pass_context
def apply(ctx, corrections_path, tag, model):
    """Set e_x = scale * raw_e_x + offset (quadrature entries: sqrt((scale raw_e_x)^2 + offset^2)) for every label
    in CORRECTIONS.pkl ((corrections, reference) pickle); S/N-dependent entries use the offset and scale of each
    row's own S/N bin."""
    from ..core.emulator import PayneEmulator
    from ..db.models import ThePayne
    from ..pipeline.noise_model import apply_corrections_to_database, load_corrections

    if not corrections_path.exists():
        raise ConfigurationError(f"corrections file {corrections_path}: does not exist")
    if not corrections_path.is_file():
        raise ConfigurationError(f"corrections file {corrections_path}: not a regular file (a device, folder or "
                                 "pipe); give the .pkl written by `thepayne noise-model calibrate` or by Astra")
    corrections, _reference, sha256 = load_corrections(corrections_path)
    _database(ctx)
    where = None
    if tag is not None:
        where = ThePayne.tag == tag
    if model:
        condition = ThePayne.model_sha256 == PayneEmulator.load(model).sha256
        where = condition if where is None else where & condition
    outcome = apply_corrections_to_database(corrections, sha256=sha256, where=where)
    rows = max(outcome["updated"].values(), default=0)
    click.echo(f"noise model {corrections_path.name}: e_* set for {len(outcome['updated'])} label(s) on {rows} row(s)")
    if outcome["without_snr"]:
        click.echo(f"{outcome['without_snr']} row(s) without a positive S/N left as they were: the file's "
                   "S/N-dependent entries cannot place them in a bin", err=True)
    if outcome["skipped"]:
        click.echo(f"skipped labels without columns: {', '.join(outcome['skipped'])}", err=True)


def _snr_edges_option(ctx, param, value):
    """--snr-bins "30,60,100": the S/N bin edges, checked as the library checks them (exit 2 otherwise)."""
    if value is None:
        return None
    from ..pipeline.noise_model import check_snr_edges

    try:
        return check_snr_edges([float(part) for part in value.split(",") if part.strip()] if value.strip() else [])
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers, e.g. 30,60,100") from None
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc)) from None


@noise_model.command("calibrate")
@click.argument("output", metavar="OUTPUT.pkl", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tag", default="", show_default=True, help="Use results with this tag.")
@click.option("--model", default=None, help="Use results of this network file (or 'demo') only.")
@click.option("--min-pairs", type=click.IntRange(min=3), default=30, show_default=True,
              help="Labels with fewer repeat pairs get no correction; with S/N bins, a bin with fewer is merged with "
                   "a neighbour.")
@click.option("--form", type=click.Choice(["linear", "quadrature"]), default="linear", show_default=True,
              help="linear: e = s raw_e + o (Astra's); quadrature: e = sqrt((s raw_e)^2 + o^2).")
@click.option("--snr-bins", "snr_edges", metavar="EDGES", default=None, callback=_snr_edges_option,
              help="Fit (s, o) per S/N bin: increasing S/N edges, e.g. 30,60,100 (bins <30, 30-60, 60-100, >=100); "
                   "each result is corrected by its own S/N. Astra reads only the S/N-independent offset and scale "
                   "written beside them.")
@click.option("--by-snr", "snr_bins", type=click.IntRange(min=2), default=None, metavar="N",
              help="Like --snr-bins, with N bins of about equal numbers of paired visits (per label).")
@click.pass_context
def calibrate(ctx, output, tag, model, min_pairs, form, snr_edges, snr_bins):
    """Fit offset and scale per label from repeat visits of the same stars (two different exposures each); write
    OUTPUT.pkl (Astra's format; quadrature entries add "form", S/N-dependent ones "snr_edges", "snr_offset" and
    "snr_scale")."""
    from ..core.emulator import PayneEmulator
    from ..pipeline.noise_model import calibrate_from_database, save_corrections

    if snr_edges is not None and snr_bins is not None:
        raise click.UsageError("give --snr-bins or --by-snr, not both")
    _database(ctx)
    sha256 = PayneEmulator.load(model).sha256 if model else None
    corrections, reference = calibrate_from_database(tag=tag, model_sha256=sha256, min_pairs=min_pairs, form=form,
                                                     snr_edges=snr_edges, snr_bins=snr_bins)
    if not corrections:
        most = max(reference["n_pairs"].values(), default=0)
        what = " with an S/N" if "snr" in reference else ""
        raise ConfigurationError(f"not enough repeat visits to calibrate: at most {most} pair(s){what} per label, "
                                 f"--min-pairs is {min_pairs}")
    save_corrections(output, corrections, reference)
    for label, info in reference.get("snr", {}).items():
        for message in info["merged"][:5]:
            click.echo(f"{label}: {message}", err=True)
        if len(info["merged"]) > 5:  # e.g. --by-snr far above the pairs there are: say so once
            click.echo(f"{label}: ... and {len(info['merged']) - 5} more bins merged (the file's reference lists "
                       "them all)", err=True)
        if info["n_without_snr"]:
            click.echo(f"{label}: {info['n_without_snr']} pair(s) left out: a visit without a positive S/N", err=True)
    click.echo(f"wrote corrections for {len(corrections)} label(s) to {output}")
    for label, info in reference.get("snr", {}).items():
        entry = corrections[label]
        if "snr_edges" not in entry:
            click.echo(f"  {label}: one S/N bin ({info['n_pairs'][0]} pairs): offset {entry['offset']:.4g}, "
                       f"scale {entry['scale']:.4g}")
            continue
        def value(v, error):
            return f"{v:.3g}" + (f"±{error:.2g}" if math.isfinite(error) else "")

        cells = [f"{name} ({n} pairs): s {value(s, se)} o {value(o, oe)}" for name, n, s, se, o, oe in
                 zip(info["bins"], info["n_pairs"], entry["snr_scale"], info["scale_err"], entry["snr_offset"],
                     info["offset_err"], strict=True)]
        click.echo(f"  {label}: " + "; ".join(cells))
