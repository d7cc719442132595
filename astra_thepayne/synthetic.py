"""Spectra drawn from a known network with known noise: the ground truth that label-recovery tests and the demo use."""
from __future__ import annotations

import numpy as np

from .grid import APSTAR_NPIX, MODEL_SEGMENTS, SPEED_OF_LIGHT_KMS, apstar_wavelength
from .spectrum import Spectrum

__all__ = ["synthetic_spectrum", "doppler_shift", "smooth_continuum"]


def doppler_shift(model_wavelength, model_flux, wavelength, v_rel):
    """Flux of a rest-frame model seen at ``wavelength`` from a source with radial velocity ``v_rel`` (km/s, > 0 =
    receding): ``f_obs(lambda) = f_model(lambda / (1 + v/c))``, linear interpolation, NaN outside the model."""
    rest = np.asarray(wavelength) / (1.0 + v_rel / SPEED_OF_LIGHT_KMS)
    return np.interp(rest, model_wavelength, model_flux, left=np.nan, right=np.nan)


def smooth_continuum(wavelength, rng, level=1000.0):
    """A positive, slowly varying continuum (the kind a degree-4 Chebyshev polynomial per chip describes)."""
    x = (wavelength - 16000.0) / 1000.0
    coefficients = rng.normal(0, 0.08, 3)
    return level * (1.0 + coefficients[0] * x + coefficients[1] * x**2 + coefficients[2] * x**3)


def synthetic_spectrum(emulator, labels, snr=100.0, v_rel=0.0, rng=None, masked_fraction=0.02, path="", obj="",
                       continuum=True) -> Spectrum:
    """Draw an apStar-grid spectrum from ``emulator`` at physical ``labels`` (K,).

    The rectified model is Doppler shifted by ``v_rel`` (km/s), multiplied by a smooth continuum, and given
    Gaussian noise of standard deviation ``continuum / snr``. Chip gaps and grid ends carry flux 0 and ivar 0 as in
    apStar files. A fraction ``masked_fraction`` of pixels is corrupted (flux spikes) and flagged BADPIX (bit 0), so
    that a fitter which ignores pixel flags is caught out. The truth is kept in ``meta["true_labels"]`` and
    ``meta["true_v_rel"]``.
    """
    rng = np.random.default_rng(rng)
    labels = np.asarray(labels, dtype=float)
    wavelength = apstar_wavelength()
    rectified = np.full(APSTAR_NPIX, np.nan)
    model = emulator.predict(emulator.scale(labels))
    offset = 0
    for start, stop in MODEL_SEGMENTS:  # shift each chip on its own so no flux is interpolated across a gap
        n = stop - start
        seg_model_wl, seg_model = emulator.wavelength[offset:offset + n], model[offset:offset + n]
        rectified[start:stop] = doppler_shift(seg_model_wl, seg_model, wavelength[start:stop], v_rel)
        offset += n
    level = smooth_continuum(wavelength, rng) if continuum else np.ones(APSTAR_NPIX)
    sigma = level / snr
    flux = rectified * level + rng.normal(0, 1, APSTAR_NPIX) * sigma
    ivar = 1.0 / sigma**2
    gap = ~np.isfinite(flux)
    flux[gap], ivar[gap] = 0.0, 0.0
    flags = np.zeros(APSTAR_NPIX, dtype=np.int64)
    bad = (rng.random(APSTAR_NPIX) < masked_fraction) & ~gap
    flags[bad] = 1
    flux[bad] += 20 * sigma[bad] * rng.choice([-1, 1], bad.sum())
    truth = dict(zip(emulator.label_names, labels.tolist(), strict=True))
    return Spectrum(wavelength, flux, ivar, flags, obj=obj or "synthetic", snr=float(snr), path=path,
                    spectrum_type="synthetic", rest_frame=True,
                    meta={"true_labels": truth, "true_v_rel": float(v_rel)})
