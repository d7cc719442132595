"""Flags an APOGEE user expects (issue 15): per-label at-bound bits, teff/logg at a bound bad, warning bits tied to
the network's bounds, bad pixels per chip, and the file's STARFLAG and VSCATTER carried into the result."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from astra_thepayne.core.fitting import PayneFitter
from astra_thepayne.core.labels import (
    AT_BOUND_BITS,
    BAD_RESULT_FLAGS,
    LABEL_NAMES,
    RESULT_FLAGS,
    flag_result,
    starflag_names,
)
from astra_thepayne.core.synthetic import synthetic_spectrum
from astra_thepayne.core.wavelength import MODEL_SEGMENTS
from astra_thepayne.db.models import ThePayne, row_to_fields
from astra_thepayne.io import read_spectra

FLAG = {flag.name: flag.value for flag in RESULT_FLAGS}


def test_warning_bits_follow_the_network_bounds():
    middle = {"teff": 5000.0, "logg": 2.5, "fe_h": 0.0}
    assert flag_result(middle, 100) == 0
    # the standard network's logg upper bound is 5.0: the old "logg > 5.2" could never fire
    assert flag_result({**middle, "logg": 4.95}, 100) == FLAG["warn_logg"]
    assert flag_result({**middle, "teff": 3050.0}, 100) == FLAG["warn_teff"]
    # a dwarf network with logg in [3.5, 5.0]: 3.55 is near its edge, 2.5 would be outside it
    assert flag_result({**middle, "logg": 3.55}, 100, bounds={"logg": (3.5, 5.0)}) == FLAG["warn_logg"]
    assert flag_result({**middle, "logg": 4.0}, 100, bounds={"logg": (3.5, 5.0)}) == 0


def test_teff_or_logg_at_bound_is_bad_other_labels_warn():
    middle = {"teff": 5000.0, "logg": 2.5, "fe_h": 0.0}
    weak = flag_result(middle, 100, at_bound=["ti_h"])
    assert weak == FLAG["label_at_bound"] and not weak & BAD_RESULT_FLAGS
    for name in ("teff", "logg"):
        flags = flag_result(middle, 100, at_bound=[name, "ti_h"])
        assert flags & FLAG[f"{name}_at_bound"] and flags & BAD_RESULT_FLAGS
    assert AT_BOUND_BITS["teff"] == 1 and AT_BOUND_BITS["logg"] == 2
    assert sorted(AT_BOUND_BITS.values()) == [1 << i for i in range(len(LABEL_NAMES))]


def test_fit_pinned_at_the_teff_bound_is_bad_and_names_the_label(toy_emulator):
    truth = (toy_emulator.x_min + toy_emulator.x_max) / 2
    truth[0] = toy_emulator.x_max[0] + 0.3 * (toy_emulator.x_max[0] - toy_emulator.x_min[0])  # hotter than the grid
    spectrum = synthetic_spectrum(toy_emulator, truth, snr=200, rng=3)
    result = PayneFitter(toy_emulator, bank_cache_dir=False).fit(spectrum)
    assert result.at_bound_flags & AT_BOUND_BITS["teff"]
    assert result.result_flags & FLAG["teff_at_bound"] and result.flag_bad
    row = row_to_fields(result.as_row())
    assert row["at_bound_flags"] == result.at_bound_flags


def test_bad_pixels_per_chip_on_a_real_visit(toy_emulator, apogee_data_dir):
    (visit,) = read_spectra(apogee_data_dir / "apVisit-r13-9518-57729-104.fits")
    fitter = PayneFitter(toy_emulator, bank_cache_dir=False)
    clean = fitter.prepare(visit)
    assert all(fraction < 0.2 for fraction in clean.bad_pixel_fractions)
    # BADPIX on a third of the green chip's input pixels (the middle of the observed range)
    green = (visit.wavelength > 15900) & (visit.wavelength < 16400)
    damaged = np.flatnonzero(green)[: int(0.35 * green.sum())]
    visit.pixel_flags[damaged] |= 1
    prepared = fitter.prepare(visit)
    blue, middle, red = prepared.bad_pixel_fractions
    assert middle > 0.2 and blue < 0.2 and red < 0.2
    flags = flag_result({}, prepared.snr, bad_pixel_fractions=prepared.bad_pixel_fractions)
    assert flags & FLAG["bad_pixels_green"] and not flags & (FLAG["bad_pixels_blue"] | FLAG["bad_pixels_red"])
    assert len(prepared.bad_pixel_fractions) == len(MODEL_SEGMENTS)


def test_starflag_and_vscatter_of_the_file_reach_the_result(toy_emulator, apogee_data_dir, tmp_path):
    path = tmp_path / "apStar-dr17-2M17335483-2753043.fits"
    with fits.open(apogee_data_dir / path.name) as hdul:
        hdul[0].header["STARFLAG"] = (1 << 17) | (1 << 2)  # OR over the visits
        hdul[0].header["FLAG2"] = 1 << 17
        hdul.writeto(path)
    spectra = read_spectra(path)
    results = PayneFitter(toy_emulator, bank_cache_dir=False).fit_batch(spectra[:3])
    assert [r.starflag for r in results] == [(1 << 17) | (1 << 2), 0, 1 << 17]
    assert starflag_names(results[0].starflag) == ("bright_neighbor", "suspect_broad_lines")
    assert starflag_names(None) == () and ThePayne(starflag=None).flag_starflag_bright_neighbor is False
    assert all(r.vscatter == pytest.approx(0.18421091) for r in results)
    row = row_to_fields(results[0].as_row())
    assert (row["starflag"], row["vscatter"]) == ((1 << 17) | (1 << 2), pytest.approx(0.18421091))
    assert {"starflag", "vscatter", "at_bound_flags"} <= set(ThePayne._meta.fields)
    (visit,) = read_spectra(apogee_data_dir / "apVisit-r13-5095-55844-128.fits")
    assert (visit.meta["starflag"], visit.meta["vscatter"]) == (0, pytest.approx(3.30833))
