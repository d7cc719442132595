"""Spectra drawn from a known network with known noise: the ground truth that label-recovery tests and the demo use."""
from __future__ import annotations

import numpy as np

from .grid import APSTAR_NPIX, MODEL_SEGMENTS, SPEED_OF_LIGHT_KMS, apstar_wavelength
from .spectrum import Spectrum

__all__ = ["synthetic_spectrum", "doppler_shift", "smooth_continuum", "toy_network"]


def doppler_shift(model_wavelength, model_flux, wavelength, v_rel):
    """Flux of a rest-frame model seen at ``wavelength`` from a source with radial velocity ``v_rel`` (km/s, > 0 =
    receding): ``f_obs(lambda) = f_model(lambda / (1 + v/c))``, NaN outside the model.

    The model is interpolated with a quintic spline in log-lambda: a star's spectrum is smooth between pixels, and
    this is not the interpolation the fitter uses (a cubic spline, :class:`astra_thepayne.problem.Shift`), as real
    data would not be.
    """
    from scipy.interpolate import make_interp_spline

    rest = np.log(np.asarray(wavelength) / (1.0 + v_rel / SPEED_OF_LIGHT_KMS))
    grid = np.log(np.asarray(model_wavelength))
    flux = make_interp_spline(grid, model_flux, k=5)(np.clip(rest, grid[0], grid[-1]))
    return np.where((rest >= grid[0]) & (rest <= grid[-1]), flux, np.nan)


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


def toy_network(hidden: int = 48, seed: int = 0):
    """A small random 25-label network on the 7214-pixel model grid with the standard training ranges.

    Features a few pixels wide respond to every label, and a third of the pixels are pure continuum (flux 1). ``hidden``
    must exceed the number of labels: the Jacobian has rank at most ``hidden``, and a narrower network could not
    constrain all 25 labels.
    """
    from .emulator import PayneEmulator
    from .grid import model_wavelength
    from .labels import LABELS

    rng = np.random.default_rng(seed)
    wavelength = model_wavelength()
    k, p = len(LABELS), len(wavelength)
    # each hidden unit listens mostly to one label (like lines that belong to one element), which keeps the labels
    # individually identifiable, plus some cross-talk between labels
    w0 = rng.normal(0, 0.5, (hidden, k))
    w0[np.arange(hidden), np.arange(hidden) % k] += rng.choice([-3.0, 3.0], hidden)
    b0 = 2.0 + rng.normal(0, 0.3, hidden)  # first layer stays in its linear regime: no label goes blind
    w1 = rng.normal(0, 1.0 / np.sqrt(hidden), (hidden, hidden))
    b1 = rng.normal(0, 0.3, hidden)
    # sparse "lines": each pixel responds to few hidden units, so flux stays mostly near 1 with absorption dips
    # sparse, smooth "lines" (a few pixels wide, like APOGEE's line spread): each pixel responds to few hidden units
    w2 = rng.normal(0, 0.04, (p, hidden)) * (rng.random((p, hidden)) < 0.3)
    kernel = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
    w2 = np.apply_along_axis(lambda column: np.convolve(column, kernel / kernel.sum() * 2.5, mode="same"), 0, w2)
    b2 = 1.0 - np.convolve(np.abs(rng.normal(0, 0.05, p)), kernel / kernel.sum(), mode="same")
    continuum = (np.arange(p) // 20) % 3 == 0  # windows of pure continuum (flux exactly 1 for every label)
    taper = np.convolve(continuum.astype(float), kernel / kernel.sum(), mode="same")
    w2 *= (1.0 - taper)[:, None]  # features fade smoothly into the continuum windows: no pixel-scale structure
    b2 = b2 * (1.0 - taper) + taper
    w2[continuum], b2[continuum] = 0.0, 1.0
    x_min = np.array([label.lower for label in LABELS])
    x_max = np.array([label.upper for label in LABELS])
    return PayneEmulator([w0, w1, w2], [b0, b1, b2], x_min, x_max, wavelength, [label.name for label in LABELS],
                         meta={"description": "random toy network for tests and benchmarks - not for science"})
