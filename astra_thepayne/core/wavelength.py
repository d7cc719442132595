"""APOGEE wavelength grids: the 8575-pixel apStar log-lambda grid and the 7214-pixel Payne model grid inside it."""
from __future__ import annotations

import numpy as np

__all__ = [
    "APSTAR_CRVAL1", "APSTAR_CDELT1", "APSTAR_NPIX", "apstar_wavelength", "MODEL_SEGMENTS", "MODEL_TO_APSTAR",
    "model_wavelength", "CONTINUUM_REGIONS", "SPEED_OF_LIGHT_KMS",
]

APSTAR_CRVAL1 = 4.179
APSTAR_CDELT1 = 6e-6
APSTAR_NPIX = 8575

#: (apStar start, apStar stop) of the three chip segments that make up the 7214-pixel model grid.
MODEL_SEGMENTS = ((322, 3242), (3648, 6048), (6412, 8306))
#: apStar pixel index of every model pixel, shape (7214,).
MODEL_TO_APSTAR = np.concatenate([np.arange(a, b) for a, b in MODEL_SEGMENTS])

#: Wavelength ranges (Angstrom) in which the continuum is fitted separately.
CONTINUUM_REGIONS = ((15100.0, 15793.0), (15880.0, 16417.0), (16499.0, 17000.0))

from astropy.constants import c as _c  # noqa: E402

SPEED_OF_LIGHT_KMS = _c.to_value("km/s")


def apstar_wavelength() -> np.ndarray:
    """Vacuum wavelength (Angstrom) of the apStar grid, ``10**(4.179 + 6e-6 i)``, shape (8575,)."""
    return 10 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * np.arange(APSTAR_NPIX))


def model_wavelength() -> np.ndarray:
    """Wavelength (Angstrom) of the 7214-pixel APOGEE model grid, shape (7214,)."""
    return apstar_wavelength()[MODEL_TO_APSTAR]
