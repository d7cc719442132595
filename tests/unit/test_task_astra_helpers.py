"""Helpers of the Astra-wrapped task, tested without sdss-astra: ``paginate`` (``astra execute --page/--limit``)
and ``skip_fitted`` (spectra that already have a result are not given to Astra's INSERT again)."""
import numpy as np
import peewee
import pytest

from astra_thepayne import connect
from astra_thepayne.db.migrate import upgrade
from astra_thepayne.db.models import SpectrumRecord, ThePayne
from astra_thepayne.spectrum import Spectrum
from astra_thepayne.task import paginate, skip_fitted


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
