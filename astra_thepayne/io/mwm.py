"""mwmStar and mwmVisit files (SDSS-V Astra products): rest-frame APOGEE spectra as binary-table rows.

Layout (SDSS datamodel; Astra ``astra.products.mwm``): HDU0 is a header-only source summary (``SDSS_ID``, ``RA``,
``DEC``, ...); HDU1 ``BOSS/APO``, HDU2 ``BOSS/LCO``, HDU3 ``APOGEE/APO`` (apo25m and apo1m) and HDU4 ``APOGEE/LCO``
are binary tables. The APOGEE tables carry ``EXTNAME``, ``OBSRVTRY``, ``INSTRMNT = 'APOGEE'`` and a log-lambda
solution (``CRVAL``, ``CDELT``, ``CRPIX``, ``NPIXELS``), and one row per spectrum with the 8575-pixel array
columns ``flux``, ``ivar``, ``pixel_flags`` and ``continuum`` next to scalars such as ``sdss_id``, ``obj``,
``telescope``, ``snr`` and ``v_rad`` (mwmVisit adds ``mjd``, ``fiber``, ``plate``, ``field``). mwmStar rows are
coadds, one per telescope; mwmVisit rows are rest-frame visits. Empty tables (no data from that observatory) have
no rows; a row whose flux and ivar are zero everywhere is a placeholder and is skipped.

``ivar`` is used as written (pixels with non-finite flux or ivar, or ivar <= 0, get ivar 0).

Identification: binary tables named ``APOGEE/APO`` or ``APOGEE/LCO`` (or with ``INSTRMNT = 'APOGEE'``). Which of
the two products: the ``filetype`` column when present, else the columns (``mjd`` and ``fiber`` mean mwmVisit).
"""
from __future__ import annotations

import numpy as np

from ..core.spectrum import Spectrum
from ..core.wavelength import APSTAR_NPIX
from .base import (
    SpectrumFileError,
    SpectrumReader,
    clean_flux_ivar,
    header_float,
    header_str,
    header_value,
    is_table_hdu,
    register,
    to_python,
)

__all__ = ["MWMStarReader", "MWMVisitReader", "apogee_hdus"]

_APOGEE_EXTNAMES = {"APOGEE/APO": "apo25m", "APOGEE/LCO": "lco25m"}
_META_COLUMNS = {
    "mwmStar": ("sdss_id", "release", "apred", "min_mjd", "max_mjd", "n_visits", "n_good_visits", "v_rad",
                "e_v_rad"),
    "mwmVisit": ("sdss_id", "release", "apred", "mjd", "plate", "fiber", "field", "v_rad", "v_rel", "bc",
                 "in_stack"),
}


def apogee_hdus(hdul) -> list[int]:
    """Indices of the APOGEE binary tables of an mwmStar/mwmVisit ``HDUList`` (by EXTNAME, else INSTRMNT)."""
    found = []
    for index, hdu in enumerate(hdul):
        if index == 0 or not is_table_hdu(hdu):
            continue
        extname = header_str(hdu.header, "EXTNAME").upper()
        if extname in _APOGEE_EXTNAMES or header_str(hdu.header, "INSTRMNT").upper() == "APOGEE":
            found.append(index)
    return found


def _column_names(hdu) -> set[str]:
    header = hdu.header
    return {str(header[f"TTYPE{i}"]).strip().lower() for i in range(1, int(header.get("TFIELDS", 0)) + 1)
            if f"TTYPE{i}" in header}


def _filetype(hdul) -> str | None:
    """``"mwmStar"`` or ``"mwmVisit"`` for an mwm file, None for anything else."""
    indices = apogee_hdus(hdul)
    if not indices:
        return None
    columns = [_column_names(hdul[i]) for i in indices]
    for index, names in zip(indices, columns, strict=True):
        if "filetype" in names and hdul[index].header.get("NAXIS2", 0) > 0:
            value = to_python(hdul[index].data["filetype"][0])
            if value in ("mwmStar", "mwmVisit"):
                return value
    return "mwmVisit" if any({"mjd", "fiber"} <= c for c in columns) else "mwmStar"


class _MWMReader(SpectrumReader):
    spectrum_type = ""

    @classmethod
    def identify(cls, hdul) -> bool:
        return _filetype(hdul) == cls.format_name

    @classmethod
    def read(cls, hdul, path, coadd_only=False):
        primary = hdul[0].header
        spectra = []
        for index in apogee_hdus(hdul):
            hdu = hdul[index]
            if not hdu.header.get("NAXIS2", 0):
                continue
            data = hdu.data
            names = {n.lower(): n for n in data.names}
            if "flux" not in names or "ivar" not in names:
                raise SpectrumFileError(path, f"{cls.format_name} HDU{index} has no flux/ivar columns")
            flux = np.asarray(data[names["flux"]], dtype=np.float64)
            ivar = np.asarray(data[names["ivar"]], dtype=np.float64)
            flags = (np.asarray(data[names["pixel_flags"]]) if "pixel_flags" in names
                     else np.zeros(flux.shape, dtype=np.int64))
            if flux.ndim != 2 or flux.shape != ivar.shape or flux.shape != flags.shape:
                raise SpectrumFileError(
                    path, f"{cls.format_name} HDU{index} flux {flux.shape}, ivar {ivar.shape} and pixel_flags "
                    f"{flags.shape} shapes differ"
                )
            if flux.shape[1] != APSTAR_NPIX:
                raise SpectrumFileError(path, f"{cls.format_name} HDU{index} spectra have {flux.shape[1]} pixels; the "
                                        f"format has {APSTAR_NPIX}")
            wavelength = _wavelength(hdu.header, flux.shape[1], path, index)
            extname = header_str(hdu.header, "EXTNAME").upper()
            for row in range(flux.shape[0]):
                if not (np.any(flux[row][np.isfinite(flux[row])] != 0) or np.any(ivar[row] > 0)):
                    continue  # placeholder row: nothing observed
                f, iv = clean_flux_ivar(flux[row], ivar[row])
                meta = {"ra": header_float(primary, "RA"), "dec": header_float(primary, "DEC"),
                        "sdss_id": header_value(primary, "SDSS_ID")}
                for column in _META_COLUMNS[cls.format_name]:
                    if column in names:
                        meta[column] = to_python(data[names[column]][row])
                telescope = to_python(data[names["telescope"]][row]) if "telescope" in names else ""
                obj = to_python(data[names["obj"]][row]) if "obj" in names else ""
                snr = float(data[names["snr"]][row]) if "snr" in names else float("nan")
                spectra.append(Spectrum(
                    wavelength=wavelength, flux=f, ivar=iv, pixel_flags=flags[row].astype(np.int64),
                    obj=obj or str(meta.get("sdss_id") or ""), snr=snr,
                    telescope=telescope or _APOGEE_EXTNAMES.get(extname, ""), path=str(path), hdu=index,
                    row=row, spectrum_type=cls.spectrum_type, rest_frame=True, meta=meta,
                ))
        return spectra


def _wavelength(header, npix, path, index):
    """Log-lambda grid from the table's CRVAL/CDELT/CRPIX cards (also accepted with a trailing 1)."""
    from ..core.wavelength import APSTAR_CDELT1, APSTAR_CRVAL1

    crval = header_float(header, "CRVAL", header_float(header, "CRVAL1", APSTAR_CRVAL1))
    cdelt = header_float(header, "CDELT", header_float(header, "CDELT1", APSTAR_CDELT1))
    crpix = header_float(header, "CRPIX", header_float(header, "CRPIX1", 1.0))
    npixels = header_value(header, "NPIXELS")
    if npixels is not None and int(npixels) != npix:
        raise SpectrumFileError(path, f"HDU{index} says NPIXELS={npixels} but its spectra have {npix} pixels")
    return 10 ** (crval + cdelt * (np.arange(npix) + 1.0 - crpix))


@register
class MWMStarReader(_MWMReader):
    """Reader of mwmStar files: one ``mwmstar`` coadd per non-empty APOGEE row (APO and LCO)."""

    format_name = "mwmStar"
    spectrum_type = "mwmstar"


@register
class MWMVisitReader(_MWMReader):
    """Reader of mwmVisit files: one ``mwmvisit`` rest-frame visit spectrum per non-empty APOGEE row."""

    format_name = "mwmVisit"
    spectrum_type = "mwmvisit"
