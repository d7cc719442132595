"""apStar files (SDSS-IV DR17 and SDSS-V): combined and visit spectra of one star on the apStar log-lambda grid.

Layout: HDU1 flux, HDU2 flux error, HDU3 APOGEE_PIXMASK bitmask, each ``(nrow, npix)`` (or ``(npix,)`` in old
single-visit files), HDU9 the visit RV table. The wavelength is ``10**(CRVAL1 + CDELT1 * (i + 1 - CRPIX1))``,
in the rest frame.

Rows: with NVISITS > 1, row 0 is the pixel-weighted coadd, row 1 the global-weighted coadd and rows 2.. the
visits. With NVISITS = 1 the coadd of one visit is that visit: DR17 files then hold two rows, row 1 being an all-zero
placeholder (flux, error and mask are 0 everywhere in apStar-dr17-2M19485057+5005279.fits). Such a file gives two
spectra: the coadd (row 0) and the visit (row 1, its slot, carrying row 0's data when row 1 is empty;
``meta["data_row"]`` says which), so that the all-visit catalogue lists every visit, single ones included.

Identification: HDU1-HDU3 are images, HDU3 holds integers (the bitmask) and a log-linear wavelength solution
(CRVAL1/CDELT1) sits in HDU1 or the primary header. apVisit files have no CRVAL1; aspcapStar files have a float
HDU3 (the best fit).

Telescope: the TELESCOP card when present. DR17 apStar files lack it, so it is inferred from the visit file names:
``asVisit`` files come from LCO (``lco25m``), ``apVisit`` files from APO (``apo25m``). The few DR17 stars observed
only with the APO 1-m telescope would be labelled ``apo25m`` by this rule; the header holds nothing better.

Visit S/N: the ``snr`` column of the HDU9 visit table, which is the apVisit file's own S/N (so a visit read from
the apStar and from its apVisit file carries the same value); NaN when the table is missing. The header's
``SNRVIS<n>`` (median S/N per apStar pixel) is kept in ``meta["snr_apstar_pixel"]``; the fit computes its own S/N
(:func:`astra_thepayne.core.preprocess.spectrum_snr`), the same for every spectrum type.

Quality: ``meta["starflag"]`` is the header's STARFLAG (the OR over visits) for the coadd and ``FLAG<n>`` ("STARFLAG
for visit n") for visit n; ``meta["vscatter"]`` the header's VSCATTER (km/s) for every row.
"""
from __future__ import annotations

import functools

import numpy as np

from ..core.spectrum import Spectrum
from ..core.wavelength import APSTAR_NPIX
from .base import (
    SpectrumFileError,
    SpectrumReader,
    header_float,
    header_str,
    header_value,
    is_image_hdu,
    is_table_hdu,
    ivar_from_error,
    register,
    to_python,
)

__all__ = ["ApStarReader", "log_linear_wavelength"]


def log_linear_wavelength(header, npix: int, fallback=None):
    """Wavelength (Angstrom) of a log-linear solution: ``10**(CRVAL1 + CDELT1 * (i + 1 - CRPIX1))``, shape (npix,).

    Cards are taken from ``header``, then from ``fallback``; returns None when neither has CRVAL1 and CDELT1.
    """
    for h in (header, fallback):
        if h is None:
            continue
        crval, cdelt = header_float(h, "CRVAL1"), header_float(h, "CDELT1")
        if np.isfinite(crval) and np.isfinite(cdelt):
            crpix = header_float(h, "CRPIX1", 1.0)
            # a copy: each file's spectra get their own array, as before the cache
            return _log_linear_grid(crval, cdelt, crpix, npix).copy()
    return None


@functools.lru_cache(maxsize=16)
def _log_linear_grid(crval, cdelt, crpix, npix):
    # every apStar file has the same grid: the power of 8575 numbers was a tenth of a file's reading time
    return 10 ** (crval + cdelt * (np.arange(npix) + 1.0 - crpix))


def _telescope(primary) -> str:
    telescope = header_str(primary, "TELESCOP")
    if telescope:
        return telescope.lower()
    sfile = header_str(primary, "SFILE1")
    if sfile.startswith("asVisit"):
        return "lco25m"
    if sfile.startswith("apVisit"):
        return "apo25m"
    return ""


@register
class ApStarReader(SpectrumReader):
    """Reader of apStar files: the coadd (row 0, ``apstar_coadd``) and every visit row (``apstar_visit``)."""

    format_name = "apStar"

    @classmethod
    def identify(cls, hdul) -> bool:
        if len(hdul) < 4 or not all(is_image_hdu(hdul[i]) for i in (1, 2, 3)):
            return False
        if hdul[3].header.get("BITPIX", -32) < 0 or hdul[1].header.get("BITPIX", 8) > 0:
            return False
        for h in (hdul[1].header, hdul[0].header):
            if "CRVAL1" in h and "CDELT1" in h:
                return True
        return False

    @classmethod
    def read(cls, hdul, path, coadd_only=False):
        primary = hdul[0].header
        flux = np.atleast_2d(np.asarray(hdul[1].data, dtype=np.float64))
        error = np.atleast_2d(np.asarray(hdul[2].data, dtype=np.float64))
        mask = np.atleast_2d(np.asarray(hdul[3].data))
        if flux.ndim != 2 or flux.shape != error.shape or flux.shape != mask.shape:
            raise SpectrumFileError(
                path, f"apStar flux {flux.shape}, error {error.shape} and bitmask {mask.shape} shapes differ"
            )
        nrow, npix = flux.shape
        if npix != APSTAR_NPIX:
            # a cut or foreign array would otherwise be fitted on the pixels it has, and give a clean-looking row
            raise SpectrumFileError(path, f"apStar spectra have {npix} pixels; the format has {APSTAR_NPIX}")
        wavelength = log_linear_wavelength(hdul[1].header, npix, fallback=primary)
        if wavelength is None:
            raise SpectrumFileError(path, "apStar file has no numeric CRVAL1/CDELT1 wavelength solution")
        if not (np.all(np.isfinite(wavelength)) and np.all(np.diff(wavelength) > 0)):
            raise SpectrumFileError(path, "apStar CRVAL1/CDELT1 do not give an increasing, finite wavelength grid")
        nwave = header_value(primary, "NWAVE")
        if nwave is not None and int(nwave) != npix:
            raise SpectrumFileError(path, f"apStar header says NWAVE={nwave} but the spectra have {npix} pixels")

        nvisits = header_value(primary, "NVISITS")
        nvisits = int(nvisits) if nvisits is not None else (nrow - 2 if nrow > 2 else 1)
        if nvisits > 1 and nrow < 3 and not coadd_only:
            raise SpectrumFileError(path, f"apStar header says NVISITS={nvisits} but HDU1 has {nrow} row(s)")
        if coadd_only:
            rows = [0]
        elif nvisits <= 1:
            rows = [0, 1] if nrow >= 2 else [0]  # the single visit is row 0's data too (see the docstring)
        else:
            rows = [0, *range(2, nrow)]

        # only visit rows use the HDU9 table, whose parsing costs more than the rest of a coadd-only read
        visit_table = _visit_table(hdul) if rows != [0] else None
        common = {
            "ra": header_float(primary, "RA"),
            "dec": header_float(primary, "DEC"),
            "field": header_str(primary, "FIELD"),
            "nvisits": nvisits,
            "vscatter": header_float(primary, "VSCATTER"),  # scatter of the star's visit velocities (km/s)
        }
        obj = header_str(primary, "OBJID")
        telescope = _telescope(primary)
        spectra = []
        for row in rows:
            data_row = row
            if nvisits <= 1 and row == 1 and not (np.any(flux[1]) or np.any(error[1])):
                data_row = 0
            f, ivar = ivar_from_error(flux[data_row], error[data_row])
            meta = dict(common, data_row=data_row)
            if row == 0:
                snr = header_float(primary, "SNR")
                spectrum_type = "apstar_coadd"
                meta["vhelio"] = header_float(primary, "VHELIO")
                meta["starflag"] = header_value(primary, "STARFLAG")  # OR of the visits' STARFLAG
            else:
                visit = row - 2 if nvisits > 1 else 0  # 0-based visit index; header cards count from 1
                spectrum_type = "apstar_visit"
                meta["visit"] = visit + 1
                meta["sfile"] = header_str(primary, f"SFILE{visit + 1}")
                meta["jd"] = header_float(primary, f"JD{visit + 1}")
                meta["fiber"] = header_value(primary, f"FIBER{visit + 1}")
                meta["vhelio"] = header_float(primary, f"VHELIO{visit + 1}")
                meta["bc"] = header_float(primary, f"BC{visit + 1}")
                meta["snr_apstar_pixel"] = header_float(primary, f"SNRVIS{visit + 1}")
                meta["starflag"] = header_value(primary, f"FLAG{visit + 1}")  # "STARFLAG for visit <n>"
                snr = float("nan")
                if visit_table is not None and visit < len(visit_table):
                    names = {n.lower(): n for n in visit_table.names}
                    if "snr" in names:
                        snr = float(visit_table[names["snr"]][visit])
                    if "filename" in names and not meta["sfile"]:
                        meta["sfile"] = to_python(visit_table[names["filename"]][visit])
            spectra.append(Spectrum(
                wavelength=wavelength, flux=f, ivar=ivar, pixel_flags=mask[data_row].astype(np.int64), obj=obj,
                snr=snr, telescope=telescope, path=str(path), hdu=1, row=row, spectrum_type=spectrum_type,
                rest_frame=True, meta={k: to_python(v) for k, v in meta.items()},
            ))
        return spectra


def _visit_table(hdul):
    """The HDU9 visit RV table, or None when the file has none."""
    if len(hdul) > 9 and is_table_hdu(hdul[9]):
        return hdul[9].data
    return None
