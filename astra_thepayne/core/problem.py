"""The Payne fit of one spectrum as a least-squares problem for :func:`astra_thepayne.core.solver.minimise`.

Weighted residuals ``r = w (c * S_v(f(x)) - y)`` over the model pixels, with ``f(x) = W2 a(x) + b2`` the network
(``a`` its last hidden layer), ``S_v`` an optional Doppler shift (B-spline within each chip, see :class:`Shift`) and
``c = 1 + D g`` an optional multiplicative continuum correction (Chebyshev basis ``D``). Parameters are the scaled
labels ``x`` and the scaled velocity; ``g`` is solved for at every evaluation (see :class:`PayneProblem`).

What makes it fast: the output layer ``W2`` (P x H, 7214 x 300 in production) is nearly all of the network, and
the exact Jacobian ``W2 (da/dx)`` costs P H K multiply-adds. Chi2 and the exact gradient need only two
matrix-vector products with ``W2`` (``J^T r = (da/dx)^T W2^T S^T (w c r)``). The Gauss-Newton matrix of the labels,
``(da/dx)^T W2^T diag(w^2) W2 (da/dx)``, is approximated while the fit is far from the minimum by replacing
``w^2`` with its mean over each of a few wide pixel blocks: ``W2^T diag(w^2) W2 ~ sum_b mean_b(w^2) G_b`` with the
block Gram matrices ``G_b = W2_b^T W2_b`` computed once per network. The exact product is formed only near the
minimum, where it also gives the covariance; it is cached by the network's activation pattern, on which it alone
depends.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .lockstep import run_in_lockstep
from .wavelength import APSTAR_CDELT1, SPEED_OF_LIGHT_KMS

__all__ = ["OutputLayer", "PayneProblem", "SHIFT_DEGREE", "Shift", "bspline_kernel", "pixel_shift"]

_N_BLOCKS = 16  # pixel blocks of the approximate Gram matrix: ~450 pixels each, over which S/N changes little


def pixel_shift(v_rel):
    """Shift in apStar pixels of a source at ``v_rel`` km/s (positive = redshift)."""
    return np.log10(1.0 + v_rel / SPEED_OF_LIGHT_KMS) / APSTAR_CDELT1


SHIFT_DEGREE = 7  # the B-spline degree of the model shift: see Shift


@functools.lru_cache(maxsize=4)
def _bspline_terms(degree):
    """Binomial signs and knots of the centred B-spline of odd ``degree``: ``B(x) = sum_j s_j (x + h - j)_+^p / p!``
    with ``h = (p + 1) / 2``."""
    from math import comb

    signs = np.array([(-1.0) ** j * comb(degree + 1, j) for j in range(degree + 2)])
    knots = (degree + 1) / 2.0 - np.arange(degree + 2)
    return signs, knots


def _bspline(x, degree, derivative=False):
    """The centred B-spline of odd ``degree`` (or its derivative) at ``x`` (any shape)."""
    from math import factorial

    signs, knots = _bspline_terms(degree)
    power = degree - 1 if derivative else degree
    shifted = np.maximum(np.asarray(x, dtype=float)[..., None] + knots, 0.0)
    return (signs * shifted**power).sum(axis=-1) / factorial(power)


def bspline_kernel(degree):
    """What another implementation of :class:`Shift` needs: the binomial signs and knots of the centred B-spline
    (``B(x) = sum_j s_j (x + knot_j)_+^p / p!``) and the tap offsets of :class:`Shift`'s coefficients."""
    signs, knots = _bspline_terms(degree)
    return signs.copy(), knots.copy(), _tap_offsets(degree)


def _tap_offsets(degree):
    """Offsets ``t`` of the coefficients ``j + t`` behind a point at ``j - f`` (0 <= f < 1), from
    ``(p+1)/2 - 1`` down to ``-(p+1)/2``."""
    half = (degree + 1) // 2
    return tuple(range(half - 1, -half - 1, -1))


def _bspline_weights(frac, degree):
    """B-spline weights of the coefficients at offsets :func:`_tap_offsets` from a point ``frac`` of a pixel before
    them, and their derivatives with respect to ``frac``."""
    x = -frac - np.array(_tap_offsets(degree), dtype=float)  # point minus coefficient position
    return _bspline(x, degree), -_bspline(x, degree, derivative=True)


@functools.lru_cache(maxsize=8)
def _spline_factor(segments, degree):
    """LU factors (LAPACK band storage) of the matrix that turns B-spline coefficients into values at the pixels,
    each segment on its own, with the coefficients beyond an end equal to the end's (so constants stay constant).
    Clamping makes the quintic matrix unsymmetric near the ends, hence LU rather than Cholesky; computed once per
    set of segments, in float64 and float32."""
    from scipy.linalg import lapack

    half = (degree - 1) // 2  # the basis is non-zero at integers |m| <= half
    n = max(stop for _, stop in segments)
    at_integers = _bspline(np.arange(-half, half + 1), degree)
    band = np.zeros((3 * half + 1, n))  # rows: half for the LU fill-in, then the 2 half + 1 diagonals
    for start, stop in segments:
        rows = np.arange(start, stop)
        for m, value in zip(range(-half, half + 1), at_integers, strict=True):
            cols = np.clip(rows + m, start, stop - 1)
            np.add.at(band, (2 * half + rows - cols, cols), value)
    factors = []
    for trf, dtype in ((lapack.dgbtrf, np.float64), (lapack.sgbtrf, np.float32)):
        lu, pivots, info = trf(band.astype(dtype), half, half)
        if info != 0:
            raise ValueError("spline system is singular")
        factors.append((lu, pivots))
    return half, factors[0], factors[1]


def _spline_solve(factor, values, transpose=False):
    """The spline coefficients of ``values`` (or the solve with the transposed matrix): in float32 for float32
    values (the output layer's products, whose own rounding is no finer), in float64 otherwise."""
    from scipy.linalg import lapack

    half, double, single = factor
    values = np.asarray(values)
    if values.dtype == np.float32:
        (lu, pivots), trs = single, lapack.sgbtrs
    else:
        (lu, pivots), trs = double, lapack.dgbtrs
        values = np.asarray(values, dtype=np.float64)
    solution, info = trs(lu, half, half, values, pivots, trans=1 if transpose else 0)
    if info != 0:
        raise ValueError("spline solve failed")
    return solution


class Shift:
    """Resampling of model pixels to positions ``i - shift`` within each chip segment, its derivative with respect
    to ``shift``, and its transpose.

    Interpolation is by B-spline of odd ``degree`` (7 by default: coefficients from one banded solve, then
    ``degree + 1`` taps). The DRP resamples visits onto the apStar grid with a windowed sinc, the ideal interpolator of
    band-limited data, and B-spline interpolation converges to it as the degree grows. At a half-pixel shift of lines
    at APOGEE's resolution, against lines drawn at their shifted centres, the error is 2e-4 of the continuum (as the
    sinc's; cubic 1.1e-3, linear 2.3e-2), and no label moves by more than 0.01 sigma at S/N 100 as a star moves
    between model pixels (cubic: 1.5 sigma; ``docs/science.md``, Radial velocity). Linear interpolation also gives
    chi2 a kink at every whole-pixel shift: local minima one pixel (4.1 km/s) from the truth. The operator is linear
    in the values, ``S = E A^-1``, so ``S^T = A^-T E^T``.
    """

    def __init__(self, segments, shift, degree=None):
        degree = SHIFT_DEGREE if degree is None else degree
        if degree not in (3, 5, 7):
            raise ValueError(f"shift degree must be 3, 5 or 7, not {degree!r}")
        n = int(np.floor(shift))
        self.shift, self.frac, self.whole, self.degree = float(shift), float(shift - n), n, degree
        self.weights, self.slopes = _bspline_weights(self.frac, degree)
        segments = tuple(map(tuple, segments))
        self.segments = segments
        self.offsets = _tap_offsets(degree)
        self.size = sum(stop - start for start, stop in segments)
        self._factor = _spline_factor(segments, degree)

    def _coefficients(self, values):
        return _spline_solve(self._factor, values)

    @staticmethod
    def coefficients(values, segments, degree=None):
        """The B-spline coefficients of ``values``, to shift one vector many times (:meth:`apply_to_coefficients`)."""
        degree = SHIFT_DEGREE if degree is None else degree
        return _spline_solve(_spline_factor(tuple(map(tuple, segments)), degree), values)

    def apply_to_coefficients(self, coefficients):
        return self._taps(self.weights, coefficients)

    def apply_with_derivative_to_coefficients(self, coefficients):
        """:meth:`apply_with_derivative` of the values whose spline coefficients are given (no solve)."""
        return self._taps(self.weights, coefficients), self._taps(self.slopes, coefficients)

    def _taps(self, factors, c):
        if c.ndim == 1:  # one vector: a convolution per segment, padded with its end values (the taps' clamping)
            out = np.empty(self.size, dtype=np.result_type(factors, c))
            first, span = self.offsets[-1], len(self.offsets)  # offsets run down from offsets[0] to offsets[-1]
            pad = abs(self.whole) + span
            for start, stop in self.segments:
                segment = c[start:stop]
                padded = np.concatenate([np.full(pad, segment[0]), segment, np.full(pad, segment[-1])])
                begin = pad - self.whole + first
                out[start:stop] = np.convolve(padded[begin:begin + stop - start + span - 1], factors, "valid")
            return out
        # a matrix (the Jacobian's columns): contiguous slices of each segment padded with its end values (the
        # clamping of the taps), five times quicker than gathering rows. Accumulated in place in the matrix's own
        # precision (float32 from the products; Python floats keep it): float64 temporaries took 2.4 times longer
        out = np.empty(c.shape, dtype=c.dtype)
        pad = abs(self.whole) + len(self.offsets)
        base = pad - self.whole
        factors = [float(f) for f in factors]
        for start, stop in self.segments:
            segment, length = c[start:stop], stop - start
            padded = np.concatenate([np.repeat(segment[:1], pad, 0), segment, np.repeat(segment[-1:], pad, 0)])
            acc, term = out[start:stop], np.empty((length,) + c.shape[1:], dtype=c.dtype)
            np.multiply(padded[base + self.offsets[0]:base + self.offsets[0] + length], factors[0], out=acc)
            for factor, offset in zip(factors[1:], self.offsets[1:], strict=True):
                acc += np.multiply(padded[base + offset:base + offset + length], factor, out=term)
        return out

    def apply(self, values):
        """Shifted ``values`` (pixels along the first axis)."""
        return self._taps(self.weights, self._coefficients(values))

    def apply_with_derivative(self, values):
        """``apply(values)`` and ``d apply(values) / d shift``, with one solve."""
        c = self._coefficients(values)
        return self._taps(self.weights, c), self._taps(self.slopes, c)

    def derivative(self, values):
        """``d apply(values) / d shift``."""
        return self._taps(self.slopes, self._coefficients(values))

    def transpose(self, values):
        """``S^T values`` for a vector: what each model pixel contributes to, summed."""
        return _spline_solve(self._factor, self.spread(values), transpose=True)

    def spread(self, values):
        """``E^T values`` for a vector: :meth:`transpose` before its solve, so that ``M^T S^T values`` is
        ``(A^-1 M)^T spread(values)`` for a matrix ``M`` whose spline coefficients ``A^-1 M`` are known."""
        # the transpose of _taps' convolution per segment: a correlation, with what fell beyond an end (the clamped
        # taps) added to the end pixel
        out = np.empty(self.size)
        first, span = self.offsets[-1], len(self.offsets)
        pad = abs(self.whole) + span
        for start, stop in self.segments:
            length = stop - start
            padded = np.zeros(length + 2 * pad)
            begin = pad - self.whole + first
            padded[begin:begin + length + span - 1] = np.correlate(values[start:stop], self.weights, "full")
            out[start:stop] = padded[pad:pad + length]
            out[start] += padded[:pad].sum()
            out[stop - 1] += padded[pad + length:].sum()
        return out


class OutputLayer:
    """The network's output layer in float32, with the block sums behind the approximate Gauss-Newton matrix.

    Single precision halves the memory traffic of the matrix products that dominate a fit; its rounding (about
    1e-7 relative) is far below the noise of any spectrum. One instance serves all fits of a fitter; ``design`` is
    the fitter's continuum basis on the model pixels.
    """

    def __init__(self, emulator, design, n_blocks=_N_BLOCKS):
        self.emulator, self.design = emulator, design
        self.w2 = np.ascontiguousarray(emulator.weights[2], dtype=np.float32)
        self.b2 = np.asarray(emulator.biases[2], dtype=np.float64)
        n_pixels = self.w2.shape[0]
        self.block_starts = np.linspace(0, n_pixels, min(n_blocks, n_pixels) + 1).astype(int)[:-1]
        self.block_sizes = np.diff(np.append(self.block_starts, n_pixels))
        self._grams = self._cross = self._spline_layer = None
        self._design_columns = {}  # design[:, columns] per set of columns (design_columns)
        self._continuum_solves = {}  # a ContinuumSolve per set of columns (continuum_solve)
        self.bank = None  # set by a fitter that matches spectra to a model bank
        self.segments = None  # the chip segments of a shifted model (use_segments)

    def __getstate__(self):  # worker processes rebuild the block sums rather than receive them
        state = dict(self.__dict__)
        state["_grams"] = state["_cross"] = state["_regions"] = state["bank"] = None  # the bank: from its cache
        state["_design_columns"] = {}
        state["_continuum_solves"] = {}
        state["_spline_layer"] = None
        return state

    # -- lockstep execution ------------------------------------------------------------------------------------
    def run(self, steps, serve=None):
        """Drive several fit generators together (:func:`~astra_thepayne.core.lockstep.run_in_lockstep`) and
        return their return values, in order. ``serve(kind, arrays)``, when given, answers requests first
        (returning None for those it leaves to this layer): another engine's products.

        Each generator yields requests for products with the output layer, ``("flux", a)`` for ``W2 a + b2``,
        ``("transpose", u)`` for ``W2^T u`` and ``("times", m)`` for ``W2 m``, the same three prefixed ``spline``
        for the layer's spline coefficients per chip segment (:meth:`spline_layer`), ``("continuum", ...)`` for the
        continuum correction (:class:`ContinuumSolve`) and ``("bank", ...)`` for the model bank's scores, and
        receives the product. Whatever the generators ask for at the same moment is computed as
        one matrix-matrix product, so the output layer (8.7 MB of float32 in production) streams through memory
        once for all of them instead of once each, and the products run at matrix-matrix speed.
        """
        if serve is None:
            return run_in_lockstep(steps, self._products)

        def products(kind, arrays):
            answer = serve(kind, arrays)
            return self._products(kind, arrays) if answer is None else answer

        return run_in_lockstep(steps, products)

    def use_segments(self, segments):
        """Set the chip segments of the shifted models that this layer serves (one set per layer)."""
        segments = tuple((int(a), int(b)) for a, b in segments)
        if self.segments is None:
            self.segments = segments
        elif tuple((int(a), int(b)) for a, b in self.segments) != segments:
            raise ValueError("an output layer serves the shifted models of one set of chip segments")

    def spline_layer(self):
        """``(A^-1 W2, A^-1 b2)``: the B-spline coefficients (:class:`Shift`) of the layer's columns and bias per
        chip segment, so that a shifted flux, its Jacobian and their transposes need no spline solve at each
        evaluation, only the taps. Solved once in float64; the matrix is kept in float32 like ``W2``."""
        if self._spline_layer is None:
            if self.segments is None:
                raise ValueError("spline products need the chip segments: call use_segments first")
            w2 = Shift.coefficients(np.asarray(self.emulator.weights[2], dtype=np.float64), self.segments)
            b2 = Shift.coefficients(np.asarray(self.emulator.biases[2], dtype=np.float64), self.segments)
            self._spline_layer = (np.ascontiguousarray(w2, dtype=np.float32), b2)
        return self._spline_layer

    def _products(self, kind, arrays):
        # results are float32 (rows made contiguous where a caller reads them as vectors); float64 arithmetic
        # downstream promotes them, which is cheaper than converting whole products here
        w2, b2 = self.w2, self.b2
        if kind.startswith("spline "):
            (w2, b2), kind = self.spline_layer(), kind[len("spline "):]
        if kind == "flux":
            out = np.ascontiguousarray((w2 @ np.stack(arrays, axis=1).astype(np.float32)).T)
            return [row + b2 for row in out]  # float64 from the addition
        if kind == "transpose":
            out = np.ascontiguousarray((w2.T @ np.stack(arrays, axis=1).astype(np.float32)).T)
            return list(out)
        if kind == "continuum":
            return ContinuumSolve.serve(arrays)
        if kind == "bank":
            # a (2, P) request: w^2 y and w^2 of one spectrum, matched against every bank member at once
            stacked = np.stack(arrays)
            return list(self.bank.scores(stacked[:, 0], stacked[:, 1], self.segments))
        if kind == "times":
            # computed transposed, so that each caller's block is contiguous (a Fortran-ordered P x n matrix)
            out = np.vstack([a.T for a in arrays]).astype(np.float32) @ w2.T
            return [block.T for block in np.split(out, np.cumsum([a.shape[1] for a in arrays])[:-1], axis=0)]
        raise ValueError(f"unknown request {kind!r}")

    def run_one(self, step):
        """:meth:`run` for a single generator."""
        return self.run([step])[0]

    def _block_means(self, values):
        return (np.add.reduceat(values, self.block_starts) / self.block_sizes).astype(np.float32)

    def _blocks(self):
        w2 = self.emulator.weights[2]
        ends = np.append(self.block_starts[1:], len(w2))
        return [slice(a, b) for a, b in zip(self.block_starts, ends, strict=True)]

    def approximate_gram(self, weights):
        """``sum_b mean_b(weights) W2_b^T W2_b`` ~ ``W2^T diag(weights) W2`` ``(H, H)``, float32 like the products
        it feeds."""
        if self._grams is None:
            w2 = self.emulator.weights[2]
            self._grams = np.stack([(w2[b].T @ w2[b]).ravel() for b in self._blocks()]).astype(np.float32)
        return (self._block_means(weights) @ self._grams).reshape(self.w2.shape[1], -1)

    def design_regions(self):
        """The continuum basis as blocks: ``(rows, columns, basis, products)`` per chip region, where ``basis`` is
        ``design[rows, columns]`` (zero elsewhere) and ``products`` holds each pixel's outer product of it, so that
        ``weights[rows] @ products`` is the region's weighted normal matrix."""
        if getattr(self, "_regions", None) is None:
            self._regions = []
            for rows, columns in _column_groups(self.design):
                basis = self.design[rows, columns]
                products = (basis[:, :, None] * basis[:, None, :]).reshape(len(basis), -1)
                self._regions.append((rows, columns, basis, products))
        return self._regions

    def continuum_solve(self, columns):
        """The :class:`ContinuumSolve` of the design ``columns`` (kept per set of columns, like
        :meth:`design_columns`: the problems that share it are solved together)."""
        key = tuple(int(c) for c in columns)
        kept = self._continuum_solves
        if key not in kept:
            if len(kept) >= 16:
                kept.clear()
            kept[key] = ContinuumSolve(self.design_regions(), key)
        return kept[key]

    def design_columns(self, columns):
        """``design[:, columns]`` (read only), kept per set of columns: nearly every spectrum fits the same ones."""
        key = tuple(int(c) for c in columns)
        kept = self._design_columns
        if key not in kept:
            if len(kept) >= 16:
                kept.clear()
            block = np.ascontiguousarray(self.design[:, list(key)])
            block.flags.writeable = False
            kept[key] = block
        return kept[key]

    def approximate_cross(self, weights, columns):
        """``sum_b mean_b(weights) W2_b^T D_b`` ~ ``W2^T diag(weights) D`` ``(H, len(columns))``."""
        key = tuple(columns)
        if self._cross is None:
            self._cross = {}
        if key not in self._cross:
            w2 = self.emulator.weights[2]
            self._cross[key] = np.stack([(w2[b].T @ self.design[b][:, columns]).ravel()
                                         for b in self._blocks()]).astype(np.float32)
        return (self._block_means(weights) @ self._cross[key]).reshape(self.w2.shape[1], -1)


class ContinuumSolve:
    """The least-squares continuum correction of a set of design columns, for many spectra at once.

    With residuals ``r = w f c - w y`` and ``c = 1 + D g``, ``r`` is linear in ``g``; each chip region's basis is zero
    outside it, so the normal matrix ``(w f D)^T (w f D)`` is block diagonal and each region's coefficients are
    solved alone (a ``q x q`` system, ``q`` = 5 for degree 4). A region is fitted only if all its columns are among
    ``columns``. :meth:`serve` answers the ``("continuum", (solve, w f, w y))`` requests of a lockstep round: the
    products of all the spectra that share a solve are matrix products, and their systems one stacked solve per
    region, instead of a dozen small numpy calls per spectrum.
    """

    def __init__(self, design_regions, columns):
        position = {c: i for i, c in enumerate(columns)}
        self.n_design = len(columns)
        self.regions = [(rows, np.array([position[int(c)] for c in region_columns]), basis, products)
                        for rows, region_columns, basis, products in design_regions
                        if all(int(c) in position for c in region_columns)]

    @staticmethod
    def serve(requests):
        """``(g, c, (w f D)^T (w f D))`` for each request ``(solve, w f, w y)``, in order."""
        answers = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, (solve, _, _) in enumerate(requests):
            groups.setdefault(id(solve), []).append(i)
        for members in groups.values():
            solve = requests[members[0]][0]
            weighted = np.stack([requests[i][1] for i in members])
            weighted_y = np.stack([requests[i][2] for i in members])
            for i, answer in zip(members, solve._solve(weighted, weighted_y), strict=True):
                answers[i] = answer
        return answers

    def _solve(self, weighted, weighted_y):
        n, n_pixels = weighted.shape
        g = np.zeros((n, self.n_design))
        matrices = np.zeros((n, self.n_design, self.n_design))
        c = np.ones((n, n_pixels))
        for rows, positions, basis, products in self.regions:
            w_f = weighted[:, rows]
            q = len(positions)
            blocks = ((w_f * w_f) @ products).reshape(n, q, q)
            sides = (w_f * (weighted_y[:, rows] - w_f)) @ basis
            scale = np.trace(blocks, axis1=1, axis2=2) / q  # a relative ridge keeps an empty region solvable
            blocks[:, np.arange(q), np.arange(q)] += 1e-12 * np.where(scale != 0, scale, 1.0)[:, None]
            coefficients = np.linalg.solve(blocks, sides[..., None])[..., 0]
            g[:, positions] = coefficients
            matrices[:, positions[:, None], positions[None, :]] = blocks
            c[:, rows] = 1.0 + coefficients @ basis.T
        # c copied row by row: a view would keep the whole batch's array alive as long as one evaluation is kept
        return [(g_i, c_i.copy(), m_i) for g_i, c_i, m_i in zip(g, c, matrices, strict=True)]


def _column_groups(design):
    """``(rows, columns)`` of the design's blocks: columns grouped by the range of rows where they are non-zero (the
    columns of one chip region). The ranges must not overlap: the continuum solve treats the blocks separately."""
    groups = {}
    for column in range(design.shape[1]):
        rows = np.flatnonzero(design[:, column])
        key = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
        groups.setdefault(key, []).append(column)
    ranges = sorted(groups)
    if any(a[1] > b[0] for a, b in zip(ranges[:-1], ranges[1:], strict=True)):
        raise ValueError("continuum basis: the regions' rows overlap")
    return [(slice(*key), np.array(columns)) for key, columns in groups.items()]


@dataclass(slots=True)
class _Evaluation:
    """What :class:`PayneProblem` computed at one point ``x``; filled as the evaluation and the requests after it
    need."""

    x: np.ndarray
    a1: np.ndarray | None = None  #: last hidden layer
    slopes: tuple | None = None  #: the activation pattern (leaky-ReLU slopes of each hidden layer)
    shift: Shift | None = None  #: the Doppler shift operator (velocity fitted)
    flux: np.ndarray | None = None  #: network flux, shifted
    d_flux_d_v: np.ndarray | None = None  #: its derivative with respect to the scaled velocity
    g: np.ndarray | None = None  #: continuum coefficients at their best
    c: np.ndarray | None = None  #: continuum correction ``1 + D g`` (None without a design)
    continuum_matrix: np.ndarray | None = None  #: ``(w f D)^T (w f D)``, block diagonal by region
    r: np.ndarray | None = None  #: weighted residuals
    exact_matrix: np.ndarray | None = None  #: exact profiled ``J^T J``, once computed
    gradient: np.ndarray | None = None  #: ``J^T r``, once computed


class PayneProblem:
    """Chi2, gradient and Gauss-Newton matrix of the network against one spectrum (see the module docstring).

    The parameters are the scaled labels and, with ``v_scale``, the scaled velocity. The continuum coefficients
    ``g`` are not among them: they enter the residuals linearly, so at every evaluation they are solved for exactly
    (a 15-parameter linear least-squares problem) and chi2 is minimised over the labels with ``g`` always at its
    best (variable projection). By the envelope theorem the gradient is then the partial one; the Gauss-Newton
    matrix of the labels is the Schur complement over ``g`` of the full one, whose inverse is the label covariance
    marginalised over the continuum. The optimiser thus works in 25 dimensions instead of 40 and never wanders in
    the continuum's.

    Parameters
    ----------
    layer : OutputLayer
    y, weight : ndarray (P,)
        Continuum-normalised flux and ``sqrt(ivar)`` on the model pixels (weight 0 = pixel not used).
    segments : list of (start, stop)
        Chip segments of the model pixels (needed with ``v_scale``).
    v_scale : float, optional
        Fit the radial velocity as the parameter after the labels, in units of ``v_scale`` km/s.
    design_columns : ndarray of int, optional
        Fit a continuum correction ``1 + D g`` with these columns ``D`` of ``layer.design``.
    gram : ndarray, optional
        ``layer.approximate_gram(weight**2)``, when already made (the starts of one spectrum share it).
    """

    def __init__(self, layer, y, weight, segments=None, v_scale=None, design_columns=None, gram=None):
        self.layer, self.emulator = layer, layer.emulator
        self.y, self.weight = y, weight
        self.segments, self.v_scale = segments, v_scale
        self.design_columns = design_columns
        if v_scale:
            layer.use_segments(segments)  # the shifted model comes from the layer's spline coefficients
        self.design = None if design_columns is None else layer.design_columns(design_columns)
        self.n_labels = self.emulator.n_labels
        self.n_design = 0 if design_columns is None else len(design_columns)
        # with c = 1: an approximation in any case
        self._gram = layer.approximate_gram(weight**2) if gram is None else gram
        self._p = self._previous = None  # evaluated states: the current point and the one before
        self._pattern = self._hidden_jacobian = self._product = self._pattern_matrix = None
        self._hidden_cross = self._approximate_blocks = None
        self._continuum = layer.continuum_solve(design_columns) if self.n_design else None
        self._weighted_y = weight * y

    # -- parameters --------------------------------------------------------------------------------------------
    def velocity(self, theta):
        """km/s."""
        return float(theta[self.n_labels] * self.v_scale) if self.v_scale else 0.0

    # -- evaluation --------------------------------------------------------------------------------------------
    # These are generators: they yield requests for products with the output layer (see OutputLayer.run) and
    # return their value; call them with ``yield from`` inside another such generator, or through OutputLayer.run.
    def _evaluate(self, theta):
        """Make ``self._p`` the state at ``theta``. The state before is kept too: after a rejected trial step the
        solver returns to it, and it costs nothing to restore."""
        if self._p is not None and np.array_equal(theta, self._p.x):
            return
        if self._previous is not None and np.array_equal(theta, self._previous.x):
            self._p, self._previous = self._previous, self._p
            return
        p = _Evaluation(x=np.array(theta, copy=True))
        p.a1, p.slopes = self.emulator.hidden_forward(theta[:self.n_labels])
        if self.v_scale:
            v = theta[self.n_labels] * self.v_scale
            p.shift = Shift(self.segments, pixel_shift(v))
            p.flux, d_flux_d_shift = p.shift.apply_with_derivative_to_coefficients((yield ("spline flux", p.a1)))
            d_shift = self.v_scale / (np.log(10) * APSTAR_CDELT1 * (SPEED_OF_LIGHT_KMS + v))
            p.d_flux_d_v = d_flux_d_shift * d_shift
        else:
            p.flux = yield ("flux", p.a1)
        weighted = self.weight * p.flux
        if self.n_design:
            # r = w f + (w f D) g - w y is linear in g: its least-squares g, exactly (ContinuumSolve)
            p.g, p.c, p.continuum_matrix = yield ("continuum", (self._continuum, weighted, self._weighted_y))
            p.r = weighted * p.c - self._weighted_y
        else:
            p.c = None
            p.r = weighted - self._weighted_y
        self._p, self._previous = p, self._p

    def chi2(self, theta):
        yield from self._evaluate(theta)
        value = float(self._p.r @ self._p.r)
        return value if np.isfinite(value) else np.inf

    def residuals(self, theta):
        yield from self._evaluate(theta)
        return self._p.r.copy()

    def rectified_model(self, theta):
        """Network flux (shifted, without the continuum correction) on the model pixels."""
        yield from self._evaluate(theta)
        return self._p.flux.copy()

    def correction(self, theta):
        """Continuum correction ``1 + D g`` on the model pixels at its best for ``theta`` (1 without a design)."""
        yield from self._evaluate(theta)
        return self._p.c.copy() if self._p.c is not None else np.ones_like(self.y)

    def gradient(self, theta):
        """``J^T r`` with respect to the labels (and velocity); that of ``g`` is zero, ``g`` being at its best."""
        yield from self._evaluate(theta)
        p = self._p
        if p.gradient is None:  # kept: a fit finished from where a coarse one ended asks again at the same point
            p.gradient = self.emulator.hidden_vjp(p.slopes, (yield from self._transpose(self._label_weight() * p.r)))
            if self.v_scale:
                p.gradient = np.append(p.gradient, self._velocity_column() @ p.r)
        return p.gradient.copy()

    def jacobian(self, theta):
        """The exact Jacobian of the residuals ``(P, n)``: labels, velocity, then continuum coefficients."""
        yield from self._evaluate(theta)
        m = self._jacobian_of_hidden()
        if self._product is None:  # W2 m, or its spline coefficients with a shift: kept for the activation pattern
            self._product = yield ("spline times" if self.v_scale else "times", m)
        product = self._p.shift.apply_to_coefficients(self._product) if self.v_scale else self._product
        k, n_v = self.n_labels, int(bool(self.v_scale))
        jac = np.empty((len(product), k + n_v + self.n_design))  # float64, filled in place (no stacking copies)
        np.multiply(product, self._label_weight()[:, None], out=jac[:, :k])
        if self.v_scale:
            jac[:, k] = self._velocity_column()
        if self.n_design:
            # d r / d g = w f D at the current point
            np.multiply((self.weight * self._p.flux)[:, None], self.design, out=jac[:, k + n_v:])
        return jac

    def normal_matrix(self, theta, exact):
        """``J^T J`` of the labels (and velocity), with the continuum coefficients profiled out."""
        yield from self._evaluate(theta)
        p = self._p
        if exact:
            if p.exact_matrix is None:
                constant_weights = not self.v_scale and not self.n_design
                self._jacobian_of_hidden()  # forgets what belonged to another activation pattern
                if constant_weights and self._pattern_matrix is not None:
                    # same activation pattern, same weights: the same Jacobian
                    p.exact_matrix = self._pattern_matrix
                else:
                    jac = yield from self.jacobian(theta)
                    p.exact_matrix = self._profiled(jac.T @ jac)
                    self._pattern_matrix = p.exact_matrix if constant_weights else None
            return p.exact_matrix
        m = self._jacobian_of_hidden()
        if self._approximate_blocks is None:
            # the label blocks depend on the activation pattern alone (the block weights and the kept cross
            # products are fixed for the problem), so they are made once per pattern
            if self.n_design and self._hidden_cross is None:
                # what the label-continuum block takes from the model changes little over a fit, and only the
                # speed of convergence depends on it here: it is computed at the first point and kept
                weights = self.weight**2 * p.flux * p.c
                self._hidden_cross = self.layer.approximate_cross(weights, self.design_columns)
            # in float32 like the products: an approximation needs no more
            self._approximate_blocks = ((m.T @ (self._gram @ m)).astype(np.float64),
                                        (m.T @ self._hidden_cross).astype(np.float64) if self.n_design else None)
        labels_block, cross = self._approximate_blocks
        if not self.v_scale and not self.n_design:
            return labels_block
        k, n_v = self.n_labels, int(bool(self.v_scale))
        n = k + n_v + self.n_design
        matrix = np.empty((n, n))
        matrix[:k, :k] = labels_block
        if self.n_design:
            matrix[:k, k + n_v:], matrix[k + n_v:, :k] = cross, cross.T
            matrix[k + n_v:, k + n_v:] = p.continuum_matrix
        if self.v_scale:  # one column: exact, two matrix-vector products
            column = self._velocity_column()
            matrix[:k, k] = matrix[k, :k] = self.emulator.hidden_vjp(
                p.slopes, (yield from self._transpose(self._label_weight() * column)))
            matrix[k, k] = column @ column
            if self.n_design:
                # (w f D)^T column without forming w f D
                matrix[k, k + 1:] = matrix[k + 1:, k] = (column * self.weight * p.flux) @ self.design
        return self._profiled(matrix)

    def _transpose(self, u):
        """``(S W2)^T u`` (``W2^T u`` without a shift) in float64: with a shift, the layer's spline coefficients
        against the spread of ``u`` (:meth:`Shift.spread`), which needs no spline solve."""
        if self.v_scale:
            product = yield ("spline transpose", self._p.shift.spread(u))
        else:
            product = yield ("transpose", u)
        return product.astype(np.float64)

    def _profiled(self, matrix):
        """The Schur complement over the continuum coefficients (the last ``n_design`` rows and columns)."""
        if not self.n_design:
            return matrix
        k = len(matrix) - self.n_design
        a, b, c = matrix[:k, :k], matrix[:k, k:], matrix[k:, k:]
        ridge = 1e-12 * (np.mean(np.diag(c)) or 1.0)
        return a - b @ np.linalg.solve(c + ridge * np.eye(len(c)), b.T)

    def _label_weight(self):
        """``d r / d flux``: the factor between residuals and (shifted) network flux."""
        return self.weight * self._p.c if self._p.c is not None else self.weight

    def _velocity_column(self):
        """``d r / d v`` (scaled velocity), exact and cheap."""
        return self._label_weight() * self._p.d_flux_d_v

    def _jacobian_of_hidden(self):
        """``da/dx`` at the last evaluated point. The network is piecewise linear: it, and the expensive product
        ``W2 da/dx``, change only when the activation pattern does, so both are kept until it changes."""
        if self._pattern is None or not all(np.array_equal(a, b) for a, b in zip(self._pattern, self._p.slopes,
                                                                                 strict=True)):
            self._pattern = tuple(s.copy() for s in self._p.slopes)
            self._hidden_jacobian = self.emulator.hidden_jacobian(self._p.slopes, np.float32)
            self._product = self._pattern_matrix = self._approximate_blocks = None
        return self._hidden_jacobian
