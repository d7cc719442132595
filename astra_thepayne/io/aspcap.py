"""aspcapStar files (SDSS-IV): the ASPCAP pseudo-continuum-normalised spectrum of one star, rest frame.

Layout: HDU1 normalised flux, HDU2 its error, HDU3 the ASPCAP best-fitting model, each one-dimensional; a later
binary table (HDU4 in DR16/DR17) holds the ASPCAP results (``APOGEE_ID``, ``TELESCOPE``, ``FIELD``, ``SNR``,
``ASPCAPFLAG``, ...).

Grids: the 7214-pixel ASPCAP grid (the apStar grid without its ends and chip gaps, identical to the Payne model
grid, :data:`~astra_thepayne.core.wavelength.MODEL_TO_APSTAR`) or, as files of later releases hold, the full
8575-pixel apStar grid. Either way the spectrum is returned on the 8575-pixel apStar grid, so every rest-frame
reader gives the same grid; pixels outside the ASPCAP grid (ends and chip gaps) have flux 0 and ivar 0.
aspcapStar files carry no pixel bitmask, so ``pixel_flags`` is 0; unusable pixels are those with ivar 0. The best
fit (HDU3) is not returned.

Identification: HDU1-HDU3 are one-dimensional float images of one length (apStar files have an integer HDU3).
"""
from __future__ import annotations

import numpy as np

from ..core.spectrum import Spectrum
from ..core.wavelength import APSTAR_NPIX, MODEL_TO_APSTAR, apstar_wavelength
from .base import (
    SpectrumFileError,
    SpectrumReader,
    header_float,
    header_str,
    is_image_hdu,
    is_table_hdu,
    ivar_from_error,
    register,
    to_python,
)

__all__ = ["AspcapStarReader"]

ASPCAP_NPIX = len(MODEL_TO_APSTAR)


@register
class AspcapStarReader(SpectrumReader):
    """Reader of aspcapStar files: one ``aspcapstar`` spectrum on the apStar grid."""

    format_name = "aspcapStar"

    @classmethod
    def identify(cls, hdul) -> bool:
        if len(hdul) < 4 or not all(is_image_hdu(hdul[i]) for i in (1, 2, 3)):
            return False
        headers = [hdul[i].header for i in (1, 2, 3)]
        return all(h.get("NAXIS") == 1 and h.get("BITPIX", 8) < 0 for h in headers)

    @classmethod
    def read(cls, hdul, path, coadd_only=False):
        flux, error, model = (np.asarray(hdul[i].data, dtype=np.float64) for i in (1, 2, 3))
        if not (flux.shape == error.shape == model.shape):
            raise SpectrumFileError(
                path, f"aspcapStar flux {flux.shape}, error {error.shape} and best fit {model.shape} shapes differ"
            )
        npix = flux.shape[0]
        if npix not in (ASPCAP_NPIX, APSTAR_NPIX):
            raise SpectrumFileError(
                path, f"aspcapStar spectrum has {npix} pixels; expected {ASPCAP_NPIX} (ASPCAP grid) or "
                f"{APSTAR_NPIX} (apStar grid)"
            )
        f, ivar = ivar_from_error(flux, error)
        if npix == ASPCAP_NPIX:
            full_flux, full_ivar = np.zeros(APSTAR_NPIX), np.zeros(APSTAR_NPIX)
            full_flux[MODEL_TO_APSTAR], full_ivar[MODEL_TO_APSTAR] = f, ivar
            f, ivar = full_flux, full_ivar

        primary = hdul[0].header
        obj, snr = header_str(primary, "OBJID"), header_float(primary, "SNR")
        telescope = header_str(primary, "TELESCOP").lower()
        meta = {"ra": header_float(primary, "RA"), "dec": header_float(primary, "DEC"),
                "field": header_str(primary, "FIELD"), "aspcap_npix": npix}
        table = next((hdu.data for hdu in hdul[4:] if is_table_hdu(hdu) and hdu.header.get("NAXIS2", 0)), None)
        if table is not None:
            names = {n.lower(): n for n in table.names}

            def first(column):
                return to_python(table[names[column]][0]) if column in names else None

            obj = first("apogee_id") or obj
            snr = float(first("snr")) if first("snr") is not None else snr
            telescope = (first("telescope") or telescope).lower()
            for key in ("field", "ra", "dec", "aspcapflag"):
                if first(key) is not None:
                    meta[key] = first(key)
        return [Spectrum(
            wavelength=apstar_wavelength(), flux=f, ivar=ivar, pixel_flags=np.zeros(APSTAR_NPIX, dtype=np.int64),
            obj=obj, snr=snr, telescope=telescope, path=str(path), hdu=1, row=0, spectrum_type="aspcapstar",
            rest_frame=True, meta=meta,
        )]
