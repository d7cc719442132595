"""Write spectra as apStar-layout FITS files (used by ``thepayne demo`` for its synthetic stars)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from ..core.wavelength import APSTAR_CDELT1, APSTAR_CRVAL1, APSTAR_NPIX

__all__ = ["write_apstar"]


def write_apstar(path, spectrum, obj=None, header=None) -> Path:
    """Write one apStar-grid spectrum as a single-visit apStar file (HDU1 flux, HDU2 error, HDU3 pixel mask).

    Pixels with ``ivar == 0`` get the error 1e10, as the APOGEE reduction writes them. ``header`` adds primary
    header cards (e.g. provenance of synthetic spectra).
    """
    if spectrum.flux.shape != (APSTAR_NPIX,):
        raise ValueError(f"write_apstar: expected a spectrum on the {APSTAR_NPIX}-pixel apStar grid")
    with np.errstate(divide="ignore"):
        error = np.where(spectrum.ivar > 0, 1 / np.sqrt(np.where(spectrum.ivar > 0, spectrum.ivar, 1)), 1e10)
    primary = fits.PrimaryHDU()
    primary.header.update(OBJID=obj or spectrum.obj, SNR=float(spectrum.snr), NVISITS=1, TELESCOP="apo25m",
                          FIELD="SYNTHETIC")
    primary.header["SFILE1"] = f"apVisit-synthetic-{obj or spectrum.obj}.fits"
    for key, value in (header or {}).items():
        primary.header[key] = value
    hdus = [primary]
    for data in (spectrum.flux.astype(np.float32), error.astype(np.float32), spectrum.pixel_flags.astype(np.int32)):
        hdu = fits.ImageHDU(data)
        hdu.header.update(CRVAL1=APSTAR_CRVAL1, CDELT1=APSTAR_CDELT1, CRPIX1=1)
        hdus.append(hdu)
    path = Path(path)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path
