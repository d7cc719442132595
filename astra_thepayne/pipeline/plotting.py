"""Fit plots a spectroscopist wants to look at: data and model per chip, residuals, masked pixels shaded.

Choices, and why:

* chips left to right in increasing wavelength (blue, green, red), as spectra are read;
* pixels the fit did not use (masked, flagged, no data, chip edges) are a grey band, never a line: drawn, their
  flux (often 0) looks like a deep absorption line;
* the flux axis follows the data and the model of the used pixels, so line cores (down to ~0.2 in cool giants) are
  not cut off, while one cosmic ray does not squash the rest;
* residuals in units of the noise on a symmetric-log axis: linear within +-3 sigma, logarithmic beyond, so a good
  fit shows its noise and a bad one still shows where and how it fails instead of a wall at the axis limit;
* the title names the result flags (:func:`astra_thepayne.core.labels.describe_flags`), not their integer.
"""
from __future__ import annotations

import numpy as np

from ..core.labels import describe_flags
from ..core.wavelength import MODEL_SEGMENTS, apstar_wavelength

__all__ = ["plot_fit", "fit_figure"]

_SUMMARY_LABELS = ("teff", "logg", "fe_h", "v_rel")
_CHIP_NAMES = ("blue chip", "green chip", "red chip")
#: Residuals (sigma) inside which the residual axis is linear.
RESIDUAL_LINEAR_SIGMA = 3.0


def _title(spectrum, row, notice):
    parts = []
    for name in _SUMMARY_LABELS:
        value, error = row.get(name), row.get(f"e_{name}")
        if value is not None and error is not None and np.isfinite(value):
            digits = 0 if name == "teff" else 2
            parts.append(f"{name}={value:.{digits}f}±{error:.{digits}f}")
    chi2 = row.get("reduced_chi2")
    snr = row.get("snr")
    parts.append(f"χ²ᵣ={chi2:.2f}" if chi2 is not None and np.isfinite(chi2) else "fit failed")
    parts.append(f"S/N={snr:.0f}" if snr is not None and np.isfinite(snr) else "S/N=?")
    parts.append(f"flags: {describe_flags(row.get('result_flags'))}")
    first = f"{spectrum.obj}  {spectrum.label}"
    return "\n".join([first, "  ".join(parts)] + ([notice] if notice else []))


def _flux_limits(data, model):
    """(lower, upper) of the flux axis: every model line core and nearly all used data, but not outliers."""
    values = np.concatenate([data[np.isfinite(data)], model[np.isfinite(model)]])
    if values.size == 0:
        return 0.0, 1.2
    low = min(np.percentile(values, 0.05), np.nanmin(model) if np.isfinite(model).any() else 1.0)
    high = max(np.percentile(values, 99.8), 1.05)
    pad = 0.05 * (high - low)
    return max(low - pad, -0.2), min(high + pad, 2.0)


def _unused_spans(wavelength, unused):
    """(start, stop) wavelengths of each run of unused pixels, half a pixel wider on either side."""
    if not unused.any():
        return []
    edges = np.concatenate([[wavelength[0] - (wavelength[1] - wavelength[0]) / 2],
                            (wavelength[1:] + wavelength[:-1]) / 2,
                            [wavelength[-1] + (wavelength[-1] - wavelength[-2]) / 2]])
    change = np.diff(np.concatenate([[0], unused.astype(np.int8), [0]]))
    starts, stops = np.flatnonzero(change == 1), np.flatnonzero(change == -1)
    return [(edges[a], edges[b]) for a, b in zip(starts, stops, strict=True)]


_MEDIAN_WINDOW = 25


def _running_median(values, window=_MEDIAN_WINDOW):
    """Median of each ``window`` consecutive pixels, NaN pixels ignored (NaN where a window has none)."""
    padded = np.pad(values, window // 2, constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, window)
    out = np.full(len(values), np.nan)
    enough = np.isfinite(windows).sum(axis=1) >= window // 3
    out[enough] = np.nanmedian(windows[enough], axis=1)
    return out


def fit_figure(spectrum, prepared, continuum, rectified_model_flux, row, notice=""):
    """The matplotlib Figure of :func:`plot_fit` (for notebooks and reports); parameters as there."""
    from matplotlib.figure import Figure

    wavelength = apstar_wavelength()
    continuum = np.asarray(continuum, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        used = (prepared.norm_ivar > 0) & (continuum > 0)
        data = np.where(used, prepared.flux / continuum, np.nan)
        sigma = np.where(used, 1 / (np.sqrt(prepared.ivar) * continuum), np.nan)
        model = np.asarray(rectified_model_flux, dtype=float)
        residual = (data - model) / sigma
    chips = [slice(start, stop) for start, stop in MODEL_SEGMENTS]  # increasing wavelength
    low, high = _flux_limits(np.concatenate([data[c] for c in chips]), np.concatenate([model[c] for c in chips]))
    finite = np.abs(residual[np.isfinite(residual)])
    reach = max(5.0, float(np.percentile(finite, 99.9)) * 1.2) if finite.size else 5.0

    fig = Figure(figsize=(16, 5.5), constrained_layout=True)
    axes = fig.subplots(2, 3, sharex="col", sharey="row", gridspec_kw={"height_ratios": [3, 1.4]})
    for column, chip in enumerate(chips):
        top, bottom = axes[0, column], axes[1, column]
        w = wavelength[chip]
        for start, stop in _unused_spans(w, ~used[chip]):
            for ax in (top, bottom):
                ax.axvspan(start, stop, color="0.88", linewidth=0, zorder=0)
        top.plot(w, data[chip], color="k", lw=0.6, drawstyle="steps-mid", label="data / continuum")
        top.plot(w, np.where(np.isfinite(model[chip]), model[chip], np.nan), color="tab:red", lw=0.8,
                 label="model")
        top.set_title(_CHIP_NAMES[column], fontsize=9)
        bottom.axhspan(-1, 1, color="tab:blue", alpha=0.12, linewidth=0)
        # points, not a line: on a bad fit a line joining +-30 sigma neighbours is a solid wall; points show where
        # the residuals lie, and their running median shows a systematic misfit under any scatter
        bottom.plot(w, residual[chip], ",", color="k", alpha=0.6, rasterized=True)
        bottom.plot(w, _running_median(residual[chip]), color="tab:orange", lw=0.9,
                    label=f"running median ({_MEDIAN_WINDOW} px)" if column == 0 else None)
        bottom.axhline(0, color="tab:red", lw=0.8)
        bottom.set_xlim(w[0], w[-1])
        bottom.set_xlabel("vacuum wavelength [Å]")
    axes[0, 0].set_ylim(low, high)
    axes[1, 0].set_yscale("symlog", linthresh=RESIDUAL_LINEAR_SIGMA, linscale=1.0)
    axes[1, 0].set_ylim(-reach, reach)
    ticks = [tick for tick in (1, RESIDUAL_LINEAR_SIGMA, 10, 30, 100, 300, 1000, 3000) if tick <= reach]
    ticks = sorted({0.0, *ticks, *(-tick for tick in ticks)})
    axes[1, 0].set_yticks(ticks, [f"{tick:g}" for tick in ticks])
    axes[1, 0].minorticks_off()
    axes[0, 0].set_ylabel("normalised flux")
    axes[1, 0].set_ylabel("(data − model) / σ")
    from matplotlib.patches import Patch

    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles.append(Patch(color="0.88", label="not used in the fit"))
    axes[0, 0].legend(handles=handles, loc="lower left", fontsize=8, ncol=3)
    axes[1, 0].legend(loc="lower left", fontsize=7)
    fig.suptitle(_title(spectrum, row, notice), fontsize=10)
    return fig


def plot_fit(spectrum, prepared, continuum, rectified_model_flux, row, path, notice=""):
    """Write a PNG with one column per APOGEE chip (blue to red): normalised data and model on top, residuals in
    units of the noise below (symmetric-log beyond +-3 sigma), pixels that were not used shaded grey.

    Parameters
    ----------
    spectrum : Spectrum
    prepared : PreparedSpectrum
        From :meth:`PayneFitter.prepare`: the masked data; pixels it gives no weight are shaded.
    continuum : ndarray, shape (8575,)
        The fitted continuum the data are divided by.
    rectified_model_flux : ndarray, shape (8575,)
        The fitted model, continuum-normalised.
    row : dict
        Result values for the title (``FitResult.as_row()`` or a database row's fields).
    path : str or Path
    notice : str
        Extra line for the title (e.g. the demonstration-network notice).
    """
    fig = fit_figure(spectrum, prepared, continuum, rectified_model_flux, row, notice)
    fig.savefig(path, dpi=110)
