"""Continuum normalisation: an inverse-variance weighted Chebyshev polynomial per APOGEE chip region, fitted on
continuum pixels with iterative sigma clipping, and the default choice of continuum pixels from the network."""
from __future__ import annotations

import numpy as np
from numpy.polynomial import chebyshev

from .wavelength import CONTINUUM_REGIONS

__all__ = ["ContinuumBasis", "continuum_pixels_from_model", "continuum_design"]


class ContinuumBasis:
    """The continuum model on one wavelength grid: a Chebyshev basis of ``degree`` per region, built once and used
    for many spectra by :meth:`fit`."""

    def __init__(self, wavelength, degree=4, regions=CONTINUUM_REGIONS):
        wavelength = np.asarray(wavelength, dtype=float)
        self.size, self.n_terms = len(wavelength), int(degree) + 1
        pixels, bases = [], []
        for lo, hi in regions:
            index = np.flatnonzero((wavelength >= lo) & (wavelength <= hi))
            if len(index):
                pixels.append(index)
                bases.append(chebyshev.chebvander(2 * (wavelength[index] - lo) / (hi - lo) - 1, degree))  # [-1, 1]
        # the regions' pixels one after the other; region r is self.slices[r] of them
        ends = np.cumsum([len(p) for p in pixels])
        self.slices = [slice(a, b) for a, b in zip(np.concatenate([[0], ends[:-1]]), ends, strict=True)]
        self.pixels = np.concatenate(pixels) if pixels else np.zeros(0, dtype=int)
        self.basis = np.vstack(bases) if bases else np.zeros((0, self.n_terms))
        # products of basis functions per pixel: weights @ products is a normal matrix
        self.products = (self.basis[:, :, None] * self.basis[:, None, :]).reshape(len(self.pixels), -1)

    def fit(self, flux, ivar, continuum_mask, n_clip=3, clip_sigma=3.0):
        """Fit the continuum of one spectrum on this grid.

        Parameters
        ----------
        flux, ivar : ndarray, shape (P,)
            Pixels with ``ivar == 0`` carry no weight.
        continuum_mask : ndarray of bool, shape (P,)
            Pixels allowed to define the continuum.
        n_clip, clip_sigma : int, float
            Rounds of clipping: continuum pixels further than ``clip_sigma`` from the current fit (in units of their
            own noise) are dropped and the fit repeated. This keeps cosmic rays, unflagged bad pixels and weak lines
            that fall on nominal continuum pixels from pulling the polynomial. A round that would leave too few
            pixels for the polynomial is not applied (the previous round's fit stands): at very high S/N, nominal
            continuum pixels that depart from 1 by a fraction of a percent all lie beyond a few sigma, and the
            region would be lost.

        Returns
        -------
        continuum : ndarray, shape (P,)
            NaN outside the regions and in regions with too few usable continuum pixels.
        """
        n = self.n_terms
        continuum = np.full(self.size, np.nan)
        f, w = flux[self.pixels], ivar[self.pixels]
        usable = continuum_mask[self.pixels] & (w > 0) & np.isfinite(f)
        f = np.where(usable, f, 0.0)
        sigma_weight = np.sqrt(np.where(usable, w, 0.0))
        for part in self.slices:
            use, coefficients = usable[part], None
            for _ in range(n_clip + 1):
                if np.count_nonzero(use) < 3 * n:
                    coefficients = None
                    break
                # inverse-variance weighted least squares through the normal equations: a Chebyshev basis on
                # [-1, 1] is well conditioned, and unused pixels simply get weight 0
                weights = np.where(use, w[part], 0.0)
                try:
                    coefficients = np.linalg.solve((weights @ self.products[part]).reshape(n, n),
                                                   (weights * f[part]) @ self.basis[part])
                except np.linalg.LinAlgError:
                    coefficients = None
                    break
                model = self.basis[part] @ coefficients
                keep = use & (np.abs((f[part] - model) * sigma_weight[part]) < clip_sigma)
                if np.array_equal(keep, use) or np.count_nonzero(keep) < 3 * n:
                    break
                use = keep
            if coefficients is not None:
                continuum[self.pixels[part]] = model
        return continuum


def continuum_pixels_from_model(emulator, tolerance=0.01, min_fraction=0.05, n_samples=256, seed=0):
    """Model pixels whose flux stays within ``tolerance`` of 1 across the network's label space.

    The network is evaluated at ``n_samples`` label vectors drawn uniformly over its training box (scaled labels in
    [-0.45, 0.45]); a pixel qualifies when ``max |flux - 1|`` over the draws is below ``tolerance``. Where a chip
    region would keep fewer than ``min_fraction`` of its pixels, the tolerance is relaxed for that region to the
    ``min_fraction`` quantile of the deviation, so every region keeps enough pixels to fit a polynomial.

    Returns
    -------
    ndarray of bool, shape (P,)
    """
    rng = np.random.default_rng(seed)
    draws = rng.uniform(-0.45, 0.45, (n_samples, emulator.n_labels))
    deviation = np.zeros(emulator.n_pixels)
    for chunk in np.array_split(draws, max(1, n_samples // 64)):
        deviation = np.maximum(deviation, np.abs(emulator.predict(chunk) - 1).max(axis=0))
    selected = deviation < tolerance
    for lo, hi in CONTINUUM_REGIONS:
        region = (emulator.wavelength >= lo) & (emulator.wavelength <= hi)
        if region.any() and selected[region].mean() < min_fraction:
            threshold = np.quantile(deviation[region], min_fraction)
            selected[region] = deviation[region] <= threshold
    return selected


def continuum_design(wavelength, degree=4, regions=CONTINUUM_REGIONS):
    """Chebyshev basis of the continuum: one block of ``degree + 1`` columns per region, zero outside it.

    Returns
    -------
    ndarray, shape (P, len(regions) * (degree + 1))
    """
    wavelength = np.asarray(wavelength, dtype=float)
    columns = []
    for lo, hi in regions:
        in_region = (wavelength >= lo) & (wavelength <= hi)
        x = 2 * (wavelength - lo) / (hi - lo) - 1
        basis = chebyshev.chebvander(np.where(in_region, x, 0.0), degree)
        columns.append(np.where(in_region[:, None], basis, 0.0))
    return np.hstack(columns)
