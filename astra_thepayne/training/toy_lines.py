"""A toy, physically motivated line model of APOGEE H-band spectra, used to make the demonstration network.

This is **not** a stellar atmosphere code. It reproduces the qualitative behaviour that makes labels measurable,
with a few closed-form ingredients, so that a small network can learn it and a fit can recover the labels:

* **Atomic lines** (every element of the 25-label network has its own lines, Fe the most): the optical depth at
  the line centre scales as ``10**[X/H]`` (abundance), with a Boltzmann factor ``10**(-theta * chi_exc)``
  (``theta = 5040 / teff``), a Saha ionisation balance ``log(N_II / N_I) = 2.5 log T - theta chi_ion - 0.1762
  - log P_e`` and a continuous opacity proportional to the electron pressure ``P_e`` (H- dominates the H band),
  everything relative to the Sun (teff 5777 K, logg 4.44, scaled-solar abundances).
  ``log P_e = 1 + (logg - 4.44) / 3 + 6 log10(teff / 5777)`` is a rough fit to model atmospheres at the depth
  where lines form; gravity enters the spectrum through it and through pressure-broadened (Lorentzian) wings
  whose width grows as ``10**((logg - 4.44) / 3)``.
* **Molecular bands** (CO, CN, OH, and 13CO / 13CN): strength follows the product of the abundances involved and a
  saturating dissociation balance ``x / (1 + x)`` with ``log x = D (theta - theta_sun) - 1`` so that molecules
  vanish in hot stars and saturate in cool ones. ``12C/13C = R`` splits carbon into ``R / (1 + R)`` 12C and
  ``1 / (1 + R)`` 13C, so 13C features appear at low ratios and 12C features fade below R ~ 1.
* **Hydrogen Brackett lines** (n = 11..20 -> 4, at their vacuum wavelengths): populated from 12.75 eV, so they grow
  strongly with teff; Stark-broadened Lorentzian wings grow with the electron pressure (gravity).
* **Continuum windows**: 24 windows of 4 Angstrom (8 per chip) hold no lines, so that continuum-normalisation has
  true continuum pixels (:meth:`ToyLineModel.continuum_mask`); hydrogen wings of hot stars still reach some of them.
* **Broadening**: each line has a Gaussian Doppler core ``b = sqrt(2 k T / m + v_turb**2 + b_floor**2)`` (area
  conserved, so ``v_turb`` de-saturates strong lines and raises their equivalent widths, the classical curve of
  growth); ``exp(-tau)`` is computed on an oversampled log-lambda grid and then convolved with a Gaussian
  macroturbulence (``sigma = v_macro / sqrt(2)``) and the APOGEE line spread function (R = 22 500), and averaged
  into pixels.

The line list is drawn once from a fixed seed (:data:`LINE_LIST_SEED`), so the model is a deterministic function
of the 25 labels. Solar-scaled line strengths are chosen so that lines of every element are visible at S/N ~ 100
for most of the training range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.labels import LABEL_NAMES
from ..core.wavelength import APSTAR_CDELT1, APSTAR_CRVAL1, MODEL_SEGMENTS, MODEL_TO_APSTAR, SPEED_OF_LIGHT_KMS

__all__ = ["ToyLineModel", "LINE_LIST_SEED", "SOLAR", "ELEMENTS"]

LINE_LIST_SEED = 20190722  # fixed: the toy model (and thus the demonstration network) depends on it
SOLAR = {"teff": 5777.0, "logg": 4.44}
_THETA_SUN = 5040.0 / SOLAR["teff"]
_LOG_PE_SUN = 1.0
_K_OVER_AMU = 1.380649e-23 / 1.66053907e-27 / 1e6  # (km/s)^2 per K per amu
_RESOLUTION = 22500.0
_B_FLOOR = 1.5  # km/s: stands in for unresolved broadening, and keeps lines resolved on the oversampled grid
_WING_CUTOFF = 40.0  # km/s: damping wings of metal and molecular lines taper to zero here
_BR_CUTOFF = 2000.0  # km/s: Brackett Stark wings taper to zero here (~110 Angstrom)
# Continuum windows: 8 per chip, 4 Angstrom wide; no line centre within the wing cut-off plus 4.5 sigma of the widest
# broadening (v_macro = 30 km/s with the LSF: sigma = 21.9 km/s) of their edges.
_N_WINDOWS_PER_CHIP = 8
_WINDOW_HALF_WIDTH = 2.0
_LINE_FREE_MARGIN = _WING_CUTOFF + 100.0  # km/s
_WINDOW_BRACKETT_CLEARANCE = 40.0  # Angstrom

# element: (mass in amu, first ionisation potential in eV, number of atomic lines, fraction of lines from ions)
ELEMENTS = {
    "c": (12.0, 11.26, 4, 0.0), "n": (14.0, 14.53, 3, 0.0), "o": (16.0, 13.62, 3, 0.0),
    "na": (23.0, 5.14, 4, 0.0), "mg": (24.3, 7.65, 8, 0.0), "al": (27.0, 5.99, 5, 0.0),
    "si": (28.1, 8.15, 10, 0.0), "p": (31.0, 10.49, 4, 0.0), "s": (32.1, 10.36, 5, 0.0),
    "k": (39.1, 4.34, 4, 0.0), "ca": (40.1, 6.11, 7, 0.0), "ti": (47.9, 6.83, 8, 0.25),
    "v": (50.9, 6.75, 5, 0.0), "cr": (52.0, 6.77, 5, 0.0), "mn": (54.9, 7.43, 5, 0.0),
    "fe": (55.8, 7.90, 45, 0.1), "co": (58.9, 7.88, 5, 0.0), "ni": (58.7, 7.64, 8, 0.0),
    "cu": (63.5, 7.73, 4, 0.0), "ge": (72.6, 7.90, 4, 0.0),
}
# molecule: (mass, effective dissociation coefficient D, number of lines, elements in it, carbon isotope or None)
_MOLECULES = {
    "12co": (28.0, 5.0, 24, ("c", "o"), 12), "13co": (29.0, 5.0, 10, ("c", "o"), 13),
    "12cn": (26.0, 4.0, 24, ("c", "n"), 12), "13cn": (27.0, 4.0, 8, ("c", "n"), 13),
    "oh": (17.0, 3.0, 24, ("o",), None),
}
_SOLAR_C12_C13 = 89.0
# Brackett series n -> 4: upper level n and vacuum wavelength (Angstrom), 1 / lambda = R_H (1/16 - 1/n^2)
_BRACKETT_N = np.arange(11, 21)
# Effective excitation of n = 4: 12.75 eV, halved because hydrogen ionisation and the rising H- opacity of hot stars
# offset part of the Boltzmann growth.
_BR_EXCITATION = 6.4


def _brackett_wavelengths():
    """Vacuum wavelengths (Angstrom) of Brackett n -> 4 for n = 11..20 (Rydberg formula for hydrogen)."""
    return 1e8 / (109678.77 * (1 / 16 - 1 / _BRACKETT_N.astype(float) ** 2))


def _log_pe(teff, logg):
    return _LOG_PE_SUN + (logg - SOLAR["logg"]) / 3.0 + 6.0 * np.log10(teff / SOLAR["teff"])


def _log_ion_ratio(teff, logg, chi_ion):
    """log10 N_II / N_I from the Saha equation (partition-function ratio taken as 1)."""
    return 2.5 * np.log10(teff) - (5040.0 / teff) * chi_ion - 0.1762 - _log_pe(teff, logg)


def _log_stage_fraction(teff, logg, chi_ion, ion):
    r = _log_ion_ratio(teff, logg, chi_ion)
    # log10 of N_I / N or N_II / N, written stably for large |r|
    return np.where(ion, -np.logaddexp(0.0, -r * np.log(10)) / np.log(10),
                    -np.logaddexp(0.0, r * np.log(10)) / np.log(10))


@dataclass(frozen=True)
class _Lines:
    wavelength: np.ndarray  # (L,) Angstrom
    label_index: np.ndarray  # (L, 2) labels whose [X/H] add to log tau (-1 = none)
    chi_exc: np.ndarray  # (L,) eV
    chi_ion: np.ndarray  # (L,) eV (0 for molecules)
    ion: np.ndarray  # (L,) bool
    mass: np.ndarray  # (L,) amu
    log_tau_sun: np.ndarray  # (L,) log10 central optical depth in the Sun for b = 2 km/s
    dissociation: np.ndarray  # (L,) D of the molecule (0 for atoms)
    isotope: np.ndarray  # (L,) 0 (no carbon isotope), 12 or 13
    molecular: np.ndarray  # (L,) bool


class ToyLineModel:
    """Deterministic toy spectra on the 7214-pixel APOGEE model grid.

    Parameters
    ----------
    oversample : int
        Sub-pixels per apStar pixel for the radiative part (default 6: 0.69 km/s steps).
    seed : int
        Seed of the line list (default :data:`LINE_LIST_SEED`).

    Examples
    --------
    >>> model = ToyLineModel()
    >>> flux = model.spectrum({"teff": 4800, "logg": 2.5, "fe_h": -0.3})   # other labels at solar-ish defaults
    >>> flux.shape
    (7214,)
    """

    label_names = LABEL_NAMES
    defaults = {"teff": 5777.0, "logg": 4.44, "v_turb": 1.0, "c12_c13": _SOLAR_C12_C13, "v_macro": 3.0}

    def __init__(self, oversample: int = 6, seed: int = LINE_LIST_SEED):
        self.oversample = int(oversample)
        self.seed = int(seed)
        self._index = {name: i for i, name in enumerate(LABEL_NAMES)}
        self.lines = self._draw_lines(np.random.default_rng(self.seed))
        # oversampled log-lambda grid over the model segments plus padding for the wings and the convolution
        pad = 160
        self._first = MODEL_SEGMENTS[0][0] - pad
        last = MODEL_SEGMENTS[-1][1] + pad
        n_fine = (last - self._first) * self.oversample
        # sub-pixel centres: apStar pixel i covers [i - 0.5, i + 0.5) in index units
        self._fine_index = self._first - 0.5 + (np.arange(n_fine) + 0.5) / self.oversample
        self._dv = APSTAR_CDELT1 * np.log(10) * SPEED_OF_LIGHT_KMS / self.oversample  # km/s per sub-pixel
        self._freq = np.fft.rfftfreq(n_fine, d=self._dv)  # cycles per km/s
        self._pixels = MODEL_TO_APSTAR - self._first
        self._precompute_windows()

    # -- line list -------------------------------------------------------------------------------------------
    def _draw_lines(self, rng) -> _Lines:
        wl_edges = [(10 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * (a + 8)), 10 ** (APSTAR_CRVAL1 + APSTAR_CDELT1 * (b - 8)))
                    for a, b in MODEL_SEGMENTS]
        widths = np.array([b - a for a, b in wl_edges])

        # Line-free continuum windows, evenly spread over each chip: line centres stay far enough away that neither
        # wings (cut at _WING_CUTOFF) nor the widest broadening (v_macro 30 km/s and the LSF) reach the window core.
        per_chip = []
        for lo, hi in wl_edges:
            spacing = (hi - lo) / _N_WINDOWS_PER_CHIP
            per_chip.append(lo + spacing * (np.arange(_N_WINDOWS_PER_CHIP) + 0.5 + rng.uniform(-0.2, 0.2,
                                                                                               _N_WINDOWS_PER_CHIP)))
        centres = np.concatenate(per_chip)
        # ... and keep clear of the cores of the Brackett lines
        offset = centres[:, None] - _brackett_wavelengths()[None, :]
        nearest = np.argmin(np.abs(offset), axis=1)
        near = np.abs(offset[np.arange(len(centres)), nearest]) < _WINDOW_BRACKETT_CLEARANCE
        shift = np.sign(offset[np.arange(len(centres)), nearest]) * _WINDOW_BRACKETT_CLEARANCE
        centres = np.where(near, _brackett_wavelengths()[nearest] + shift, centres)
        self.continuum_windows = centres[:, None] + np.array([[-1.0, 1.0]]) * _WINDOW_HALF_WIDTH
        exclusion = _WINDOW_HALF_WIDTH + self.continuum_windows.mean(axis=1) * _LINE_FREE_MARGIN / SPEED_OF_LIGHT_KMS

        def positions(n):
            out = np.empty(0)
            while len(out) < n:  # rejection sampling keeps the draw order, hence the list, fixed by the seed
                chip = rng.choice(len(wl_edges), size=n, p=widths / widths.sum())
                lo = np.array([wl_edges[c][0] for c in chip])
                wl = lo + rng.uniform(0, 1, n) * widths[chip]
                centre = self.continuum_windows.mean(axis=1)
                free = np.all(np.abs(wl[:, None] - centre[None, :]) > exclusion[None, :], axis=1)
                out = np.concatenate([out, wl[free]])
            return out[:n]

        rows = []
        for element, (mass, chi_ion, n, ion_fraction) in ELEMENTS.items():
            k = self._index[f"{element}_h"]
            ion = rng.uniform(size=n) < ion_fraction
            # Fe carries weak and strong lines; rarer elements get moderately strong lines so each is measurable
            log_tau = rng.uniform(-0.9, 0.9, n) if element == "fe" else rng.uniform(-0.5, 0.7, n)
            rows.append(dict(wavelength=positions(n), label_index=np.tile([k, -1], (n, 1)),
                             chi_exc=rng.uniform(2.0, 6.5, n), chi_ion=np.full(n, chi_ion), ion=ion,
                             mass=np.full(n, mass), log_tau_sun=log_tau, dissociation=np.zeros(n),
                             isotope=np.zeros(n, int), molecular=np.zeros(n, bool)))
        for (mass, dissociation, n, elements, isotope) in _MOLECULES.values():
            idx = [self._index[f"{e}_h"] for e in elements] + [-1] * (2 - len(elements))
            # 13C bands are weak at the solar ratio (89) and strong below ~10
            log_tau = rng.uniform(-0.2, 0.6, n)
            rows.append(dict(wavelength=positions(n), label_index=np.tile(idx, (n, 1)),
                             chi_exc=rng.uniform(0.2, 1.5, n), chi_ion=np.zeros(n), ion=np.zeros(n, bool),
                             mass=np.full(n, mass), log_tau_sun=log_tau, dissociation=np.full(n, dissociation),
                             isotope=np.full(n, isotope or 0), molecular=np.ones(n, bool)))
        cat = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
        return _Lines(**cat)

    def _precompute_windows(self):
        # Each line touches only sub-pixels within +-_WING_CUTOFF km/s of its centre.
        log_idx = (np.log10(self.lines.wavelength) - APSTAR_CRVAL1) / APSTAR_CDELT1
        self._centre = (log_idx - self._first + 0.5) * self.oversample - 0.5  # fractional sub-pixel position
        half = int(np.ceil(_WING_CUTOFF / self._dv))
        offsets = np.arange(-half, half + 1)
        start = np.floor(self._centre).astype(int)
        self._win_idx = start[:, None] + offsets[None, :]  # (L, W)
        self._win_v = (self._win_idx - self._centre[:, None]) * self._dv  # km/s from line centre
        taper = np.clip(1 - (self._win_v / _WING_CUTOFF) ** 2, 0, None) ** 2  # smooth cut-off of damping wings
        self._taper = taper
        # Brackett lines: wide windows for Stark wings
        log_idx = (np.log10(_brackett_wavelengths()) - APSTAR_CRVAL1) / APSTAR_CDELT1
        self._br_centre = (log_idx - self._first + 0.5) * self.oversample - 0.5
        n_fine = len(self._fine_index)
        self._br_v = (np.arange(n_fine)[None, :] - self._br_centre[:, None]) * self._dv  # (10, n_fine)
        self._br_taper = np.clip(1 - (self._br_v / _BR_CUTOFF) ** 2, 0, None) ** 2
        # oscillator strength falls roughly as n^-3 along the series
        self._br_log_tau_sun = np.log10(0.08 * (11.0 / _BRACKETT_N) ** 3)

    # -- physics ---------------------------------------------------------------------------------------------
    def _full_labels(self, labels) -> np.ndarray:
        if isinstance(labels, dict):
            unknown = set(labels) - set(LABEL_NAMES)
            if unknown:
                raise ValueError(f"unknown labels {sorted(unknown)}; expected some of {list(LABEL_NAMES)}")
            return np.array([labels.get(n, self.defaults.get(n, 0.0)) for n in LABEL_NAMES], dtype=float)
        x = np.asarray(labels, dtype=float)
        if x.shape != (len(LABEL_NAMES),):
            raise ValueError(f"labels must have shape ({len(LABEL_NAMES)},), got {x.shape}")
        return x

    def opacity(self, labels) -> np.ndarray:
        """Line optical depth on the oversampled grid for one label vector."""
        x = self._full_labels(labels)
        teff, logg, v_turb = x[self._index["teff"]], x[self._index["logg"]], x[self._index["v_turb"]]
        ratio = x[self._index["c12_c13"]]
        theta = 5040.0 / teff
        L = self.lines
        abundance = np.where(L.label_index >= 0, x[np.clip(L.label_index, 0, None)], 0.0).sum(axis=1)
        log_pe = _log_pe(teff, logg)
        # atoms: Boltzmann x ionisation stage / continuous opacity, relative to the Sun
        stage = _log_stage_fraction(teff, logg, L.chi_ion, L.ion) - _log_stage_fraction(
            SOLAR["teff"], SOLAR["logg"], L.chi_ion, L.ion)
        atomic = -(theta - _THETA_SUN) * L.chi_exc + stage - (log_pe - _LOG_PE_SUN)
        # molecules: saturating dissociation balance, carbon isotopes
        log_x = L.dissociation * (theta - _THETA_SUN) - 1.0
        sat = -np.logaddexp(0.0, -log_x * np.log(10)) / np.log(10) + np.logaddexp(0.0, np.log(10)) / np.log(10)
        iso = np.where(L.isotope == 12, np.log10(ratio / (1 + ratio)) - np.log10(_SOLAR_C12_C13 / (1 + _SOLAR_C12_C13)),
                       np.where(L.isotope == 13, np.log10(1 / (1 + ratio)) - np.log10(1 / (1 + _SOLAR_C12_C13)), 0.0))
        molecular = sat + iso - (theta - _THETA_SUN) * L.chi_exc
        log_tau = L.log_tau_sun + abundance + np.where(L.molecular, molecular, atomic)
        # Doppler core (area-normalised to the b = 2 km/s reference) and pressure-broadened Lorentzian wings
        b = np.sqrt(2 * _K_OVER_AMU * teff / L.mass + v_turb ** 2 + _B_FLOOR ** 2)
        pressure = 10 ** ((logg - SOLAR["logg"]) / 3.0)
        gamma = 2.0 * pressure
        strength = 10 ** log_tau * 2.0 * np.sqrt(np.pi)  # integral of tau over velocity (km/s)
        v = self._win_v
        core = np.exp(-(v / b[:, None]) ** 2) / (b[:, None] * np.sqrt(np.pi))
        wings = 0.04 * pressure * gamma / (np.pi * (v ** 2 + gamma ** 2)) * self._taper
        tau = np.bincount(self._win_idx.ravel(), weights=(strength[:, None] * (core + wings)).ravel(),
                          minlength=len(self._fine_index))
        # Brackett lines: n = 4 population (12.75 eV) over the continuous opacity, Stark (Lorentzian) profile
        log_br = self._br_log_tau_sun - _BR_EXCITATION * (theta - _THETA_SUN) - (log_pe - _LOG_PE_SUN)
        width = 40.0 * 10 ** ((2.0 / 3.0) * (log_pe - _LOG_PE_SUN))
        br_strength = 10 ** log_br * np.pi * 40.0  # tau_centre = 10**log_br when width = 40 km/s
        tau += (br_strength[:, None] * width / (np.pi * (self._br_v ** 2 + width ** 2)) * self._br_taper).sum(axis=0)
        return tau

    def spectrum(self, labels) -> np.ndarray:
        """Normalised flux ``(7214,)`` on the APOGEE model grid for labels (dict or ``(25,)`` in network order)."""
        x = self._full_labels(labels)
        absorbed = 1.0 - np.exp(-self.opacity(x))
        v_macro = x[self._index["v_macro"]]
        sigma = np.sqrt(v_macro ** 2 / 2.0 + (SPEED_OF_LIGHT_KMS / _RESOLUTION / 2.3548) ** 2)
        kernel = np.exp(-2.0 * (np.pi * self._freq * sigma) ** 2)
        smoothed = np.fft.irfft(np.fft.rfft(absorbed) * kernel, n=len(absorbed))
        per_pixel = smoothed.reshape(-1, self.oversample).mean(axis=1)
        return 1.0 - per_pixel[self._pixels]

    def continuum_mask(self) -> np.ndarray:
        """Model pixels ``(7214,)`` inside the line-free continuum windows."""
        from ..core.wavelength import model_wavelength

        wl = model_wavelength()
        return np.any((wl[:, None] >= self.continuum_windows[:, 0]) & (wl[:, None] <= self.continuum_windows[:, 1]),
                      axis=1)

    def spectra(self, labels, progress: bool = False) -> np.ndarray:
        """Flux ``(N, 7214)`` for labels ``(N, 25)``."""
        labels = np.atleast_2d(np.asarray(labels, dtype=float))
        out = np.empty((len(labels), len(self._pixels)))
        iterator = range(len(labels))
        if progress:
            from tqdm import tqdm

            iterator = tqdm(iterator, desc="toy spectra", unit="spectrum", disable=None)  # quiet in a log file
        for i in iterator:
            out[i] = self.spectrum(labels[i])
        return out
