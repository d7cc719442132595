"""Helpers of the database tests: apStar-like FITS files and the command line run in-process."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from astra_thepayne.core.wavelength import APSTAR_CDELT1, APSTAR_CRVAL1

__all__ = ["write_apstar", "corrupt_file_d", "run_cli"]


def write_apstar(path, spectra, obj, ra=10.0, dec=20.0, snr=100.0) -> Path:
    """Write spectra (apStar grid) as an apStar file: one row for one spectrum, else two coadd rows then visits.

    HDU1 flux, HDU2 error (1e10 where ivar is 0, as the APOGEE reduction writes), HDU3 pixel bitmask.
    """
    if len(spectra) == 1:
        rows = [spectra[0]]
    else:  # rows 0 and 1 are coadds; the mean of the visits stands in for both
        flux = np.mean([s.flux for s in spectra], axis=0)
        ivar = np.sum([s.ivar for s in spectra], axis=0)
        coadd = type(spectra[0])(spectra[0].wavelength, flux, ivar, np.zeros_like(spectra[0].pixel_flags))
        rows = [coadd, coadd, *spectra]
    flux = np.array([s.flux for s in rows], dtype=np.float32)
    with np.errstate(divide="ignore"):
        error = np.array([np.where(s.ivar > 0, 1 / np.sqrt(s.ivar), 1e10) for s in rows], dtype=np.float32)
    mask = np.array([s.pixel_flags for s in rows], dtype=np.int32)
    primary = fits.PrimaryHDU()
    primary.header.update(OBJID=obj, SNR=snr, NVISITS=max(1, len(spectra)), RA=ra, DEC=dec, TELESCOP="apo25m",
                          FIELD="TEST")
    for i in range(len(spectra)):
        primary.header[f"SFILE{i + 1}"] = f"apVisit-test-{obj}-{i + 1}.fits"
        primary.header[f"JD{i + 1}"] = 2456000.5 + i
        primary.header[f"SNRVIS{i + 1}"] = snr / np.sqrt(len(spectra))
    hdus = [primary]
    for data in (flux, error, mask):
        hdu = fits.ImageHDU(data[0] if len(rows) == 1 else data)
        hdu.header.update(CRVAL1=APSTAR_CRVAL1, CDELT1=APSTAR_CDELT1, CRPIX1=1)
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return Path(path)


def corrupt_file_d(spectra_dir) -> Path:
    """Overwrite apStar-D with bytes that are not FITS (as a truncated transfer would)."""
    path = spectra_dir / "sub" / "apStar-D.fits"
    path.write_bytes(b"SIMPLE  = garbage" + b"\0" * 100)
    return path


def run_cli(*args):
    """Run the command line in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from astra_thepayne.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()
