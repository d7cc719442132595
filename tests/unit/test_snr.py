"""One S/N for every spectrum type (issue 15): the median S/N per apStar pixel of the data as fitted."""
from __future__ import annotations

import pytest

from astra_thepayne.core.fitting import PayneFitter
from astra_thepayne.core.labels import RESULT_FLAGS
from astra_thepayne.io import read_spectra


@pytest.mark.slow
def test_single_visit_coadd_and_its_visit_row_have_one_snr(toy_emulator, apogee_data_dir):
    coadd, visit = read_spectra(apogee_data_dir / "apStar-dr17-2M19485057+5005279.fits")
    assert (coadd.spectrum_type, visit.spectrum_type, visit.meta["data_row"]) == ("apstar_coadd", "apstar_visit", 0)
    assert (coadd.snr, visit.snr) == pytest.approx((137.5, 97.7), abs=0.05)  # what the file says differs
    fitter = PayneFitter(toy_emulator, bank_cache_dir=False)
    results = fitter.fit_batch([coadd, visit])
    assert results[0].snr == results[1].snr == fitter.prepare(coadd).snr
    assert results[0].snr == pytest.approx(coadd.snr, rel=0.05)  # the DRP's SNR card: median S/N per apStar pixel
    low_snr = next(flag.value for flag in RESULT_FLAGS if flag.name == "low_snr")
    assert (results[0].result_flags & low_snr) == (results[1].result_flags & low_snr)


def test_visit_snr_is_per_apstar_pixel(toy_emulator, apogee_data_dir):
    """An apVisit's S/N is the same quantity as an apStar row's: per apStar pixel (apVisit pixels are wider)."""
    fitter = PayneFitter(toy_emulator, bank_cache_dir=False)
    giant = read_spectra(apogee_data_dir / "apStar-dr17-2M17335483-2753043.fits")
    for row in giant[1:]:  # each visit row's S/N is the DRP's own SNRVIS card, to 2%
        assert fitter.prepare(row).snr == pytest.approx(row.meta["snr_apstar_pixel"], rel=0.02)
    (visit,) = read_spectra(apogee_data_dir / "apVisit-r13-5095-55844-128.fits")
    assert fitter.prepare(visit).snr == pytest.approx(55.9, abs=0.5)  # the header's SNR, per apVisit pixel: 45.0
