"""The result of fitting one spectrum, and its flat row form (the same keys for successes and failures)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .labels import is_bad, is_flagged, label_pairs, rho_name
from .wavelength import APSTAR_NPIX

__all__ = ["FitResult", "row_keys"]


def row_keys(label_names) -> list[str]:
    """Column names of a result row for a network with these labels, in output order."""
    names = list(label_names)
    return (["v_rel", "e_v_rel"] + names + [f"e_{n}" for n in names] + [f"raw_e_{n}" for n in names]
            + [rho_name(a, b) for a, b in label_pairs(names)]
            + ["chi2", "reduced_chi2", "dof", "snr", "starflag", "vscatter", "result_flags", "at_bound_flags",
               "flag_warn", "flag_bad"])


@functools.lru_cache(maxsize=8)
def _rho_layout(names: tuple[str, ...]):
    """``(column names, row indices, column indices)`` of the label pairs' correlations in the matrix."""
    index = {n: i for i, n in enumerate(names)}
    pairs = label_pairs(names)
    return ([rho_name(a, b) for a, b in pairs], np.array([index[a] for a, _ in pairs], dtype=np.intp),
            np.array([index[b] for _, b in pairs], dtype=np.intp))


@dataclass
class FitResult:
    """Labels, uncertainties, statistics and model spectra for one spectrum.

    Attributes
    ----------
    label_names : tuple of str, length K
    labels : ndarray, shape (K,)
        Best-fit labels in physical units (NaN after a failure).
    raw_e : ndarray, shape (K,)
        Formal 1-sigma errors from the covariance.
    e : ndarray, shape (K,)
        Errors after the noise model (equal to ``raw_e`` until one is applied).
    covariance : ndarray, shape (K, K)
        Label covariance in physical units.
    v_rel, e_v_rel : float
        Fitted radial velocity (km/s, > 0 = redshifted relative to the model) and its error; NaN when not fitted.
    chi2 : float
        Sum of squared normalised residuals over the pixels used.
    dof : int
        Degrees of freedom: pixels used minus free parameters: the labels, v_rel when fitted, and the coefficients
        of the continuum correction fitted with them (``joint_continuum``, the default: ``continuum_degree + 1``
        per chip region with enough usable pixels, up to 15 at degree 4; profiled out of the optimiser, but fitted
        to the same pixels).
    reduced_chi2 : float
        ``chi2 / dof``.
    snr : float
    result_flags : int
        Bits of :data:`astra_thepayne.core.labels.RESULT_FLAGS`.
    at_bound_flags : int
        One bit per label that ended on its bound (:data:`astra_thepayne.core.labels.AT_BOUND_BITS`).
    starflag : int or None
        The file's STARFLAG for this spectrum (APOGEE_STARFLAG bits; None when the file has none).
    vscatter : float
        The file's VSCATTER (km/s, scatter of the star's visit velocities; NaN when the file has none).
    continuum, rectified_model_flux : ndarray, shape (8575,)
        On the apStar grid, NaN in chip gaps and for failures; model flux = continuum * rectified_model_flux.
    message : str
        Why the fit failed (empty on success).
    """

    label_names: tuple
    labels: np.ndarray
    raw_e: np.ndarray
    covariance: np.ndarray
    v_rel: float = float("nan")
    e_v_rel: float = float("nan")
    chi2: float = float("nan")
    dof: int = 0
    reduced_chi2: float = float("nan")
    snr: float = float("nan")
    result_flags: int = 0
    continuum: np.ndarray = field(default_factory=lambda: np.full(APSTAR_NPIX, np.nan))
    rectified_model_flux: np.ndarray = field(default_factory=lambda: np.full(APSTAR_NPIX, np.nan))
    e: np.ndarray | None = None
    message: str = ""
    n_iterations: int = 0
    seconds: float | None = None  # wall time of the fit (its share, when fitted in a batch)
    at_bound_flags: int = 0
    starflag: int | None = None
    vscatter: float = float("nan")

    def __post_init__(self):
        if self.e is None:
            self.e = np.array(self.raw_e, dtype=float, copy=True)

    @classmethod
    def failure(cls, label_names, message: str, snr=float("nan"), result_flags: int = 1) -> FitResult:
        """A result with NaN labels and the fitting-failure bit set (plus any other bits given)."""
        k = len(label_names)
        nan = np.full(k, np.nan)
        return cls(tuple(label_names), nan, nan.copy(), np.full((k, k), np.nan), snr=snr,
                   result_flags=int(result_flags) | 1, message=message)

    @property
    def errors(self) -> np.ndarray:
        """``e`` (the noise model's errors; ``raw_e`` until one is applied)."""
        return self.raw_e if self.e is None else self.e

    @property
    def flag_warn(self) -> bool:
        return bool(is_flagged(self.result_flags))

    @property
    def flag_bad(self) -> bool:
        return bool(is_bad(self.result_flags))

    @property
    def flag_names(self) -> tuple[str, ...]:
        """Names of the bits set in ``result_flags``."""
        from .labels import flag_names

        return flag_names(self.result_flags)

    @property
    def success(self) -> bool:
        return not self.flag_bad

    @property
    def model_flux(self) -> np.ndarray:
        return self.continuum * self.rectified_model_flux

    @property
    def rho(self) -> np.ndarray:
        """Correlation matrix ``C_ab / sqrt(C_aa C_bb)`` of the labels, shape (K, K)."""
        sigma = np.sqrt(np.diag(self.covariance))
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.covariance / np.outer(sigma, sigma)

    def as_row(self) -> dict:
        """Flat ``{column: value}`` with the keys of :func:`row_keys`, identical for successes and failures."""
        row: dict[str, Any] = {"v_rel": float(self.v_rel), "e_v_rel": float(self.e_v_rel)}
        names = list(self.label_names)
        row.update({n: float(v) for n, v in zip(names, self.labels, strict=True)})
        row.update({f"e_{n}": float(v) for n, v in zip(names, self.errors, strict=True)})
        row.update({f"raw_e_{n}": float(v) for n, v in zip(names, self.raw_e, strict=True)})
        # the 300 correlations in one gather: indexing the matrix pair by pair was most of the time of a row
        keys, rows, columns = _rho_layout(tuple(names))
        row.update(zip(keys, np.asarray(self.rho[rows, columns], dtype=float).tolist(), strict=True))
        row.update(chi2=float(self.chi2), reduced_chi2=float(self.reduced_chi2), dof=int(self.dof),
                   snr=float(self.snr), starflag=None if self.starflag is None else int(self.starflag),
                   vscatter=float(self.vscatter), result_flags=int(self.result_flags),
                   at_bound_flags=int(self.at_bound_flags), flag_warn=self.flag_warn, flag_bad=self.flag_bad)
        return row
