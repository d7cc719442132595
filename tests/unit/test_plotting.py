"""Fit plots (astra_thepayne.pipeline.plotting): wavelength increasing, unused pixels shaded not drawn, line cores
inside the axes, flags by name, residuals readable on a bad fit."""
from __future__ import annotations

import numpy as np
import pytest

from astra_thepayne.core.fitting import PayneFitter
from astra_thepayne.core.labels import RESULT_FLAGS
from astra_thepayne.core.synthetic import synthetic_spectrum
from astra_thepayne.core.wavelength import MODEL_SEGMENTS, apstar_wavelength
from astra_thepayne.pipeline.plotting import RESIDUAL_LINEAR_SIGMA, fit_figure, plot_fit

MASKED = slice(1000, 1040)  # inside the blue chip


@pytest.fixture(scope="module")
def fitted(toy_emulator):
    fitter = PayneFitter(toy_emulator)
    mid = (toy_emulator.x_min + toy_emulator.x_max) / 2
    spectrum = synthetic_spectrum(toy_emulator, mid, snr=150, rng=11, obj="2M-PLOT")
    spectrum.ivar[MASKED] = 0.0
    spectrum.flux[MASKED] = 0.0  # what a masked stretch of an apStar file often holds
    result = fitter.fit(spectrum)
    return fitter, spectrum, result


def _figure(fitted, rectified=None, flags=None):
    fitter, spectrum, result = fitted
    row = result.as_row()
    if flags is not None:
        row["result_flags"] = flags
    rectified = result.rectified_model_flux if rectified is None else rectified
    return fit_figure(spectrum, fitter.prepare(spectrum), result.continuum, rectified, row, notice="a notice")


def test_chips_run_blue_to_red_left_to_right(fitted):
    axes = _figure(fitted).axes
    limits = [axes[3 + i].get_xlim() for i in range(3)]  # the residual row, left to right
    assert all(a[0] < a[1] for a in limits)
    assert limits[0][1] < limits[1][0] < limits[1][1] < limits[2][0]


def test_masked_pixels_are_shaded_not_drawn(fitted):
    figure = _figure(fitted)
    top = figure.axes[0]
    wavelength = apstar_wavelength()
    data = top.lines[0]
    x, y = np.asarray(data.get_xdata()), np.asarray(data.get_ydata(), dtype=float)
    inside = (x >= wavelength[MASKED][0]) & (x <= wavelength[MASKED][-1])
    assert inside.sum() == 40 and np.isnan(y[inside]).all()  # no spike to zero
    spans = [patch.get_x() for patch in top.patches] + [patch.get_x() + patch.get_width() for patch in top.patches]
    assert min(spans) <= wavelength[MASKED][0] and any(
        p.get_x() <= wavelength[MASKED][0] and p.get_x() + p.get_width() >= wavelength[MASKED][-1]
        for p in top.patches)


def test_line_cores_are_inside_the_flux_axis(fitted):
    _fitter, _spectrum, result = fitted
    figure = _figure(fitted)
    low, high = figure.axes[0].get_ylim()
    chips = np.concatenate([result.rectified_model_flux[a:b] for a, b in MODEL_SEGMENTS])
    assert low < np.nanmin(chips) and high > 1.0


def _texts(figure):
    """The figure-level texts (the suptitle is one), through the public Figure.texts."""
    return [text.get_text() for text in figure.texts]


def test_title_names_the_flags(fitted):
    flags = RESULT_FLAGS[1].value | RESULT_FLAGS[4].value
    (title,) = _texts(_figure(fitted, flags=flags))
    assert f"{RESULT_FLAGS[1].name},{RESULT_FLAGS[4].name}" in title and f"flags={flags}" not in title
    assert "flags: none" in _texts(_figure(fitted, flags=0))[0]


def test_residuals_of_a_bad_fit_stay_on_the_axes(fitted):
    fitter, spectrum, result = fitted
    wrong = np.where(np.isfinite(result.rectified_model_flux), 1.0, np.nan)  # a featureless model: a bad fit
    residual_axis = _figure(fitted, rectified=wrong).axes[3]
    assert residual_axis.get_yscale() == "symlog"
    prepared = fitter.prepare(spectrum)
    with np.errstate(invalid="ignore", divide="ignore"):
        residual = (prepared.flux / result.continuum - 1) * np.sqrt(prepared.ivar) * result.continuum
    used = (prepared.norm_ivar > 0) & np.isfinite(residual)
    low, high = residual_axis.get_ylim()
    inside = (residual[used] >= low) & (residual[used] <= high)
    assert inside.mean() > 0.995 and high > 5 * RESIDUAL_LINEAR_SIGMA


def test_plot_fit_writes_a_png(fitted, tmp_path):
    fitter, spectrum, result = fitted
    path = tmp_path / "fit.png"
    plot_fit(spectrum, fitter.prepare(spectrum), result.continuum, result.rectified_model_flux, result.as_row(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
