"""Tests of the bundled demonstration network, the toy line model it was trained on, and its regeneration script."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from astra_thepayne.core import demo_network as demo_model
from astra_thepayne.core.emulator import PayneEmulator
from astra_thepayne.core.labels import LABEL_NAMES, LABELS
from astra_thepayne.core.wavelength import model_wavelength
from astra_thepayne.training.toy_lines import ToyLineModel

LOWER = np.array([label.lower for label in LABELS])
UPPER = np.array([label.upper for label in LABELS])


@pytest.fixture(scope="module")
def demo():
    return PayneEmulator.load("demo")


@pytest.fixture(scope="module")
def toy():
    return ToyLineModel()


def test_bundled_file_is_small_and_complete(demo):
    path = demo_model.demo_model_path()
    assert path.stat().st_size < 5e6
    assert demo.path == str(path)
    assert demo.label_names == LABEL_NAMES
    # computed floats: the bundled file was written on another CPU, whose pow/log10 may differ by one ulp
    np.testing.assert_allclose(demo.wavelength, model_wavelength(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(demo.x_min, LOWER, rtol=1e-12, atol=0)
    np.testing.assert_allclose(demo.x_max, UPPER, rtol=1e-12, atol=0)
    assert demo.weights[0].shape == (demo_model.DEMO_HIDDEN, 25)
    assert demo.weights[2].shape == (7214, demo_model.DEMO_HIDDEN)


def test_bundled_file_says_it_is_a_demonstration(demo):
    assert demo.is_demo
    assert demo.meta["demonstration"] is True
    assert demo.meta["description"] == demo_model.DEMO_NOTICE
    assert "not for science" in demo_model.DEMO_NOTICE
    assert "demonstration" in repr(demo)
    training = demo.meta["training"]
    assert training["hidden"] == demo_model.DEMO_HIDDEN
    assert training["seed"] == demo_model.DEMO_SEED
    assert training["n_train"] + training["n_valid"] == demo_model.DEMO_N_SPECTRA
    assert demo.meta["toy_model"]["grid_seed"] == demo_model.DEMO_GRID_SEED
    assert demo.meta["backend"] == "numpy"
    assert len(demo.meta["grid_sha256"]) == 64
    assert demo.meta["package_version"]


def test_demo_network_emulates_the_toy_model(demo, toy):
    # Fresh labels (not the training grid): the bundled network's validation median |flux error| is 7.3e-4
    # (p50 in meta); on 20 new spectra allow 1.5e-3, and at most twice the recorded validation median.
    rng = np.random.default_rng(7)
    labels = LOWER + rng.uniform(0.1, 0.9, (20, 25)) * (UPPER - LOWER)
    err = np.abs(demo.predict(demo.scale(labels)) - toy.spectra(labels))
    assert np.median(err) < 1.5e-3
    assert np.median(err) < 2 * demo.meta["training"]["validation_abs_error_percentiles"]["p50"]


# -- toy line model: the physics the demo network learned ----------------------------------------------------------
def _depth_at(toy, labels, which):
    """Mean absorption (1 - flux) over the model pixels nearest the given lines."""
    flux = toy.spectrum(labels)
    wl = model_wavelength()
    idx = np.searchsorted(wl, toy.lines.wavelength[which])
    idx = np.clip(idx, 0, len(wl) - 1)
    return float(np.mean(1 - flux[idx]))


def _element_lines(toy, element):
    k = LABEL_NAMES.index(f"{element}_h")
    return (toy.lines.label_index[:, 0] == k) & ~toy.lines.molecular


@pytest.mark.parametrize("element", [n[:-2] for n in LABEL_NAMES if n.endswith("_h")])
def test_every_element_has_lines_that_follow_its_abundance(toy, element):
    base = {"teff": 4800.0, "logg": 2.5}
    lines = _element_lines(toy, element)
    assert lines.sum() >= 3
    weak = _depth_at(toy, {**base, f"{element}_h": -0.8}, lines)
    strong = _depth_at(toy, {**base, f"{element}_h": 0.8}, lines)
    # visible at S/N 100: the strong-abundance lines are deeper by well over the noise (0.01) on average
    assert strong - weak > 0.03, (element, weak, strong)


def test_c12_c13_moves_carbon_features(toy):
    base = {"teff": 4200.0, "logg": 1.8}
    c13 = toy.lines.isotope == 13
    c12 = toy.lines.isotope == 12
    assert _depth_at(toy, {**base, "c12_c13": 3.0}, c13) > _depth_at(toy, {**base, "c12_c13": 90.0}, c13) + 0.05
    assert _depth_at(toy, {**base, "c12_c13": 0.1}, c12) < _depth_at(toy, {**base, "c12_c13": 90.0}, c12) - 0.05


def test_molecules_vanish_in_hot_stars_and_brackett_lines_appear(toy):
    mol = toy.lines.molecular
    assert _depth_at(toy, {"teff": 7500.0, "logg": 4.0}, mol) < 0.3 * _depth_at(toy, {"teff": 4000.0, "logg": 4.0}, mol)
    wl = model_wavelength()
    br11 = np.argmin(np.abs(wl - 16811.1))
    hot, cool = toy.spectrum({"teff": 7800.0, "logg": 4.0}), toy.spectrum({"teff": 4500.0, "logg": 4.0})
    assert hot[br11] < cool[br11] - 0.1


def test_broadening_conserves_equivalent_width_and_v_turb_desaturates(toy):
    narrow = 1 - toy.spectrum({"v_macro": 1.0})
    broad = 1 - toy.spectrum({"v_macro": 25.0})
    assert broad.max() < narrow.max()
    assert broad.sum() == pytest.approx(narrow.sum(), rel=0.01)
    slow, fast = 1 - toy.spectrum({"v_turb": 0.0}), 1 - toy.spectrum({"v_turb": 3.0})
    assert fast.sum() > 1.05 * slow.sum()


def test_continuum_windows_are_line_free(toy):
    windows = toy.continuum_mask()
    assert 300 < windows.sum() < 600
    rng = np.random.default_rng(3)
    labels = LOWER + rng.uniform(0, 1, (20, 25)) * (UPPER - LOWER)
    labels[:, 0] = rng.uniform(3000, 5500, 20)  # cool and warm stars: only Brackett wings of hot stars reach windows
    flux = toy.spectra(labels)
    assert np.abs(flux[:, windows] - 1).max() < 1e-3


def test_gravity_changes_the_spectrum(toy):
    a, b = toy.spectrum({"teff": 4800.0, "logg": 1.5}), toy.spectrum({"teff": 4800.0, "logg": 3.5})
    assert np.sum(((a - b) / 0.01) ** 2) > 1e3  # chi2 difference at S/N 100


# -- regeneration ----------------------------------------------------------------------------------------------
def test_make_demo_is_deterministic_and_marks_the_network(tmp_path):
    from astra_thepayne.training.make_demo import make_demo_network, save_compact

    digests = []
    for name in ("a.pkl", "b.pkl"):
        result = make_demo_network(n_spectra=40, epochs=3, hidden=8)
        path = save_compact(result.emulator, tmp_path / name)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    small = PayneEmulator.load(tmp_path / "a.pkl")
    assert small.is_demo and small.meta["description"] == demo_model.DEMO_NOTICE
    assert small.weights[2].shape == (7214, 8)
    assert small.meta["weights_dtype"] == "float32"


def test_thepayne_train_on_the_saved_toy_grid_gives_the_same_network(tmp_path):
    # docs/models.md: `make_demo --grid-output` + `thepayne train` with the demo options trains the same weights.
    from astra_thepayne.cli import main
    from astra_thepayne.training.grid import save_grid
    from astra_thepayne.training.make_demo import make_demo_network, make_toy_grid

    reference = make_demo_network(n_spectra=40, epochs=3, hidden=8).emulator
    grid = save_grid(make_toy_grid(40), tmp_path / "toy.npz")
    code = main(["train", str(grid), "--output", str(tmp_path / "again.pkl"), "--hidden", "8", "--epochs", "3",
                 "--batch-size", str(demo_model.DEMO_BATCH_SIZE), "--learning-rate", str(demo_model.DEMO_LEARNING_RATE),
                 "--patience", str(demo_model.DEMO_PATIENCE), "--seed", str(demo_model.DEMO_SEED),
                 "--backend", "numpy", "--quiet"])
    assert code == 0
    again = PayneEmulator.load(tmp_path / "again.pkl")
    for a, b in zip(again.weights + again.biases, reference.weights + reference.biases, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-12)
    assert again.meta["grid_sha256"] == reference.meta["grid_sha256"]
    assert again.meta["demonstration"] is False  # trained by a user: not marked as the demo


# -- label recovery ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fits_of_demo_spectra_recover_labels_with_unit_pulls(demo):
    # 48 spectra at S/N 100 drawn from the demo network (seed 2024), fitted with the default fitter (continuum
    # fitted first on model-derived continuum pixels, then labels with raw_e from the covariance).
    # Stated tolerance for teff, logg and fe_h: |mean pull| < 0.3 and pull standard deviation in [0.7, 1.4]
    # (with 48 spectra the standard deviation itself scatters by ~10%). Measured on 2026-11-26: teff -0.25 / 1.28,
    # logg -0.10 / 1.07, fe_h -0.27 / 1.16; with the true continuum instead of a fitted one 0.01 / 1.03,
    # 0.21 / 1.03, 0.14 / 0.91, so most of the excess comes from continuum normalisation, not the network.
    # Not asserted: c12_c13 (13C bands vanish at high ratios, so its errors are far from Gaussian) and a few weak
    # labels whose pull widths reach 1.5-2 even with the true continuum.
    fitting = pytest.importorskip("astra_thepayne.core.fitting")
    from astra_thepayne.core.synthetic import synthetic_spectrum

    rng = np.random.default_rng(2024)
    fitter = fitting.PayneFitter(demo)
    truths, fits, errors = [], [], []
    for _ in range(48):
        truth = demo.unscale(rng.uniform(-0.35, 0.35, 25))
        result = fitter.fit(synthetic_spectrum(demo, truth, snr=100.0, rng=rng))
        assert result.result_flags & 1 == 0, result.message
        truths.append(truth)
        fits.append(result.labels)
        errors.append(result.raw_e)
    pulls = (np.array(fits) - np.array(truths)) / np.array(errors)
    for name in ("teff", "logg", "fe_h"):
        k = LABEL_NAMES.index(name)
        assert abs(np.mean(pulls[:, k])) < 0.3, (name, np.mean(pulls[:, k]))
        assert 0.7 < np.std(pulls[:, k]) < 1.4, (name, np.std(pulls[:, k]))
