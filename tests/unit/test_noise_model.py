"""Noise model: calibration from repeat pairs, Astra's corrections format, and refusal of unsafe pickles."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from astra_thepayne.errors import ConfigurationError
from astra_thepayne.pipeline.noise_model import (
    apply_correction,
    calibrate_pair_errors,
    calibrate_pair_errors_by_snr,
    check_snr_edges,
    load_corrections,
    pair_snr,
    pair_z_scores,
    quantile_snr_edges,
    save_corrections,
    snr_bin_index,
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


# -- calibration as a function of S/N ------------------------------------------------------------------------------

def _snr_pairs(seed, n, edges, scales, floor, form):
    """Repeat pairs whose true error inflation is piecewise constant in each visit's own S/N.

    Stars have S/N log-uniform in 15-400 and each visit scatters about it by 25% (so many pairs straddle an edge);
    the formal error is 1/S/N times a factor 0.5-2 (stars of other types have weaker or stronger lines), so raw
    errors overlap between S/N bins and a correction by raw error alone cannot tell the bins apart.
    """
    rng = np.random.default_rng(seed)
    star = np.exp(rng.uniform(np.log(15), np.log(400), n))
    snr = star[:, None] * np.exp(rng.normal(0, 0.25, (n, 2)))
    raw = rng.uniform(0.5, 2.0, (n, 2)) / snr
    true = apply_correction(raw, 0.0, 1.0, form, snr=snr, snr_edges=edges, snr_offset=[floor] * len(scales),
                            snr_scale=scales)
    x = rng.uniform(-1, 0.3, n)[:, None] + rng.normal(0, true)
    return x[:, 0], raw[:, 0], snr[:, 0], x[:, 1], raw[:, 1], snr[:, 1]


@pytest.mark.parametrize("form", ["linear", "quadrature"])
def test_snr_calibration_recovers_each_bins_scale_and_offset(form):
    # truth: formal errors 1.5x too small below S/N 60, right above it, a floor of 0.01 throughout; 4 bins, 8000
    # pairs (seed fixed). Fitted values within 3.5 sigma of the Fisher errors, which a 100-realisation ensemble
    # matched (pull widths 0.8-1.1); the errors themselves small enough that this is a test
    edges, scales, floor = [30.0, 60.0, 120.0], [1.5, 1.5, 1.0, 1.0], 0.01
    x1, e1, s1, x2, e2, s2 = _snr_pairs(3, 8000, edges, scales, floor, form)
    entry, info = calibrate_pair_errors_by_snr(x1, e1, s1, x2, e2, s2, edges, form=form)
    assert entry["snr_edges"] == edges and info["merged"] == [] and info["n_without_snr"] == 0
    assert (entry.get("form") == "quadrature") == (form == "quadrature")
    assert min(info["n_pairs"]) > 1000 and sum(info["n_pairs"]) > 8000  # straddling pairs count in both bins
    for k in range(4):
        low, high = ([0, *edges, 1e9])[k:k + 2]
        raw = np.median(np.concatenate([e1[(s1 >= low) & (s1 < high)], e2[(s2 >= low) & (s2 < high)]]))
        true = apply_correction(raw, floor, scales[k], form)
        assert info["scale_err"][k] < 0.12
        assert abs(entry["snr_scale"][k] - scales[k]) < 3.5 * info["scale_err"][k], k
        if np.isnan(info["offset_err"][k]):
            # a quadrature floor fitted to 0 has no Fisher error: allowed only where the floor hardly matters (adds
            # under 5% to the bin's typical error); the corrected error below still has to be right
            assert form == "quadrature" and entry["snr_offset"][k] == 0 and true < 1.05 * scales[k] * raw, k
        else:
            assert info["offset_err"][k] < 0.006
            assert abs(entry["snr_offset"][k] - floor) < 3.5 * info["offset_err"][k], k
        # what a correction is for: the corrected error at the bin's own raw errors, good to a few per cent
        fitted = apply_correction(raw, entry["snr_offset"][k], entry["snr_scale"][k], form)
        assert fitted == pytest.approx(true, rel=0.05), k


@pytest.mark.parametrize("form", ["linear", "quadrature"])
def test_snr_calibration_gives_unit_z_width_in_every_bin_where_one_calibration_cannot(form):
    # calibrate on one sample, judge z widths on an independent one (seed fixed, 40000 pairs each, pairs binned by
    # their geometric-mean S/N). In units of a width's sampling error, out of sample the S/N-dependent widths
    # scatter by ~1.5 about 0 (sampling plus calibration error; 10 seeds: at most 3.1 off), the single (offset,
    # scale) fitted to the same pairs is 7-12 off in its worst bin: bounds 4.5 and 6
    edges, scales, floor = [60.0], [1.5, 1.0], 0.01
    entry, _ = calibrate_pair_errors_by_snr(*_snr_pairs(1, 40000, edges, scales, floor, form), edges, form=form)
    plain = {key: entry[key] for key in ("offset", "scale", "form") if key in entry}
    x1, e1, s1, x2, e2, s2 = _snr_pairs(2, 40000, edges, scales, floor, form)
    by_snr = pair_z_scores(x1, apply_correction(e1, **entry, snr=s1), x2, apply_correction(e2, **entry, snr=s2))
    single = pair_z_scores(x1, apply_correction(e1, **plain), x2, apply_correction(e2, **plain))
    raw = pair_z_scores(x1, e1, x2, e2)
    bins = snr_bin_index(pair_snr(s1, s2), edges)
    off_by_snr, off_single = [], []
    for k in range(len(edges) + 1):
        sigma = 1 / np.sqrt(2 * (bins == k).sum())  # standard error of a unit Gaussian's width
        off_by_snr.append((np.std(by_snr[bins == k]) - 1) / sigma)
        off_single.append((np.std(single[bins == k]) - 1) / sigma)
    assert np.std(raw[bins == 0]) > 1.3  # the formal errors are visibly wrong at low S/N
    assert max(abs(v) for v in off_by_snr) < 4.5, off_by_snr
    assert max(abs(v) for v in off_single) > 6, off_single


def test_snr_calibration_with_one_bin_agrees_with_the_plain_fit():
    # all S/N in one bin except too few to keep a second: merged, and the plain fit comes back (Astra's entry)
    rng = np.random.default_rng(8)
    e1, e2 = rng.uniform(0.5, 2.0, 2000), rng.uniform(0.5, 2.0, 2000)
    x1, x2 = rng.normal(0, 1.3 * e1 + 0.2), rng.normal(0, 1.3 * e2 + 0.2)
    s1, s2 = np.full(2000, 50.0), np.full(2000, 50.0)
    s1[:5] = 500.0
    entry, info = calibrate_pair_errors_by_snr(x1, e1, s1, x2, e2, s2, [100.0], min_pairs=30)
    assert entry == calibrate_pair_errors(x1, e1, x2, e2)
    assert info["merged"] == ["S/N >=100: 5 pair(s), fewer than 30; merged with <100"]


def test_sparse_and_empty_snr_bins_are_merged_with_their_emptier_neighbour():
    rng = np.random.default_rng(9)
    n = 3000
    snr = np.where(np.arange(n) < 20, 15.0, np.where(np.arange(n) < 1500, 45.0, 150.0))  # <30 holds 20 pairs
    e = rng.uniform(0.5, 2, (2, n))
    x = rng.normal(0, e)
    entry, info = calibrate_pair_errors_by_snr(x[0], e[0], snr, x[1], e[1], snr, [30, 60, 100, 1000],
                                               min_pairs=50)
    # bins <30 (20 pairs), 30-60 (1480), 60-100 (0), 100-1000 (1500), >=1000 (0): the empty ones go first (60-100
    # into its emptier neighbour 30-60), then <30
    assert info["merged"] == ["S/N 60-100: 0 pair(s), fewer than 50; merged with 30-60",
                              "S/N >=1000: 0 pair(s), fewer than 50; merged with 100-1000",
                              "S/N <30: 20 pair(s), fewer than 50; merged with 30-100"]
    assert entry["snr_edges"] == [100.0] and info["n_pairs"] == [1500, 1500]


def test_pairs_without_a_positive_snr_are_left_out_and_counted():
    rng = np.random.default_rng(10)
    e = rng.uniform(0.5, 2, (2, 400))
    x = rng.normal(0, e)
    snr1 = np.full(400, 40.0)
    snr2 = snr1.copy()
    snr1[:3], snr2[3:6], snr1[6] = np.nan, -5.0, 0.0
    snr2[200:] = 80.0
    _, info = calibrate_pair_errors_by_snr(x[0], e[0], snr1, x[1], e[1], snr2, [60])
    assert info["n_without_snr"] == 7 and sum(info["n_pairs"]) == 393 + 200  # 200 pairs straddle the edge


@pytest.mark.parametrize("edges, match", [([60, 30], "increase strictly"), ([30, 30], "increase strictly"),
                                          ([30, float("nan")], "finite"), ([-5, 30], "above 0"),
                                          ([0, 30], "above 0"), ([30, float("inf")], "finite"),
                                          ([], "at least one"), ("30,60", "sequence"), (["a"], "numbers")])
def test_bad_snr_edges_are_refused(edges, match):
    with pytest.raises(ConfigurationError, match=match):
        check_snr_edges(edges)
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (2, 50))
    with pytest.raises(ConfigurationError, match=match):
        calibrate_pair_errors_by_snr(x[0], np.ones(50), np.full(50, 40.0), x[1], np.ones(50), np.full(50, 40.0),
                                     edges)


def test_snr_dependent_correction_uses_each_errors_own_bin_and_refuses_to_guess():
    entry = {"offset": 0.5, "scale": 2.0, "snr_edges": [30.0, 100.0], "snr_offset": [0.3, 0.2, 0.1],
             "snr_scale": [3.0, 2.0, 1.0]}
    snr = np.array([10.0, 30.0, 99.9, 100.0, 1e4, np.nan, -1.0, 0.0, np.inf])
    got = apply_correction(np.ones(snr.size), **entry, snr=snr)
    # on an edge an S/N belongs to the bin above; no S/N, no bin: NaN, never the S/N-independent fallback
    np.testing.assert_allclose(got[:5], [3.3, 2.2, 2.2, 1.1, 1.1])
    assert np.isnan(got[5:]).all()
    assert apply_correction(1.0, **entry | {"form": "quadrature"}, snr=40.0) == pytest.approx(np.hypot(2.0, 0.2))
    with pytest.raises(ConfigurationError, match="depends on S/N"):
        apply_correction(np.ones(3), **entry)
    with pytest.raises(ConfigurationError, match="3 finite numbers"):
        apply_correction(1.0, **entry | {"snr_scale": [1.0, 2.0]}, snr=40.0)


def test_snr_entries_round_trip_and_astra_reads_their_plain_part(tmp_path):
    entry = {"offset": 0.02, "scale": 1.2, "snr_edges": [50.0], "snr_offset": [0.03, 0.01], "snr_scale": [1.5, 1.0]}
    corrections = {"fe_h": entry, "teff": {"offset": 30.0, "scale": 1.1, "form": "quadrature", "snr_edges": [60.0],
                                           "snr_offset": [40.0, 20.0], "snr_scale": [1.4, 1.0]},
                   "logg": {"offset": 0.01, "scale": 1.0}}
    path = save_corrections(tmp_path / "snr.pkl", corrections)
    loaded, _, _ = load_corrections(path)
    assert loaded == corrections
    with open(path, "rb") as fh:
        raw = pickle.load(fh)[0]
    # Astra applies scale * raw_e + offset from each entry: those keys are plain floats, the S/N-independent fit
    assert isinstance(raw["fe_h"]["offset"], float) and isinstance(raw["fe_h"]["scale"], float)
    assert raw["logg"] == {"offset": 0.01, "scale": 1.0}


@pytest.mark.parametrize("change, match", [
    ({"snr_edges": None}, "sequence"), ({"snr_edges": [50.0, 40.0]}, "increase strictly"),
    ({"snr_offset": [0.1]}, "2 finite numbers"), ({"snr_scale": [1.0, float("nan")]}, "2 finite numbers"),
    ({"snr_scale": "ab"}, "2 finite numbers"), ({"snr_edges": [-1.0]}, "above 0")])
def test_bad_snr_entries_in_a_corrections_file_are_configuration_errors(tmp_path, change, match):
    entry = {"offset": 0.02, "scale": 1.2, "snr_edges": [50.0], "snr_offset": [0.03, 0.01], "snr_scale": [1.5, 1.0]}
    path = tmp_path / "bad.pkl"
    path.write_bytes(pickle.dumps(({"fe_h": entry | change}, None)))
    with pytest.raises(ConfigurationError, match=f"entry 'fe_h'.*{match}"):
        load_corrections(path)
    del entry["snr_scale"]
    path.write_bytes(pickle.dumps(({"fe_h": entry}, None)))
    with pytest.raises(ConfigurationError, match="lacks snr_scale"):
        load_corrections(path)


def test_quantile_edges_and_pair_snr():
    rng = np.random.default_rng(1)
    snr = np.exp(rng.uniform(np.log(10), np.log(500), 10000))
    edges = quantile_snr_edges(np.concatenate([snr, [np.nan, -1.0]]), 4)
    assert len(edges) == 3 and edges == sorted(edges)
    counts = np.bincount(snr_bin_index(snr, edges), minlength=4)
    assert counts.min() > 0.23 * snr.size  # about a quarter each
    assert quantile_snr_edges(np.full(100, 40.0), 3) == []  # one S/N: nothing to cut
    with pytest.raises(ConfigurationError, match="at least 2"):
        quantile_snr_edges(snr, 1)
    np.testing.assert_allclose(pair_snr([25.0, 40.0, np.nan, -1.0], [100.0, 40.0, 10.0, 10.0]),
                               [50.0, 40.0, np.nan, np.nan])


def test_snr_calibration_does_not_claim_to_know_what_the_pairs_cannot_tell_apart():
    # constant formal errors: only s e + o is measured, not s and o apart; their errors must not come back small
    rng = np.random.default_rng(12)
    e = np.full(3000, 0.05)
    x1, x2 = rng.normal(0, 0.06, 3000), rng.normal(0, 0.06, 3000)
    snr = np.where(np.arange(3000) < 1500, 40.0, 120.0)
    entry, info = calibrate_pair_errors_by_snr(x1, e, snr, x2, e, snr, [60.0])
    for k in range(2):
        assert apply_correction(0.05, entry["snr_offset"][k], entry["snr_scale"][k]) == pytest.approx(0.06, rel=0.05)
        assert not info["scale_err"][k] < 1.0 and not info["offset_err"][k] < 0.05  # NaN or large


def test_a_calibration_that_does_not_converge_is_refused_not_written(monkeypatch):
    """The real optimisers, held to too few iterations: the calibration stops with a one-line error naming what
    did not converge, instead of returning the values where the optimiser stopped."""
    import scipy.optimize

    from astra_thepayne.pipeline.noise_model import NoiseModelFitError

    real = scipy.optimize.minimize

    def starved(*args, options=None, **kwargs):
        return real(*args, options={**(options or {}), "maxiter": 2}, **kwargs)

    rng = np.random.default_rng(42)
    e1, e2 = rng.uniform(0.01, 0.1, 500), rng.uniform(0.01, 0.1, 500)
    x1, x2 = rng.normal(0, 1.8 * e1 + 0.02), rng.normal(0, 1.8 * e2 + 0.02)
    assert calibrate_pair_errors(x1, e1, x2, e2)["scale"] == pytest.approx(1.8, rel=0.15)  # converges as it is
    monkeypatch.setattr(scipy.optimize, "minimize", starved)
    with pytest.raises(NoiseModelFitError, match="500 pairs did not converge"):
        calibrate_pair_errors(x1, e1, x2, e2)
    snr1, snr2 = rng.uniform(20, 200, 500), rng.uniform(20, 200, 500)
    monkeypatch.setattr(scipy.optimize, "minimize", real)  # the plain fit inside converges; the binned one not
    plain_then_starved = iter([real, starved])
    monkeypatch.setattr(scipy.optimize, "minimize", lambda *a, **k: next(plain_then_starved)(*a, **k))
    with pytest.raises(NoiseModelFitError, match="in 2 S/N bins did not converge"):
        calibrate_pair_errors_by_snr(x1, e1, snr1, x2, e2, snr2, [80.0])
    assert issubclass(NoiseModelFitError, ConfigurationError)  # the command line: one line, exit 2
