"""Fit The Payne to spectra: masking, continuum normalisation, bounded least squares, covariance, statistics and
flags.

The problem is the Astra seed's (chi2 with absolute sigma over scaled labels bounded to [-0.5, 0.5], tolerance
5e-4), started in the basin of the global minimum (a model bank, :mod:`.model_bank`, and several local
fits; or at given labels), solved by :func:`astra_thepayne.core.solver.minimise` on
:class:`astra_thepayne.core.problem.PayneProblem`: exact chi2 and gradient at every step, an approximate Gauss-Newton
matrix far from the minimum and the exact one near it, where it also gives the covariance. The tolerance is on
chi2 in absolute terms, so fits end at the minimum rather than near it.
With ``v_rad_tolerance > 0`` the radial velocity is a free parameter: the rectified model is Doppler shifted
(B-spline of degree 7 within each chip) and its derivative with respect to the shift enters the Jacobian; its start
comes from a chi2 scan over the allowed velocities against the best bank match.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass, replace

import numpy as np

from ..spawning import spawn_context
from ..threads import BLAS_THREAD_VARIABLES, blas_thread_environment
from .continuum import ContinuumBasis, continuum_design, continuum_pixels_from_model
from .labels import APOGEE_BAD_PIXEL_MASK, at_bound_flags, flag_result
from .model_bank import DEFAULT_BANK_SIZE, ModelBank
from .pixel_weights import PixelWeights
from .preprocess import model_grid_coverage, spectrum_snr, to_apstar_grid
from .problem import OutputLayer, PayneProblem, Shift, pixel_shift
from .result import FitResult
from .solver import SolverFailure, minimise
from .wavelength import (
    APSTAR_CDELT1,
    APSTAR_NPIX,
    MODEL_SEGMENTS,
    MODEL_TO_APSTAR,
    SPEED_OF_LIGHT_KMS,
    apstar_wavelength,
)

_KEPT_TEMPLATES = 256  # bank members whose spline coefficients the velocity scan keeps (59 kB each)
_KEPT_SHIFTS = 64  # Shift operators the velocity scan keeps

__all__ = ["BATCH_SIZE", "Candidate", "DISTINCT_STARTS", "PayneFitter", "PreparedSpectrum", "SAME_FLOOR",
           "STAR_NOT_FOUND_MISFIT", "TOP_MATCHES", "batches", "floor_confirmed", "load_pixel_array", "misfit"]

log = logging.getLogger(__name__)

_APSTAR_WAVELENGTH = apstar_wavelength()
_AT_BOUND = 0.5 - 1e-3  # scaled-label distance from the bound that counts as "on the bound"
_MIN_PIXELS_PER_PARAMETER = 5
#: Fraction of the network's pixels a spectrum must sample (see ``preprocess.model_grid_coverage``).
MIN_MODEL_COVERAGE = 0.9
#: Scaled-label distance between the bank matches that start separate local fits (both engines).
DISTINCT_STARTS = 0.25
#: Best bank matches searched for distinct starts (both engines).
TOP_MATCHES = 64
_PIXEL_VELOCITY = SPEED_OF_LIGHT_KMS * (10**APSTAR_CDELT1 - 1)  # km/s per apStar pixel, about 4.1
#: A fit whose model misses the spectrum by more than this rms fraction of the continuum (:func:`misfit`) has not
#: found the star (``star_not_found``): a network that covers a star fits it to about 1-2% (2M19485057+5005279, a K
#: dwarf, with the dwarf-only kurucz5 network: 1.8-2.5%), one that does not, far worse (2M17335483-2753043, an M
#: giant, with the same network: 9-14%).
STAR_NOT_FOUND_MISFIT = 0.05
#: Two coarse fits whose chi2 differ by less than this have reached the same floor. A coarse fit stops within a
#: few units of its basin's floor (it stops when a step lowers chi2 by less than one per parameter); a wrong basin
#: that matters lies 25 or more above the right one (docs/science.md, The global start).
SAME_FLOOR = 3.0
#: Spectra fitted together in lockstep by default: enough for the output layer's products to run at matrix speed,
#: few enough that results keep flowing (and a killed run loses little).
BATCH_SIZE = 32


@dataclass
class Candidate:
    """One start of the local fit of one spectrum: the spectrum prepared for it (its continuum pixels moved with
    the start's velocity), the normalised flux and weights on the model pixels (numpy arrays, or rows of tensors
    already on the batched engine's device), the continuum-correction columns fitted (None: no joint continuum),
    the scaled starting parameters (labels, then velocity) and the number of pixels with weight."""

    prepared: PreparedSpectrum
    y: np.ndarray
    weight: np.ndarray
    design_columns: np.ndarray | None
    start: np.ndarray
    n_used: int


@dataclass
class PreparedSpectrum:
    """A spectrum ready for fitting, all on the apStar grid (8575): flux and ivar after masking, continuum,
    and the continuum-normalised flux and ivar (0 where a pixel is not used); the fraction of each chip's model
    pixels the data leave without weight, and the file's STARFLAG and VSCATTER (carried into the result). The
    continuum and the normalised arrays are None where the batched engine normalises on its device
    (:meth:`PayneFitter.prepare` with ``normalise=False``)."""

    flux: np.ndarray
    ivar: np.ndarray
    continuum: np.ndarray | None
    norm_flux: np.ndarray | None
    norm_ivar: np.ndarray | None
    snr: float
    bad_pixel_fractions: tuple = ()
    starflag: int | None = None
    vscatter: float = float("nan")


def load_pixel_array(path, n_model_pixels):
    """Read a continuum-pixel list or model mask (.npy, never pickled objects): a boolean array over the apStar grid
    (8575) or the model grid, or integer indices into the apStar grid (the convention of Astra's
    ``cannon_apogee_pixels.npy``). Returns a boolean array over the apStar grid."""
    from ..errors import ConfigurationError

    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ConfigurationError(f"pixel file {path}: not a readable .npy array ({exc})") from None
    return as_apstar_mask(array, n_model_pixels, str(path))


def as_apstar_mask(array, n_model_pixels, what="pixel array"):
    from ..errors import ConfigurationError

    array = np.asarray(array)
    mask = np.zeros(APSTAR_NPIX, dtype=bool)
    if array.dtype == bool:
        if array.shape == (APSTAR_NPIX,):
            return array.copy()
        if array.shape == (n_model_pixels,) and n_model_pixels == len(MODEL_TO_APSTAR):
            mask[MODEL_TO_APSTAR] = array
            return mask
        raise ConfigurationError(f"{what}: boolean array of shape {array.shape}, expected ({APSTAR_NPIX},) or "
                                 f"({n_model_pixels},)")
    if np.issubdtype(array.dtype, np.integer) and array.ndim == 1:
        if array.size and (array.min() < 0 or array.max() >= APSTAR_NPIX):
            raise ConfigurationError(f"{what}: pixel indices must lie in 0..{APSTAR_NPIX - 1}")
        mask[array] = True
        return mask
    raise ConfigurationError(f"{what}: expected a boolean mask or integer pixel indices, found {array.dtype} "
                             f"{array.shape}")


class PayneFitter:
    """Fits one Payne network to many spectra.

    Parameters
    ----------
    emulator : PayneEmulator
        Its wavelength must be the 7214-pixel APOGEE model grid or the 8575-pixel apStar grid.
    mask : ndarray of bool, optional
        Model pixels to ignore (True = ignore), over the model grid or the apStar grid.
    continuum_pixels : ndarray, optional
        Continuum pixels (see :func:`load_pixel_array`); default :func:`continuum_pixels_from_model`.
    opt_tolerance : float
        The fit ends when a full Gauss-Newton step would lower chi2 by less than this (absolute, in chi2 units), or
        when a step moves no label by more than ``sqrt(opt_tolerance)`` of its sigma (0.022 sigma by default); see
        :func:`astra_thepayne.core.solver.minimise`.
    v_rad_tolerance : float
        Largest ``|v_rel|`` (km/s) fitted; 0 disables the radial velocity.
    pixel_flag_mask : int
        APOGEE_PIXMASK bits that make a pixel bad (default bits 0-7 and 14).
    continuum_degree : int
        Chebyshev degree of the continuum per chip region.
    joint_continuum : bool
        Fit the labels together with a multiplicative correction to the continuum (the same Chebyshev degree per
        chip region, solved for exactly at every step of the fit), on every usable pixel (default).
        Continuum pixels rarely sit exactly at 1 in a real star, and a realistic network leaves few of them; fixing
        the continuum from them biases labels by several sigma, and its uncertainty would be missing from the
        errors. The joint fit removes the bias and its covariance marginalises over the continuum.
        False gives the seed's single pass.
    bank_size : int
        Members of the model bank that finds each fit's starting point (:mod:`astra_thepayne.core.model_bank`).
    bank_cache_dir : path-like or False, optional
        Where the bank is cached (default :func:`astra_thepayne.core.model_bank.default_cache_dir`; False: no cache).
    n_starts : int
        Most local fits per spectrum, from the best distinct bank matches in order of match: they stop once two of
        them reach the lowest floor found (within :data:`SAME_FLOOR` in chi2), and the lowest chi2 wins.
    pixel_weights : PixelWeights, optional
        The survey pipelines' pixel-weight rules (sky lines, persistence, LITTROW ghosts, error floor), applied
        where the spectrum is prepared (:mod:`astra_thepayne.core.pixel_weights`); default ``PixelWeights()``, all on;
        ``PixelWeights.off()`` for none.
    """

    def __init__(self, emulator, mask=None, continuum_pixels=None, opt_tolerance=5e-4, v_rad_tolerance=0.0,
                 pixel_flag_mask=APOGEE_BAD_PIXEL_MASK, continuum_degree=4, joint_continuum=True,
                 bank_size=DEFAULT_BANK_SIZE, bank_cache_dir=None, n_starts=4, pixel_weights=None):
        self.emulator = emulator
        if emulator.n_pixels == len(MODEL_TO_APSTAR):
            self.model_to_apstar = MODEL_TO_APSTAR
        elif emulator.n_pixels == APSTAR_NPIX:
            self.model_to_apstar = np.arange(APSTAR_NPIX)
        else:
            from ..errors import ConfigurationError

            raise ConfigurationError(f"model {emulator.path}: {emulator.n_pixels} pixels; expected the 7214-pixel "
                                     f"APOGEE model grid or the {APSTAR_NPIX}-pixel apStar grid")
        if not np.allclose(emulator.wavelength, _APSTAR_WAVELENGTH[self.model_to_apstar], rtol=1e-6):
            from ..errors import ConfigurationError

            raise ConfigurationError(f"model {emulator.path}: its wavelength grid is not the APOGEE model grid")
        self.ignore = np.zeros(APSTAR_NPIX, dtype=bool)
        if mask is not None:
            self.ignore = as_apstar_mask(mask, emulator.n_pixels, "model mask")
        if continuum_pixels is None:
            model_continuum = continuum_pixels_from_model(emulator)
            continuum_pixels = np.zeros(APSTAR_NPIX, dtype=bool)
            continuum_pixels[self.model_to_apstar] = model_continuum
        self.continuum_pixels = as_apstar_mask(continuum_pixels, emulator.n_pixels, "continuum pixels")
        self.opt_tolerance = float(opt_tolerance)
        self.v_rad_tolerance = float(v_rad_tolerance or 0.0)
        self.pixel_flag_mask = int(pixel_flag_mask)
        self.continuum_degree = int(continuum_degree)
        self.joint_continuum = bool(joint_continuum)
        self.bank_size = int(bank_size)
        self.bank_cache_dir = bank_cache_dir
        self.n_starts = max(int(n_starts), 1)
        self.pixel_weights = PixelWeights() if pixel_weights is None else pixel_weights
        self._design = continuum_design(_APSTAR_WAVELENGTH[self.model_to_apstar], self.continuum_degree)
        self._continuum_basis = ContinuumBasis(_APSTAR_WAVELENGTH, self.continuum_degree)
        self._on_model = np.zeros(APSTAR_NPIX, dtype=bool)
        self._on_model[self.model_to_apstar] = True
        self._segments = self._model_segments()
        self._layer = OutputLayer(emulator, self._design)
        self._layer.use_segments(self._segments)
        self._pool = None  # worker processes kept for several fit_many calls (see workers())
        self._member_coefficients, self._shifts = {}, {}  # the velocity scan's (see _velocity_scan)

    def _model_segments(self):
        """(start, stop) slices of the model pixels that are contiguous on the apStar grid (one per chip)."""
        breaks = np.flatnonzero(np.diff(self.model_to_apstar) != 1) + 1
        edges = np.concatenate([[0], breaks, [len(self.model_to_apstar)]])
        return list(zip(edges[:-1], edges[1:], strict=True))

    # -- preprocessing ------------------------------------------------------------------------------------------
    def prepare(self, spectrum, continuum_shift=0, normalise=True) -> PreparedSpectrum:
        """Mask, resample and continuum-normalise a spectrum.

        ``continuum_shift`` (whole pixels) moves the continuum pixels with a star whose velocity is being fitted:
        they are chosen in the model's rest frame, and lines would otherwise slide onto them. ``normalise=False``
        stops before the continuum (:meth:`normalised` finishes it): the batched engine normalises on its device.
        """
        flux, ivar_data = to_apstar_grid(spectrum, self.pixel_flag_mask, weights=self.pixel_weights)
        ivar = np.where(self.ignore, 0.0, ivar_data)
        snr = spectrum_snr(spectrum, self.pixel_flag_mask)  # one definition for every spectrum type
        bad_fractions = tuple(float(np.mean(ivar_data[a:b] <= 0)) for a, b in MODEL_SEGMENTS)
        starflag, vscatter = _file_quality(spectrum)
        prepared = PreparedSpectrum(flux, ivar, None, None, None, snr, bad_fractions, starflag, vscatter)
        return self.normalised(prepared, continuum_shift) if normalise else prepared

    def normalised(self, prepared, continuum_shift=0) -> PreparedSpectrum:
        """``prepared`` with its continuum and normalised flux and ivar (see :meth:`prepare`)."""
        continuum, norm_flux, norm_ivar = self._normalisation(prepared.flux, prepared.ivar, continuum_shift)
        return replace(prepared, continuum=continuum, norm_flux=norm_flux, norm_ivar=norm_ivar)

    def _normalisation(self, flux, ivar, continuum_shift=0):
        """The continuum (fitted on the continuum pixels moved by ``continuum_shift``) and the normalised flux and
        ivar of a spectrum on the apStar grid."""
        continuum_pixels = self.continuum_pixels
        if continuum_shift:
            continuum_pixels = np.roll(continuum_pixels, int(continuum_shift))
        continuum = self._continuum_basis.fit(flux, ivar, continuum_pixels)
        continuum[~self._on_model] = np.nan
        usable = self._on_model & np.isfinite(continuum) & (continuum > 0) & (ivar > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            norm_flux = np.where(usable, flux / continuum, 0.0)
            norm_ivar = self.pixel_weights.floor(np.where(usable, ivar * continuum**2, 0.0))
        return continuum, norm_flux, norm_ivar

    # -- fitting ------------------------------------------------------------------------------------------------
    def fit(self, spectrum, initial_labels=None) -> FitResult:
        """Fit one spectrum. Never raises for bad data: a failure is a result with the fitting-failure bit."""
        return self._layer.run_one(self._fit_steps(spectrum, initial_labels))

    def fit_batch(self, spectra, initial_labels=None) -> list[FitResult]:
        """Fit several spectra in lockstep (see :meth:`astra_thepayne.core.problem.OutputLayer.run`): the same results
        as :meth:`fit` one at a time, in less time. Each result's ``seconds`` is its share of the batch's time."""
        start = time.perf_counter()
        results = self._layer.run([self._fit_steps(spectrum, initial_labels) for spectrum in spectra])
        share = (time.perf_counter() - start) / max(len(results), 1)
        for result in results:
            result.seconds = share
        return results

    def _fit_steps(self, spectrum, initial_labels):
        """The fit of one spectrum as a generator of output-layer requests (see :meth:`fit`)."""
        candidates = yield from self.candidates(spectrum, initial_labels)
        if isinstance(candidates, FitResult):
            return candidates
        try:
            best, floors, grams = None, [], {}
            for candidate in candidates:
                problem = self.problem(candidate, grams)
                # with several starts, each goes only as far as the basin's floor; the best is then finished
                solution = yield from self._solve(problem, candidate.start, coarse=len(candidates) > 1)
                if best is None or solution.chi2 < best[1].chi2:
                    best = (problem, solution, candidate.prepared)
                floors.append(solution.chi2)
                if floor_confirmed(floors):
                    break
            problem, solution, prepared = best
            if solution.normal_matrix is None:
                solution = yield from self._solve(problem, solution.x)
            return (yield from self._result(problem, solution, prepared))
        except Exception as exc:  # a numerical surprise in one spectrum must not stop a batch
            snr = candidates[0].prepared.snr if candidates else float("nan")
            return self._failure(spectrum, f"{type(exc).__name__}: {exc}", snr)

    def candidates(self, spectrum, initial_labels=None):
        """Everything a local solver needs to fit one spectrum, before any fitting: a generator of output-layer
        requests (the model bank's scores) returning a list of :class:`Candidate` (one per start, the spectrum
        prepared for it), or a failure :class:`FitResult` when the spectrum cannot be fitted. Shared by this engine
        and the batched one (:mod:`astra_thepayne.accel`)."""
        prepared = self.checked_preparation(spectrum)
        if isinstance(prepared, FitResult):
            return prepared
        return (yield from self.candidates_of_prepared(spectrum, prepared, initial_labels))

    def candidates_of_prepared(self, spectrum, prepared, initial_labels=None):
        """:meth:`candidates` of a spectrum already through :meth:`checked_preparation`."""
        try:
            by_shift = {0: prepared}  # the spectrum normalised with its continuum pixels moved by whole pixels
            candidates, shared = [], {}
            for start, v_guess in (yield from self._global_start(spectrum, by_shift, initial_labels)):
                candidate = prepared
                if self.v_rad_tolerance > 0:
                    candidate = self._moved(spectrum, by_shift, v_guess)
                    start = np.append(start, v_guess / (2.0 * self.v_rad_tolerance))
                candidates.append(self._candidate(candidate, start, shared))
            return candidates
        except Exception as exc:  # a numerical surprise in one spectrum must not stop a batch
            return self._failure(spectrum, f"{type(exc).__name__}: {exc}", prepared.snr, prepared)

    def candidates_at(self, spectrum, prepared, starts, y, weight, region_counts, n_used):
        """The :class:`Candidate` of each of ``starts`` (scaled parameters, best first) of a spectrum prepared for
        them, whose normalised flux and weights on the model pixels are ``y`` and ``weight``, with ``n_used``
        pixels of weight, ``region_counts[r]`` of them in continuum region ``r`` (:meth:`OutputLayer.design_regions`),
        or a failure :class:`FitResult` (too few usable pixels): the end of :meth:`candidates`, for starts found
        elsewhere (the batched engine's, :mod:`astra_thepayne.accel.torch_starts`)."""
        try:
            columns = self._continuum_columns(region_counts)
            return [self._candidate_of(prepared, y, weight, columns, int(n_used), start) for start in starts]
        except Exception as exc:  # a numerical surprise in one spectrum must not stop a batch
            return self._failure(spectrum, f"{type(exc).__name__}: {exc}", prepared.snr, prepared)

    def checked_preparation(self, spectrum, normalise=True):
        """:meth:`prepare` of a spectrum that covers the network's pixels, or a failure :class:`FitResult` (one that
        cannot be prepared, or one cut short). The first step of :meth:`candidates`, which the batched engine takes
        in its worker processes (:mod:`astra_thepayne.accel`) without the continuum (``normalise=False``)."""
        try:
            coverage = model_grid_coverage(spectrum, self.model_to_apstar)
            prepared = self.prepare(spectrum, normalise=normalise)
        except Exception as exc:
            return self._failure(spectrum, f"cannot prepare spectrum: {exc}", float(getattr(spectrum, "snr", np.nan)))
        if coverage < MIN_MODEL_COVERAGE:
            # a spectrum cut short would be fitted on the pixels it has and look clean
            return self._failure(spectrum, f"the spectrum samples {coverage:.0%} of the network's pixels (at least "
                                 f"{MIN_MODEL_COVERAGE:.0%} needed): cut short or on another wavelength grid",
                                 prepared.snr, prepared)
        return prepared

    # -- the global start -------------------------------------------------------------------------------------
    def _bank(self):
        if self._layer.bank is None:
            self._layer.bank = ModelBank.for_emulator(self.emulator, self.bank_size, self.bank_cache_dir)
        return self._layer.bank

    def _moved(self, spectrum, by_shift, v_rel):
        """The spectrum prepared with the continuum pixels moved with a star at ``v_rel``: they are chosen in the
        model's rest frame, and lines would otherwise slide onto them. Kept per whole-pixel shift in ``by_shift``."""
        shift = int(np.round(pixel_shift(v_rel)))
        if shift not in by_shift:  # the same pixels and S/N: only the continuum is fitted again
            first = by_shift[0]
            continuum, norm_flux, norm_ivar = self._normalisation(first.flux, first.ivar, continuum_shift=shift)
            by_shift[shift] = replace(first, continuum=continuum, norm_flux=norm_flux, norm_ivar=norm_ivar)
        return by_shift[shift]

    def _global_start(self, spectrum, by_shift, initial_labels):
        """Starting points ``[(scaled labels, velocity in km/s), ...]`` in the basins of the lowest minima: the best
        ``n_starts`` distinct matches in the model bank (:mod:`astra_thepayne.core.model_bank`); with a free velocity,
        the velocity that best matches the first of them, the bank matched again with the spectrum moved to the
        rest frame, and the velocity of the best new match. ``initial_labels`` replace the bank (one start)."""
        y, weight = self._data(by_shift[0])
        if initial_labels is not None:
            x0 = self._start(initial_labels)
            v = 0.0
            if self.v_rad_tolerance > 0:
                template = self.emulator.predict(x0)
                v = self._velocity_scan(template, Shift.coefficients(template, self._segments), y, weight)
            return [(x0, v)]
        starts = yield from self._bank_match(y, weight)
        if self.v_rad_tolerance <= 0:
            return [(x0, 0.0) for x0, *_ in starts]
        v = self._velocity_scan(*self._member_template(starts[0][2]), y, weight)
        shift = int(np.round(pixel_shift(v)))
        y, weight = self._data(self._moved(spectrum, by_shift, v))
        starts = yield from self._bank_match(self._roll(y, -shift), self._roll(weight, -shift))
        # the best match's velocity starts every local fit; each fit then finds its own
        v = self._velocity_scan(*self._member_template(starts[0][2]), y, weight)
        return [(x0, v) for x0, *_ in starts]

    def _bank_match(self, y, weight):
        """The ``n_starts`` best bank members, each at least ``DISTINCT_STARTS`` (scaled) from the better ones, as
        ``(scaled labels, model flux, index in the bank)``."""
        bank = self._bank()  # loaded before the request: the driver serves it from the layer's bank
        w2 = weight**2
        scores = yield ("bank", np.stack([w2 * y, w2]))
        chosen = []
        for index in np.argsort(scores)[::-1][:TOP_MATCHES]:
            point = bank.points[index]
            if all(np.linalg.norm(point - other) > DISTINCT_STARTS for other, *_ in chosen):
                chosen.append((point.copy(), np.asarray(bank.flux[index], dtype=np.float64), int(index)))
                if len(chosen) == self.n_starts:
                    break
        return chosen

    def _roll(self, values, shift):
        """``values`` moved by a whole number of pixels within each chip segment (zeros enter at the ends)."""
        if not shift:
            return values
        out = np.zeros_like(values)
        for start, stop in self._segments:
            if shift > 0:
                out[start + shift:stop] = values[start:stop - shift]
            else:
                out[start:stop + shift] = values[start - shift:stop]
        return out

    def _member_template(self, index):
        """Bank member ``index``'s flux and its spline coefficients, for :meth:`_velocity_scan`; the coefficients
        are kept for the last :data:`_KEPT_TEMPLATES` members asked for (the best matches recur across spectra)."""
        flux = np.asarray(self._bank().flux[index], dtype=np.float64)
        kept = self._member_coefficients
        if index not in kept:
            if len(kept) >= _KEPT_TEMPLATES:
                del kept[next(iter(kept))]
            kept[index] = Shift.coefficients(flux, self._segments)
        return flux, kept[index]

    def _shift(self, shift):
        """The :class:`Shift` by ``shift`` pixels; the scan's trial shifts come from a small set, so they are kept."""
        if shift not in self._shifts:
            if len(self._shifts) >= _KEPT_SHIFTS:
                del self._shifts[next(iter(self._shifts))]
            self._shifts[shift] = Shift(self._segments, shift)
        return self._shifts[shift]

    def _velocity_scan(self, template, coefficients, y, weight):
        """Velocity (km/s) within +-v_rad_tolerance that best matches ``template`` (each chip's level profiled
        out), given with its spline coefficients (:meth:`Shift.coefficients`): chi2 on whole-pixel shifts, then
        quarter pixels around the best, then the vertex of a parabola."""
        limit = pixel_shift(self.v_rad_tolerance)
        w2 = weight**2

        @functools.cache  # the fine grid repeats points of the coarse one
        def chi2(shift):
            if shift == int(shift):
                # the interpolating spline at a whole-pixel shift is the template moved: no taps to gather (where
                # they differ, beyond the chip's ends, the edge weight is zero)
                model = self._roll(template, int(shift))
            else:
                model = self._shift(shift).apply_to_coefficients(coefficients)
            value = 0.0
            for start, stop in self._segments:
                m, d, w = model[start:stop], y[start:stop], w2[start:stop]
                mm = w @ (m * m)
                value -= (w @ (m * d)) ** 2 / mm if mm > 0 else 0.0
            return value

        whole = np.arange(-np.floor(limit), np.floor(limit) + 1)
        trials = np.unique(np.clip(np.concatenate([whole, [-limit, limit]]), -limit, limit))
        values = np.array([chi2(float(s)) for s in trials])
        best = trials[int(np.argmin(values))]
        fine = np.clip(best + np.arange(-1.0, 1.01, 0.25), -limit, limit)
        fine_values = np.array([chi2(float(s)) for s in fine])
        i = int(np.argmin(fine_values))
        shift = fine[i]
        if 0 < i < len(fine) - 1:
            a, b, c = fine_values[i - 1:i + 2]
            curvature = a - 2 * b + c
            if curvature > 0:
                shift = fine[i] + 0.125 * (a - c) / curvature  # step 0.25: vertex at 0.25 * (a - c) / (2 curv.)
        shift = float(np.clip(shift, -limit, limit))
        return SPEED_OF_LIGHT_KMS * (10 ** (shift * APSTAR_CDELT1) - 1)

    def _failure(self, spectrum, message, snr, prepared=None):
        log.warning("%s: fit failed: %s", getattr(spectrum, "label", "spectrum"), message)
        result = FitResult.failure(self.emulator.label_names, message, snr=snr)
        result.result_flags = flag_result({}, snr, failed=True)
        # the prepared spectrum carries the file's quality where the spectrum itself is only an address (a worker
        # process of the batched engine read it)
        result.starflag, result.vscatter = ((prepared.starflag, prepared.vscatter) if prepared is not None
                                            else _file_quality(spectrum))
        return result

    def _data(self, prepared):
        """Normalised flux and weights (``sqrt(ivar)``, 0 = unused) on the model pixels; with a free velocity,
        pixels within the largest shift of a chip edge get no weight."""
        y = prepared.norm_flux[self.model_to_apstar]
        weight = np.sqrt(prepared.norm_ivar[self.model_to_apstar])
        if self.v_rad_tolerance > 0:
            weight = weight * self._edge_weight()
        return y, weight

    def _candidate(self, prepared, start, shared=None):
        """A :class:`Candidate`; raises when the spectrum has too few usable pixels for the parameters. ``shared``
        (a dict) keeps what depends on the prepared spectrum alone, for the other starts from it: they then share
        its arrays too (one copy when sent between processes)."""
        shared = {} if shared is None else shared
        if id(prepared) not in shared:
            y, weight = self._data(prepared)
            used = weight > 0
            columns = self._continuum_columns([np.count_nonzero(used[rows])
                                               for rows, _, _, _ in self._layer.design_regions()])
            shared[id(prepared)] = (prepared, y, weight, columns, int(used.sum()))  # prepared: keeps its id taken
        _, y, weight, columns, n_used = shared[id(prepared)]
        return self._candidate_of(prepared, y, weight, columns, n_used, start)

    def _continuum_columns(self, region_counts):
        """The continuum-correction columns fitted, given the pixels with weight in each region (None: no joint
        continuum). A region's correction needs as many usable pixels as its continuum fit; with fewer it stays
        at 1."""
        if not self.joint_continuum:
            return None
        needed = 3 * (self.continuum_degree + 1)
        return np.concatenate([c for (_, c, _, _), count in zip(self._layer.design_regions(), region_counts,
                                                                  strict=True)
                               if count >= needed] or [np.zeros(0, dtype=int)])

    @staticmethod
    def _candidate_of(prepared, y, weight, columns, n_used, start):
        n_params = len(start) + (0 if columns is None else len(columns))
        if n_used < _MIN_PIXELS_PER_PARAMETER * n_params:
            raise _NotEnoughPixels(f"only {n_used} usable pixels for {n_params} parameters")
        return Candidate(prepared, y, weight, columns, np.asarray(start, dtype=float), n_used)

    @property
    def v_scale(self):
        """The scaled velocity is ``v / v_scale`` km/s, in [-0.5, 0.5] (None: velocity not fitted)."""
        return 2.0 * self.v_rad_tolerance if self.v_rad_tolerance > 0 else None

    def problem(self, candidate, grams=None):
        """The :class:`~astra_thepayne.core.problem.PayneProblem` of a :class:`Candidate`. ``grams`` (a dict) keeps
        the approximate Gram matrix of each weight array for the other starts that share it (a product per
        network pixel block, made here rather than with the candidates: the device engine has no use for it)."""
        grams = {} if grams is None else grams
        key = id(candidate.weight)
        if key not in grams:
            grams[key] = (candidate.weight, self._layer.approximate_gram(candidate.weight**2))
        return PayneProblem(self._layer, candidate.y, candidate.weight, self._segments, self.v_scale,
                            candidate.design_columns, grams[key][1])

    def _solve(self, problem, start, coarse=False):
        """Scaled labels and velocity within [-0.5, 0.5] (``coarse``: see :func:`.solver.minimise`)."""
        lower = np.full(problem.n_labels + int(bool(problem.v_scale)), -0.5)
        try:
            solution = yield from minimise(problem, start, lower, -lower, tolerance=self.opt_tolerance,
                                           x_tolerance=np.sqrt(self.opt_tolerance), coarse=coarse)
        except SolverFailure as exc:
            raise _OptimiserFailure(f"optimiser stopped: {exc}") from None
        if not np.all(np.isfinite(solution.x)):
            raise _OptimiserFailure("optimiser stopped at a non-finite point")
        return solution

    def _result(self, problem, solution, prepared):
        """A FitResult from a solution of scaled labels (then v_rel); the solution's matrix has the continuum
        coefficients profiled out, so its inverse is the covariance marginalised over them."""
        correction = yield from problem.correction(solution.x)
        rectified = yield from problem.rectified_model(solution.x)
        return self.result(solution.x, solution.chi2, solution.normal_matrix, int(np.count_nonzero(problem.weight)),
                           problem.n_design,
                           correction, rectified, prepared, solution.n_evaluations)

    def result(self, x, chi2, normal_matrix, n_used, n_design, correction, rectified, prepared, n_evaluations):
        """The :class:`FitResult` of a fit ended at scaled parameters ``x`` (labels, then the scaled velocity when
        it is fitted) with ``chi2``, the normal matrix of those parameters with the ``n_design`` continuum
        coefficients profiled out (its inverse is the covariance marginalised over them), the pixels with weight, and
        the continuum correction and rectified model flux on the model pixels. Both engines end here, so their
        rows are made alike."""
        emulator = self.emulator
        k = emulator.n_labels
        v_scale = self.v_scale
        fit_v = v_scale is not None
        n = k + int(fit_v)
        x = np.asarray(x, dtype=float)
        scale = np.concatenate([emulator.x_max - emulator.x_min, [v_scale] if fit_v else []])
        covariance = _covariance(np.asarray(normal_matrix, dtype=float))[:n, :n] * np.outer(scale, scale)
        sigma = np.sqrt(np.diag(covariance))
        labels = emulator.unscale(x[:k])
        dof = int(n_used) - len(x) - n_design
        at_bound = [name for name, value in zip(emulator.label_names, x[:k], strict=True) if abs(value) >= _AT_BOUND]
        reduced_chi2 = chi2 / dof if dof > 0 else float("nan")
        bounds = {name: (lo, hi) for name, lo, hi in zip(emulator.label_names, emulator.x_min, emulator.x_max,
                                                            strict=True)}
        flags = flag_result(dict(zip(emulator.label_names, labels, strict=True)), prepared.snr, at_bound=at_bound,
                            star_not_found=misfit(reduced_chi2, prepared.snr) > STAR_NOT_FOUND_MISFIT,
                            v_rel_at_bound=fit_v and abs(x[k]) >= _AT_BOUND, bounds=bounds,
                            bad_pixel_fractions=prepared.bad_pixel_fractions)
        continuum = prepared.continuum.copy()
        continuum[self.model_to_apstar] *= correction
        rectified_flux = np.full(APSTAR_NPIX, np.nan)
        rectified_flux[self.model_to_apstar] = rectified
        return FitResult(
            label_names=emulator.label_names, labels=labels, raw_e=sigma[:k], covariance=covariance[:k, :k],
            v_rel=float(x[k] * v_scale) if fit_v else float("nan"), e_v_rel=float(sigma[k]) if fit_v else float("nan"),
            chi2=float(chi2), dof=dof, reduced_chi2=reduced_chi2,
            snr=prepared.snr, result_flags=flags, continuum=continuum, rectified_model_flux=rectified_flux,
            n_iterations=int(n_evaluations), at_bound_flags=at_bound_flags(at_bound),
            starflag=prepared.starflag, vscatter=prepared.vscatter,
        )

    def _start(self, initial_labels):
        """Scaled starting labels: 0 (mid-grid) or the given physical labels, clipped to the bounds."""
        if initial_labels is None:
            return np.zeros(self.emulator.n_labels)
        x0 = np.clip(self.emulator.scale(initial_labels), -0.5, 0.5)
        return np.where(np.isfinite(x0), x0, 0.0)

    def _edge_weight(self):
        """Zero weight for pixels within the largest allowed shift of a chip edge, where a shifted model would
        need flux from beyond the chip."""
        margin = int(np.ceil(self.v_rad_tolerance / _PIXEL_VELOCITY)) + 2  # the shift reaches two pixels beyond
        weight = np.ones(len(self.model_to_apstar))
        for start, stop in self._segments:
            weight[start:start + margin] = 0.0
            weight[max(start, stop - margin):stop] = 0.0
        return weight

    # -- many spectra -------------------------------------------------------------------------------------------
    def __getstate__(self):  # worker processes get the fitter, not its pool
        state = dict(self.__dict__)
        state["_pool"] = None
        state["_member_coefficients"], state["_shifts"] = {}, {}
        return state

    @contextlib.contextmanager
    def workers(self, processes):
        """Keep ``processes`` worker processes for every :meth:`fit_many` inside the block (``thepayne run`` fits
        batch after batch: starting workers for each would cost about a second per batch, and every start is a
        moment in which Ctrl-C catches workers half-started). Without ``processes > 1``, or inside another such block
        (whose workers are used), does nothing."""
        if processes <= 1 or self._pool is not None:
            yield self
            return
        self._pool = self._start_pool(processes)
        try:
            with self._pool:  # on Ctrl-C (KeyboardInterrupt here) the pool terminates its workers on the way out
                yield self
        finally:
            self._pool = None

    def _start_pool(self, processes):
        from multiprocessing import resource_tracker

        context = spawn_context("fit_many's worker processes")  # a script without the guard would hang here
        saved = {v: os.environ.get(v) for v in BLAS_THREAD_VARIABLES}
        os.environ.update(blas_thread_environment(1))  # read by the spawned workers' BLAS at import
        try:
            # started first: starting it later unblocks SIGINT (its own start blocks and then unblocks the signal)
            resource_tracker.ensure_running()
            with _ctrl_c_held():  # workers inherit the blocked SIGINT: Ctrl-C reaches this process alone
                return context.Pool(processes, initializer=_init_worker, initargs=(self,))
        finally:
            for variable, value in saved.items():
                if value is None:
                    os.environ.pop(variable, None)
                else:
                    os.environ[variable] = value

    def fit_many(self, spectra, processes=1, initial_labels=None, batch_size=BATCH_SIZE):
        """Fit spectra in order, ``batch_size`` at a time in lockstep (:meth:`fit_batch`); with ``processes > 1``
        the batches go to worker processes (one BLAS thread each), those of :meth:`workers` when inside it.

        The workers are started with ``spawn``, so each imports the calling script: in a script, call this under
        ``if __name__ == "__main__":``. A script without that guard is refused with a
        :class:`~astra_thepayne.errors.ConfigurationError` before any worker starts (every worker would run it
        again and the call would never return)."""
        if processes > 1 and hasattr(spectra, "__len__"):
            batch_size = min(batch_size, -(-len(spectra) // processes))  # a few spectra still reach every worker
        chunks = batches(spectra, batch_size)
        if processes <= 1:
            for batch in chunks:
                yield from self.fit_batch(batch, initial_labels)
            return
        with self.workers(processes):
            for results in self._pool.imap(_fit_in_worker, ((batch, initial_labels) for batch in chunks)):
                yield from results


@contextlib.contextmanager
def _ctrl_c_held():
    """SIGINT blocked in this thread while a pool starts its workers. The terminal sends Ctrl-C to every process of
    its foreground group: workers raised KeyboardInterrupt (tracebacks) and a pool interrupted while starting left
    workers behind. A signal mask is inherited through fork and exec, so workers started now never see Ctrl-C, and
    one pressed meanwhile is delivered to this process when the mask is restored, after the pool exists."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def batches(items, size):
    """Lists of up to ``size`` consecutive items."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, max(int(size), 1))):
        yield batch


_WORKER_FITTER = None


def _init_worker(fitter):
    global _WORKER_FITTER
    _WORKER_FITTER = fitter


def _fit_in_worker(args):
    batch, initial_labels = args
    return _WORKER_FITTER.fit_batch(batch, initial_labels)


class _NotEnoughPixels(RuntimeError):
    pass


class _OptimiserFailure(RuntimeError):
    pass


def _file_quality(spectrum):
    """The file's STARFLAG (int, None when the file has none) and VSCATTER (km/s, NaN when none) of a spectrum."""
    meta = getattr(spectrum, "meta", None) or {}
    starflag, vscatter = meta.get("starflag"), meta.get("vscatter")
    try:
        starflag = None if starflag is None else int(starflag)
    except (TypeError, ValueError):
        starflag = None
    try:
        vscatter = float(vscatter)
    except (TypeError, ValueError):
        vscatter = float("nan")
    return starflag, vscatter


def floor_confirmed(floors):
    """Whether the lowest of the coarse fits' chi2 ``floors`` so far is reached by a second start (within
    :data:`SAME_FLOOR`), so that no further start is tried."""
    if len(floors) < 2:
        return False
    lowest = min(floors)
    return sum(floor - lowest < SAME_FLOOR for floor in floors) >= 2


def misfit(reduced_chi2, snr):
    """The model's rms error in units of the continuum that explains a reduced chi2 above 1 at S/N ``snr`` per
    pixel: ``sqrt(max(reduced_chi2 - 1, 0)) / snr`` (a fractional mismatch ``d`` adds ``(d snr)^2`` per pixel).
    Unlike reduced chi2 itself it does not grow with S/N for the same model mismatch."""
    if not (np.isfinite(reduced_chi2) and np.isfinite(snr) and snr > 0):
        return 0.0
    return float(np.sqrt(max(reduced_chi2 - 1.0, 0.0)) / snr)


def _covariance(normal_matrix):
    """``(J^T J)^-1`` through its eigen-decomposition; eigenvalues are floored at a relative 1e-24 (singular values of
    J at 1e-12) so that a label the data do not constrain gets an enormous error instead of a crash or a deceptively
    small one."""
    values, vectors = np.linalg.eigh(normal_matrix)
    values = np.maximum(values, 1e-24 * (values[-1] if len(values) and values[-1] > 0 else 1.0))
    return (vectors / values) @ vectors.T
