"""Put a spectrum onto the apStar rest-frame grid with bad pixels carrying zero weight.

Pixels are bad when their flux or inverse variance is not finite, their inverse variance is not positive, or their
APOGEE_PIXMASK bits intersect the chosen mask. The pixel-weight rules of :mod:`astra_thepayne.core.pixel_weights`
(sky lines, persistence, LITTROW ghosts) act on the spectrum's own pixels when ``weights`` are given (the fitter
passes its own, ``PayneFitter.pixel_weights``).

Resampling (apVisit, other grids) is flux-conserving: each output pixel is the overlap-weighted mean of the input
pixels it covers (pixel edges half-way between centres, log-lambda edges on the apStar grid). An output pixel gets
zero weight when any input pixel it overlaps is bad, when it is not covered completely (chip edges and gaps), so a
bad pixel can never lend weight to a good one. Its inverse variance keeps the information honest:

    ivar_out = (sum f_k^2 / sum f_k d_k / D) / sum f_k^2 var_k

with ``f_k`` the fraction of the output pixel (width ``D``) covered by input pixel ``k`` (width ``d_k``). For
uniform noise this is ``ivar_in D / d``: the information per unit wavelength of the input, so a chip's total
weight is its input's; a pixel overlapping a noisy (e.g. sky-line) input pixel is down-weighted as a whole. Output
pixels share the input pixels on their boundaries, so neighbours are correlated; this diagonal weight gives the right
total information (label errors, chip weights) while the chi2 of the truth falls a little below the number of
pixels (docs/science.md, section 2).
"""
from __future__ import annotations

import numpy as np

from .wavelength import APSTAR_NPIX, MODEL_TO_APSTAR, SPEED_OF_LIGHT_KMS, apstar_wavelength

__all__ = ["good_pixels", "to_apstar_grid", "resample", "pixel_edges", "median_snr", "spectrum_snr",
           "model_grid_coverage"]

_APSTAR_WAVELENGTH = apstar_wavelength()


def good_pixels(flux, ivar, pixel_flags, pixel_flag_mask):
    """Boolean mask of usable pixels."""
    good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    if pixel_flags is not None and pixel_flag_mask:
        good &= (np.asarray(pixel_flags, dtype=np.int64) & int(pixel_flag_mask)) == 0
    return good


def pixel_edges(centres):
    """Edges (n + 1) of pixels with ascending ``centres``: half-way between neighbours, half a step beyond the ends."""
    centres = np.asarray(centres, dtype=float)
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middle = 0.5 * (centres[1:] + centres[:-1])
    return np.concatenate([[centres[0] - (middle[0] - centres[0])], middle,
                           [centres[-1] + (centres[-1] - middle[-1])]])


def _segments(wavelength):
    """(start, stop) of the runs of input pixels without a gap wider than three typical steps (chips)."""
    if len(wavelength) < 2:
        return [(0, len(wavelength))]
    step = np.diff(wavelength)
    breaks = np.flatnonzero(step > 3 * np.median(step)) + 1
    edges = np.concatenate([[0], breaks, [len(wavelength)]])
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def resample(wavelength, flux, ivar, good, new_wavelength, new_edges=None):
    """Flux-conserving resampling onto ``new_wavelength`` (both ascending) with information-conserving ivar.

    Returns ``(flux, ivar)`` on the new grid; ivar is 0 where an output pixel is not fully covered by one run of input
    pixels (ends, chip gaps) and wherever it overlaps a bad input pixel.
    """
    order = np.argsort(wavelength)
    wavelength, flux, ivar, good = (np.asarray(a)[order] for a in (wavelength, flux, ivar, good))
    new_wavelength = np.asarray(new_wavelength, dtype=float)
    out_edges = pixel_edges(new_wavelength) if new_edges is None else np.asarray(new_edges, dtype=float)
    lo, hi = out_edges[:-1], out_edges[1:]
    width = hi - lo
    new_flux = np.zeros(len(new_wavelength))
    new_ivar = np.zeros(len(new_wavelength))
    with np.errstate(invalid="ignore", divide="ignore"):
        variance = np.where(good, 1.0 / np.where(good, ivar, 1.0), np.inf)
    flux_clean = np.where(good, flux, 0.0)
    for start, stop in _segments(wavelength):
        edges = pixel_edges(wavelength[start:stop])
        inside = np.flatnonzero((lo >= edges[0]) & (hi <= edges[-1]))
        if not len(inside):
            continue
        d = np.diff(edges)
        n_cover = int(np.ceil(np.max(width[inside]) / np.min(d))) + 2  # input pixels one output can overlap
        first = np.clip(np.searchsorted(edges, lo[inside], side="right") - 1, 0, len(d) - 1)
        k = np.clip(first[:, None] + np.arange(n_cover)[None, :], 0, len(d) - 1)
        overlap = np.clip(np.minimum(hi[inside, None], edges[k + 1]) - np.maximum(lo[inside, None], edges[k]),
                          0.0, None)
        overlap[:, 1:][k[:, 1:] == k[:, :-1]] = 0.0  # clipped duplicates at the end of a run
        f = overlap / width[inside, None]
        used = f > 0
        bad = np.any(used & ~good[start:stop][k], axis=1)
        var_k = np.where(used, variance[start:stop][k], 0.0)
        exact = np.sum(f**2 * var_k, axis=1)
        information = np.sum(f**2, axis=1) / np.sum(f * d[k] / width[inside, None], axis=1)
        ok = ~bad & np.isfinite(exact) & (exact > 0)
        new_flux[inside[ok]] = np.sum(f * flux_clean[start:stop][k], axis=1)[ok]
        new_ivar[inside[ok]] = information[ok] / exact[ok]
    return new_flux, new_ivar


_APSTAR_EDGES = 10 ** (4.179 + 6e-6 * (np.arange(APSTAR_NPIX + 1) - 0.5))


def to_apstar_grid(spectrum, pixel_flag_mask, weights=None):
    """Flux and ivar of ``spectrum`` on the 8575-pixel apStar rest-frame grid, bad pixels at ivar 0.

    Spectra already on that grid in the rest frame (apStar, mwmStar, aspcapStar) are only masked; others are
    shifted by ``spectrum.v_rel_known`` (when finite) and resampled. ``weights`` (a
    :class:`~astra_thepayne.core.pixel_weights.PixelWeights`) applies the pipelines' pixel-weight rules first.

    Returns
    -------
    flux, ivar : ndarray, shape (8575,)
    """
    flux = np.asarray(spectrum.flux, dtype=float)
    ivar = np.asarray(spectrum.ivar, dtype=float)
    good = good_pixels(flux, ivar, spectrum.pixel_flags, pixel_flag_mask)
    if weights is not None:
        ivar = np.where(good, weights.apply(spectrum.spectrum_type, np.where(good, ivar, 0.0), spectrum.pixel_flags),
                        0.0)
        good &= ivar > 0
    on_grid = (spectrum.rest_frame and len(flux) == APSTAR_NPIX
               and (np.array_equal(spectrum.wavelength, _APSTAR_WAVELENGTH)  # the usual case, and quick to tell
                    or np.allclose(spectrum.wavelength, _APSTAR_WAVELENGTH, rtol=1e-9, atol=0)))
    if on_grid:
        return np.where(good, flux, 0.0), np.where(good, ivar, 0.0)
    wavelength = np.asarray(spectrum.wavelength, dtype=float)
    if not spectrum.rest_frame and np.isfinite(spectrum.v_rel_known):
        wavelength = wavelength / (1.0 + spectrum.v_rel_known / SPEED_OF_LIGHT_KMS)
    finite = np.isfinite(wavelength)
    return resample(wavelength[finite], flux[finite], ivar[finite], good[finite], _APSTAR_WAVELENGTH,
                    _APSTAR_EDGES)


def model_grid_coverage(spectrum, pixels=None):
    """Fraction of the model pixels (default: the 7214 of the APOGEE model grid, as apStar indices) that the
    spectrum samples: inside its wavelength range (rest frame) and not in a gap of more than three of its pixels.
    1 for a spectrum on the apStar grid. A spectrum cut short covers less, however clean its pixels are."""
    if pixels is None:
        pixels = MODEL_TO_APSTAR
    wavelength = np.asarray(spectrum.wavelength, dtype=float)
    if (spectrum.rest_frame and len(wavelength) == APSTAR_NPIX
            and np.allclose(wavelength, _APSTAR_WAVELENGTH, rtol=1e-9, atol=0)):
        return 1.0
    if not spectrum.rest_frame and np.isfinite(spectrum.v_rel_known):
        wavelength = wavelength / (1.0 + spectrum.v_rel_known / SPEED_OF_LIGHT_KMS)
    wavelength = np.sort(wavelength[np.isfinite(wavelength)])
    if len(wavelength) < 2:
        return 0.0
    target = _APSTAR_WAVELENGTH[pixels]
    after = np.searchsorted(wavelength, target)
    inside = (after > 0) & (after < len(wavelength))
    step = np.median(np.diff(wavelength))
    gap = np.where(inside, wavelength[np.minimum(after, len(wavelength) - 1)] - wavelength[np.maximum(after - 1, 0)],
                   np.inf)
    return float(np.mean(inside & (gap <= 3 * step)))


def median_snr(flux, ivar, pixels=None):
    """The project's one S/N: median of ``|flux| sqrt(ivar)`` over the usable pixels (ivar > 0) among ``pixels``
    (default: the model grid) of a spectrum on the apStar grid, i.e. the median S/N per apStar pixel, the
    definition of the DRP's apStar ``SNR`` card. NaN without usable pixels."""
    flux, ivar = np.asarray(flux, dtype=float), np.asarray(ivar, dtype=float)
    if pixels is None:
        pixels = MODEL_TO_APSTAR
    f, i = flux[pixels], ivar[pixels]
    usable = np.isfinite(f) & np.isfinite(i) & (i > 0)
    return float(np.median(np.abs(f[usable]) * np.sqrt(i[usable]))) if usable.any() else float("nan")


def spectrum_snr(spectrum, pixel_flag_mask):
    """The S/N of every fitted spectrum, whatever its type: :func:`median_snr` of the spectrum on the apStar grid
    (resampled when it is not on it) after the bad-pixel mask, before the pipelines' pixel weights and the error
    floor, so that it describes the data, not the fit's options. The coadd of a single-visit apStar and its visit row
    (the same data) get the same value; for apStar coadds it is within a few per cent of the DRP's ``SNR`` card
    (apStar-dr17-2M19485057+5005279: 140.2 against 137.5), for apVisit files it is the S/N per apStar pixel, not per
    apVisit pixel (apVisit-r13-5095-55844-128: 55.9 against the header's 45.0)."""
    return median_snr(*to_apstar_grid(spectrum, pixel_flag_mask))
