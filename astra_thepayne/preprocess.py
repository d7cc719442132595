"""Put a spectrum onto the apStar rest-frame grid with bad pixels carrying zero weight.

Pixels are bad when their flux or inverse variance is not finite, their inverse variance is not positive, or their
APOGEE_PIXMASK bits intersect the chosen mask. Resampling (apVisit, other grids) interpolates flux and variance
linearly between the two neighbouring input pixels and gives an output pixel zero weight whenever either neighbour
is bad, so a bad pixel can never lend weight to a good one (the Astra seed interpolated ivar, which does).
"""
from __future__ import annotations

import numpy as np

from .grid import APSTAR_NPIX, SPEED_OF_LIGHT_KMS, apstar_wavelength

__all__ = ["good_pixels", "to_apstar_grid", "resample"]

_APSTAR_WAVELENGTH = apstar_wavelength()


def good_pixels(flux, ivar, pixel_flags, pixel_flag_mask):
    """Boolean mask of usable pixels."""
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    if pixel_flags is not None and pixel_flag_mask:
        good &= (np.asarray(pixel_flags, dtype=np.int64) & int(pixel_flag_mask)) == 0
    return good


def resample(wavelength, flux, ivar, good, new_wavelength):
    """Linear resampling of flux and variance onto ``new_wavelength`` (both ascending).

    Returns ``(flux, ivar)`` on the new grid; ivar is 0 outside the input range, in input gaps wider than
    three input pixels, and wherever a neighbouring input pixel is bad.
    """
    order = np.argsort(wavelength)
    wavelength, flux, ivar, good = wavelength[order], flux[order], ivar[order], good[order]
    right = np.searchsorted(wavelength, new_wavelength)
    inside = (right > 0) & (right < len(wavelength))
    right = np.clip(right, 1, len(wavelength) - 1)
    left = right - 1
    step = wavelength[right] - wavelength[left]
    typical = np.median(np.diff(wavelength)) if len(wavelength) > 1 else np.inf
    inside &= step < 3 * np.abs(typical)  # do not bridge chip gaps
    with np.errstate(invalid="ignore", divide="ignore"):
        t = np.where(step > 0, (new_wavelength - wavelength[left]) / step, 0.0)
        variance = np.where(good, 1.0 / np.where(good, ivar, 1.0), np.inf)
    flux_clean = np.where(good, flux, 0.0)
    new_flux = (1 - t) * flux_clean[left] + t * flux_clean[right]
    new_variance = (1 - t) ** 2 * variance[left] + t**2 * variance[right]
    ok = inside & good[left] & good[right] & np.isfinite(new_variance) & (new_variance > 0)
    new_ivar = np.zeros(len(new_wavelength))
    new_ivar[ok] = 1.0 / new_variance[ok]
    return np.where(ok, new_flux, 0.0), new_ivar


def to_apstar_grid(spectrum, pixel_flag_mask):
    """Flux and ivar of ``spectrum`` on the 8575-pixel apStar rest-frame grid, bad pixels at ivar 0.

    Spectra already on that grid in the rest frame (apStar, mwmStar, aspcapStar) are only masked; others are
    shifted by ``spectrum.v_rel_known`` (when finite) and resampled.

    Returns
    -------
    flux, ivar : ndarray, shape (8575,)
    """
    flux = np.asarray(spectrum.flux, dtype=float)
    ivar = np.asarray(spectrum.ivar, dtype=float)
    good = good_pixels(flux, ivar, spectrum.pixel_flags, pixel_flag_mask)
    on_grid = (spectrum.rest_frame and len(flux) == APSTAR_NPIX
               and (np.array_equal(spectrum.wavelength, _APSTAR_WAVELENGTH)  # the usual case, and quick to tell
                    or np.allclose(spectrum.wavelength, _APSTAR_WAVELENGTH, rtol=1e-9, atol=0)))
    if on_grid:
        return np.where(good, flux, 0.0), np.where(good, ivar, 0.0)
    wavelength = np.asarray(spectrum.wavelength, dtype=float)
    if not spectrum.rest_frame and np.isfinite(spectrum.v_rel_known):
        wavelength = wavelength / (1.0 + spectrum.v_rel_known / SPEED_OF_LIGHT_KMS)
    return resample(wavelength, flux, ivar, good & np.isfinite(wavelength), _APSTAR_WAVELENGTH)
