"""mwmStar, mwmVisit and aspcapStar readers, on files built with astropy from a real apStar (none ship offline)."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from broken_corpus import write_aspcapstar_file, write_mwm_file

from astra_thepayne.core.wavelength import APSTAR_NPIX, MODEL_TO_APSTAR, apstar_wavelength
from astra_thepayne.io import SpectrumFileError, detect_format, read_spectra, registered_readers

pytestmark = pytest.mark.filterwarnings("error")

MULTI = "apStar-dr17-2M17335483-2753043.fits"


@pytest.fixture(scope="module")
def apstar(apogee_data_dir):
    return apogee_data_dir / MULTI


@pytest.fixture(scope="module")
def apstar_coadd(apstar):
    return read_spectra(apstar, coadd_only=True)[0]


def _claims(path):
    with fits.open(path) as hdul:
        return [r.format_name for r in registered_readers() if r.identify(hdul)]


# --- mwmStar ------------------------------------------------------------------------------------------------------

def test_mwmstar_one_spectrum_per_non_empty_row(apstar, apstar_coadd, tmp_path):
    path = write_mwm_file(tmp_path / "mwmStar-0.6.0-12345678.fits", apstar, apo_rows=(0,), lco_rows=(0,),
                          empty_rows=1)
    assert detect_format(path) == "mwmStar" and _claims(path) == ["mwmStar"]
    spectra = read_spectra(path)
    assert [(s.hdu, s.row) for s in spectra] == [(3, 0), (4, 0)]  # the all-zero placeholder row is skipped
    assert [s.telescope for s in spectra] == ["apo25m", "lco25m"]
    for s in spectra:
        assert s.spectrum_type == "mwmstar" and s.rest_frame
        assert s.flux.shape == (APSTAR_NPIX,)
        assert np.max(np.abs(s.wavelength / apstar_wavelength() - 1)) < 1e-10
        assert s.obj == "2M17335483-2753043" and s.meta["sdss_id"] == 12345678
        assert s.snr == pytest.approx(154.155, rel=1e-5)
        # ivar is used as written (float32 in the file), zero where the apStar had no information
        good = apstar_coadd.ivar > 0
        np.testing.assert_allclose(s.ivar[good], apstar_coadd.ivar[good].astype(np.float32), rtol=1e-6)
        assert np.all(s.ivar[~good] == 0)
        np.testing.assert_array_equal(s.pixel_flags, apstar_coadd.pixel_flags)
        assert np.all(np.isfinite(s.flux))


def test_mwmstar_with_only_lco_data(apstar, tmp_path):
    path = write_mwm_file(tmp_path / "star.fits", apstar, apo_rows=(), lco_rows=(0,))
    spectra = read_spectra(path)
    assert [(s.hdu, s.telescope) for s in spectra] == [(4, "lco25m")]


def test_mwm_file_without_apogee_rows_gives_no_spectra(apstar, tmp_path):
    path = write_mwm_file(tmp_path / "boss-only.fits", apstar, apo_rows=(), lco_rows=())
    assert detect_format(path) == "mwmStar"
    assert read_spectra(path) == []


def test_mwmstar_nan_flux_and_bad_ivar_are_cleaned(apstar, tmp_path):
    path = write_mwm_file(tmp_path / "star.fits", apstar, apo_rows=(0,))
    with fits.open(path, mode="update") as hdul:
        flux, ivar = hdul[3].data["flux"], hdul[3].data["ivar"]
        flux[0, 1000:1100] = np.nan
        ivar[0, 2000:2100] = np.inf
        ivar[0, 3000:3100] = -1.0
    s = read_spectra(path)[0]
    assert np.all(np.isfinite(s.flux)) and np.all(np.isfinite(s.ivar))
    assert np.all(s.ivar[1000:1100] == 0) and np.all(s.flux[1000:1100] == 0)
    assert np.all(s.ivar[2000:2100] == 0) and np.all(s.ivar[3000:3100] == 0)


def test_mwmstar_wrong_pixel_count(apstar, tmp_path):
    path = write_mwm_file(tmp_path / "star.fits", apstar, apo_rows=(0,))
    with fits.open(path) as hdul:
        header = hdul[3].header.copy()
        header["NPIXELS"] = 8000
        hdus = [hdul[0].copy(), hdul[1].copy(), hdul[2].copy(), fits.BinTableHDU(hdul[3].data, header=header),
                hdul[4].copy()]
        fits.HDUList(hdus).writeto(tmp_path / "bad.fits")
    with pytest.raises(SpectrumFileError, match="NPIXELS=8000") as info:
        read_spectra(tmp_path / "bad.fits")
    assert str(info.value).startswith(str(tmp_path / "bad.fits") + ": ")


def test_mwmstar_with_fewer_pixels_than_its_format_is_refused(apstar, tmp_path):
    path = write_mwm_file(tmp_path / "star.fits", apstar, apo_rows=(0,))
    with fits.open(path) as hdul:
        hdus = [hdu.copy() for hdu in hdul]
        columns = []
        for c in hdul[3].columns:
            values = hdul[3].data[c.name]
            is_spectrum = values.ndim == 2 and values.shape[1] == 8575
            columns.append(fits.Column(name=c.name, format=f"1000{c.format[-1]}" if is_spectrum else c.format,
                                       array=values[:, :1000] if is_spectrum else values))
        short = fits.BinTableHDU.from_columns(columns, header=hdul[3].header.copy())
    short.header["NPIXELS"] = 1000
    hdus[3] = short
    fits.HDUList(hdus).writeto(tmp_path / "short.fits")
    with pytest.raises(SpectrumFileError, match="have 1000 pixels; the format has 8575"):
        read_spectra(tmp_path / "short.fits")


# --- mwmVisit -----------------------------------------------------------------------------------------------------

def test_mwmvisit_rest_frame_visits(apstar, tmp_path):
    path = write_mwm_file(tmp_path / "mwmVisit-0.6.0-12345678.fits", apstar, kind="mwmVisit", apo_rows=(2, 3, 4),
                          empty_rows=1)
    assert detect_format(path) == "mwmVisit" and _claims(path) == ["mwmVisit"]
    spectra = read_spectra(path)
    assert [(s.hdu, s.row) for s in spectra] == [(3, 0), (3, 1), (3, 2)]
    visits = read_spectra(apstar)[1:]
    for s, visit in zip(spectra, visits, strict=True):
        assert s.spectrum_type == "mwmvisit" and s.rest_frame and np.isnan(s.v_rel_known)
        assert s.meta["mjd"] >= 56396 and s.meta["in_stack"] is True
        good = visit.ivar > 0
        np.testing.assert_allclose(s.flux[good], visit.flux[good].astype(np.float32), rtol=1e-6)


def test_mwmvisit_detected_from_columns_without_filetype(apstar, tmp_path):
    path = write_mwm_file(tmp_path / "visit.fits", apstar, kind="mwmVisit", apo_rows=(2,))
    with fits.open(path) as hdul:
        hdus = [hdu.copy() for hdu in hdul]
        table = hdus[3]
        columns = [c for c in table.columns if c.name != "filetype"]
        hdus[3] = fits.BinTableHDU.from_columns(columns, header=table.header)
        fits.HDUList(hdus).writeto(tmp_path / "no-filetype.fits")
    assert detect_format(tmp_path / "no-filetype.fits") == "mwmVisit"


# --- aspcapStar ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("npix", [7214, 8575])
def test_aspcapstar_on_the_apstar_grid(apstar, apstar_coadd, tmp_path, npix):
    path = write_aspcapstar_file(tmp_path / f"aspcapStar-{npix}.fits", apstar, npix=npix)
    assert detect_format(path) == "aspcapStar" and _claims(path) == ["aspcapStar"]
    spectra = read_spectra(path)
    assert len(spectra) == 1
    s = spectra[0]
    assert s.spectrum_type == "aspcapstar" and s.rest_frame
    assert s.flux.shape == (APSTAR_NPIX,)
    assert np.max(np.abs(s.wavelength / apstar_wavelength() - 1)) < 1e-10
    assert s.obj == "2M17335483-2753043" and s.telescope == "apo25m" and s.snr == pytest.approx(154.155, rel=1e-5)
    outside = np.ones(APSTAR_NPIX, bool)
    outside[MODEL_TO_APSTAR] = False
    if npix == 7214:
        assert np.all(s.ivar[outside] == 0) and np.all(s.flux[outside] == 0)  # ends and chip gaps
    # normalised: the model-grid pixels with information sit around 1, and match the apStar coadd's shape
    inside = ~outside & (s.ivar > 0) & (apstar_coadd.ivar > 0)
    assert inside.sum() > 7000
    assert np.median(s.flux[inside]) == pytest.approx(1.0, abs=0.05)
    ratio = s.flux[inside] / apstar_coadd.flux[inside]
    assert np.std(ratio) / np.mean(ratio) < 1e-6  # flux / constant (float32 rounding only)


def test_aspcapstar_unexpected_length(apstar, tmp_path):
    path = write_aspcapstar_file(tmp_path / "aspcapStar.fits", apstar, npix=7214)
    with fits.open(path) as hdul:
        hdus = [hdu.copy() for hdu in hdul]
    for i in (1, 2, 3):
        hdus[i] = fits.ImageHDU(hdus[i].data[:7000], header=hdus[i].header)
    fits.HDUList(hdus).writeto(tmp_path / "short.fits")
    with pytest.raises(SpectrumFileError, match="7000 pixels"):
        read_spectra(tmp_path / "short.fits")


def test_mwm_file_whose_apogee_tables_have_no_columns(tmp_path):
    hdus = [fits.PrimaryHDU()]
    for extname in ("BOSS/APO", "BOSS/LCO", "APOGEE/APO", "APOGEE/LCO"):
        hdu = fits.BinTableHDU.from_columns(fits.ColDefs([]), nrows=0)
        hdu.header["EXTNAME"] = extname
        hdus.append(hdu)
    fits.HDUList(hdus).writeto(tmp_path / "mwmStar-nothing.fits")
    assert detect_format(tmp_path / "mwmStar-nothing.fits") == "mwmStar"
    assert read_spectra(tmp_path / "mwmStar-nothing.fits") == []
