"""Spectra drawn from a known network with known noise: the ground truth that label-recovery tests and the demo use."""
from __future__ import annotations

import functools

import numpy as np

from .spectrum import Spectrum
from .wavelength import APSTAR_NPIX, MODEL_SEGMENTS, SPEED_OF_LIGHT_KMS, apstar_wavelength

__all__ = ["synthetic_spectrum", "doppler_shift", "smooth_continuum", "toy_network", "line_network", "LineModel",
           "LINE_NETWORK_LABELS", "APOGEE_LSF_SIGMA_PX"]


_SINC_HALF_WIDTH = 8  # taps each side of the windowed sinc in doppler_shift


def doppler_shift(model_wavelength, model_flux, wavelength, v_rel, interpolation="sinc"):
    """Flux of a rest-frame model seen at ``wavelength`` from a source with radial velocity ``v_rel`` (km/s, > 0 =
    receding): ``f_obs(lambda) = f_model(lambda / (1 + v/c))``, NaN outside the model.

    ``interpolation="sinc"`` (default) resamples in log-lambda with a Lanczos-windowed sinc (8 pixels each side):
    band-limited interpolation, the kind the APOGEE DRP applies when it resamples visits onto the apStar grid, and
    not the interpolation the fitter uses (a B-spline of degree 7, :class:`.problem.Shift`), as real data would not
    be. ``model_wavelength`` must then be uniform in log-lambda (the model grid is, within each chip). ``"quintic"``
    and ``"cubic"`` are splines closer to and further from the fitter's (with other end conditions), and
    ``"linear"`` makes lines 2 px wide shallower and broader at half-pixel shifts.
    """
    rest = np.asarray(wavelength) / (1.0 + v_rel / SPEED_OF_LIGHT_KMS)
    if interpolation == "linear":
        return np.interp(rest, model_wavelength, model_flux, left=np.nan, right=np.nan)
    log_model, log_rest = np.log(model_wavelength), np.log(rest)
    inside = (log_rest >= log_model[0]) & (log_rest <= log_model[-1])
    if interpolation == "sinc":
        step = (log_model[-1] - log_model[0]) / (len(log_model) - 1)
        position = (np.clip(log_rest, log_model[0], log_model[-1]) - log_model[0]) / step
        nearest = np.floor(position).astype(int)
        taps = nearest[:, None] + np.arange(1 - _SINC_HALF_WIDTH, _SINC_HALF_WIDTH + 1)[None, :]
        distance = position[:, None] - taps
        kernel = np.sinc(distance) * np.sinc(distance / _SINC_HALF_WIDTH)
        values = np.asarray(model_flux, dtype=float)[np.clip(taps, 0, len(log_model) - 1)]  # ends held constant
        flux = (kernel * values).sum(axis=1) / kernel.sum(axis=1)
        return np.where(inside, flux, np.nan)
    degree = {"cubic": 3, "quintic": 5}.get(interpolation)
    if degree is None:
        raise ValueError(f"interpolation must be 'sinc', 'quintic', 'cubic' or 'linear', not {interpolation!r}")
    from scipy.interpolate import make_interp_spline

    flux = make_interp_spline(log_model, model_flux, k=degree)(np.clip(log_rest, log_model[0], log_model[-1]))
    return np.where(inside, flux, np.nan)


def smooth_continuum(wavelength, rng, level=1000.0):
    """A positive, slowly varying continuum (the kind a degree-4 Chebyshev polynomial per chip describes)."""
    x = (wavelength - 16000.0) / 1000.0
    coefficients = rng.normal(0, 0.08, 3)
    return level * (1.0 + coefficients[0] * x + coefficients[1] * x**2 + coefficients[2] * x**3)


def synthetic_spectrum(emulator, labels, snr=100.0, v_rel=0.0, rng=None, masked_fraction=0.02, path="", obj="",
                       continuum=True, interpolation="sinc") -> Spectrum:
    """Draw an apStar-grid spectrum from ``emulator`` at physical ``labels`` (K,).

    The rectified model is Doppler shifted by ``v_rel`` (km/s), multiplied by a smooth continuum, and given
    Gaussian noise of standard deviation ``continuum / snr``. Chip gaps and grid ends carry flux 0 and ivar 0 as in
    apStar files. A fraction ``masked_fraction`` of pixels is corrupted (flux spikes) and flagged BADPIX (bit 0), so
    that a fitter which ignores pixel flags is caught out. The truth is kept in ``meta["true_labels"]`` and
    ``meta["true_v_rel"]``. ``interpolation`` is the Doppler shift's (see :func:`doppler_shift`).
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
        rectified[start:stop] = doppler_shift(seg_model_wl, seg_model, wavelength[start:stop], v_rel,
                                              interpolation)
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
    from .labels import LABELS
    from .wavelength import model_wavelength

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


#: Labels of :func:`line_network` and their ranges: a box inside the production training ranges where the closed-form
#: line model below stays physical (cool enough for metal lines, lines narrow enough to stay sharp).
LINE_NETWORK_LABELS = (("teff", 4000.0, 6500.0), ("logg", 1.0, 5.0), ("v_turb", 0.5, 2.5), ("mg_h", -1.0, 0.5),
                       ("ti_h", -1.0, 0.5), ("fe_h", -1.5, 0.5), ("v_macro", 0.5, 8.0))
_LINE_SIGMA_PX = 0.75  # instrumental line spread of line_network (Gaussian sigma, apStar pixels): FWHM 1.8 px
_KMS_PER_PIXEL = SPEED_OF_LIGHT_KMS * (10**6e-6 - 1)
#: APOGEE's line spread on the apStar grid: R ~ 22,500 is c/R = 13.3 km/s FWHM, 3.2 pixels of 4.14 km/s (sigma 1.37).
#: line_network's default lines are sharper than that, a harsher test of wrong minima and of the model shift.
APOGEE_LSF_SIGMA_PX = SPEED_OF_LIGHT_KMS / 22500.0 / _KMS_PER_PIXEL / np.sqrt(8 * np.log(2))


def _curve_of_growth():
    """Equivalent width (in units of the Doppler sigma) of a Gaussian-profile line of central optical depth tau,
    ``int 1 - exp(-tau exp(-u^2 / 2)) du``, tabulated over log10 tau for interpolation."""
    log_tau = np.linspace(-4, 4, 161)
    u = np.linspace(-12, 12, 2401)
    depth = 1 - np.exp(-(10 ** log_tau)[:, None] * np.exp(-0.5 * u**2)[None, :])
    return log_tau, depth.sum(axis=1) * (u[1] - u[0])


class LineModel:
    """A closed-form spectrum of sharp absorption lines on the 7214-pixel model grid (the truth behind
    :func:`line_network`; not a stellar atmosphere).

    Each line has an element (Fe, Mg or Ti, or a molecule that scales with fe_h), an excitation potential and an
    ionisation stage. Its central optical
    depth follows ``log tau = log tau0 + [X/H] - chi (theta - theta_sun) + ionisation and gravity terms``
    (theta = 5040 / teff); its equivalent width comes from the exact curve of growth of a Gaussian profile whose
    Doppler width includes v_turb (so v_turb strengthens saturated lines only), and the line is drawn as a Gaussian of
    that width broadened by the instrument and v_macro (which conserve the equivalent width). Fe has many lines, weak
    to saturated; Mg fewer, stronger ones; Ti weak ones; molecular lines grow towards low teff and are mostly
    blended with atomic lines a pixel or two away.
    """

    label_names = tuple(name for name, _, _ in LINE_NETWORK_LABELS)

    def __init__(self, seed=0, n_lines=(("fe", 420), ("mg", 45), ("ti", 40)), n_molecular=300,
                 lsf_sigma=_LINE_SIGMA_PX):
        from .wavelength import MODEL_SEGMENTS

        self.lsf_sigma = float(lsf_sigma)
        rng = np.random.default_rng(seed)
        sizes = [b - a for a, b in MODEL_SEGMENTS]
        edges = np.concatenate([[0], np.cumsum(sizes)])
        element, centre, log_tau0, chi, ion = [], [], [], [], []
        strength = {"fe": (-1.5, 1.5), "mg": (-0.3, 1.5), "ti": (-1.8, -0.2)}
        for name, n in n_lines:
            chip = rng.choice(len(sizes), n, p=np.array(sizes) / sum(sizes))
            # centres at least 12 px from chip edges, at random sub-pixel phases
            centre.append(edges[chip] + 12 + rng.uniform(0, 1, n) * (np.array(sizes)[chip] - 24))
            element += [name] * n
            log_tau0.append(rng.uniform(*strength[name], n))
            chi.append(rng.uniform(0.0, 5.5, n))
            ion.append(rng.random(n) < (0.2 if name == "fe" else 0.1))
        # molecular lines (think CN, CO, OH): strong in cool stars, weak in hot ones, and most of them blended with
        # an atomic line 0.7-1.8 px away, so that the blend's centre moves with teff as in real spectra (what makes
        # a velocity found with the wrong labels a pixel off)
        atoms = np.concatenate(centre)
        n_mol = n_molecular
        partner = rng.choice(len(atoms), n_mol, replace=False)
        blended = rng.random(n_mol) < 0.7
        lone = edges[-1] * rng.uniform(0, 1, n_mol)
        offset = rng.choice([-1.0, 1.0], n_mol) * rng.uniform(0.7, 1.8, n_mol)
        position = np.where(blended, atoms[partner] + offset, lone)
        centre.append(np.clip(position, 12, edges[-1] - 12))
        element += ["mol"] * n_mol
        log_tau0.append(rng.uniform(-1.2, 0.8, n_mol))
        chi.append(-rng.uniform(3.0, 6.0, n_mol))  # negative "excitation": dissociation makes them grow as T falls
        ion.append(np.zeros(n_mol, dtype=bool))
        self.element = np.array(element)
        self.centre, self.log_tau0 = np.concatenate(centre), np.concatenate(log_tau0)
        self.chi, self.ion = np.concatenate(chi), np.concatenate(ion)
        self.n_pixels = int(edges[-1])
        index = {name: i for i, name in enumerate(self.label_names)}
        self._abundance_index = np.array([index["fe_h" if e == "mol" else f"{e}_h"] for e in self.element])
        self._cog = _curve_of_growth()
        half = 9  # pixels each side drawn; beyond 4 sigma of the widest line the flux is exactly 1
        self._pixels = np.floor(self.centre).astype(int)[:, None] + np.arange(-half, half + 2)[None, :]
        self._offset = self._pixels - self.centre[:, None]

    def log_tau(self, labels):
        """Central optical depth (log10) of every line, ``(N, L)`` for labels ``(N, K)``."""
        x = np.atleast_2d(np.asarray(labels, dtype=float))
        teff, logg = x[:, :1], x[:, 1:2]
        theta = 5040.0 / teff
        # neutral lines of these metals weaken as they ionise (hotter, lower gravity); ionised lines gain at low
        # gravity
        stage = np.where(self.ion, -0.35 * (logg - 3.0) + 0.3 * (teff - 5000.0) / 1000.0,
                         0.1 * (logg - 3.0) - 0.45 * (teff - 5000.0) / 1000.0)
        return self.log_tau0 + x[:, self._abundance_index] - self.chi * (theta - 5040.0 / 5000.0) + stage

    def spectra(self, labels, shift=0.0):
        """Normalised flux ``(N, 7214)`` for labels ``(N, K)`` in :attr:`label_names` order, with every line moved
        by ``shift`` pixels (exactly: the lines are drawn at their new centres; ``|shift| <= 2``)."""
        if abs(shift) > 2:
            raise ValueError(f"shift {shift} px: at most 2 (the lines are drawn on a window of fixed pixels)")
        x = np.atleast_2d(np.asarray(labels, dtype=float))
        v_turb, v_macro = x[:, 2:3], x[:, 6:7]
        doppler = np.sqrt(1.0**2 + v_turb**2) / _KMS_PER_PIXEL / np.sqrt(2)  # thermal ~1 km/s + v_turb, sigma in px
        log_tau = np.clip(self.log_tau(x), *self._cog[0][[0, -1]])
        width = np.interp(log_tau, *self._cog) * doppler  # equivalent width, pixels
        sigma = np.sqrt(self.lsf_sigma**2 + doppler**2 + (v_macro / _KMS_PER_PIXEL) ** 2 / 2)  # (N, 1)
        depth = width / (np.sqrt(2 * np.pi) * sigma)  # (N, L)
        profile = np.exp(-0.5 * ((self._offset[None] - shift) / sigma[:, :, None]) ** 2)  # (N, L, W)
        absorbed = np.minimum(depth[:, :, None] * profile, 0.95)
        log_flux = np.zeros((len(x), self.n_pixels + 40))
        pixels = np.clip(self._pixels, 0, self.n_pixels + 39).ravel()
        for row, a in zip(log_flux, np.log1p(-absorbed), strict=True):  # overlapping lines multiply
            row += np.bincount(pixels, a.ravel(), len(row))
        return np.exp(log_flux[:, :self.n_pixels])


@functools.lru_cache(maxsize=4)
def line_network(hidden: int = 64, seed: int = 0, n_train: int = 3000, ridge: float = 1e-6,
                 lsf_sigma: float = _LINE_SIGMA_PX):
    """A small Payne network with the chi2 surface of a physical one: sharp lines, ragged response, 7 labels.

    An extreme learning machine fitted to :class:`LineModel`: random first and second hidden layers (LeakyReLU 0.01,
    kinks spread through the label box, as in a trained network), and the output layer solved by ridge-regularised
    linear least squares on ``n_train`` spectra drawn uniformly from the box. The result is the truth of the tests
    that use it (spectra are drawn from the network, not from the line model); the line model only gives it the
    shape of real spectra: hundreds of lines 1.8-3 px FWHM whose depths change with teff, logg, fe_h, mg_h (strong
    lines) and ti_h (weak lines), and whose widths change with v_turb and v_macro. ``lsf_sigma`` is the instrumental
    line spread in pixels (default 0.75, sharper than APOGEE's :data:`APOGEE_LSF_SIGMA_PX`). Deterministic in
    ``seed``; about a second to build; cached (treat the returned network as read-only).
    """
    from .emulator import PayneEmulator
    from .wavelength import model_wavelength

    rng = np.random.default_rng(seed)
    model = LineModel(seed=seed, lsf_sigma=lsf_sigma)
    names = model.label_names
    x_min = np.array([lo for _, lo, _ in LINE_NETWORK_LABELS])
    x_max = np.array([hi for _, _, hi in LINE_NETWORK_LABELS])
    k = len(names)
    scaled = rng.uniform(-0.5, 0.5, (n_train, k))
    flux = model.spectra((scaled + 0.5) * (x_max - x_min) + x_min)
    # kinks (z = 0) of each unit cross the box at a random point, in a random direction
    w0 = rng.normal(0, 1, (hidden, k)) * 4.0 / np.sqrt(k)
    b0 = -np.sum(w0 * rng.uniform(-0.4, 0.4, (hidden, k)), axis=1)
    a0 = _leaky(scaled @ w0.T + b0)
    w1 = rng.normal(0, 1, (hidden, hidden)) / np.sqrt(hidden)
    z1 = a0 @ w1.T
    quantiles = rng.uniform(0.1, 0.9, hidden)
    b1 = -np.array([np.quantile(z1[:, j], q) for j, q in enumerate(quantiles)])
    a1 = _leaky(z1 + b1)
    design = np.hstack([a1, np.ones((n_train, 1))])
    gram = design.T @ design
    gram[np.diag_indices_from(gram)] += ridge * np.trace(gram) / len(gram)
    solution = np.linalg.solve(gram, design.T @ (flux - 1.0))  # (H + 1, P)
    w2, b2 = solution[:-1].T, 1.0 + solution[-1]
    return PayneEmulator([w0, w1, w2], [b0, b1, b2], x_min, x_max, model_wavelength(), names,
                         meta={"description": f"line_network(hidden={hidden}, seed={seed}, lsf_sigma={lsf_sigma:g}): "
                               "an extreme learning "
                               "machine fitted to a closed-form line model, for tests - not for science"})


def _leaky(z):
    return np.where(z > 0, z, 0.01 * z)
