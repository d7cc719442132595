"""Noise model: calibration from repeat pairs, Astra's corrections format, and refusal of unsafe pickles."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from astra_thepayne.errors import ConfigurationError
from astra_thepayne.pipeline.noise_model import (
    apply_correction,
    calibrate_pair_errors,
    load_corrections,
    pair_z_scores,
    save_corrections,
)


def test_calibration_recovers_scale_and_offset_from_repeat_pairs():
    # seed fixed; 4000 pairs: the fitted scale is good to a few per cent, the offset to ~20% of its value
    rng = np.random.default_rng(42)
    n, true_scale, true_offset = 4000, 1.8, 0.02
    raw1, raw2 = rng.uniform(0.01, 0.1, n), rng.uniform(0.01, 0.1, n)
    truth = rng.uniform(-1, 0.3, n)
    x1 = truth + rng.normal(0, 1, n) * (true_scale * raw1 + true_offset)
    x2 = truth + rng.normal(0, 1, n) * (true_scale * raw2 + true_offset)
    assert np.std(pair_z_scores(x1, raw1, x2, raw2)) > 1.5  # formal errors are too small
    fitted = calibrate_pair_errors(x1, raw1, x2, raw2)
    assert fitted["scale"] == pytest.approx(true_scale, rel=0.08)
    assert fitted["offset"] == pytest.approx(true_offset, abs=0.006)
    z = pair_z_scores(x1, apply_correction(raw1, **fitted), x2, apply_correction(raw2, **fitted))
    assert np.std(z) == pytest.approx(1.0, abs=0.04)


def test_calibration_of_right_errors_changes_nothing():
    rng = np.random.default_rng(7)
    e1, e2 = rng.uniform(0.5, 2.0, 3000), rng.uniform(0.5, 2.0, 3000)
    x1, x2 = rng.normal(0, e1), rng.normal(0, e2)
    fitted = calibrate_pair_errors(x1, e1, x2, e2)
    assert fitted["scale"] == pytest.approx(1.0, abs=0.06) and fitted["offset"] < 0.1


def test_calibration_needs_pairs():
    with pytest.raises(ValueError, match="at least 3"):
        calibrate_pair_errors([1.0, np.nan], [1.0, 1.0], [1.0, 2.0], [1.0, 1.0])


def test_corrections_round_trip_in_astra_format(tmp_path):
    path = save_corrections(tmp_path / "c.pkl", {"teff": {"offset": np.float64(5.0), "scale": 1.2}}, {"n": 10})
    with open(path, "rb") as fh:
        corrections, reference = pickle.load(fh)
    assert corrections == {"teff": {"offset": 5.0, "scale": 1.2}} and reference == {"n": 10}
    loaded, reference, sha = load_corrections(path)
    assert loaded == corrections and len(sha) == 64


class _Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


@pytest.mark.parametrize("content", [{"teff": {"offset": 1.0}}, ({"teff": 1.0}, None), _Payload()])
def test_bad_or_unsafe_corrections_files_are_configuration_errors(tmp_path, content):
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(content))
    with pytest.raises(ConfigurationError, match="corrections file"):
        load_corrections(path)


def test_quadrature_form_recovers_its_floor_where_the_linear_form_overstates():
    rng = np.random.default_rng(5)
    n, true_scale, floor = 4000, 1.5, 0.05
    raw1, raw2 = rng.uniform(0.01, 0.1, n), rng.uniform(0.01, 0.1, n)
    x1 = rng.normal(0, np.hypot(true_scale * raw1, floor))
    x2 = rng.normal(0, np.hypot(true_scale * raw2, floor))
    fitted = calibrate_pair_errors(x1, raw1, x2, raw2, form="quadrature")
    assert fitted["form"] == "quadrature"
    assert fitted["scale"] == pytest.approx(true_scale, rel=0.1)
    assert fitted["offset"] == pytest.approx(floor, rel=0.1)
    z = pair_z_scores(x1, apply_correction(raw1, **fitted), x2, apply_correction(raw2, **fitted))
    assert np.std(z) == pytest.approx(1.0, abs=0.04)
    # the same scale and offset read linearly overstate an error whose two terms are equal by sqrt(2)
    equal = floor / true_scale
    assert apply_correction(equal, floor, true_scale) / apply_correction(equal, floor, true_scale, "quadrature") \
        == pytest.approx(np.sqrt(2))


def test_quadrature_entries_round_trip_and_linear_files_stay_astras(tmp_path):
    corrections = {"teff": {"offset": 30.0, "scale": 1.1, "form": "quadrature"}, "logg": {"offset": 0.01, "scale": 1.0}}
    path = save_corrections(tmp_path / "q.pkl", corrections)
    loaded, _, _ = load_corrections(path)
    assert loaded == corrections
    with open(path, "rb") as fh:
        assert pickle.load(fh)[0]["logg"] == {"offset": 0.01, "scale": 1.0}  # no extra key where Astra's has none
    path.write_bytes(pickle.dumps(({"teff": {"offset": 1.0, "scale": 1.0, "form": "cubic"}}, None)))
    with pytest.raises(ConfigurationError, match="form 'cubic'"):
        load_corrections(path)
