"""apVisit files: one visit of one star, in the observed frame, on each chip's own wavelength solution.

Layout: HDU1 flux, HDU2 flux error, HDU3 APOGEE_PIXMASK bitmask, HDU4 wavelength (Angstrom, vacuum), each
``(3 chips, 4096)`` with the chips, and the pixels within a chip, in descending wavelength. The reader returns one
spectrum with the three chips concatenated in ascending wavelength (12288 pixels), ``rest_frame=False``.

Velocity: ``v_rel_known`` is the star's line-of-sight velocity relative to the observer, the shift to remove
before comparing with a rest-frame model (positive = redshift). It is the header card ``VRAD`` ("doppler shift
(km/s)"), which the APOGEE pipeline measured directly on this observed-frame spectrum. In the real files
``VRAD = VHELIO - BC`` (apVisit-r13-5095-55844-128: -33.1228 - 11.2978 = -44.4206 km/s;
apVisit-r13-9518-57729-104: -82.0528 + 14.5808 = -67.4720 km/s): VHELIO is barycentric and BC the barycentric
correction of the observer. When VRAD is absent, ``VHELIO - BC`` is used, then the ``VREL`` column of the
visit table (HDU11), else NaN.

Quality: ``meta["starflag"]`` and ``meta["vscatter"]`` are the header's STARFLAG and VSCATTER (km/s).

Identification: HDU1-HDU4 are two-dimensional images, HDU3 holds integers and HDU4 floats, and there is no
log-linear wavelength solution (CRVAL1) in HDU1 or the primary header (which apStar files have).
"""
from __future__ import annotations

import numpy as np

from ..core.spectrum import Spectrum
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

__all__ = ["ApVisitReader", "apvisit_v_rel"]

APVISIT_SHAPE = (3, 4096)  # chips, pixels per chip


def apvisit_v_rel(primary, table=None) -> float:
    """Velocity (km/s) of the star relative to the observer for an apVisit header (see the module docstring)."""
    vrad = header_float(primary, "VRAD")
    if np.isfinite(vrad):
        return vrad
    vhelio, bc = header_float(primary, "VHELIO"), header_float(primary, "BC")
    if np.isfinite(vhelio) and np.isfinite(bc):
        return vhelio - bc
    if table is not None:
        names = {n.lower(): n for n in table.names}
        if "vrel" in names and len(table):
            return float(table[names["vrel"]][0])
    return float("nan")


@register
class ApVisitReader(SpectrumReader):
    """Reader of apVisit files: one ``apvisit`` spectrum per file, observed frame."""

    format_name = "apVisit"

    @classmethod
    def identify(cls, hdul) -> bool:
        if len(hdul) < 5 or not all(is_image_hdu(hdul[i]) for i in (1, 2, 3, 4)):
            return False
        if any(hdul[i].header.get("NAXIS") != 2 for i in (1, 2, 3, 4)):
            return False
        if hdul[3].header.get("BITPIX", -32) < 0 or hdul[4].header.get("BITPIX", 8) > 0:
            return False
        return "CRVAL1" not in hdul[1].header and "CRVAL1" not in hdul[0].header

    @classmethod
    def read(cls, hdul, path, coadd_only=False):
        primary = hdul[0].header
        flux, error, mask, wavelength = (np.asarray(hdul[i].data) for i in (1, 2, 3, 4))
        shapes = {flux.shape, error.shape, mask.shape, wavelength.shape}
        if len(shapes) != 1:
            raise SpectrumFileError(
                path, f"apVisit flux {flux.shape}, error {error.shape}, mask {mask.shape} and wavelength "
                f"{wavelength.shape} shapes differ"
            )
        if flux.shape != APVISIT_SHAPE:
            raise SpectrumFileError(path, f"apVisit arrays are {flux.shape}; the format has {APVISIT_SHAPE} "
                                    "(chips, pixels)")
        wavelength = wavelength.astype(np.float64).ravel()
        if not np.all(np.isfinite(wavelength) & (wavelength > 0)):
            raise SpectrumFileError(path, "apVisit wavelength (HDU4) has non-finite or non-positive values")
        # Chips and pixels are stored in descending wavelength; sort rather than reverse so any chip order works.
        order = np.argsort(wavelength, kind="stable")
        f, ivar = ivar_from_error(flux.ravel()[order], error.ravel()[order])
        table = None
        if len(hdul) > 11 and is_table_hdu(hdul[11]):
            table = hdul[11].data
        meta = {
            "ra": header_float(primary, "RA"),
            "dec": header_float(primary, "DEC"),
            "mjd": header_value(primary, "MJD5"),
            "plate": header_str(primary, "PLATE"),
            "fiber": header_value(primary, "FIBERID"),
            "jd": header_float(primary, "JD-MID"),
            "vhelio": header_float(primary, "VHELIO"),
            "bc": header_float(primary, "BC"),
            "starflag": header_value(primary, "STARFLAG"),
            "vscatter": header_float(primary, "VSCATTER"),
        }
        if table is not None and len(table):
            names = {n.lower(): n for n in table.names}
            if "field" in names:
                meta["field"] = table[names["field"]][0]
        return [Spectrum(
            wavelength=wavelength[order], flux=f, ivar=ivar, pixel_flags=mask.ravel()[order].astype(np.int64),
            obj=header_str(primary, "OBJID"), snr=header_float(primary, "SNR"),
            telescope=header_str(primary, "TELESCOP").lower(), path=str(path), hdu=1, row=0,
            spectrum_type="apvisit", rest_frame=False, v_rel_known=apvisit_v_rel(primary, table),
            meta={k: to_python(v) for k, v in meta.items()},
        )]
