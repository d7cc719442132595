"""``paginate``: how the Astra task applies ``astra execute --page/--limit`` (runs without sdss-astra)."""
import peewee
import pytest

from astra_thepayne.task import paginate


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
