"""Tests of astra_thepayne.training: grid loading and validation, the numpy and torch trainers, `thepayne train`."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from astra_thepayne.cli import main
from astra_thepayne.core.emulator import PayneEmulator
from astra_thepayne.training.grid import GridError, TrainingGrid, load_grid, save_grid, validate_grid
from astra_thepayne.training.trainer import TrainingError, train_network


def small_grid(n=400, seed=0, pixels=60) -> TrainingGrid:
    """Three labels, a few Gaussian absorption lines whose depth and width follow the labels (smooth, learnable)."""
    rng = np.random.default_rng(seed)
    labels = np.column_stack([rng.uniform(4000, 6000, n), rng.uniform(1, 5, n), rng.uniform(-1, 0.5, n)])
    wavelength = np.linspace(15200.0, 15260.0, pixels)
    t, g, m = (labels - labels.mean(axis=0)).T / np.ptp(labels, axis=0)[:, None]
    centres = (15210.0, 15225.0, 15240.0, 15252.0)
    depth = np.column_stack([0.3 + 0.25 * m, 0.4 - 0.3 * t, 0.2 + 0.15 * g + 0.1 * m, 0.35 + 0.2 * t * m])
    width = 1.0 + 0.3 * g
    flux = 1.0 - sum(depth[:, [i]] * np.exp(-0.5 * ((wavelength - c) / width[:, None]) ** 2)
                     for i, c in enumerate(centres))
    return TrainingGrid(labels, ("teff", "logg", "fe_h"), wavelength, flux)


@pytest.fixture(scope="module")
def trained():
    return train_network(small_grid(), hidden=24, epochs=300, batch_size=32, learning_rate=3e-3, patience=30,
                         seed=3, backend="numpy")


def test_numpy_trainer_recovers_small_grid(trained):
    # Stated accuracy: median |flux error| < 2e-3 and 95th percentile < 1e-2 on held-out spectra of a grid whose
    # lines are 20-50% deep (this run reaches ~5e-4 and ~3e-3).
    errors = trained.validation_errors
    assert errors["p50"] < 2e-3, errors
    assert errors["p95"] < 1e-2, errors
    assert trained.history[0]["valid_loss"] > 10 * trained.history[trained.best_epoch - 1]["valid_loss"]
    meta = trained.emulator.meta
    assert meta["demonstration"] is False
    assert meta["backend"] == "numpy"
    assert meta["training"]["n_train"] + meta["training"]["n_valid"] == 400
    assert meta["training"]["validation_abs_error_percentiles"] == errors
    assert meta["grid_sha256"] == small_grid().sha256()


def test_trained_network_generalises_to_new_labels(trained):
    fresh = small_grid(n=100, seed=99)
    emulator = trained.emulator
    err = np.abs(emulator.predict(emulator.scale(fresh.labels)) - fresh.flux)
    assert np.median(err) < 3e-3


def test_saved_file_loads_and_matches_trainer(trained, tmp_path):
    path = tmp_path / "net.pkl"
    trained.emulator.save(path)
    loaded = PayneEmulator.load(path)
    assert loaded.label_names == ("teff", "logg", "fe_h")
    np.testing.assert_allclose(loaded.wavelength, small_grid().wavelength, rtol=1e-12, atol=0)
    assert loaded.meta["training"]["seed"] == 3
    grid = small_grid()
    valid = trained.valid_index
    # the trainer computes in float32, the emulator in float64: agreement to float32 rounding
    from astra_thepayne.training.trainer import _NumpyBackend

    w, b = trained.emulator.weights, trained.emulator.biases
    engine = _NumpyBackend([w[0], b[0], w[1], b[1], w[2], b[2]])
    engine.params = [p.astype(np.float32) for p in engine.params]
    x = loaded.scale(grid.labels[valid]).astype(np.float32)
    np.testing.assert_allclose(loaded.predict(loaded.scale(grid.labels[valid])), engine.predict(x), atol=2e-5)
    # and the percentiles stored in the file are those of the loaded network
    err = np.abs(loaded.predict(loaded.scale(grid.labels[valid])) - grid.flux[valid])
    assert np.median(err) == pytest.approx(loaded.meta["training"]["validation_abs_error_percentiles"]["p50"],
                                           rel=1e-3, abs=1e-6)


def test_numpy_training_is_deterministic(tmp_path):
    paths = []
    for name in ("a.pkl", "b.pkl"):
        result = train_network(small_grid(n=80), hidden=8, epochs=5, batch_size=16, seed=11, backend="numpy")
        result.emulator.save(tmp_path / name)
        paths.append(tmp_path / name)
    assert hashlib.sha256(paths[0].read_bytes()).digest() == hashlib.sha256(paths[1].read_bytes()).digest()
    other = train_network(small_grid(n=80), hidden=8, epochs=5, batch_size=16, seed=12, backend="numpy")
    assert not np.array_equal(other.emulator.weights[2], PayneEmulator.load(paths[0]).weights[2])


def test_early_stopping_keeps_best_epoch():
    result = train_network(small_grid(n=60), hidden=64, epochs=400, batch_size=8, learning_rate=2e-2, patience=6,
                           seed=0, backend="numpy")
    assert len(result.history) < 400
    losses = [row["valid_loss"] for row in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert len(result.history) - result.best_epoch == 6


@pytest.mark.parametrize("suffix", [".npz", ".fits"])
def test_grid_round_trip(tmp_path, suffix):
    grid = small_grid(n=20)
    path = save_grid(grid, tmp_path / f"grid{suffix}")
    loaded = load_grid(path)
    np.testing.assert_allclose(loaded.labels, grid.labels)
    np.testing.assert_allclose(loaded.flux, grid.flux)
    np.testing.assert_allclose(loaded.wavelength, grid.wavelength)
    assert loaded.label_names == grid.label_names
    assert loaded.sha256() == grid.sha256()


def _broken(kind):
    g = small_grid(n=30)
    if kind == "nan-flux":
        g.flux[4, 7] = np.nan
    elif kind == "inf-label":
        g.labels[2, 1] = np.inf
    elif kind == "rows":
        g.flux = g.flux[:-1]
    elif kind == "pixels":
        g.wavelength = g.wavelength[:-2]
    elif kind == "constant":
        g.labels[:, 2] = -0.3
    elif kind == "names":
        g.label_names = ("teff", "logg")
    elif kind == "duplicate":
        g.label_names = ("teff", "teff", "fe_h")
    elif kind == "few":
        g.labels, g.flux = g.labels[:3], g.flux[:3]
    return g


@pytest.mark.parametrize("kind, words", [
    ("nan-flux", "flux has 1 NaN"), ("inf-label", "labels has 1 NaN or infinite"), ("rows", "29 spectra"),
    ("pixels", "wavelength has 58"), ("constant", "fe_h do not vary"), ("names", "2 label names for 3"),
    ("duplicate", "repeat"), ("few", "at least 10"),
])
def test_bad_grids_are_rejected(kind, words):
    with pytest.raises(GridError, match=words):
        validate_grid(_broken(kind))


def test_cli_trains_and_reports(tmp_path, capsys):
    grid_path = save_grid(small_grid(n=120), tmp_path / "grid.npz")
    out = tmp_path / "model.pkl"
    code = main(["train", str(grid_path), "--output", str(out), "--hidden", "16", "--epochs", "15",
                 "--batch-size", "32", "--seed", "5", "--backend", "numpy"])
    assert code == 0
    text = capsys.readouterr().out
    assert sum(line.startswith("epoch ") for line in text.splitlines()) == 15
    assert "validation |flux error| percentiles: 50%" in text
    model = PayneEmulator.load(out)
    assert model.meta["training"]["hidden"] == 16 and model.meta["training"]["seed"] == 5
    assert model.meta["demonstration"] is False
    assert model.weights[0].shape == (16, 3)


@pytest.mark.parametrize("kind", ["nan-flux", "constant", "rows"])
def test_cli_bad_grid_exits_2_with_one_line(tmp_path, capsys, kind):
    g = _broken(kind)
    path = tmp_path / "bad.npz"
    np.savez(path, labels=g.labels, label_names=np.array(g.label_names), wavelength=g.wavelength, flux=g.flux)
    code = main(["train", str(path), "--output", str(tmp_path / "m.pkl"), "--epochs", "2", "--backend", "numpy"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(path) in err, err
    assert not (tmp_path / "m.pkl").exists()


def test_cli_rejects_unreadable_and_incomplete_grids(tmp_path, capsys):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a grid")
    assert main(["train", str(junk), "--output", str(tmp_path / "m.pkl")]) == 2
    partial = tmp_path / "partial.npz"
    np.savez(partial, labels=np.zeros((20, 2)), flux=np.ones((20, 5)))
    assert main(["train", str(partial), "--output", str(tmp_path / "m.pkl")]) == 2
    err = capsys.readouterr().err
    assert "neither a .npz archive nor a FITS file" in err and "lacks label_names, wavelength" in err
    assert main(["train", str(tmp_path / "missing.npz"), "--output", str(tmp_path / "m.pkl")]) == 2


def test_bad_options_raise():
    with pytest.raises(TrainingError, match="backend"):
        train_network(small_grid(n=20), backend="tensorflow")
    with pytest.raises(TrainingError, match="validation fraction"):
        train_network(small_grid(n=20), validation_fraction=1.5)


def test_torch_backend_same_format_and_accuracy(trained):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    result = train_network(small_grid(), hidden=24, epochs=120, batch_size=32, learning_rate=3e-3, patience=30,
                           seed=3, backend="torch")
    assert result.backend == "torch"
    assert result.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert set(result.validation_errors) == set(trained.validation_errors)
    assert result.emulator.meta["training"].keys() == trained.emulator.meta["training"].keys()
    assert [w.shape for w in result.emulator.weights] == [w.shape for w in trained.emulator.weights]
    # same seed: same split, same initial weights and batches; Adam in float32 on either side, so the first
    # epochs agree closely and the final accuracy is comparable (not bit-identical)
    np.testing.assert_array_equal(result.valid_index, trained.valid_index)
    assert result.history[0]["train_loss"] == pytest.approx(trained.history[0]["train_loss"], rel=1e-3)
    numpy_at_120 = trained.history[119]["valid_loss"]
    assert result.history[-1]["valid_loss"] < 3 * numpy_at_120
    assert result.validation_errors["p50"] < 4e-3
