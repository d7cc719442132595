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
"""
from __future__ import annotations

import hashlib
import math
import pickle
from pathlib import Path

import numpy as np

from ..errors import ConfigurationError
from ..files import atomic_write

__all__ = ["apply_correction", "calibrate_pair_errors", "pair_z_scores", "load_corrections", "save_corrections",
           "apply_corrections_to_database", "repeat_pairs", "calibrate_from_database", "FORMS"]

#: The forms of the correction: Astra's linear ``s raw_e + o`` and the quadrature ``sqrt((s raw_e)^2 + o^2)``.
FORMS = ("linear", "quadrature")


def _check_form(form):
    if form not in FORMS:
        raise ConfigurationError(f"noise model form {form!r}: use one of {', '.join(FORMS)}")
    return form


def apply_correction(raw_e, offset: float, scale: float, form: str = "linear"):
    """``scale * raw_e + offset`` (``"linear"``) or ``sqrt((scale * raw_e)**2 + offset**2)`` (``"quadrature"``)."""
    raw_e = np.asarray(raw_e, dtype=float)
    if _check_form(form) == "quadrature":
        return np.hypot(scale * raw_e, offset)
    return scale * raw_e + offset


def pair_z_scores(x1, e1, x2, e2):
    """``(x1 - x2) / sqrt(e1**2 + e2**2)`` for pairs of measurements of the same quantity, shape (N,)."""
    x1, e1, x2, e2 = (np.asarray(a, dtype=float) for a in (x1, e1, x2, e2))
    return (x1 - x2) / np.sqrt(e1**2 + e2**2)


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
    fitted = {"offset": float(abs(best.x[1]) * typical), "scale": float(math.exp(best.x[0]))}
    return fitted | ({"form": form} if form != "linear" else {})


def load_corrections(path):
    """Read ``(corrections, reference)`` with the array-only unpickler; check every entry has offset and scale.

    Returns
    -------
    corrections : dict
        ``label -> {"offset": float, "scale": float}``, plus ``"form": "quadrature"`` for quadrature entries
        (an entry without a form is linear, as in Astra's files).
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
    return checked, reference, hashlib.sha256(path.read_bytes()).hexdigest()


def save_corrections(path, corrections: dict, reference=None) -> Path:
    """Write ``(corrections, reference)`` in Astra's format, atomically (quadrature entries add ``"form"``)."""
    path = Path(path)

    def entry(value):
        form = _check_form(value.get("form", "linear"))
        return {"offset": float(value["offset"]), "scale": float(value["scale"])} | (
            {"form": form} if form != "linear" else {})

    payload = ({k: entry(v) for k, v in corrections.items()}, reference)
    return atomic_write(path, lambda handle: pickle.dump(payload, handle, protocol=4))


def apply_corrections_to_database(corrections: dict, sha256: str | None = None, where=None) -> dict:
    """Set ``e_x = scale * raw_e_x + offset`` (or, for quadrature entries, ``sqrt((scale raw_e_x)^2 + offset^2)``)
    in ``the_payne`` with one UPDATE per label, in one transaction.

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
        ``{"updated": {label: rows}, "skipped": [labels]}``.
    """
    from peewee import fn

    from ..db.models import ThePayne

    fields = ThePayne._meta.fields
    updated, skipped = {}, []
    with ThePayne._meta.database.atomic():
        for label, entry in corrections.items():
            if f"e_{label}" not in fields or f"raw_e_{label}" not in fields:
                skipped.append(label)
                continue
            e, raw = fields[f"e_{label}"], fields[f"raw_e_{label}"]
            scale, offset = float(entry["scale"]), float(entry["offset"])
            if _check_form(entry.get("form", "linear")) == "quadrature":
                values = {e: fn.SQRT(raw * raw * (scale * scale) + offset * offset)}
            else:
                values = {e: raw * scale + offset}
            if sha256:
                values[ThePayne.noise_model_sha256] = sha256
            query = ThePayne.update(values)
            if where is not None:
                query = query.where(where)
            updated[label] = query.execute()
    return {"updated": updated, "skipped": skipped}


def repeat_pairs(label: str, tag: str = "", model_sha256: str | None = None, errors: str = "raw_e"):
    """Disjoint pairs of visit results of the same source for one label: ``(x1, e1, x2, e2)``, each shape (N,).

    Visits of a source (apStar visit rows, apVisit, mwmVisit) with a successful fit are taken in spectrum order and
    paired (1st with 2nd, 3rd with 4th, ...), so that no result enters two pairs and the pairs are independent.
    Spectra of one source on the same MJD are one exposure (an apStar visit row and its apVisit file): only the
    first of them is used, so a pair never shares an exposure (visits without an MJD count as their own).
    Errors are the formal ones (``errors="raw_e"``), or those after the noise model (``errors="e"``).
    """
    from ..db.models import VISIT_TYPES, SpectrumRecord, ThePayne

    value, error = ThePayne._meta.fields[label], ThePayne._meta.fields[f"{errors}_{label}"]
    query = (ThePayne.select(ThePayne.source_pk, SpectrumRecord.mjd, value, error)
             .join(SpectrumRecord, on=(ThePayne.spectrum_pk == SpectrumRecord.pk))
             .where(SpectrumRecord.spectrum_type.in_(list(VISIT_TYPES)) & ~ThePayne.flag_bad
                    & (ThePayne.tag == tag) & ThePayne.source_pk.is_null(False)
                    & value.is_null(False) & error.is_null(False)))
    if model_sha256:
        query = query.where(ThePayne.model_sha256 == model_sha256)
    pairs, previous, exposures = [], None, set()
    for source_pk, mjd, x, e in query.order_by(ThePayne.source_pk, ThePayne.spectrum_pk).tuples():
        if mjd is not None:
            if (source_pk, mjd) in exposures:
                continue
            exposures.add((source_pk, mjd))
        if previous is not None and previous[0] == source_pk:
            pairs.append((previous[1], previous[2], x, e))
            previous = None
        else:
            previous = (source_pk, x, e)
    array = np.array(pairs, dtype=float).reshape(-1, 4)
    return array[:, 0], array[:, 1], array[:, 2], array[:, 3]


def calibrate_from_database(labels=None, tag: str = "", model_sha256: str | None = None, min_pairs: int = 3,
                            form: str = "linear"):
    """Calibrate ``(offset, scale)`` per label from the repeat visits in the database, in the given ``form``.

    Returns
    -------
    corrections : dict
        ``label -> {"offset", "scale"}`` for the labels with at least ``min_pairs`` pairs.
    reference : dict
        Provenance: pairs used per label, tag, network hash.
    """
    from ..core.labels import LABEL_NAMES

    corrections, n_pairs = {}, {}
    for label in labels or LABEL_NAMES:
        x1, e1, x2, e2 = repeat_pairs(label, tag, model_sha256)
        n_pairs[label] = len(x1)
        if len(x1) >= max(3, min_pairs):
            corrections[label] = calibrate_pair_errors(x1, e1, x2, e2, form)
    variance = ("(s e1 + o)^2 + (s e2 + o)^2" if form == "linear" else "(s e1)^2 + (s e2)^2 + 2 o^2")
    reference = {"method": f"repeat visit pairs (one per exposure), Gaussian likelihood of dx with variance {variance}",
                 "form": form, "n_pairs": n_pairs, "tag": tag, "model_sha256": model_sha256 or ""}
    return corrections, reference
