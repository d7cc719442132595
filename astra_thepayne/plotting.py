"""Fit plots a spectroscopist wants to look at: data and model per chip, residuals, masked pixels shaded."""
from __future__ import annotations

import numpy as np

from .grid import MODEL_SEGMENTS, apstar_wavelength

__all__ = ["plot_fit"]

_SUMMARY_LABELS = ("teff", "logg", "fe_h", "v_rel")


def _title(spectrum, row, notice):
    parts = []
    for name in _SUMMARY_LABELS:
        value, error = row.get(name), row.get(f"e_{name}")
        if value is not None and error is not None and np.isfinite(value):
            parts.append(f"{name}={value:.{0 if name == 'teff' else 2}f}±{error:.{0 if name == 'teff' else 2}f}")
    chi2 = row.get("reduced_chi2")
    snr = row.get("snr")
    parts.append(f"χ²ᵣ={chi2:.2f}" if chi2 is not None and np.isfinite(chi2) else "fit failed")
    parts.append(f"S/N={snr:.0f}" if snr is not None and np.isfinite(snr) else "S/N=?")
    parts.append(f"flags={row['result_flags']}")
    first = f"{spectrum.obj}  {spectrum.label}"
    return "\n".join([first, "  ".join(parts)] + ([notice] if notice else []))


def plot_fit(spectrum, prepared, continuum, rectified_model_flux, row, path, notice=""):
    """Write a PNG with one column per APOGEE chip: normalised data and model on top, residuals in units of the
    noise below, pixels that were not used (masked, flagged, no data) shaded grey.

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wavelength = apstar_wavelength()
    continuum = np.asarray(continuum, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        used = (prepared.norm_ivar > 0) & (continuum > 0)
        raw = np.where(continuum > 0, prepared.flux / continuum, np.nan)
        data = np.where(used, raw, np.nan)
        sigma = np.where(used, 1 / (np.sqrt(prepared.ivar) * continuum), np.nan)
    model = np.asarray(rectified_model_flux, dtype=float)
    fig, axes = plt.subplots(2, 3, figsize=(16, 5.5), sharex="col", gridspec_kw={"height_ratios": [3, 1]},
                             constrained_layout=True)
    for column, (start, stop) in enumerate(reversed(MODEL_SEGMENTS)):  # red chip first, as APOGEE numbers them
        chip = slice(start, stop)
        top, bottom = axes[0, column], axes[1, column]
        w = wavelength[chip]
        unused = ~used[chip]
        for ax in (top, bottom):
            ax.fill_between(w, 0, 1, where=unused, transform=ax.get_xaxis_transform(), color="0.85", step="mid",
                            linewidth=0, label="not used" if ax is top else None)
        top.plot(w, raw[chip], color="0.6", lw=0.5, drawstyle="steps-mid")
        top.plot(w, data[chip], color="k", lw=0.6, drawstyle="steps-mid", label="data / continuum")
        top.plot(w, model[chip], color="tab:red", lw=0.8, label="model")
        top.set_ylim(0.4, 1.25)
        residual = (data[chip] - model[chip]) / sigma[chip]
        bottom.plot(w, residual, color="k", lw=0.5, drawstyle="steps-mid")
        bottom.axhline(0, color="tab:red", lw=0.8)
        bottom.set_ylim(-5, 5)
        bottom.set_xlabel("vacuum wavelength [Å]")
    axes[0, 0].set_ylabel("normalised flux")
    axes[1, 0].set_ylabel("residual [σ]")
    axes[0, 0].legend(loc="lower left", fontsize=8, ncol=3)
    fig.suptitle(_title(spectrum, row, notice), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
