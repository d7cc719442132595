"""Helpers of the Astra-wrapped task, tested without sdss-astra: ``paginate`` (``astra execute --page/--limit``)
and ``skip_fitted`` (spectra that already have a result are not given to Astra's INSERT again)."""
import numpy as np
import peewee
import pytest

from astra_thepayne import connect
from astra_thepayne.core.spectrum import Spectrum
from astra_thepayne.db.migrate import upgrade
from astra_thepayne.db.models import SpectrumRecord, ThePayne
from astra_thepayne.pipeline.astra_binding import paginate, skip_fitted


@pytest.fixture()
def query():
    database = peewee.SqliteDatabase(":memory:")

    class Item(peewee.Model):
        value = peewee.IntegerField()

    Item._meta.set_database(database)
    database.create_tables([Item])
    Item.insert_many([{"value": v} for v in range(1, 11)]).execute()
    yield Item.select().order_by(Item.value)
    database.close()


def values(rows):
    return [row.value for row in rows]


def test_page_and_limit_select_that_block(query):
    # astra execute passes them as the integers click parsed; strings (from Python callers) work too
    assert values(paginate(query, 3, 3)) == [7, 8, 9]
    assert values(paginate(query, "2", "4")) == [5, 6, 7, 8]


def test_limit_alone_takes_the_first_rows(query):
    assert values(paginate(query, None, 2)) == [1, 2]


def test_reapplying_astra_executes_pagination_changes_nothing(query):
    # astra execute has already paginated the query before it passes page= and limit= on to the task
    assert values(paginate(query.paginate(2, 3), 2, 3)) == [4, 5, 6]


def test_no_page_or_limit_and_non_queries_are_taken_as_given(query):
    assert paginate(query, None, None) is query
    spectra = [object(), object(), object()]
    assert paginate(spectra, 1, 1) is spectra  # e.g. the generator astra execute builds from spectrum keys


def test_skip_fitted_drops_only_spectra_with_a_result_for_this_network_and_tag(tmp_path):
    database = connect(f"sqlite:///{tmp_path / 'results.db'}")
    upgrade(database)
    records = [SpectrumRecord.create(path=f"/s{i}.fits", hdu=1, row=0, spectrum_type="apstar_coadd")
               for i in range(4)]
    ThePayne.create(spectrum_pk=records[0].pk, model_sha256="net", tag="")
    ThePayne.create(spectrum_pk=records[1].pk, model_sha256="net", tag="other")
    ThePayne.create(spectrum_pk=records[2].pk, model_sha256="older-net", tag="")
    pixels = np.ones(8575)
    in_memory = Spectrum(pixels, pixels, pixels)  # a spectrum read from a file has no key: always kept

    kept = list(skip_fitted([records[0], in_memory, records[1], records[2], records[3]], ThePayne, "net", None))
    assert kept[0] is in_memory
    assert [r.pk for r in kept if r is not in_memory] == [records[1].pk, records[2].pk, records[3].pk]

    class AstraRow:  # an Astra spectrum row exposes the key as `spectrum_pk` (an int, or a model with `.pk`)
        def __init__(self, spectrum_pk):
            self.spectrum_pk = spectrum_pk

    rows = [AstraRow(records[1].pk), AstraRow(records[1]), AstraRow(records[3].pk)]
    assert list(skip_fitted(rows, ThePayne, "net", "other")) == [rows[2]]
    database.close()


def test_an_astra_apvisit_row_becomes_the_spectrum_the_apvisit_reader_makes(apogee_data_dir):
    # Astra's ApogeeVisitSpectrum rows expose the apVisit HDUs as (3, 4096) arrays (ivar = error**-2) and the DRP's
    # VREL as v_rel; the task must turn them into what read_spectra makes of the same file
    from astropy.io import fits

    from astra_thepayne import read_spectra
    from astra_thepayne.pipeline.task import _astra_row_spectrum

    path = apogee_data_dir / "apVisit-r13-5095-55844-128.fits"
    (expected,) = read_spectra(path)
    with fits.open(path) as hdul:
        error = hdul[2].data.astype(float)

        class AstraVisitRow:
            wavelength = hdul[4].data
            flux = hdul[1].data
            ivar = np.where(error > 0, 1.0 / np.where(error > 0, error, 1.0) ** 2, 0.0)
            pixel_flags = hdul[3].data
            v_rel = hdul[0].header["VRAD"]
            snr = hdul[0].header["SNR"]

        spectrum = _astra_row_spectrum(AstraVisitRow(), Spectrum)
    assert spectrum.wavelength.shape == (3 * 4096,) and np.all(np.diff(spectrum.wavelength) > 0)
    np.testing.assert_allclose(spectrum.wavelength, expected.wavelength, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(spectrum.pixel_flags, expected.pixel_flags)
    usable = expected.ivar > 0
    np.testing.assert_allclose(spectrum.flux[usable], expected.flux[usable], rtol=1e-6)
    np.testing.assert_allclose(spectrum.ivar[usable], expected.ivar[usable], rtol=1e-5)
    assert (spectrum.rest_frame, spectrum.v_rel_known) == (False, expected.v_rel_known) == (False, -44.4206)


@pytest.mark.parametrize("name", ['the_payne"; DROP TABLE source; --', "9lives", "the-payne", "a" * 64, "x\n"])
def test_the_astra_table_name_must_be_a_plain_identifier(monkeypatch, name):
    from astra_thepayne.errors import ConfigurationError
    from astra_thepayne.pipeline.astra_binding import astra_table_name

    monkeypatch.setenv("THEPAYNE_ASTRA_TABLE", name)
    with pytest.raises(ConfigurationError, match="THEPAYNE_ASTRA_TABLE"):
        astra_table_name()
    monkeypatch.setenv("THEPAYNE_ASTRA_TABLE", "the_payne_plugin")
    assert astra_table_name() == "the_payne_plugin"
