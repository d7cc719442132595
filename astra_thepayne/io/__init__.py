"""Readers of APOGEE spectrum files: apStar, apVisit, mwmStar, mwmVisit and aspcapStar.

>>> from astra_thepayne.io import read_spectra
>>> spectra = read_spectra("apStar-dr17-2M17335483-2753043.fits")   # coadd + 3 visits
>>> [s.spectrum_type for s in spectra]
['apstar_coadd', 'apstar_visit', 'apstar_visit', 'apstar_visit']

The format is detected from the file's content (headers and HDU layout), never from its name, so renamed or
gzipped files read the same. Every reader returns :class:`~astra_thepayne.core.spectrum.Spectrum` objects whose
``ivar`` is finite and >= 0 and whose ``flux`` is finite: a pixel without information (NaN flux, error <= 0 or
not finite, chip gaps) has ivar 0. ``pixel_flags`` are the file's raw APOGEE_PIXMASK bits; the fitter decides
which bits to mask. Rest-frame spectra (apStar, mwmStar, mwmVisit, aspcapStar) come on the 8575-pixel apStar
grid; apVisit spectra stay in the observed frame with ``v_rel_known`` set.

A file that cannot be read raises :class:`SpectrumFileError` (a ``ValueError``) whose message is one line naming
the file and the problem. Astropy warnings are caught and logged (``logging`` at debug level), never printed.

Adding a format: write a module with a :class:`SpectrumReader` subclass decorated with :func:`register` and import
it below (see :mod:`astra_thepayne.io.base`).
"""
from __future__ import annotations

import os
from pathlib import Path

# Importing the format modules registers their readers. Registration order would matter only if two formats could
# claim one file, which the identification rules avoid (the tests check that each file is claimed by one reader).
from . import apstar, apvisit, aspcap, mwm  # noqa: F401
from .base import SpectrumFileError, SpectrumReader, open_fits, register, registered_readers

__all__ = [
    "read_spectra", "spectra_by_position", "spectrum_at", "detect_format", "iter_spectrum_files", "SpectrumFileError",
    "SpectrumReader", "register",
    "registered_readers", "FITS_SUFFIXES",
]

#: File name endings that directory scans pick up (compared case-insensitively).
FITS_SUFFIXES = (".fits", ".fits.gz")

_FORMATS = "apStar, apVisit, mwmStar, mwmVisit, aspcapStar"


def _identify(hdul, path) -> type[SpectrumReader]:
    for reader in registered_readers():
        try:
            if reader.identify(hdul):
                return reader
        except Exception:  # a malformed header is simply "not this format"
            continue
    kinds = ", ".join(f"{type(h).__name__}" for h in hdul[:6]) + (", ..." if len(hdul) > 6 else "")
    raise SpectrumFileError(path, f"not a recognised APOGEE spectrum file ({_FORMATS}); it holds {kinds}")


def detect_format(path) -> str:
    """The format of an APOGEE spectrum file, from its content.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file (optionally gzipped).

    Returns
    -------
    str
        ``"apStar"``, ``"apVisit"``, ``"mwmStar"``, ``"mwmVisit"`` or ``"aspcapStar"``.

    Raises
    ------
    SpectrumFileError
        When the file is missing, empty, not FITS, truncated or of no known format.
    """
    with open_fits(path) as hdul:
        return _identify(hdul, os.fspath(path)).format_name


def read_spectra(path, coadd_only: bool = False) -> list:
    """All spectra in an APOGEE spectrum file.

    Parameters
    ----------
    path : str or os.PathLike
        apStar, apVisit, mwmStar, mwmVisit or aspcapStar file (optionally gzipped); the format is detected from
        the content.
    coadd_only : bool, default False
        For apStar files, return only the coadd (row 0) instead of the coadd and every visit row.

    Returns
    -------
    list of Spectrum
        apStar: the coadd, then one spectrum per visit (none with one visit). apVisit, aspcapStar: one.
        mwmStar/mwmVisit: one per non-empty APOGEE row (APO rows first, then LCO). May be empty for an mwm file
        without APOGEE data.

    Raises
    ------
    SpectrumFileError
        One line naming the file and the problem.
    """
    path_str = os.fspath(path)
    with open_fits(path_str) as hdul:
        reader = _identify(hdul, path_str)
        try:
            return reader.read(hdul, path_str, coadd_only=coadd_only)
        except SpectrumFileError:
            raise
        except Exception as exc:
            # open_fits names truncation as the cause when astropy warned about it; otherwise say what failed.
            raise SpectrumFileError(
                path_str, f"could not read {reader.format_name} data ({type(exc).__name__}: {exc})"
            ) from exc


def spectra_by_position(path) -> dict:
    """``{(hdu, row): Spectrum}`` of every spectrum in the file (what a registered spectrum row points at)."""
    return {(spectrum.hdu, spectrum.row): spectrum for spectrum in read_spectra(path)}


def spectrum_at(spectra: dict, path, hdu: int, row: int):
    """The spectrum at ``(hdu, row)`` of :func:`spectra_by_position`'s ``spectra`` of ``path``; a LookupError that
    names the file and the position when the file holds none there (any more)."""
    try:
        return spectra[(hdu, row)]
    except KeyError:
        raise LookupError(f"{os.fspath(path)}: no spectrum at HDU {hdu}, row {row}") from None


def iter_spectrum_files(paths):
    """Spectrum files named by ``paths``, directories searched recursively.

    Parameters
    ----------
    paths : str, os.PathLike or iterable of them
        Files and directories. A file given by name is yielded whatever its name (the reader checks its content);
        inside directories only names ending in one of :data:`FITS_SUFFIXES` (any case) are taken, hidden files
        and folders are skipped, and the files are yielded in sorted path order.

    Yields
    ------
    pathlib.Path
        Each file once, in argument order.

    Raises
    ------
    SpectrumFileError
        For a path that does not exist.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    seen = set()
    for entry in paths:
        entry = Path(entry)
        if entry.is_dir():
            found = []
            for root, dirs, files in os.walk(entry):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                found.extend(Path(root) / name for name in files
                             if not name.startswith(".") and name.lower().endswith(FITS_SUFFIXES))
            candidates = sorted(found)
        elif entry.exists():
            candidates = [entry]
        else:
            raise SpectrumFileError(entry, "no such file or directory")
        for candidate in candidates:
            key = os.path.realpath(candidate)
            if key not in seen:
                seen.add(key)
                yield candidate
