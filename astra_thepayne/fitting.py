"""Fit The Payne to one spectrum: continuum normalisation, bounded least squares with the analytic Jacobian,
covariance, statistics and flags.

The optimisation follows the Astra seed (scipy's Trust Region Reflective method, scaled labels bounded to
[-0.5, 0.5], tolerance 5e-4, start at 0 or given labels, absolute sigma) but supplies the exact Jacobian of the
network, so one iteration costs one forward pass plus one matrix product instead of K + 1 forward passes, and it
applies the tolerance to chi2 in absolute terms (see ``fit``), so fits end at the minimum rather than near it.
With ``v_rad_tolerance > 0`` the radial velocity is a free parameter: the rectified model is Doppler shifted
(linear interpolation in log-lambda within each chip) and its derivative with respect to the shift enters the
Jacobian, after a coarse grid search over the allowed velocities to start the optimiser near the global minimum.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
from scipy.linalg import LinAlgError, cholesky, solve_triangular
from scipy.linalg.blas import dsyrk
from scipy.optimize import least_squares

from .continuum import continuum_design, continuum_pixels_from_model, fit_continuum
from .grid import APSTAR_CDELT1, APSTAR_NPIX, MODEL_TO_APSTAR, SPEED_OF_LIGHT_KMS, apstar_wavelength
from .labels import APOGEE_BAD_PIXEL_MASK, flag_result
from .preprocess import to_apstar_grid
from .result import FitResult

__all__ = ["PayneFitter", "PreparedSpectrum", "load_pixel_array"]

log = logging.getLogger(__name__)

_APSTAR_WAVELENGTH = apstar_wavelength()
_AT_BOUND = 0.5 - 1e-3  # scaled-label distance from the bound that counts as "on the bound"
_MIN_PIXELS_PER_PARAMETER = 5
_PIXEL_VELOCITY = SPEED_OF_LIGHT_KMS * (10**APSTAR_CDELT1 - 1)  # km/s per apStar pixel, about 4.1


@dataclass
class PreparedSpectrum:
    """A spectrum ready for fitting, all on the apStar grid (8575): flux and ivar after masking, continuum,
    and the continuum-normalised flux and ivar (0 where a pixel is not used)."""

    flux: np.ndarray
    ivar: np.ndarray
    continuum: np.ndarray
    norm_flux: np.ndarray
    norm_ivar: np.ndarray
    snr: float


def load_pixel_array(path, n_model_pixels):
    """Read a continuum-pixel list or model mask (.npy, never pickled objects): a boolean array over the apStar grid
    (8575) or the model grid, or integer indices into the apStar grid (the convention of Astra's
    ``cannon_apogee_pixels.npy``). Returns a boolean array over the apStar grid."""
    from .errors import ConfigurationError

    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise ConfigurationError(f"pixel file {path}: not a readable .npy array ({exc})") from None
    return as_apstar_mask(array, n_model_pixels, str(path))


def as_apstar_mask(array, n_model_pixels, what="pixel array"):
    from .errors import ConfigurationError

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
        ``xtol`` and ``ftol`` of the optimiser.
    v_rad_tolerance : float
        Largest |v_rel| (km/s) fitted; 0 disables the radial velocity.
    pixel_flag_mask : int
        APOGEE_PIXMASK bits that make a pixel bad (default bits 0-7 and 14).
    continuum_degree : int
        Chebyshev degree of the continuum per chip region.
    absolute_chi2_tolerance : bool
        True (default): ``opt_tolerance`` bounds the final change in chi2 (see :meth:`_solve`); False: SciPy's
        relative ``ftol`` exactly as the Astra seed passes it (used by the benchmark to compare like with like).
    joint_continuum : bool
        After the first fit, fit the labels together with a multiplicative correction to the continuum (the same
        Chebyshev degree per chip region), on every usable pixel, starting from the first solution (default).
        Continuum pixels rarely sit exactly at 1 in a real star, and a realistic network leaves few of them; fixing
        the continuum from them biases labels by several sigma, and its uncertainty would be missing from the
        errors. The joint fit removes the bias and its covariance marginalises over the continuum.
        False gives the seed's single pass.
    """

    def __init__(self, emulator, mask=None, continuum_pixels=None, opt_tolerance=5e-4, v_rad_tolerance=0.0,
                 pixel_flag_mask=APOGEE_BAD_PIXEL_MASK, continuum_degree=4, absolute_chi2_tolerance=True,
                 joint_continuum=True):
        self.emulator = emulator
        if emulator.n_pixels == len(MODEL_TO_APSTAR):
            self.model_to_apstar = MODEL_TO_APSTAR
        elif emulator.n_pixels == APSTAR_NPIX:
            self.model_to_apstar = np.arange(APSTAR_NPIX)
        else:
            from .errors import ConfigurationError

            raise ConfigurationError(f"model {emulator.path}: {emulator.n_pixels} pixels; expected the 7214-pixel "
                                     f"APOGEE model grid or the {APSTAR_NPIX}-pixel apStar grid")
        if not np.allclose(emulator.wavelength, _APSTAR_WAVELENGTH[self.model_to_apstar], rtol=1e-6):
            from .errors import ConfigurationError

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
        self.absolute_chi2_tolerance = bool(absolute_chi2_tolerance)
        self.joint_continuum = bool(joint_continuum)
        self._design = continuum_design(_APSTAR_WAVELENGTH[self.model_to_apstar], self.continuum_degree)
        self._segments = self._model_segments()
        self._layer = _OutputLayer(emulator)

    def _model_segments(self):
        """(start, stop) slices of the model pixels that are contiguous on the apStar grid (one per chip)."""
        breaks = np.flatnonzero(np.diff(self.model_to_apstar) != 1) + 1
        edges = np.concatenate([[0], breaks, [len(self.model_to_apstar)]])
        return list(zip(edges[:-1], edges[1:], strict=True))

    # -- preprocessing ------------------------------------------------------------------------------------------
    def prepare(self, spectrum, continuum_shift=0) -> PreparedSpectrum:
        """Mask, resample and continuum-normalise a spectrum.

        ``continuum_shift`` (whole pixels) moves the continuum pixels with a star whose velocity is being fitted:
        they are chosen in the model's rest frame, and lines would otherwise slide onto them.
        """
        flux, ivar = to_apstar_grid(spectrum, self.pixel_flag_mask)
        ivar = np.where(self.ignore, 0.0, ivar)
        continuum_pixels = self.continuum_pixels
        if continuum_shift:
            continuum_pixels = np.roll(continuum_pixels, int(continuum_shift))
        continuum = fit_continuum(_APSTAR_WAVELENGTH, flux, ivar, continuum_pixels, degree=self.continuum_degree)
        on_model = np.zeros(APSTAR_NPIX, dtype=bool)
        on_model[self.model_to_apstar] = True
        continuum[~on_model] = np.nan
        usable = on_model & np.isfinite(continuum) & (continuum > 0) & (ivar > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            norm_flux = np.where(usable, flux / continuum, 0.0)
            norm_ivar = np.where(usable, ivar * continuum**2, 0.0)
        snr = float(spectrum.snr) if np.isfinite(spectrum.snr) else _median_snr(flux, ivar)
        return PreparedSpectrum(flux, ivar, continuum, norm_flux, norm_ivar, snr)

    # -- fitting ------------------------------------------------------------------------------------------------
    def fit(self, spectrum, initial_labels=None) -> FitResult:
        """Fit one spectrum. Never raises for bad data: a failure is a result with the fitting-failure bit."""
        try:
            prepared = self.prepare(spectrum)
        except Exception as exc:
            return self._failure(spectrum, f"cannot prepare spectrum: {exc}", float(getattr(spectrum, "snr", np.nan)))
        try:
            shift = 0
            if self.v_rad_tolerance > 0:
                x0 = self._start(initial_labels)
                y = prepared.norm_flux[self.model_to_apstar]
                weight = np.sqrt(prepared.norm_ivar[self.model_to_apstar]) * self._edge_weight()
                shift = int(np.round(_pixel_shift(self._velocity_grid_search(x0, y, weight))))
                if shift:
                    prepared = self.prepare(spectrum, continuum_shift=shift)
            if self.joint_continuum and self.v_rad_tolerance <= 0:
                return self._fit_jointly(prepared, self._start(initial_labels))
            result, solution = self._fit_prepared(prepared, initial_labels)
            if self.joint_continuum:  # the velocity needs the first pass's grid search and fit to start from
                result = self._fit_jointly(prepared, solution)
            return result
        except Exception as exc:  # a numerical surprise in one spectrum must not stop a batch
            return self._failure(spectrum, f"{type(exc).__name__}: {exc}", prepared.snr, prepared)

    def _failure(self, spectrum, message, snr, prepared=None):
        log.warning("%s: fit failed: %s", getattr(spectrum, "label", "spectrum"), message)
        result = FitResult.failure(self.emulator.label_names, message, snr=snr)
        result.result_flags = flag_result({}, snr, failed=True)
        return result

    def _fit_prepared(self, prepared, initial_labels):
        emulator = self.emulator
        k = emulator.n_labels
        y = prepared.norm_flux[self.model_to_apstar]
        weight = np.sqrt(prepared.norm_ivar[self.model_to_apstar])
        fit_v = self.v_rad_tolerance > 0
        if fit_v:
            weight = weight * self._edge_weight()
        used = np.flatnonzero(weight > 0)
        n_params = k + int(fit_v)
        if len(used) < _MIN_PIXELS_PER_PARAMETER * n_params:
            raise _NotEnoughPixels(f"only {len(used)} usable pixels for {n_params} parameters")

        x0 = self._start(initial_labels)
        if fit_v:
            v_scale = 2.0 * self.v_rad_tolerance  # v / v_scale lies in [-0.5, 0.5] like the labels
            v0 = self._velocity_grid_search(x0, y, weight)
            x0 = np.concatenate([x0, [v0 / v_scale]])
            problem = _ShiftedProblem(self._layer, self._segments, y, weight, v_scale)
        else:
            problem = _HiddenSpaceProblem(emulator, y, weight, self._gram_buffer())

        solution = self._solve(problem, x0, len(used))
        if fit_v:
            # The first velocity guess used the starting labels; with the fitted labels a different velocity may
            # match better (line patterns repeat), so search again and keep whichever fit has the lower chi2.
            v1 = self._velocity_grid_search(solution.x[:k], y, weight)
            if abs(v1 - solution.x[k] * v_scale) > 2 * _PIXEL_VELOCITY:
                retry = self._solve(problem, np.concatenate([solution.x[:k], [v1 / v_scale]]), len(used))
                if retry.cost < solution.cost:
                    solution = retry

        rectified = problem.model(solution.x)
        result = self._result(solution, problem.jacobian(solution.x), problem.residuals(solution.x), len(used),
                              n_params, prepared, prepared.continuum, rectified)
        return result, solution.x

    def _fit_jointly(self, prepared, x_first):
        """Labels (and v_rel) together with a multiplicative continuum correction, from the first solution."""
        fit_v = self.v_rad_tolerance > 0
        y = prepared.norm_flux[self.model_to_apstar]
        weight = np.sqrt(prepared.norm_ivar[self.model_to_apstar])
        if fit_v:
            weight = weight * self._edge_weight()
        used = weight > 0
        design = self._design[:, np.any(self._design[used] != 0, axis=0)]  # regions without data: no freedom
        if fit_v:
            base = _ShiftedProblem(self._layer, self._segments, y, weight, 2.0 * self.v_rad_tolerance)
        else:
            base = _RestFrameModel(self._layer)
        n = len(x_first)
        n_params = n + design.shape[1]
        if used.sum() < _MIN_PIXELS_PER_PARAMETER * n_params:
            raise _NotEnoughPixels(f"only {int(used.sum())} usable pixels for {n_params} parameters")
        problem = _NormalEquationsProblem(_JointContinuumProblem(base, design, y, weight))
        lower = np.concatenate([np.full(n, -0.5), np.full(design.shape[1], -np.inf)])
        start = np.concatenate([np.clip(x_first, -0.5 + 1e-9, 0.5 - 1e-9), np.zeros(design.shape[1])])
        solution = self._solve(problem, start, int(used.sum()), bounds=(lower, -lower))
        continuum = prepared.continuum.copy()
        continuum[self.model_to_apstar] *= problem.problem.correction(solution.x)
        return self._result(solution, problem.jacobian(solution.x), problem.residuals(solution.x), int(used.sum()),
                            n_params, prepared, continuum, base.flux(solution.x[:n]))

    def _result(self, solution, jac, residuals, n_used, n_params, prepared, continuum, rectified_on_model):
        """A FitResult from a solution whose first K parameters are scaled labels (then v_rel, then nuisance
        parameters, over which the label covariance is marginalised)."""
        emulator = self.emulator
        k = emulator.n_labels
        fit_v = self.v_rad_tolerance > 0
        n = k + int(fit_v)
        scale = np.concatenate([emulator.x_max - emulator.x_min, [2.0 * self.v_rad_tolerance] if fit_v else []])
        covariance = _covariance(jac)[:n, :n] * np.outer(scale, scale)
        sigma = np.sqrt(np.diag(covariance))
        labels = emulator.unscale(solution.x[:k])
        chi2 = float(np.sum(residuals**2))  # zero-weight pixels add nothing
        dof = int(n_used - n_params)
        at_bound = bool(np.any(np.abs(solution.x[:k]) >= _AT_BOUND))
        flags = flag_result(dict(zip(emulator.label_names, labels, strict=True)), prepared.snr, at_bound=at_bound)
        rectified = np.full(APSTAR_NPIX, np.nan)
        rectified[self.model_to_apstar] = rectified_on_model
        return FitResult(
            label_names=emulator.label_names, labels=labels, raw_e=sigma[:k], covariance=covariance[:k, :k],
            v_rel=float(solution.x[k] * scale[k]) if fit_v else float("nan"),
            e_v_rel=float(sigma[k]) if fit_v else float("nan"),
            chi2=chi2, dof=dof, reduced_chi2=chi2 / dof if dof > 0 else float("nan"), snr=prepared.snr,
            result_flags=flags, continuum=continuum, rectified_model_flux=rectified,
            n_iterations=int(solution.nfev),
        )

    def _gram_buffer(self):
        """A scratch array shaped like the output layer, allocated once per fitter (and per worker process)."""
        if getattr(self, "_buffer", None) is None:
            self._buffer = np.empty_like(self.emulator.weights[2])
        return self._buffer

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_buffer"] = None  # scratch space: not worth sending to worker processes
        return state

    def _solve(self, problem, x0, n_used, bounds=(-0.5, 0.5)):
        # SciPy's ftol is relative to the cost (chi2 / 2), which for thousands of pixels lets the seed stop while chi2
        # still falls by several units, i.e. about a sigma short of the minimum. Dividing by the expected cost at
        # the minimum (half the number of pixels) makes opt_tolerance an absolute chi2 tolerance instead.
        ftol = self.opt_tolerance / max(0.5 * n_used, 1.0) if self.absolute_chi2_tolerance else self.opt_tolerance
        solution = least_squares(problem.residuals, x0, jac=problem.jacobian, bounds=bounds, method="trf",
                                 xtol=self.opt_tolerance, ftol=ftol)
        if solution.status <= 0 or not np.all(np.isfinite(solution.x)):
            raise _OptimiserFailure(f"optimiser stopped: {solution.message}")
        return solution

    def _start(self, initial_labels):
        """Scaled starting labels: 0 (mid-grid) or the given physical labels, clipped to the bounds."""
        if initial_labels is None:
            return np.zeros(self.emulator.n_labels)
        x0 = np.clip(self.emulator.scale(initial_labels), -0.5, 0.5)
        return np.where(np.isfinite(x0), x0, 0.0)

    def _edge_weight(self):
        """Zero weight for pixels within the largest allowed shift of a chip edge, where a shifted model would
        need flux from beyond the chip."""
        margin = int(np.ceil(self.v_rad_tolerance / _PIXEL_VELOCITY)) + 1
        weight = np.ones(len(self.model_to_apstar))
        for start, stop in self._segments:
            weight[start:start + margin] = 0.0
            weight[max(start, stop - margin):stop] = 0.0
        return weight

    def _velocity_grid_search(self, x0, y, weight):
        """Velocity (km/s) on a one-pixel grid over +-v_rad_tolerance that best matches the model at ``x0``."""
        flux = self.emulator.predict(x0)
        trial = np.arange(-self.v_rad_tolerance, self.v_rad_tolerance + 1e-9, _PIXEL_VELOCITY)
        chi2 = [np.sum((weight * (_shift(flux, self._segments, _pixel_shift(v))[0] - y)) ** 2) for v in trial]
        return float(trial[int(np.argmin(chi2))])

    # -- many spectra -------------------------------------------------------------------------------------------
    def fit_many(self, spectra, processes=1, initial_labels=None):
        """Fit spectra in order; with ``processes > 1`` in worker processes (one BLAS thread each)."""
        if processes <= 1:
            for spectrum in spectra:
                yield self.fit(spectrum, initial_labels)
            return
        import multiprocessing

        saved = {v: os.environ.get(v) for v in _THREAD_VARIABLES}
        os.environ.update({v: "1" for v in _THREAD_VARIABLES})  # read by the spawned workers' BLAS at import
        try:
            context = multiprocessing.get_context("spawn")
            with context.Pool(processes, initializer=_init_worker, initargs=(self,)) as pool:
                yield from pool.imap(_fit_in_worker, ((s, initial_labels) for s in spectra), chunksize=1)
        finally:
            for variable, value in saved.items():
                if value is None:
                    os.environ.pop(variable, None)
                else:
                    os.environ[variable] = value


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_WORKER_FITTER = None


def _init_worker(fitter):
    global _WORKER_FITTER
    _WORKER_FITTER = fitter


def _fit_in_worker(args):
    spectrum, initial_labels = args
    return _WORKER_FITTER.fit(spectrum, initial_labels)


class _NotEnoughPixels(RuntimeError):
    pass


class _OptimiserFailure(RuntimeError):
    pass


def _median_snr(flux, ivar):
    good = ivar > 0
    return float(np.median(np.abs(flux[good]) * np.sqrt(ivar[good]))) if good.any() else float("nan")


def _covariance(jac):
    """``(J^T J)^-1`` through the SVD; singular values are floored at a relative 1e-12 so that a label the data do
    not constrain gets an enormous error instead of a crash or a deceptively small one."""
    _, s, vt = np.linalg.svd(jac, full_matrices=False)
    s = np.maximum(s, 1e-12 * (s[0] if len(s) and s[0] > 0 else 1.0))
    return (vt.T / s**2) @ vt


def _pixel_shift(v_rel):
    """Shift in apStar pixels of a source at ``v_rel`` km/s (positive = redshift)."""
    return np.log10(1.0 + v_rel / SPEED_OF_LIGHT_KMS) / APSTAR_CDELT1


def _shift(values, segments, shift):
    """Resample ``values`` (model pixels, optionally with extra trailing axes) to positions ``i - shift`` within
    each chip, linearly; returns the shifted values and their derivative with respect to ``shift``."""
    n = int(np.floor(shift))
    frac = shift - n
    shifted = np.empty_like(values)
    derivative = np.empty_like(values)
    for start, stop in segments:
        index = np.arange(start, stop) - n
        upper = np.clip(index, start, stop - 1)
        lower = np.clip(index - 1, start, stop - 1)
        shifted[start:stop] = (1 - frac) * values[upper] + frac * values[lower]
        derivative[start:stop] = values[lower] - values[upper]
    return shifted, derivative


class _OutputLayer:
    """Flux and Jacobian of the network with its output layer in float32.

    The output layer holds almost all of the network (7214 x 300 weights in production) and every fit iteration
    streams it through memory once or twice; single precision halves that traffic and doubles the SIMD width. Its
    rounding (about 1e-7 relative) is far below the noise of any spectrum. The hidden layers stay float64.
    One instance is built per fitter and shared by all its fits; masked pixels simply get zero weight.
    """

    def __init__(self, emulator):
        self.emulator = emulator
        self.w2 = np.ascontiguousarray(emulator.weights[2], dtype=np.float32)
        self.b2 = np.asarray(emulator.biases[2], dtype=np.float64)
        self._x = None

    def _hidden(self, x):
        if self._x is None or not np.array_equal(x, self._x):  # least_squares asks for fun and jac at the same x
            self._a1, self._hidden_jac = self.emulator.hidden(x)
            self._x = np.array(x, copy=True)
        return self._a1, self._hidden_jac

    def flux(self, x):
        a1, _ = self._hidden(x)
        return (self.w2 @ a1.astype(np.float32)).astype(np.float64) + self.b2

    def jacobian(self, x):
        _, hidden_jac = self._hidden(x)
        return (self.w2 @ hidden_jac.astype(np.float32)).astype(np.float64)


class _HiddenSpaceProblem:
    """The rest-frame fit rewritten exactly in the network's hidden space (H residuals instead of P pixels).

    With ``a(x)`` the last hidden layer, the weighted residuals are ``r = M a + d`` with ``M = diag(w) W2`` (P x H)
    and ``d = w (b2 - y)``. Factor the Gram matrix once per spectrum, ``M^T M = R^T R`` (R is H x H), and let
    ``R^T e = M^T d``. Then ``|r|^2 = |R a + e|^2 + (|d|^2 - |e|^2)`` for every x, so the H + 1 residuals
    ``[R a + e, sqrt(|d|^2 - |e|^2)]`` have the same chi2 everywhere, the same gradient and the same Gauss-Newton
    matrix ``J^T J = B^T R^T R B`` (B = da/dx) as the P pixel residuals: TRF takes the same steps. What changes is
    the cost: one Gram product per spectrum (P H^2 / 2 flops, at matrix-matrix speed) replaces, at every
    iteration, the P x H x K Jacobian product and the SVD of a P x K matrix inside TRF.
    """

    def __init__(self, emulator, y, weight, buffer=None):
        self.emulator = emulator
        # unused pixels have weight 0 and so contribute nothing; multiplying in place into a reused buffer avoids
        # both a boolean-index copy and a fresh 17 MB allocation per spectrum, which cost more than the product
        m = np.multiply(emulator.weights[2], weight[:, None], out=buffer)
        d = weight * (emulator.biases[2] - y)
        gram = dsyrk(1.0, m.T, trans=0)  # upper triangle of M^T M; m.T is Fortran-ordered, so no copy
        gram = np.triu(gram) + np.triu(gram, 1).T
        scale = np.mean(np.diag(gram)) or 1.0
        projected = m.T @ d
        try:
            # a relative 1e-12 ridge keeps the factorisation alive for hidden units no used pixel depends on
            self.r = cholesky(gram + 1e-12 * scale * np.eye(len(gram)), lower=False)
            self.e = solve_triangular(self.r, projected, trans="T")
        except LinAlgError:
            values, vectors = np.linalg.eigh(gram)
            root = np.sqrt(np.clip(values, 1e-12 * scale, None))
            self.r = root[:, None] * vectors.T
            self.e = (vectors.T @ projected) / root
        self.rest = np.sqrt(max(float(d @ d - self.e @ self.e), 0.0))
        self._x = None

    def _hidden(self, x):
        if self._x is None or not np.array_equal(x, self._x):
            self._a1, self._hidden_jac = self.emulator.hidden(x)
            self._x = np.array(x, copy=True)
        return self._a1, self._hidden_jac

    def residuals(self, x):
        a1, _ = self._hidden(x)
        return np.append(self.r @ a1 + self.e, self.rest)

    def jacobian(self, x):
        _, hidden_jac = self._hidden(x)
        return np.vstack([self.r @ hidden_jac, np.zeros((1, hidden_jac.shape[1]))])

    def model(self, x):
        return self.emulator.predict(x)


class _RestFrameModel:
    """Unweighted rectified model and its Jacobian on the model pixels (no velocity)."""

    def __init__(self, layer):
        self.layer = layer
        self.layer._x = None

    def flux(self, x):
        return self.layer.flux(x)

    def flux_jacobian(self, x):
        return self.layer.jacobian(x)


class _ShiftedProblem:
    """Residuals and Jacobian when the radial velocity (last parameter, in units of ``v_scale``) is free."""

    def __init__(self, layer, segments, y, weight, v_scale):
        self.layer = layer
        self.layer._x = None
        self.segments, self.y, self.weight, self.v_scale = segments, y, weight, v_scale

    def _shift_of(self, x):
        return _pixel_shift(x[-1] * self.v_scale)

    def flux(self, x):
        """Shifted rectified model (unweighted)."""
        return _shift(self.layer.flux(x[:-1]), self.segments, self._shift_of(x))[0]

    def flux_jacobian(self, x):
        """Its derivatives with respect to the scaled labels and the scaled velocity (unweighted)."""
        v = x[-1] * self.v_scale
        shift = self._shift_of(x)
        _, d_flux = _shift(self.layer.flux(x[:-1]), self.segments, shift)
        jac_shifted, _ = _shift(self.layer.jacobian(x[:-1]), self.segments, shift)
        d_shift_d_x = self.v_scale / (np.log(10) * APSTAR_CDELT1 * (SPEED_OF_LIGHT_KMS + v))
        return np.column_stack([jac_shifted, d_flux * d_shift_d_x])

    def residuals(self, x):
        return self.weight * (self.flux(x) - self.y)

    def jacobian(self, x):
        return self.weight[:, None] * self.flux_jacobian(x)

    def model(self, x):
        return self.flux(x)


class _JointContinuumProblem:
    """Residuals ``w ((1 + D g) m(x) - y)``: the rectified model ``m`` times a smooth correction to the continuum
    (Chebyshev basis ``D`` per chip region, coefficients ``g``), fitted together with the labels."""

    def __init__(self, base, design, y, weight):
        self.base, self.design, self.y, self.weight = base, design, y, weight
        self.n_design = design.shape[1]

    def correction(self, theta):
        return 1.0 + self.design @ theta[len(theta) - self.n_design:]

    def residuals(self, theta):
        x = theta[:len(theta) - self.n_design]
        return self.weight * (self.correction(theta) * self.base.flux(x) - self.y)

    def jacobian(self, theta):
        x = theta[:len(theta) - self.n_design]
        flux = self.base.flux(x)
        d_labels = self.correction(theta)[:, None] * self.base.flux_jacobian(x)
        return self.weight[:, None] * np.hstack([d_labels, flux[:, None] * self.design])


class _NormalEquationsProblem:
    """Any least-squares problem presented to TRF as ``n + 1`` residuals with the same steps.

    At each point x, with the Cholesky factor ``J^T J = L L^T``, the residuals ``[L^-1 J^T r, sqrt(|r|^2 -
    |L^-1 J^T r|^2)]`` and the Jacobian ``[L^T; 0]`` give TRF the same cost, gradient, Gauss-Newton matrix and SVD
    as the full problem, so it takes the same steps; but the SVD TRF computes every iteration is of an n x n matrix
    instead of P x n. The full Jacobian is still needed at every trial point (to keep residuals and Jacobian
    consistent), which costs little next to that SVD when P >> n.
    """

    def __init__(self, problem):
        self.problem = problem
        self._x = None

    def _evaluate(self, x):
        if self._x is None or not np.array_equal(x, self._x):
            r = self.problem.residuals(x)
            jac = self.problem.jacobian(x)
            gram = jac.T @ jac
            ridge = 1e-12 * (np.mean(np.diag(gram)) or 1.0)  # keeps unconstrained directions factorable
            lower = cholesky(gram + ridge * np.eye(len(gram)), lower=True)
            projected = solve_triangular(lower, jac.T @ r, lower=True)
            rest = np.sqrt(max(float(r @ r - projected @ projected), 0.0))
            self._residuals = np.append(projected, rest)
            self._jacobian = np.vstack([lower.T, np.zeros((1, len(x)))])
            self._x = np.array(x, copy=True)
        return self._residuals, self._jacobian

    def residuals(self, x):
        return self._evaluate(x)[0]

    def jacobian(self, x):
        return self._evaluate(x)[1]
