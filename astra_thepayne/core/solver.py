"""Bounded nonlinear least squares for problems whose gradient is cheap but whose exact Jacobian is not.

A trust-region reflective method on a box, the algorithm of SciPy's ``least_squares(method="trf")`` that the Astra
seed uses (Branch, Coleman & Li 1999: Coleman-Li scaling of the variables by their distance to the bound the
gradient points at, a trust-region step in the scaled variables, and the best of the stepped-back, reflected and
anti-gradient steps when the step would leave the box), written here for a problem that supplies the normal
matrix ``J^T J`` instead of ``J``, so that it may supply an approximation of it.

Every step uses the exact chi2 and the exact gradient ``J^T r``; the Gauss-Newton matrix may be approximate while
the fit is far from the minimum, which changes how fast the iteration gets there but not where it ends (where the
gradient vanishes). Once the exact matrix is in use, the last one made serves as the model of the steps after it
(near the minimum it changes little), and a new one is made where convergence is to be confirmed: convergence is
declared only with the exact matrix at the solution, which is returned and gives the covariance directly.

Pure numpy. The problem's three functions (see :class:`LeastSquaresProblem`) and :func:`minimise` itself are
generators: whatever expensive product a problem needs it may yield as a request to its driver and receive the
answer, so that a driver can advance many fits in lockstep and serve all their requests at once
(:func:`astra_thepayne.core.lockstep.run_in_lockstep`). A problem that needs nothing yields nothing.
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .lockstep import Request

__all__ = ["LeastSquaresProblem", "Solution", "SolverFailure", "minimise"]


class LeastSquaresProblem(Protocol):
    """Each method is a generator returning the value described (``value = yield from problem.chi2(x)``)."""

    def chi2(self, x: np.ndarray) -> Generator[Request, Any, float]:
        """``sum(r(x)^2)``; may keep what it computed for :meth:`gradient` and :meth:`normal_matrix` at ``x``."""

    def gradient(self, x: np.ndarray) -> Generator[Request, Any, np.ndarray]:
        """``J(x)^T r(x)`` (half the gradient of chi2)."""

    def normal_matrix(self, x: np.ndarray, exact: bool) -> Generator[Request, Any, np.ndarray]:
        """``J(x)^T J(x)``, exactly when ``exact`` is true, otherwise any cheap symmetric positive approximation."""


@dataclass
class Solution:
    x: np.ndarray
    chi2: float
    normal_matrix: np.ndarray | None  # exact J^T J at x (None for a coarse solution)
    n_evaluations: int
    message: str


class SolverFailure(RuntimeError):
    pass


def minimise(problem: LeastSquaresProblem, x0, lower, upper, tolerance: float = 5e-4, x_tolerance: float = 0.02,
             max_evaluations: int | None = None, coarse: bool = False) -> Generator[Request, Any, Solution]:
    """Minimise ``problem.chi2`` within ``lower <= x <= upper`` from ``x0``; a generator that passes on the
    problem's requests and returns a :class:`Solution`.

    Stops, with the exact Gauss-Newton matrix in use, when a full Gauss-Newton step would lower chi2 by less than
    ``tolerance`` (absolute, in chi2 units: that step is then shorter than ``sqrt(tolerance)`` in the metric of the
    inverse covariance, so no parameter is further than ``sqrt(tolerance)`` of its sigma from the minimum of the
    quadratic model), when an accepted step lowered chi2 by less than ``tolerance`` with a reliable model (SciPy's
    ``ftol`` rule, made absolute), or when a step is shorter than ``x_tolerance`` in that same metric (every
    parameter moved by less than ``x_tolerance`` of its sigma; it ends fits that sit on a kink of a
    piecewise-linear network, where steps fail until the trust region is that small). With ``coarse``, returns
    instead as soon as the fit is near a minimum (where the exact matrix would take over), with ``normal_matrix``
    None: enough to compare starting points. A converged fit whose Newton step points through bounds tries the
    parameters on them (:func:`_onto_bounds`) and goes on from there when chi2 is lower. Raises
    :class:`SolverFailure` when chi2 is not finite at the start or the evaluation budget (default 100 per parameter,
    as SciPy) runs out.
    """
    lower = np.broadcast_to(np.asarray(lower, dtype=float), np.shape(x0))
    upper = np.broadcast_to(np.asarray(upper, dtype=float), np.shape(x0))
    x = _strictly_inside(np.asarray(x0, dtype=float), lower, upper, 1e-10)
    max_evaluations = max_evaluations or 100 * len(x)
    cost = 0.5 * (yield from problem.chi2(x))  # SciPy's convention: cost = chi2 / 2, gradient J^T r
    if not np.isfinite(cost):
        raise SolverFailure("chi2 is not finite at the starting point")
    evaluations = 1
    gradient = yield from problem.gradient(x)
    exact = False
    model = _Model((yield from problem.normal_matrix(x, exact)))
    radius = max(float(np.linalg.norm(x)), 1.0)  # initial trust region: at least unit size (SciPy: |x0|, or 1 at 0)
    onto_bounds = _ONTO_BOUNDS_TRIES
    finished = None  # why a fit with the exact matrix stopped, when a step test (not the decrement) stopped it
    stale = False  # the model is the exact matrix of an earlier point (see below)

    while True:
        matrix = model.matrix
        if exact and (finished or model.decrement(gradient, x, lower, upper) < tolerance):
            if stale:  # converged by the last exact matrix: confirm (or go on) with the one at x
                model, stale = _Model((yield from problem.normal_matrix(x, True))), False
                continue
            if not coarse and onto_bounds:
                onto_bounds -= 1
                moved = yield from _onto_bounds(problem, x, cost, gradient, matrix, lower, upper)
                if moved is not None:
                    (x, cost), evaluations, finished = moved, evaluations + 1, None
                    gradient = yield from problem.gradient(x)
                    model = _Model((yield from problem.normal_matrix(x, True)))
                    continue
            return Solution(x, 2 * cost, matrix, evaluations,
                            finished or "a full step would lower chi2 by less than the tolerance")
        if evaluations >= max_evaluations:
            raise SolverFailure(f"no convergence after {evaluations} evaluations")
        scaled, step_from_exact = None, exact
        reduction, stop = -1.0, None
        while reduction <= 0 and evaluations < max_evaluations:
            step = model.trust_region_step(gradient, radius)
            if np.all((x + step > lower) & (x + step < upper)):
                # the step stays inside the box: take it as it is (the scaling below only slows the approach)
                step_h, predicted = step, -_quadratic(matrix, gradient, step)
            else:
                if scaled is None:
                    # Coleman-Li scaling: a variable moving towards a bound is measured in units of
                    # sqrt(distance to it), so that steps slow down near the bounds instead of leaving the box
                    v, dv = _scaling(x, gradient, lower, upper)
                    d = np.sqrt(v)
                    g_h = d * gradient
                    b_h = matrix * np.outer(d, d) + np.diag(gradient * dv)
                    theta = max(0.995, 1.0 - np.linalg.norm(gradient * v, ord=np.inf))  # closeness to a bound
                    scaled = _Model(b_h)
                p_h = scaled.trust_region_step(g_h, radius)
                step, step_h, predicted = _select_step(x, b_h, g_h, p_h, d, radius, lower, upper, theta)
            trial = _strictly_inside(x + step, lower, upper, 0.0)
            trial_cost = 0.5 * (yield from problem.chi2(trial))
            evaluations += 1
            step_h_norm = float(np.linalg.norm(step_h))
            if not np.isfinite(trial_cost):
                radius = 0.25 * step_h_norm
                continue
            reduction = cost - trial_cost
            ratio = reduction / predicted if predicted > 0 else (1.0 if reduction == 0 else -1.0)
            if ratio < 0.25:
                radius = 0.25 * step_h_norm
            elif ratio > 0.75 and step_h_norm > 0.95 * radius:
                radius *= 2.0
            moved = trial - x
            if moved @ matrix @ moved < x_tolerance**2:
                # the step is below x_tolerance in the metric of J^T J, the inverse covariance: no parameter
                # moved by more than x_tolerance of its own sigma (Cauchy-Schwarz); on a kink of a piecewise-linear
                # network, where steps fail until the trust region is that small, the minimum is that close
                stop = "step below the x tolerance (in sigma)"
                break
            if 2 * reduction < tolerance and ratio > 0.25:
                stop = "chi2 decrease below the tolerance"
                break
        if reduction > 0:
            x, cost = trial, trial_cost
            gradient = yield from problem.gradient(x)
            if 2 * reduction < len(x):
                # chi2 fell by less than one per parameter: the fit is within a few sigma of the minimum, where
                # the exact matrix converges quadratically and an approximate one only linearly
                if coarse:
                    return Solution(x, 2 * cost, None, evaluations, "near a minimum (coarse)")
                exact = True
        else:
            yield from problem.chi2(x)  # back to the state at x
        if stop is not None:
            if coarse:
                return Solution(x, 2 * cost, None, evaluations, stop)
            if step_from_exact:  # ends at the top of the loop, with the exact matrix at x
                model, finished, stale = _Model((yield from problem.normal_matrix(x, True))), stop, False
                continue
            exact = True  # near the minimum: from here on only the exact matrix
        if step_from_exact and reduction > 0:
            # near the minimum the exact matrix changes little from step to step: the last one is the model for the
            # next step too, and the one at x is made only to confirm convergence (or when a step stops the fit)
            stale = True
            continue
        model, stale = _Model((yield from problem.normal_matrix(x, exact))), False
        if not exact and model.decrement(gradient, x, lower, upper) < tolerance:
            if coarse:
                return Solution(x, 2 * cost, None, evaluations, "near a minimum (coarse)")
            exact = True  # apparently converged: confirm (or continue) with the exact matrix
            model = _Model((yield from problem.normal_matrix(x, True)))


#: Times a converged fit tries to put the parameters that its Newton step carries through a bound onto it
_ONTO_BOUNDS_TRIES = 2


def _onto_bounds(problem, x, cost, gradient, matrix, lower, upper):
    """``(x, cost)`` with the parameters that the Newton step would carry through a bound put on that bound and the
    others moved by the Newton step of the rest, or None unless that lowers chi2.

    The Coleman-Li scaling makes steps towards a bound shrink with the distance to it, so a fit whose minimum lies
    beyond a bound used to stop short of it (on kurucz25 by up to 0.002 of the range), still descending: the
    minimum within the box is on the bound, and this puts it there."""
    step = _Model(matrix).newton_step(gradient)
    if step is None:
        return None
    below, above = (x + step <= lower) & (gradient > 0), (x + step >= upper) & (gradient < 0)
    through = below | above
    if not through.any():
        return None
    trial = np.array(x, dtype=float)
    trial[below], trial[above] = lower[below], upper[above]
    free = ~through
    if free.any():
        # the quadratic model's minimum over the others with those fixed on their bounds
        a = matrix[np.ix_(free, free)]
        a = a + np.diag(np.full(len(a), 1e-12 * (np.mean(np.diag(a)) or 1.0)))
        try:
            trial[free] = x[free] - np.linalg.solve(a, gradient[free] + matrix[np.ix_(free, through)]
                                                    @ (trial[through] - x[through]))
        except np.linalg.LinAlgError:
            return None
    trial = _strictly_inside(np.clip(trial, lower, upper), lower, upper, 0.0)
    trial_cost = 0.5 * (yield from problem.chi2(trial))
    if not (np.isfinite(trial_cost) and trial_cost < cost):
        yield from problem.chi2(x)  # back to the state at x
        return None
    return trial, trial_cost


def _strictly_inside(x, lower, upper, relative_step):
    """``x`` moved just inside any bound it touches or crosses (the scaling needs a distance to the bound)."""
    if np.all((x > lower) & (x < upper)):
        return x
    x = np.clip(x, lower, upper)
    on_lower, on_upper = (x <= lower) & (lower < upper), (x >= upper) & (lower < upper)
    if relative_step:
        x[on_lower] = lower[on_lower] + relative_step * np.maximum(1.0, np.abs(lower[on_lower]))
        x[on_upper] = upper[on_upper] - relative_step * np.maximum(1.0, np.abs(upper[on_upper]))
    else:
        x[on_lower] = np.nextafter(lower[on_lower], upper[on_lower])
        x[on_upper] = np.nextafter(upper[on_upper], lower[on_upper])
    return x


def _scaling(x, gradient, lower, upper):
    """Distance to the bound the descent direction points at (1 where that bound is infinite), and the sign of
    its derivative with respect to x."""
    v, dv = np.ones_like(x), np.zeros_like(x)
    towards_upper = (gradient < 0) & np.isfinite(upper)
    towards_lower = (gradient > 0) & np.isfinite(lower)
    v[towards_upper], dv[towards_upper] = upper[towards_upper] - x[towards_upper], -1.0
    v[towards_lower], dv[towards_lower] = x[towards_lower] - lower[towards_lower], 1.0
    return v, dv


class _Model:
    """A symmetric positive semi-definite matrix ``B`` of a quadratic model ``g.p + p.B.p / 2``, factored as
    needed: one solve for the Newton step, the eigen-decomposition only when the step must be shortened."""

    def __init__(self, matrix):
        self.matrix = matrix
        self._newton_for = self._newton = self._eigen = None

    def newton_step(self, g):
        """``-B^-1 g``, or None if B is singular or the step is not a descent direction."""
        if self._newton_for is not g:
            try:
                step = -np.linalg.solve(self.matrix, g)
                self._newton = step if np.all(np.isfinite(step)) and g @ step < 0 else None
            except np.linalg.LinAlgError:
                self._newton = None
            self._newton_for = g
        return self._newton

    def trust_region_step(self, g, radius):
        """Minimiser of the model with ``|p| <= radius``: the Newton step if it fits, otherwise
        ``-(B + alpha)^-1 g`` with ``alpha`` such that ``|p| = radius`` (Newton's method on ``1/|p| - 1/radius``,
        which is nearly linear in alpha)."""
        p = self.newton_step(g)
        if p is not None and np.linalg.norm(p) <= radius:
            return p
        if self._eigen is None:
            self._eigen = np.linalg.eigh(self.matrix)
        values, vectors = self._eigen
        g_t = vectors.T @ g
        floor = 1e-12 * max(values[-1], 1e-300)
        alpha = max(0.0, -values[0]) + floor
        for _ in range(30):
            shifted = values + alpha
            p_t = -g_t / shifted
            norm = np.linalg.norm(p_t)
            if (norm <= radius and alpha == floor) or abs(norm - radius) <= 1e-3 * radius:
                break
            derivative = np.sum(g_t**2 / shifted**3) / norm**3  # d(1/|p|)/d alpha
            alpha = max(alpha - (1.0 / norm - 1.0 / radius) / derivative, 0.5 * alpha + floor)
        return vectors @ p_t

    def decrement(self, g, x, lower, upper):
        """Predicted chi2 decrease of a full Gauss-Newton step over the parameters not held at a bound."""
        margin = 1e-6 * np.where(np.isfinite(upper - lower), upper - lower, 1.0)
        held = ((x - lower <= margin) & (g > 0)) | ((upper - x <= margin) & (g < 0))
        if not held.any():
            p = self.newton_step(g)
            if p is not None:
                return float(-g @ p)
        free = ~held
        if not free.any():
            return 0.0
        a = self.matrix[np.ix_(free, free)]
        a = a + np.diag(np.full(len(a), 1e-12 * (np.mean(np.diag(a)) or 1.0)))
        return float(g[free] @ np.linalg.solve(a, g[free]))


def _quadratic(b, g, p):
    return g @ p + 0.5 * p @ b @ p


def _stride_to_bound(x, step, lower, upper):
    """Largest t with ``x + t step`` in the box, and which variables reach their bound there."""
    with np.errstate(divide="ignore", invalid="ignore"):
        limits = np.where(step > 0, (upper - x) / step, np.where(step < 0, (lower - x) / step, np.inf))
    t = float(np.min(limits))
    return t, limits == t


def _minimise_along(b, g, start, direction, low, high):
    """Minimiser in ``[low, high]`` of the quadratic along ``start + t direction``, and its value."""
    slope = g @ direction + start @ b @ direction
    curvature = direction @ b @ direction
    candidates = [low, high]
    if curvature > 0 and low < -slope / curvature < high:
        candidates.append(-slope / curvature)
    base = _quadratic(b, g, start)
    values = [base + t * slope + 0.5 * t * t * curvature for t in candidates]
    best = int(np.argmin(values))
    return candidates[best], values[best]


def _select_step(x, b_h, g_h, p_h, d, radius, lower, upper, theta):
    """The trust-region step if it stays inside the box; otherwise the best (by the quadratic model) of that step
    stopped short of the bound, its reflection off the bound, and the anti-gradient step. Returns the step, the
    step in scaled variables, and the predicted decrease of the cost."""
    p = d * p_h
    if np.all((x + p > lower) & (x + p < upper)):
        return p, p_h, -_quadratic(b_h, g_h, p_h)
    stride, hits = _stride_to_bound(x, p, lower, upper)
    options = []
    # reflection: continue from the bound with the hitting components reversed, within the trust region and box
    r_h = np.where(hits, -p_h, p_h)
    start_h = stride * p_h
    to_radius = _to_sphere(start_h, r_h, radius)
    to_box, _ = _stride_to_bound(x + d * start_h, d * r_h, lower, upper)
    r_stride = min(to_radius, to_box)
    if r_stride > 0:
        low = (1 - theta) * stride / r_stride
        high = theta * to_box if r_stride == to_box else to_radius
        if low <= high:
            t, value = _minimise_along(b_h, g_h, start_h, r_h, low, high)
            options.append((value, start_h + t * r_h))
    # the trust-region step, stopped just short of the bound
    options.append((_quadratic(b_h, g_h, theta * start_h), theta * start_h))
    # the anti-gradient step
    a_h = -g_h
    norm = np.linalg.norm(a_h)
    if norm > 0:
        to_box, _ = _stride_to_bound(x, d * a_h, lower, upper)
        t, value = _minimise_along(b_h, g_h, np.zeros_like(a_h), a_h, 0.0, min(radius / norm, theta * to_box))
        options.append((value, t * a_h))
    value, best_h = min(options, key=lambda option: option[0])
    return d * best_h, best_h, -value


def _to_sphere(start, direction, radius):
    """Positive t with ``|start + t direction| = radius`` (``start`` inside the sphere)."""
    a = direction @ direction
    if a == 0:
        return 0.0
    b = start @ direction
    c = start @ start - radius**2
    return float((-b + np.sqrt(max(b * b - a * c, 0.0))) / a)
