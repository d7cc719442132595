"""Files for reader and "bad input at scale" tests: broken APOGEE files, and mwm/aspcapStar files built with astropy.

No real mwmStar, mwmVisit or aspcapStar file is available offline, so :func:`write_mwm_file` and
:func:`write_aspcapstar_file` build small ones following the SDSS data models (see the docstrings of
:mod:`astra_thepayne.io.mwm` and :mod:`astra_thepayne.io.aspcap`), with spectra taken from a real apStar file.

:func:`make_broken_corpus` writes one file per way of being broken. :data:`UNREADABLE` names the cases for which
``read_spectra`` must raise ``SpectrumFileError``; :data:`NO_INFORMATION` those it reads but whose spectra carry no
information (every ivar 0), which the fitter must flag instead of fitting.
"""
from __future__ import annotations

import gzip
import shutil
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from astra_thepayne.core.wavelength import APSTAR_CDELT1, APSTAR_CRVAL1, APSTAR_NPIX, MODEL_TO_APSTAR

__all__ = [
    "make_broken_corpus", "UNREADABLE", "NO_INFORMATION", "write_mwm_file", "write_aspcapstar_file", "gzip_copy",
]

#: Cases that ``read_spectra`` rejects with ``SpectrumFileError``.
UNREADABLE = frozenset({
    "truncated", "truncated_header", "truncated_gzip", "wrong_shapes", "empty", "other_instrument", "text_as_fits",
    "header_only", "short_spectra",
})
#: Cases that read fine but whose every spectrum has ivar 0 everywhere.
NO_INFORMATION = frozenset({"nan_flux", "zero_ivar", "nan_error"})


def _write(hdul, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corpus is deliberately odd; its writing is not under test
        hdul.writeto(path, overwrite=True, output_verify="silentfix")
    return path


def _modified_copy(good_file, path: Path, change) -> Path:
    """Copy of ``good_file`` after ``change(hdul)`` edited it in memory."""
    with fits.open(good_file, memmap=False) as hdul:
        hdul = fits.HDUList([hdu.copy() for hdu in hdul])
    change(hdul)
    return _write(hdul, path)


def make_broken_corpus(folder, good_file) -> dict[str, Path]:
    """Write files broken in different ways, derived from a real apStar (or apVisit) file or built with astropy.

    Parameters
    ----------
    folder : str or Path
        Where to write (created if needed).
    good_file : str or Path
        A readable apStar or apVisit file (HDU1 flux, HDU2 error).

    Returns
    -------
    dict of str to Path
        ``nan_flux``: every flux NaN. ``zero_ivar``: every error 0 in even rows and +inf in odd rows.
        ``nan_error``: every error NaN. ``truncated``: the first half of the file's bytes.
        ``truncated_header``: cut inside the primary header. ``truncated_gzip``: the first half of the gzipped
        file. ``wrong_shapes``: the error HDU has fewer pixels than the flux HDU.
        ``short_spectra``: every array cut, consistently, to its first 1000 pixels (a valid-looking file with far
        fewer pixels than its format has). ``empty``: 0 bytes.
        ``other_instrument``: a valid FITS image and table of another instrument (HST/WFC3 headers).
        ``text_as_fits``: a text file named .fits. ``header_only``: a valid FITS file with a primary header that
        looks like an apStar's and no extensions.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    good_file = Path(good_file)
    stem = good_file.name.split(".fits")[0]
    files = {}

    def set_flux_nan(hdul):
        hdul[1].data = np.full(hdul[1].data.shape, np.nan, dtype=hdul[1].data.dtype)

    def set_error_zero_inf(hdul):
        error = np.zeros(hdul[2].data.shape, dtype=np.float64)
        if error.ndim == 2:
            error[1::2] = np.inf
        hdul[2].data = error.astype(hdul[2].data.dtype)

    def set_error_nan(hdul):
        hdul[2].data = np.full(hdul[2].data.shape, np.nan, dtype=hdul[2].data.dtype)

    def cut_error_pixels(hdul):
        hdul[2].data = np.ascontiguousarray(hdul[2].data[..., : hdul[2].data.shape[-1] // 2])

    files["nan_flux"] = _modified_copy(good_file, folder / f"{stem}-nan-flux.fits", set_flux_nan)
    files["zero_ivar"] = _modified_copy(good_file, folder / f"{stem}-zero-ivar.fits", set_error_zero_inf)
    files["nan_error"] = _modified_copy(good_file, folder / f"{stem}-nan-error.fits", set_error_nan)
    files["wrong_shapes"] = _modified_copy(good_file, folder / f"{stem}-wrong-shapes.fits", cut_error_pixels)

    def keep_first_pixels(hdul, n=1000):
        shape = hdul[1].data.shape
        for hdu in hdul[1:5]:
            if hdu.data is not None and hdu.data.shape == shape:
                hdu.data = np.ascontiguousarray(hdu.data[..., :n])
        if "NWAVE" in hdul[0].header:
            hdul[0].header["NWAVE"] = n

    files["short_spectra"] = _modified_copy(good_file, folder / f"{stem}-short.fits", keep_first_pixels)

    data = good_file.read_bytes()
    files["truncated"] = folder / f"{stem}-truncated.fits"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["truncated_header"] = folder / f"{stem}-truncated-header.fits"
    files["truncated_header"].write_bytes(data[:1000])
    packed = gzip.compress(data, mtime=0)
    files["truncated_gzip"] = folder / f"{stem}-truncated.fits.gz"
    files["truncated_gzip"].write_bytes(packed[: len(packed) // 2])
    files["empty"] = folder / "apStar-empty.fits"
    files["empty"].write_bytes(b"")
    files["text_as_fits"] = folder / "apStar-text.fits"
    files["text_as_fits"].write_text("This is not a FITS file.\nIt only has a .fits name.\n")

    image = fits.PrimaryHDU(np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32))
    image.header.update({"TELESCOP": "HST", "INSTRUME": "WFC3", "FILTER": "F160W", "EXPTIME": 1200.0,
                         "OBJECT": "NGC 1234"})
    table = fits.BinTableHDU.from_columns([fits.Column(name="flux", format="D", array=np.arange(5.0))],
                                          name="PHOTOMETRY")
    files["other_instrument"] = _write(fits.HDUList([image, table]), folder / "apStar-other-instrument.fits")

    with fits.open(good_file, memmap=False) as hdul:
        primary = fits.PrimaryHDU(header=hdul[0].header.copy())
    files["header_only"] = _write(fits.HDUList([primary]), folder / f"{stem}-header-only.fits")
    return files


def gzip_copy(path, folder) -> Path:
    """A gzipped copy of ``path`` in ``folder`` (name + .gz)."""
    out = Path(folder) / (Path(path).name + ".gz")
    with open(path, "rb") as source, gzip.open(out, "wb") as target:
        shutil.copyfileobj(source, target)
    return out


def _apstar_row(apstar_file, row=0):
    with fits.open(apstar_file, memmap=False) as hdul:
        flux = np.atleast_2d(hdul[1].data)[row].astype(np.float64)
        error = np.atleast_2d(hdul[2].data)[row].astype(np.float64)
        mask = np.atleast_2d(hdul[3].data)[row].astype(np.int64)
        header = hdul[0].header.copy()
    return flux, error, mask, header


def _ivar(error):
    # Astra's mwm products hold ivar 0 where the apStar had no information (NaN, chip gaps with errors >= 1e10)
    with np.errstate(all="ignore"):
        return np.where(np.isfinite(error) & (error > 0) & (error < 1e10), 1.0 / error**2, 0.0)


def write_mwm_file(path, apstar_file, kind="mwmStar", apo_rows=(0,), lco_rows=(), empty_rows=0, sdss_id=12345678):
    """Write an mwmStar or mwmVisit file following the SDSS-V data model, with spectra from a real apStar file.

    Parameters
    ----------
    path : str or Path
        Output file.
    apstar_file : str or Path
        Real apStar file whose rows provide flux, error (turned into ivar, float32 like Astra's) and bitmask.
    kind : {"mwmStar", "mwmVisit"}
        Which product to imitate (columns, ``filetype`` values).
    apo_rows, lco_rows : sequence of int
        apStar rows to put into the ``APOGEE/APO`` (HDU3) and ``APOGEE/LCO`` (HDU4) tables.
    empty_rows : int
        All-zero placeholder rows appended to the APO table.
    sdss_id : int
        Source identifier (primary header and ``sdss_id`` column).

    Returns
    -------
    Path
    """
    flux_rows, ivar_rows, flag_rows, header = {}, {}, {}, None
    for row in {*apo_rows, *lco_rows}:
        flux, error, mask, header = _apstar_row(apstar_file, row)
        flux_rows[row], ivar_rows[row], flag_rows[row] = flux, _ivar(error), mask
    if header is None:
        header = _apstar_row(apstar_file, 0)[3]
    obj = str(header.get("OBJID", ""))

    primary = fits.PrimaryHDU()
    primary.header.update({
        "V_ASTRA": "0.6.0", "CREATED": "24-01-01 00:00:00", "HEALPIX": 42, "SDSS_ID": sdss_id,
        "GAIA_ID": 0, "RA": float(header.get("RA", 0.0)), "DEC": float(header.get("DEC", 0.0)),
    })
    for text in ("HDU 0: Summary information only", "HDU 1: BOSS spectra from Apache Point Observatory",
                 "HDU 2: BOSS spectra from Las Campanas Observatory",
                 "HDU 3: APOGEE spectra from Apache Point Observatory",
                 "HDU 4: APOGEE spectra from Las Campanas Observatory"):
        primary.header.add_comment(text)

    def boss_hdu(observatory):
        columns = [fits.Column(name=name, format="4648E", array=np.zeros((0, 4648), np.float32))
                   for name in ("flux", "ivar")]
        hdu = fits.BinTableHDU.from_columns(columns, nrows=0)
        hdu.header.update({"EXTNAME": f"BOSS/{observatory}", "OBSRVTRY": observatory, "INSTRMNT": "BOSS"})
        return hdu

    def apogee_hdu(observatory, rows, n_empty):
        n = len(rows) + n_empty
        telescope = "apo25m" if observatory == "APO" else "lco25m"
        flux = np.zeros((n, APSTAR_NPIX), np.float32)
        ivar = np.zeros((n, APSTAR_NPIX), np.float32)
        flags = np.zeros((n, APSTAR_NPIX), np.int64)
        for i, row in enumerate(rows):
            flux[i], ivar[i], flags[i] = flux_rows[row], ivar_rows[row], flag_rows[row]
        snr = np.array([float(header.get("SNR", np.nan)) if row == 0 else 50.0 + row for row in rows]
                       + [0.0] * n_empty)
        columns = [
            fits.Column(name="sdss_id", format="K", array=np.full(n, sdss_id)),
            fits.Column(name="release", format="5A", array=["sdss5"] * n),
            fits.Column(name="filetype", format="8A", array=[kind] * n),
            fits.Column(name="v_astra", format="5A", array=["0.6.0"] * n),
            fits.Column(name="healpix", format="J", array=np.full(n, 42)),
            fits.Column(name="apred", format="4A", array=["dr17"] * n),
            fits.Column(name="obj", format="18A", array=[obj] * n),
            fits.Column(name="telescope", format="6A", array=[telescope] * n),
        ]
        if kind == "mwmVisit":
            columns += [
                fits.Column(name="plate", format="5A", array=["5815"] * n),
                fits.Column(name="fiber", format="J", array=np.arange(n) + 100),
                fits.Column(name="mjd", format="J", array=np.arange(n) + 56396),
                fits.Column(name="field", format="8A", array=[str(header.get("FIELD", ""))] * n),
                fits.Column(name="in_stack", format="L", array=np.ones(n, bool)),
            ]
        else:
            columns += [
                fits.Column(name="min_mjd", format="J", array=np.full(n, 56396)),
                fits.Column(name="max_mjd", format="J", array=np.full(n, 56434)),
                fits.Column(name="n_visits", format="J", array=np.full(n, 3)),
            ]
        columns += [
            fits.Column(name="snr", format="E", array=snr),
            fits.Column(name="v_rad", format="E", array=np.full(n, 15.68)),
            fits.Column(name="flux", format=f"{APSTAR_NPIX}E", array=flux),
            fits.Column(name="ivar", format=f"{APSTAR_NPIX}E", array=ivar),
            fits.Column(name="pixel_flags", format=f"{APSTAR_NPIX}K", array=flags),
            fits.Column(name="continuum", format=f"{APSTAR_NPIX}E", array=np.ones((n, APSTAR_NPIX), np.float32)),
        ]
        hdu = fits.BinTableHDU.from_columns(columns, nrows=n)
        hdu.header.update({
            "EXTNAME": f"APOGEE/{observatory}", "OBSRVTRY": observatory, "INSTRMNT": "APOGEE",
            "CRVAL": APSTAR_CRVAL1, "CDELT": APSTAR_CDELT1, "CTYPE": "LOG-LINEAR", "CUNIT": "Angstrom (Vacuum)",
            "CRPIX": 1, "DC-FLAG": 1, "NPIXELS": APSTAR_NPIX,
        })
        return hdu

    hdul = fits.HDUList([primary, boss_hdu("APO"), boss_hdu("LCO"), apogee_hdu("APO", list(apo_rows), empty_rows),
                         apogee_hdu("LCO", list(lco_rows), 0)])
    return _write(hdul, Path(path))


def write_aspcapstar_file(path, apstar_file, npix=7214, telescope="apo25m"):
    """Write an aspcapStar-like file from row 0 of a real apStar file.

    HDU1 is the flux divided by its median (a crude pseudo-continuum normalisation), HDU2 its error, HDU3 a
    smoothed copy standing in for the best fit, HDU4 an ASPCAP table (APOGEE_ID, TELESCOPE, FIELD, SNR, ASPCAPFLAG).
    With ``npix=7214`` the arrays are on the ASPCAP grid (apStar pixels :data:`MODEL_TO_APSTAR`), with 8575 on the
    apStar grid.
    """
    flux, error, _, header = _apstar_row(apstar_file, 0)
    if npix == len(MODEL_TO_APSTAR):
        flux, error = flux[MODEL_TO_APSTAR], error[MODEL_TO_APSTAR]
    elif npix != APSTAR_NPIX:
        raise ValueError("npix must be 7214 or 8575")
    with np.errstate(all="ignore"):
        scale = np.nanmedian(flux[np.isfinite(flux) & (flux > 0)])
        norm, norm_error = flux / scale, error / scale
    best_fit = np.convolve(np.nan_to_num(norm, nan=1.0), np.ones(5) / 5, mode="same")
    primary = fits.PrimaryHDU()
    primary.header.update({"OBJID": str(header.get("OBJID", "")), "RA": header.get("RA", 0.0),
                           "DEC": header.get("DEC", 0.0)})
    images = []
    for array, unit in ((norm, "Normalized flux"), (norm_error, "Normalized flux error"), (best_fit, "Best fit")):
        hdu = fits.ImageHDU(array.astype(np.float32))
        hdu.header.update({"CRVAL1": APSTAR_CRVAL1, "CDELT1": APSTAR_CDELT1, "CRPIX1": 1, "BUNIT": unit})
        images.append(hdu)
    table = fits.BinTableHDU.from_columns([
        fits.Column(name="APOGEE_ID", format="18A", array=[str(header.get("OBJID", ""))]),
        fits.Column(name="TELESCOPE", format="6A", array=[telescope]),
        fits.Column(name="FIELD", format="10A", array=[str(header.get("FIELD", ""))]),
        fits.Column(name="SNR", format="E", array=[float(header.get("SNR", np.nan))]),
        fits.Column(name="ASPCAPFLAG", format="K", array=[0]),
    ])
    return _write(fits.HDUList([primary, *images, table]), Path(path))
