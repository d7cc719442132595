"""Emulator: loading both model formats safely, prediction, and the analytic Jacobian against finite differences."""
import pickle

import numpy as np
import pytest

from astra_thepayne.core.emulator import ModelFileError, PayneEmulator
from astra_thepayne.core.labels import LABEL_NAMES


def test_jacobian_matches_central_finite_differences(toy_emulator):
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.uniform(-0.45, 0.45, toy_emulator.n_labels)
        flux, jac = toy_emulator.predict_and_jacobian(x)
        eps = 1e-6
        numeric = np.column_stack([
            (toy_emulator.predict(x + eps * e) - toy_emulator.predict(x - eps * e)) / (2 * eps)
            for e in np.eye(toy_emulator.n_labels)
        ])
        np.testing.assert_allclose(flux, toy_emulator.predict(x), rtol=0, atol=1e-12)
        assert np.max(np.abs(jac - numeric)) < 1e-6 * np.max(np.abs(numeric))


def test_pixel_subset_and_batch_prediction_agree(toy_emulator):
    x = np.linspace(-0.4, 0.4, toy_emulator.n_labels)
    pixels = np.arange(0, toy_emulator.n_pixels, 7)
    flux, jac = toy_emulator.predict_and_jacobian(x)
    sub_flux, sub_jac = toy_emulator.subset(pixels).predict_and_jacobian(x)
    np.testing.assert_allclose(sub_flux, flux[pixels])
    np.testing.assert_allclose(sub_jac, jac[pixels])
    batch = toy_emulator.predict(np.stack([x, -x]))
    np.testing.assert_allclose(batch[0], flux)


def test_scale_round_trip(toy_emulator):
    labels = toy_emulator.unscale(np.full(toy_emulator.n_labels, 0.25))
    np.testing.assert_allclose(toy_emulator.scale(labels), 0.25)


def test_astra_pickle_round_trip(toy_emulator, tmp_path):
    path = tmp_path / "net.pkl"
    toy_emulator.save(path)
    loaded = PayneEmulator.load(path)
    assert loaded.label_names == LABEL_NAMES
    assert loaded.sha256 and len(loaded.sha256) == 64
    x = np.full(toy_emulator.n_labels, 0.1)
    np.testing.assert_allclose(loaded.predict(x), toy_emulator.predict(x), rtol=1e-12, atol=1e-15)


def test_saved_files_are_readable_by_others_as_the_umask_allows(toy_emulator, tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        path = toy_emulator.save(tmp_path / "shared.pkl")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_payne_npz_implies_grid_and_names(toy_emulator, tmp_path):
    path = tmp_path / "net.npz"
    np.savez(path, **{f"w_array_{i}": w for i, w in enumerate(toy_emulator.weights)},
             **{f"b_array_{i}": b for i, b in enumerate(toy_emulator.biases)},
             x_min=toy_emulator.x_min, x_max=toy_emulator.x_max)
    loaded = PayneEmulator.load(path)
    assert loaded.label_names == LABEL_NAMES and loaded.n_pixels == 7214
    np.testing.assert_allclose(loaded.wavelength, toy_emulator.wavelength)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("content, problem", [
    ({"weights": _Evil()}, "refusing to load builtins.print"),
    ([1, 2, 3], "expected a dict"),
    ({"weights": (1,)}, "lacks biases"),
])
def test_unsafe_or_wrong_pickles_are_refused_with_the_file_named(tmp_path, content, problem):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ModelFileError, match=problem) as info:
        PayneEmulator.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_wrong_shapes_missing_and_truncated_files(toy_emulator, tmp_path):
    data = toy_emulator.to_dict()
    data["x_min"] = data["x_min"][:3]
    path = tmp_path / "shape.pkl"
    path.write_bytes(pickle.dumps(data))
    with pytest.raises(ModelFileError, match="x_min has shape"):
        PayneEmulator.load(path)
    with pytest.raises(ModelFileError, match="does not exist"):
        PayneEmulator.load(tmp_path / "missing.pkl")
    good = tmp_path / "good.pkl"
    toy_emulator.save(good)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="truncated.pkl"):
        PayneEmulator.load(truncated)
