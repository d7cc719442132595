"""The noise model: from formal errors ``raw_e_x`` to errors that match the scatter of repeat observations.

Astra's corrections file (``$MWM_ASTRA/<version>/aux/ThePayne_corrections.pkl``) is a pickle of
``(corrections, reference)`` with ``corrections[label] = {"offset": o, "scale": s}``, and ``e_x = s * raw_e_x + o``.
:func:`calibrate_pair_errors` estimates ``(offset, scale)`` for one label from pairs of observations of the same
star: the difference of two independent measurements has variance ``e_1**2 + e_2**2`` when the errors are right,
so ``z = dx / sqrt(e_1**2 + e_2**2)`` has unit variance; we fit ``s`` and ``o`` by maximising the Gaussian
likelihood of ``dx`` with variance ``(s e_1 + o)**2 + (s e_2 + o)**2``.

Two forms (:data:`FORMS`): ``"linear"``, Astra's ``e = s raw_e + o``, and ``"quadrature"``,
``e = sqrt((s raw_e)**2 + o**2)``: an error floor ``o`` added in quadrature to scaled formal errors, as independent
error sources add. The linear form adds ``o`` in full to every error and overstates a combination of comparable
terms by up to sqrt(2). A quadrature entry carries ``"form": "quadrature"`` in the corrections file; linear entries
are written exactly as Astra writes them (Astra itself applies every entry linearly, so give it linear files only).

What repeat visits can calibrate: whatever differs from one visit to the next, i.e. noise the formal errors get
wrong (correlated pixels after resampling, under- or overestimated pixel errors, sky and persistence residuals) and
how the fit responds to it. What they cannot: anything the same in every visit of a star, such as network
(emulator) imperfections, line-list and model-atmosphere errors, or a continuum bias that repeats, which cancel in
a visit-to-visit difference; those need comparisons with stars of known labels (clusters, asteroseismology). Pairs
are therefore two different exposures: two spectra of one source on the same MJD (an apStar visit row and the
apVisit file it was made from) are one exposure, and only the first enters a pair.

Optionally the correction depends on S/N (:func:`calibrate_pair_errors_by_snr`): one ``(offset, scale)`` per S/N
bin, piecewise constant, each visit corrected with the bin of its own S/N both in the fit and when applied. Such an
entry keeps Astra's scalar ``offset`` and ``scale`` (the S/N-independent fit of the same pairs: all that Astra reads)
and adds ``snr_edges``, ``snr_offset`` and ``snr_scale``. Piecewise constant rather than interpolated between bin
centres: what is applied at any S/N is then exactly what was fitted there, from that bin's own visits, with no
extrapolation beyond the outer centres; the price is a step at each edge, which more bins make smaller.
"""
from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..files import atomic_write

__all__ = ["apply_correction", "calibrate_pair_errors", "calibrate_pair_errors_by_snr", "pair_z_scores",
           "pair_snr", "snr_bin_index", "check_snr_edges", "quantile_snr_edges", "snr_bin_names",
           "load_corrections", "save_corrections", "apply_corrections_to_database", "repeat_pairs",
           "calibrate_from_database", "NoiseModelFitError", "FORMS", "SNR_KEYS"]

#: The forms of the correction: Astra's linear ``s raw_e + o`` and the quadrature ``sqrt((s raw_e)^2 + o^2)``.
FORMS = ("linear", "quadrature")

#: The keys of an S/N-dependent entry, beside Astra's ``offset`` and ``scale`` (which then hold the
#: S/N-independent fit of the same pairs, the part Astra can read).
SNR_KEYS = ("snr_edges", "snr_offset", "snr_scale")


def _check_form(form):
    if form not in FORMS:
        raise ConfigurationError(f"noise model form {form!r}: use one of {', '.join(FORMS)}")
    return form


def _correct(raw_e, offset, scale, form):
    if form == "quadrature":
        return np.hypot(scale * raw_e, offset)
    return scale * raw_e + offset


def check_snr_edges(edges) -> list[float]:
    """The S/N bin edges as floats; a :class:`ConfigurationError` unless there is at least one, each finite and
    above 0, strictly increasing.

    ``K - 1`` edges make ``K`` bins with open outer ones, ``[0, edges[0])``, ``[edges[0], edges[1])``, ...,
    ``[edges[-1], inf)``: every positive S/N has a bin, and an S/N on an edge belongs to the bin above it.
    """
    if isinstance(edges, (str, bytes)) or not hasattr(edges, "__iter__"):
        raise ConfigurationError(f"S/N bin edges {edges!r}: expected a sequence of numbers")
    try:
        values = [float(v) for v in edges]
    except (TypeError, ValueError):
        raise ConfigurationError(f"S/N bin edges {list(edges)!r}: expected numbers") from None
    if not values:
        raise ConfigurationError("S/N bin edges: give at least one edge (two bins)")
    for value in values:
        if not (math.isfinite(value) and value > 0):
            raise ConfigurationError(f"S/N bin edges {values}: every edge must be a finite S/N above 0, not {value}")
    for low, high in zip(values, values[1:], strict=False):
        if not high > low:
            raise ConfigurationError(f"S/N bin edges {values}: must increase strictly ({low:g} is followed by "
                                     f"{high:g})")
    return values


def snr_bin_index(snr, edges):
    """The bin (0 .. ``len(edges)``) of each S/N; -1 where the S/N is not a finite number above 0."""
    snr = np.asarray(snr, dtype=float)
    index = np.searchsorted(np.asarray(edges, dtype=float), snr, side="right")
    return np.where(np.isfinite(snr) & (snr > 0), index, -1)


def snr_bin_names(edges) -> list[str]:
    """Readable names of the bins of ``edges``: ``["<30", "30-60", ">=60"]``."""
    inner = [f"{low:g}-{high:g}" for low, high in zip(edges, edges[1:], strict=False)]
    return [f"<{edges[0]:g}", *inner, f">={edges[-1]:g}"]


def quantile_snr_edges(snr, n_bins: int) -> list[float]:
    """Edges for ``n_bins`` bins holding about equal numbers of the given S/N values (rounded to 3 significant
    figures; edges that rounding or ties make equal are dropped, so fewer bins may come back, or none)."""
    if int(n_bins) != n_bins or n_bins < 2:
        raise ConfigurationError(f"S/N quantile bins: need a whole number of at least 2, not {n_bins!r}")
    snr = np.asarray(snr, dtype=float)
    snr = snr[np.isfinite(snr) & (snr > 0)]
    if snr.size == 0:
        return []
    quantiles = np.quantile(snr, np.arange(1, int(n_bins)) / int(n_bins))
    edges = sorted({float(f"{q:.3g}") for q in quantiles})
    # an edge at or below the lowest value would leave its lower bin empty
    return [edge for edge in edges if snr.min() < edge <= snr.max()]


def _snr_entry_values(entry, what="S/N-dependent entry"):
    """Checked ``(edges, offsets, scales)`` of an S/N-dependent entry (arrays of K-1, K, K)."""
    try:
        edges = check_snr_edges(entry.get("snr_edges"))
    except ConfigurationError as exc:
        raise ConfigurationError(f"{what}: {exc}") from None
    values = []
    for key in ("snr_offset", "snr_scale"):
        raw = entry.get(key)
        try:
            array = np.asarray(raw, dtype=float)
        except (TypeError, ValueError):
            array = None
        if array is None or array.shape != (len(edges) + 1,) or not np.isfinite(array).all():
            raise ConfigurationError(f"{what}: {key} must be {len(edges) + 1} finite numbers (one per bin of "
                                     f"{len(edges)} edge(s)), got {raw!r}")
        values.append(array)
    return np.asarray(edges), values[0], values[1]


def apply_correction(raw_e, offset: float, scale: float, form: str = "linear", snr=None, snr_edges=None,
                     snr_offset=None, snr_scale=None):
    """``scale * raw_e + offset`` (``"linear"``) or ``sqrt((scale * raw_e)**2 + offset**2)`` (``"quadrature"``).

    An S/N-dependent entry (``snr_edges`` with one ``snr_offset`` and ``snr_scale`` per bin, see
    :func:`calibrate_pair_errors_by_snr`) needs ``snr``, the S/N of each error: each error gets the offset and
    scale of its own bin (piecewise constant; ``offset`` and ``scale`` are not used), and NaN where its S/N is not a
    finite number above 0. ``apply_correction(raw_e, **entry, snr=snr)`` works for every entry.
    """
    raw_e = np.asarray(raw_e, dtype=float)
    _check_form(form)
    if snr_edges is None and snr_offset is None and snr_scale is None:
        return _correct(raw_e, offset, scale, form)
    if snr_edges is None:
        raise ConfigurationError("S/N-dependent correction without snr_edges")
    if snr is None:
        raise ConfigurationError("this correction depends on S/N (it has snr_edges): give the S/N of every error "
                                 "(snr=...)")
    edges, offsets, scales = _snr_entry_values({"snr_edges": snr_edges, "snr_offset": snr_offset,
                                                "snr_scale": snr_scale})
    raw_e, snr = np.broadcast_arrays(raw_e, np.asarray(snr, dtype=float))
    index = snr_bin_index(snr, edges)
    safe = np.maximum(index, 0)
    return np.where(index >= 0, _correct(raw_e, offsets[safe], scales[safe], form), np.nan)


def pair_z_scores(x1, e1, x2, e2):
    """``(x1 - x2) / sqrt(e1**2 + e2**2)`` for pairs of measurements of the same quantity, shape (N,)."""
    x1, e1, x2, e2 = (np.asarray(a, dtype=float) for a in (x1, e1, x2, e2))
    return (x1 - x2) / np.sqrt(e1**2 + e2**2)


def pair_snr(snr1, snr2):
    """The S/N by which a *pair* is binned in diagnostics (z-score widths per bin): the geometric mean of its two
    visits, the midpoint in log S/N, symmetric in the two. Calibration does not need it: there each visit is
    corrected with the bin of its own S/N. NaN where either S/N is not a finite number above 0."""
    snr1, snr2 = np.asarray(snr1, dtype=float), np.asarray(snr2, dtype=float)
    usable = np.isfinite(snr1) & np.isfinite(snr2) & (snr1 > 0) & (snr2 > 0)
    return np.where(usable, np.sqrt(np.where(usable, snr1 * snr2, 1.0)), np.nan)


def calibrate_pair_errors(x1, e1, x2, e2, form: str = "linear") -> dict:
    """Fit ``{"offset": o, "scale": s}`` so that the corrected errors (``s * e + o``, or in ``"quadrature"``
    ``sqrt((s e)**2 + o**2)``, plus ``"form": "quadrature"`` in the result) explain the differences of repeat
    pairs.

    Parameters
    ----------
    x1, e1, x2, e2 : array_like, shape (N,)
        Two measurements of the same star and their formal errors. Non-finite entries are ignored.

    Returns
    -------
    dict
        ``offset`` (same unit as the label, 0 to 100 times the typical pair error) and ``scale`` (1e-3 to 1e3).
    """
    from scipy.optimize import minimize

    _check_form(form)
    x1, e1, x2, e2 = (np.asarray(a, dtype=float) for a in (x1, e1, x2, e2))
    good = np.isfinite(x1) & np.isfinite(x2) & np.isfinite(e1) & np.isfinite(e2) & (e1 > 0) & (e2 > 0)
    if good.sum() < 3:
        raise ValueError(f"need at least 3 finite pairs to calibrate, got {int(good.sum())}")
    dx, e1, e2 = (x1 - x2)[good], e1[good], e2[good]
    typical = float(np.median(np.hypot(e1, e2)))

    def nll(params):
        log_scale, offset_scaled = params
        scale, offset = math.exp(log_scale), abs(offset_scaled) * typical
        var = apply_correction(e1, offset, scale, form) ** 2 + apply_correction(e2, offset, scale, form) ** 2
        return 0.5 * np.sum(dx**2 / var + np.log(var))

    z = dx / np.hypot(e1, e2)
    start = [math.log(max(1.4826 * float(np.median(np.abs(z - np.median(z)))), 1e-3)), 0.0]
    # bounded: labels without scatter (e.g. fixed in the fit) would otherwise drive the scale to 0 and underflow
    bounds = [(math.log(1e-3), math.log(1e3)), (0.0, 100.0)]
    start[0] = min(max(start[0], bounds[0][0]), bounds[0][1])
    best = minimize(nll, start, method="Nelder-Mead", bounds=bounds,
                    options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 4000})
    _check_converged(best, bounds, f"{dx.size} pairs")
    fitted = {"offset": float(abs(best.x[1]) * typical), "scale": float(math.exp(best.x[0]))}
    return fitted | ({"form": form} if form != "linear" else {})


class NoiseModelFitError(ConfigurationError):
    """The likelihood of a calibration did not reach its maximum: no correction is better than a wrong one."""


def _check_converged(best, bounds, what, gradient_tolerance=1e-6):
    """Raise :class:`NoiseModelFitError` unless the optimiser ``best`` (a SciPy ``OptimizeResult``) converged.

    L-BFGS-B may stop with an abnormal line search at the maximum itself, where rounding leaves no step that
    improves the likelihood; its projected gradient (components pushing against a bound dropped) then vanishes, and
    that counts as converged. A Nelder-Mead fit that is not a success ran out of iterations."""
    if best.success:
        return
    gradient = getattr(best, "jac", None)
    if gradient is not None and np.all(np.isfinite(gradient)):
        lower, upper = np.array(bounds, dtype=float).T
        x, gradient = np.asarray(best.x, dtype=float), np.asarray(gradient, dtype=float)
        pushed_out = ((x <= lower) & (gradient > 0)) | ((x >= upper) & (gradient < 0))
        if np.max(np.abs(np.where(pushed_out, 0.0, gradient))) <= gradient_tolerance * max(1.0, abs(best.fun)):
            return
    raise NoiseModelFitError(f"noise-model calibration on {what} did not converge ({best.message}); try fewer "
                             f"S/N bins or the other --form")


def _touching(b1, b2, n_bins):
    """Pairs with at least one visit in each bin: the pairs that carry information on its offset and scale."""
    same = b1 == b2
    return (np.bincount(b1, minlength=n_bins) + np.bincount(b2, minlength=n_bins)
            - np.bincount(b1[same], minlength=n_bins))


def _merge_sparse_bins(edges, snr1, snr2, min_pairs):
    """Drop edges until every bin has ``min_pairs`` pairs touching it: the emptiest bin joins its emptier
    neighbour. Returns the remaining edges and one message per merge."""
    edges, messages = list(edges), []
    while edges:
        b1, b2 = snr_bin_index(snr1, edges), snr_bin_index(snr2, edges)
        counts = _touching(b1, b2, len(edges) + 1)
        if counts.min() >= min_pairs:
            break
        k = int(np.argmin(counts))
        j = min((n for n in (k - 1, k + 1) if 0 <= n <= len(edges)), key=lambda n: counts[n])
        names = snr_bin_names(edges)
        messages.append(f"S/N {names[k]}: {counts[k]} pair(s), fewer than {min_pairs}; merged with {names[j]}")
        del edges[min(k, j)]
    return edges, messages


def calibrate_pair_errors_by_snr(x1, e1, snr1, x2, e2, snr2, snr_edges, form: str = "linear",
                                 min_pairs: int = 3):
    """Fit an ``(offset, scale)`` per S/N bin, for formal errors whose misestimate depends on S/N.

    Every visit is corrected with the offset and scale of the bin of its *own* S/N, in the same likelihood as
    :func:`calibrate_pair_errors` (``dx`` Gaussian with variance ``c(e1; snr1)**2 + c(e2; snr2)**2``), all bins
    fitted together. So a pair is never given one S/N: a pair of an S/N 40 and an S/N 150 visit informs both bins,
    and the model fitted is exactly the one :func:`apply_correction` and ``noise-model apply`` apply to a row (by
    its own S/N). Binning pairs by one pair S/N (the lower, or the geometric mean) would fit to a visit a
    correction other than the one it later gets.

    Parameters
    ----------
    x1, e1, snr1, x2, e2, snr2 : array_like, shape (N,)
        The two measurements of each pair, their formal errors and their S/N. Pairs with a non-finite value or
        error, or an S/N that is not a finite number above 0, are left out.
    snr_edges : sequence of float
        Bin edges (:func:`check_snr_edges`): K - 1 edges, K bins, the outer two open.
    min_pairs : int
        A bin touched by fewer pairs (pairs with a visit in it) is merged with its neighbour, the emptier one, until
        none is; bins with no pairs at all therefore always go.

    Returns
    -------
    entry : dict
        ``snr_edges``, ``snr_offset`` and ``snr_scale`` (one per bin), and ``offset`` and ``scale``: the
        S/N-independent fit of the same pairs, the part of the entry Astra reads. If every bin was merged into one,
        a plain entry (``offset`` and ``scale`` only). ``"form": "quadrature"`` as in :func:`calibrate_pair_errors`.
    info : dict
        ``n_pairs`` (per bin, pairs touching it), ``offset_err`` and ``scale_err`` (1 sigma per bin, from the
        Fisher information; NaN where it does not constrain the value), ``merged`` (one message per merged bin),
        ``n_without_snr`` (pairs left out for a missing or bad S/N).
    """
    from scipy.optimize import minimize

    _check_form(form)
    edges = check_snr_edges(snr_edges)
    x1, e1, snr1, x2, e2, snr2 = (np.asarray(a, dtype=float) for a in (x1, e1, snr1, x2, e2, snr2))
    good = np.isfinite(x1) & np.isfinite(x2) & np.isfinite(e1) & np.isfinite(e2) & (e1 > 0) & (e2 > 0)
    has_snr = (snr_bin_index(snr1, edges) >= 0) & (snr_bin_index(snr2, edges) >= 0)
    n_without_snr = int((good & ~has_snr).sum())
    good &= has_snr
    if good.sum() < max(3, min_pairs):
        raise ValueError(f"need at least {max(3, min_pairs)} finite pairs with a positive S/N to calibrate, got "
                         f"{int(good.sum())}")
    dx, e1, e2, snr1, snr2 = (x1 - x2)[good], e1[good], e2[good], snr1[good], snr2[good]
    edges, merged = _merge_sparse_bins(edges, snr1, snr2, max(3, min_pairs))
    plain = calibrate_pair_errors(dx, e1, np.zeros_like(dx), e2, form)
    info = {"n_pairs": [int(dx.size)], "offset_err": [math.nan], "scale_err": [math.nan], "merged": merged,
            "n_without_snr": n_without_snr}
    if not edges:
        return plain, info

    n_bins = len(edges) + 1
    b1, b2 = snr_bin_index(snr1, edges), snr_bin_index(snr2, edges)
    typical = float(np.median(np.hypot(e1, e2)))
    quadrature = form == "quadrature"

    def variance_terms(scale, offset):
        """Pair variance and its derivatives by the scale and offset of each visit's bin."""
        s1, o1, s2, o2 = scale[b1], offset[b1], scale[b2], offset[b2]
        if quadrature:
            var = (s1 * e1) ** 2 + o1**2 + (s2 * e2) ** 2 + o2**2
            return var, 2 * s1 * e1**2, 2 * o1, 2 * s2 * e2**2, 2 * o2
        c1, c2 = s1 * e1 + o1, s2 * e2 + o2
        return c1**2 + c2**2, 2 * c1 * e1, 2 * c1, 2 * c2 * e2, 2 * c2

    def nll(params):
        log_scale, offset_scaled = params[:n_bins], params[n_bins:]
        scale, offset = np.exp(log_scale), offset_scaled * typical
        var, ds1, do1, ds2, do2 = variance_terms(scale, offset)
        weight = 0.5 * (1 / var - dx**2 / var**2)  # d nll / d var
        grad_scale = (np.bincount(b1, weight * ds1, n_bins) + np.bincount(b2, weight * ds2, n_bins)) * scale
        grad_offset = (np.bincount(b1, weight * do1, n_bins) + np.bincount(b2, weight * do2, n_bins)) * typical
        return 0.5 * np.sum(dx**2 / var + np.log(var)), np.concatenate([grad_scale, grad_offset])

    bounds = [(math.log(1e-3), math.log(1e3))] * n_bins + [(0.0, 100.0)] * n_bins
    # start at the S/N-independent fit; an offset of exactly 0 is a stationary point of the quadrature form, so
    # start offsets a little above it
    start = np.concatenate([np.full(n_bins, math.log(plain["scale"])),
                            np.full(n_bins, max(plain["offset"] / typical, 0.05))])
    best = minimize(nll, start, jac=True, method="L-BFGS-B", bounds=bounds,
                    options={"maxiter": 10000, "ftol": 1e-13, "gtol": 1e-9})
    _check_converged(best, bounds, f"{dx.size} pairs in {n_bins} S/N bins")
    scale, offset = np.exp(best.x[:n_bins]), best.x[n_bins:] * typical

    # Fisher information of a Gaussian in its variance: 0.5 sum (dv/da)(dv/db) / v^2, in (scale, offset) per bin
    var, ds1, do1, ds2, do2 = variance_terms(scale, offset)
    jacobian = np.zeros((dx.size, 2 * n_bins))
    rows = np.arange(dx.size)
    jacobian[rows, b1] += ds1
    jacobian[rows, b2] += ds2
    jacobian[rows, n_bins + b1] += do1
    jacobian[rows, n_bins + b2] += do2
    fisher = 0.5 * (jacobian / var[:, None]).T @ (jacobian / var[:, None])
    errors = np.full(2 * n_bins, math.nan)
    live = np.diag(fisher) > 1e-12 * np.abs(np.diag(fisher)).max()  # a quadrature offset at 0 has no information
    norm = np.sqrt(np.diag(fisher)[live])
    try:
        # a true inverse (not a pseudo-inverse, which would drop a degenerate direction and report it as known):
        # scale and offset that only act together, as for constant formal errors, come back with huge errors
        covariance = np.linalg.inv(fisher[np.ix_(live, live)] / np.outer(norm, norm)) / np.outer(norm, norm)
        variances = np.diag(covariance)
        errors[live] = np.where(variances > 0, np.sqrt(np.abs(variances)), math.nan)
    except np.linalg.LinAlgError:
        pass
    entry = plain | {"snr_edges": [float(v) for v in edges], "snr_offset": [float(v) for v in offset],
                     "snr_scale": [float(v) for v in scale]}
    info |= {"n_pairs": [int(n) for n in _touching(b1, b2, n_bins)],
             "offset_err": [float(v) for v in errors[n_bins:]], "scale_err": [float(v) for v in errors[:n_bins]]}
    return entry, info


def load_corrections(path):
    """Read ``(corrections, reference)`` with the array-only unpickler; check every entry has offset and scale.

    Returns
    -------
    corrections : dict
        ``label -> {"offset": float, "scale": float}``, plus ``"form": "quadrature"`` for quadrature entries
        (an entry without a form is linear, as in Astra's files), and ``snr_edges``, ``snr_offset`` and
        ``snr_scale`` (lists) for S/N-dependent entries, checked as :func:`check_snr_edges` does.
    reference : object
        Whatever the file holds as its reference (kept for provenance).
    sha256 : str
    """
    from ..core.emulator import ModelFileError, load_pickle_arrays

    path = Path(path)
    try:
        content = load_pickle_arrays(path)
    except ModelFileError as exc:
        raise ConfigurationError(str(exc).replace("model file", "corrections file", 1)) from None
    if not (isinstance(content, (tuple, list)) and len(content) == 2 and isinstance(content[0], dict)):
        raise ConfigurationError(f"corrections file {path}: expected a pickled (corrections, reference) tuple")
    corrections, reference = content
    checked = {}
    for label, entry in corrections.items():
        try:
            checked[str(label)] = {"offset": float(entry["offset"]), "scale": float(entry["scale"])}
            form = str(entry.get("form", "linear"))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ConfigurationError(f"corrections file {path}: entry {label!r} lacks a numeric offset and scale") \
                from None
        if form not in FORMS:
            raise ConfigurationError(f"corrections file {path}: entry {label!r} has form {form!r}; expected one of "
                                     f"{', '.join(FORMS)}")
        if form != "linear":
            checked[str(label)]["form"] = form
        if any(key in entry for key in SNR_KEYS):
            missing = [key for key in SNR_KEYS if key not in entry]
            if missing:
                raise ConfigurationError(f"corrections file {path}: entry {label!r} is S/N-dependent but lacks "
                                         f"{', '.join(missing)}")
            edges, offsets, scales = _snr_entry_values(entry, f"corrections file {path}: entry {label!r}")
            checked[str(label)] |= {"snr_edges": edges.tolist(), "snr_offset": offsets.tolist(),
                                    "snr_scale": scales.tolist()}
    return checked, reference, hashlib.sha256(path.read_bytes()).hexdigest()


def save_corrections(path, corrections: dict, reference=None) -> Path:
    """Write ``(corrections, reference)`` in Astra's format, atomically (quadrature entries add ``"form"``,
    S/N-dependent ones ``snr_edges``, ``snr_offset`` and ``snr_scale``: keys Astra does not read)."""
    path = Path(path)

    def entry(value):
        form = _check_form(value.get("form", "linear"))
        written = {"offset": float(value["offset"]), "scale": float(value["scale"])} | (
            {"form": form} if form != "linear" else {})
        if any(value.get(key) is not None for key in SNR_KEYS):
            edges, offsets, scales = _snr_entry_values(value)
            written |= {"snr_edges": edges.tolist(), "snr_offset": offsets.tolist(), "snr_scale": scales.tolist()}
        return written

    payload = ({k: entry(v) for k, v in corrections.items()}, reference)
    return atomic_write(path, lambda handle: pickle.dump(payload, handle, protocol=4))


#: Above every S/N; in PostgreSQL NaN and Infinity compare above every number, so ``snr < _SNR_CEILING`` also
#: keeps them out.
_SNR_CEILING = 1e300


def _usable_snr(field):
    return field.is_null(False) & (field > 0) & (field < _SNR_CEILING)


def apply_corrections_to_database(corrections: dict, sha256: str | None = None, where=None) -> dict:
    """Set ``e_x = scale * raw_e_x + offset`` (or, for quadrature entries, ``sqrt((scale raw_e_x)^2 + offset^2)``)
    in ``the_payne`` with one UPDATE per label, in one transaction.

    S/N-dependent entries give each row the offset and scale of the bin of its own ``snr`` (a ``CASE`` over the
    bins); rows whose ``snr`` is NULL, NaN, infinite or not above 0 cannot be placed in a bin and are left as they
    are (``e_x`` and ``noise_model_sha256`` unchanged), and counted.

    Parameters
    ----------
    corrections : dict
        ``label -> {"offset", "scale"}``; labels without ``e_``/``raw_e_`` columns are skipped (and returned).
    sha256 : str, optional
        Recorded in ``noise_model_sha256`` of the updated rows.
    where : peewee expression, optional
        Restrict the rows (e.g. ``ThePayne.tag == "x"``).

    Returns
    -------
    dict
        ``{"updated": {label: rows}, "skipped": [labels], "without_snr": rows}`` (``without_snr``: rows with a
        formal error that an S/N-dependent entry could not correct, the most over its labels; 0 when no entry
        depends on S/N).
    """
    from peewee import Case, fn

    from ..db.models import ThePayne

    fields = ThePayne._meta.fields
    updated, skipped, without_snr = {}, [], 0

    def corrected(raw, scale, offset, form):
        if form == "quadrature":
            return fn.SQRT(raw * raw * (scale * scale) + offset * offset)
        return raw * scale + offset

    with ThePayne._meta.database.atomic():
        for label, entry in corrections.items():
            if f"e_{label}" not in fields or f"raw_e_{label}" not in fields:
                skipped.append(label)
                continue
            e, raw = fields[f"e_{label}"], fields[f"raw_e_{label}"]
            form = _check_form(entry.get("form", "linear"))
            condition = where
            if entry.get("snr_edges") is not None:
                edges, offsets, scales = _snr_entry_values(entry, f"entry {label!r}")
                # an S/N on an edge belongs to the bin above it, as in snr_bin_index
                cases = [(ThePayne.snr < float(edge), corrected(raw, float(sc), float(of), form))
                         for edge, of, sc in zip(edges, offsets[:-1], scales[:-1], strict=True)]
                value = Case(None, cases, corrected(raw, float(scales[-1]), float(offsets[-1]), form))
                usable = _usable_snr(ThePayne.snr)
                unplaced = ~usable & raw.is_null(False)  # rows without an error to correct do not count
                unplaced = ThePayne.select().where(unplaced if where is None else (where & unplaced)).count()
                without_snr = max(without_snr, unplaced)
                condition = usable if where is None else (where & usable)
            else:
                value = corrected(raw, float(entry["scale"]), float(entry["offset"]), form)
            values: dict[Any, Any] = {e: value}  # the column's new value and the model's hash (a text column)
            if sha256:
                values[ThePayne.noise_model_sha256] = sha256
            query = ThePayne.update(values)
            if condition is not None:
                query = query.where(condition)
            updated[label] = query.execute()
    return {"updated": updated, "skipped": skipped, "without_snr": without_snr}


def repeat_pairs(label: str, tag: str = "", model_sha256: str | None = None, errors: str = "raw_e",
                 with_snr: bool = False):
    """Disjoint pairs of visit results of the same source for one label: ``(x1, e1, x2, e2)``, each shape (N,).

    Visits of a source (apStar visit rows, apVisit, mwmVisit) with a successful fit are taken in spectrum order and
    paired (1st with 2nd, 3rd with 4th, ...), so that no result enters two pairs and the pairs are independent.
    Spectra of one source on the same MJD are one exposure (an apStar visit row and its apVisit file): only the
    first of them is used, so a pair never shares an exposure (visits without an MJD count as their own).
    Errors are the formal ones (``errors="raw_e"``), or those after the noise model (``errors="e"``).
    ``with_snr=True`` adds the S/N of both results (``the_payne.snr``; NaN where NULL) as ``(..., snr1, snr2)``;
    the pairs are the same.
    """
    from ..db.models import VISIT_TYPES, SpectrumRecord, ThePayne

    value, error = ThePayne._meta.fields[label], ThePayne._meta.fields[f"{errors}_{label}"]
    query = (ThePayne.select(ThePayne.source_pk, SpectrumRecord.mjd, value, error, ThePayne.snr)
             .join(SpectrumRecord, on=(ThePayne.spectrum_pk == SpectrumRecord.pk))
             .where(SpectrumRecord.spectrum_type.in_(list(VISIT_TYPES)) & ~ThePayne.flag_bad
                    & (ThePayne.tag == tag) & ThePayne.source_pk.is_null(False)
                    & value.is_null(False) & error.is_null(False)))
    if model_sha256:
        query = query.where(ThePayne.model_sha256 == model_sha256)
    pairs, previous, exposures = [], None, set()
    for source_pk, mjd, x, e, snr in query.order_by(ThePayne.source_pk, ThePayne.spectrum_pk).tuples():
        if mjd is not None:
            if (source_pk, mjd) in exposures:
                continue
            exposures.add((source_pk, mjd))
        snr = math.nan if snr is None else snr
        if previous is not None and previous[0] == source_pk:
            pairs.append((previous[1], previous[2], x, e, previous[3], snr))
            previous = None
        else:
            previous = (source_pk, x, e, snr)
    array = np.array(pairs, dtype=float).reshape(-1, 6)
    columns = (0, 1, 2, 3, 4, 5) if with_snr else (0, 1, 2, 3)
    return tuple(array[:, k] for k in columns)


def _for_label(label, calibrate, *args):
    """``calibrate(*args)`` with the label named in a :class:`NoiseModelFitError`."""
    try:
        return calibrate(*args)
    except NoiseModelFitError as exc:
        raise NoiseModelFitError(f"{label}: {exc}") from None


def calibrate_from_database(labels=None, tag: str = "", model_sha256: str | None = None, min_pairs: int = 3,
                            form: str = "linear", snr_edges=None, snr_bins: int | None = None):
    """Calibrate ``(offset, scale)`` per label from the repeat visits in the database, in the given ``form``.

    With ``snr_edges`` (bin edges, :func:`check_snr_edges`) or ``snr_bins`` (that many bins of about equal numbers
    of paired visits, per label, :func:`quantile_snr_edges`), the calibration depends on S/N
    (:func:`calibrate_pair_errors_by_snr`): bins with fewer than ``min_pairs`` pairs are merged with a neighbour.

    Returns
    -------
    corrections : dict
        ``label -> {"offset", "scale"}`` for the labels with at least ``min_pairs`` pairs (S/N-dependent entries
        add ``snr_edges``, ``snr_offset`` and ``snr_scale``).
    reference : dict
        Provenance: pairs used per label, tag, network hash; with S/N bins also ``snr``: per label the bins,
        pairs per bin, 1-sigma errors, merges and pairs left out without an S/N.
    """
    from ..core.labels import LABEL_NAMES

    if snr_edges is not None and snr_bins is not None:
        raise ConfigurationError("give S/N bin edges or a number of S/N bins, not both")
    if snr_edges is not None:
        snr_edges = check_snr_edges(snr_edges)
    if snr_bins is not None:
        quantile_snr_edges([], snr_bins)  # checks the number before any query
    by_snr = snr_edges is not None or snr_bins is not None
    corrections, n_pairs, snr_info = {}, {}, {}
    for label in labels or LABEL_NAMES:
        if not by_snr:
            x1, e1, x2, e2 = repeat_pairs(label, tag, model_sha256)
            n_pairs[label] = len(x1)
            if len(x1) >= max(3, min_pairs):
                corrections[label] = _for_label(label, calibrate_pair_errors, x1, e1, x2, e2, form)
            continue
        x1, e1, x2, e2, snr1, snr2 = repeat_pairs(label, tag, model_sha256, with_snr=True)
        usable = np.isfinite(pair_snr(snr1, snr2))
        n_pairs[label] = int(usable.sum())
        if usable.sum() < max(3, min_pairs):
            continue
        edges = snr_edges
        if edges is None:
            assert snr_bins is not None  # by_snr: edges or a number of bins
            edges = quantile_snr_edges(np.concatenate([snr1[usable], snr2[usable]]), snr_bins)
        if edges:
            entry, info = _for_label(label, calibrate_pair_errors_by_snr, x1, e1, snr1, x2, e2, snr2, edges, form,
                                     min_pairs)
        else:  # every paired visit has the same S/N: nothing to bin
            entry = _for_label(label, calibrate_pair_errors, x1[usable], e1[usable], x2[usable], e2[usable], form)
            info = {"n_pairs": [n_pairs[label]], "offset_err": [math.nan], "scale_err": [math.nan],
                    "merged": ["S/N: all paired visits have the same S/N; one bin"], "n_without_snr": 0}
        info["n_without_snr"] = int((~usable).sum())
        info["bins"] = snr_bin_names(entry["snr_edges"]) if "snr_edges" in entry else ["all"]
        corrections[label], snr_info[label] = entry, info
    variance = ("(s e1 + o)^2 + (s e2 + o)^2" if form == "linear" else "(s e1)^2 + (s e2)^2 + 2 o^2")
    reference: dict[str, Any] = {
        "method": f"repeat visit pairs (one per exposure), Gaussian likelihood of dx with variance {variance}",
        "form": form, "n_pairs": n_pairs, "tag": tag, "model_sha256": model_sha256 or ""}
    if by_snr:
        reference["method"] += ("; (s, o) per S/N bin, each visit with the bin of its own S/N (the_payne.snr), "
                                "piecewise constant in S/N")
        reference["snr"] = snr_info
        reference["snr_request"] = {"edges": snr_edges} if snr_edges is not None else {"quantile_bins": snr_bins}
    return corrections, reference
