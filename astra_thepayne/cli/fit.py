"""``thepayne fit``: fit spectra straight from files, no database; write a FITS or CSV table and optional plots."""
from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import click
import numpy as np

from ..errors import ConfigurationError
from .options import fit_options, single_process_hint

__all__ = ["fit", "results_table", "summary_table"]

log = logging.getLogger("astra_thepayne.fit")

_IDENTITY_COLUMNS = ("path", "hdu", "row", "obj", "spectrum_type", "telescope")


def results_table(pairs, emulator):
    """An astropy Table of (spectrum-or-None, FitResult, path) triples, one row each, lower-case columns."""
    from astropy.table import Table

    from .. import __version__
    from ..core.labels import describe_flags
    from ..core.result import row_keys

    keys = row_keys(emulator.label_names)
    columns = {name: [] for name in (*_IDENTITY_COLUMNS, *keys, "flag_names", "demonstration")}
    for spectrum, result, path in pairs:
        columns["path"].append(str(path))
        columns["hdu"].append(spectrum.hdu if spectrum else -1)
        columns["row"].append(spectrum.row if spectrum else -1)
        columns["obj"].append(spectrum.obj if spectrum else "")
        columns["spectrum_type"].append(spectrum.spectrum_type if spectrum else "")
        columns["telescope"].append(spectrum.telescope if spectrum else "")
        row = result.as_row()
        if row["starflag"] is None:
            row["starflag"] = -1  # the file has no STARFLAG (a table column cannot hold None)
        for key in keys:
            columns[key].append(row[key])
        columns["flag_names"].append(describe_flags(row["result_flags"], none=""))
        # in every row, so that a CSV (which has no header for such notes) says it in the file itself
        columns["demonstration"].append(bool(emulator.is_demo))
    table = Table(columns)
    table.meta.update({"PACKAGE": "astra_thepayne", "VERSION": __version__, "MODEL": str(emulator.path),
                       "MODELSHA": emulator.sha256 or "", "DEMO": bool(emulator.is_demo)})
    if emulator.is_demo:  # FITS headers are ASCII
        notice = str(emulator.meta.get("description", "demonstration network - not for science"))
        table.meta["NOTICE"] = notice.encode("ascii", "replace").decode().replace("?", "-")
    return table


# Printed digits: whole kelvin for temperatures, hundredths of a dex or km/s elsewhere (never 7.6e+03 K).
_SUMMARY_FORMATS = {"teff": ".0f", "e_teff": ".0f", "reduced_chi2": ".2f"}


def summary_table(table):
    """The few columns ``thepayne fit`` prints without ``--output``, formatted for people, flags by name."""
    show = [c for c in ("obj", "hdu", "row", "teff", "e_teff", "logg", "e_logg", "fe_h", "e_fe_h", "v_rel",
                        "reduced_chi2", "flag_names") if c in table.colnames]
    summary = table[show]
    for column in show:
        if summary[column].dtype.kind == "f":
            summary[column].format = _SUMMARY_FORMATS.get(column, ".3f" if column.startswith("e_") else ".2f")
    if "flag_names" in show:
        summary["flag_names"] = [names or "-" for names in summary["flag_names"]]
        summary.rename_column("flag_names", "flags")
    return summary


def _write(table, path):
    path = Path(path)
    if path.suffix.lower() == ".csv":
        table.write(path, format="ascii.csv", overwrite=True)
    elif path.suffix.lower() in (".fits", ".fit") or path.name.lower().endswith(".fits.gz"):
        from ..pipeline.catalogue import fits_safe

        fits_safe(table).write(path, format="fits", overwrite=True)  # non-ASCII text as UTF-8 bytes
    else:
        raise ConfigurationError(f"--output {path}: use a .fits or .csv file name")


def _os_error_message(path, exc):
    reason = exc.strerror or type(exc).__name__
    return f"{path}: cannot read ({reason})"


def _safe_name(text):
    return re.sub(r"[^A-Za-z0-9+._-]+", "_", text).strip("_")


@click.command("fit")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, readable=False))
@fit_options
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Results table (.fits or .csv). Without it, a short summary table is printed.")
@click.option("--plot-dir", type=click.Path(path_type=Path), default=None,
              help="Write one PNG per spectrum here: data, model, residuals, masked pixels.")
@click.option("--coadd-only", is_flag=True, help="apStar: fit the coadd (row 0) only, not the visits.")
def fit(files, model, mask, continuum_pixels, v_rad_tolerance, opt_tolerance, sky_lines, persistence,
        littrow_ghost, error_floor, device, processes, output, plot_dir, coadd_only):
    """Fit spectra straight from FILES (apStar, apVisit, mwmStar, mwmVisit, aspcapStar; files or folders)."""
    from tqdm import tqdm

    from ..core.pixel_weights import PixelWeights
    from ..core.result import FitResult
    from ..io import SpectrumFileError, iter_spectrum_files, read_spectra
    from ..pipeline.fitter import load_fitter

    if output is not None and output.suffix.lower() not in (".fits", ".fit", ".csv", ".gz"):
        raise ConfigurationError(f"--output {output}: use a .fits or .csv file name")
    try:
        paths = list(iter_spectrum_files(files))
    except SpectrumFileError as exc:
        raise ConfigurationError(str(exc)) from None
    if not paths:
        raise ConfigurationError("no .fits spectrum files found in " + ", ".join(map(str, files)))
    fitter = load_fitter(model, mask, continuum_pixels, opt_tolerance, v_rad_tolerance,
                         PixelWeights.from_options(sky_lines, persistence, littrow_ghost, error_floor), device)
    hint = single_process_hint("fit", device, processes)
    if hint:
        click.echo(hint, err=True)
    emulator = fitter.emulator
    notice = str(emulator.meta.get("description", "")) if emulator.is_demo else ""
    if notice:
        click.echo(f"Note: {notice}", err=True)

    spectra, unreadable = [], []
    for path in paths:
        try:
            spectra.extend(read_spectra(path, coadd_only=coadd_only))
        except (SpectrumFileError, OSError) as exc:  # OSError: permission denied, I/O error, not a regular file
            message = str(exc) if isinstance(exc, SpectrumFileError) else _os_error_message(path, exc)
            log.warning("%s", message)  # one line per unreadable file; it still gets a flagged row
            unreadable.append((None, FitResult.failure(emulator.label_names, message), path))

    start = time.monotonic()
    results = []
    progress = tqdm(total=len(spectra), unit="spectrum", disable=not sys.stderr.isatty() or not spectra)
    for spectrum, result in zip(spectra, fitter.fit_many(spectra, processes=processes), strict=True):
        results.append((spectrum, result, spectrum.path))
        progress.update()
    progress.close()
    elapsed = time.monotonic() - start

    if plot_dir is not None:
        from ..pipeline.plotting import plot_fit

        plot_dir.mkdir(parents=True, exist_ok=True)
        for spectrum, result, _ in results:
            name = _safe_name(f"{Path(spectrum.path).stem}_hdu{spectrum.hdu}_row{spectrum.row}") + ".png"
            plot_fit(spectrum, fitter.prepare(spectrum), result.continuum, result.rectified_model_flux,
                     result.as_row(), plot_dir / name, notice=notice)

    table = results_table(results + unreadable, emulator)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        _write(table, output)
    else:
        click.echo("\n".join(summary_table(table).pformat(max_lines=-1, max_width=-1)))
    if unreadable and not spectra:
        raise ConfigurationError(f"none of the {len(unreadable)} input file(s) could be read (first: "
                                 f"{unreadable[0][1].message}); check the paths and their permissions")
    failed = int(np.sum(table["flag_bad"]))
    flagged = int(np.sum(table["flag_warn"])) - failed
    rate = len(results) / elapsed if elapsed > 0 else float("inf")
    click.echo(f"{len(table)} spectra: {len(table) - failed - flagged} clean, {flagged} flagged, {failed} bad "
               f"({len(unreadable)} unreadable files); {rate:.1f} spectra/s"
               + (f"; wrote {output}" if output else "") + (f"; plots in {plot_dir}" if plot_dir else ""), err=True)
    return 0
