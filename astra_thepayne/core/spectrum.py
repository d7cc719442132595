"""The spectrum object that readers produce and the fitter consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Spectrum"]


@dataclass
class Spectrum:
    """One APOGEE spectrum.

    Attributes
    ----------
    wavelength : ndarray, shape (P,)
        Vacuum wavelength in Angstrom. For ``rest_frame=False`` (apVisit) it is the observed frame.
    flux : ndarray, shape (P,)
        Flux (any units; the continuum is fitted).
    ivar : ndarray, shape (P,)
        Inverse variance of ``flux``; 0 marks a pixel without information.
    pixel_flags : ndarray of int, shape (P,)
        APOGEE_PIXMASK bits per pixel (0 where unknown).
    obj : str
        Object identifier (2MASS id for APOGEE).
    snr : float
        Signal-to-noise ratio reported by the file (NaN when the file has none).
    telescope : str
        ``apo25m``, ``lco25m``, ``apo1m`` or "".
    path : str
        File the spectrum came from.
    hdu, row : int
        HDU and image/table row within that file.
    spectrum_type : str
        ``apstar_coadd``, ``apstar_visit``, ``apvisit``, ``mwmstar``, ``mwmvisit`` or ``aspcapstar``.
    rest_frame : bool
        True when ``wavelength`` is already in the stellar rest frame (apStar, mwmStar, aspcapStar).
    v_rel_known : float
        Radial velocity (km/s) to remove before fitting when ``rest_frame`` is False (NaN when unknown).
    meta : dict
        Any further header values a reader wants to keep (ra, dec, mjd, field, ...).
    """

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    pixel_flags: np.ndarray | None = None
    obj: str = ""
    snr: float = float("nan")
    telescope: str = ""
    path: str = ""
    hdu: int = 0
    row: int = 0
    spectrum_type: str = ""
    rest_frame: bool = True
    v_rel_known: float = float("nan")
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.wavelength = np.asarray(self.wavelength, dtype=float)
        self.flux = np.asarray(self.flux, dtype=float)
        self.ivar = np.asarray(self.ivar, dtype=float)
        if self.pixel_flags is None:
            self.pixel_flags = np.zeros(self.flux.shape, dtype=np.int64)
        else:
            self.pixel_flags = np.asarray(self.pixel_flags, dtype=np.int64)
        shapes = {a.shape for a in (self.wavelength, self.flux, self.ivar, self.pixel_flags)}
        if len(shapes) != 1 or self.flux.ndim != 1:
            raise ValueError(
                f"spectrum {self.path or self.obj!r}: wavelength, flux, ivar and pixel_flags must be 1-D arrays of "
                f"one length, got shapes {sorted(shapes)}"
            )

    @property
    def label(self) -> str:
        """Short human-readable identifier: ``file[hdu,row]``."""
        import os

        return f"{os.path.basename(self.path) or self.obj}[{self.hdu},{self.row}]"
