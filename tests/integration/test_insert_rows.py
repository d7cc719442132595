"""The bulk insert of result rows (COPY on PostgreSQL, executemany on SQLite) stores what peewee would store."""
from __future__ import annotations

import datetime
import math

import numpy as np
import pytest

from astra_thepayne import connect
from astra_thepayne.db.migrate import upgrade
from astra_thepayne.db.models import SpectrumRecord, ThePayne
from astra_thepayne.pipeline.runner import insert_rows

#: text that COPY's text format must escape, and text it must not touch
AWKWARD_TEXT = ["tab\there", "new\nline", "carriage\rreturn", "back\\slash \\N", "quote ' \" ;", "", "Ünïcode ✓"]


def _row(spectrum, tag, **values):
    return ThePayne(spectrum_pk=spectrum.pk, model_sha256="m" * 64, tag=tag, **values)


def _stored(row):
    return {f.name: row.__data__.get(f.name) for f in ThePayne._meta.sorted_fields
            if f.name not in ("task_pk", "tag")}


def _same(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def test_rows_are_stored_as_peewee_stores_them(database_url):
    """The oracle is peewee's own multi-row INSERT of the same rows (which also rounds to the backend's column
    types: FloatField is REAL on PostgreSQL)."""
    database = connect(database_url)
    upgrade(database)
    spectrum = SpectrumRecord.create(path="/a.fits", hdu=1, row=0, spectrum_type="apstar_coadd")
    created = datetime.datetime(2026, 12, 4, 18, 30, 1, 123456)

    def rows(prefix):
        made = [_row(spectrum, f"{prefix}{i}", model_path=text, teff=value, e_teff=None, logg=0.1 + 0.2,
                     v_rel=-1.5e-30, chi2=1.2345678e30, demonstration=i % 2 == 0, dof=7214 - i, starflag=2**40 + i,
                     created=created, fe_h=np.float32(0.1), mg_h=3, si_h=np.float64(-1.25), al_h="2.5")
                for i, (text, value) in enumerate(zip(AWKWARD_TEXT, [math.nan, math.inf, -math.inf, 0.0, -0.0,
                                                                     5777.123456789, None], strict=True))]
        # defaults and NULLs throughout
        return made + [_row(spectrum, f"{prefix}{len(made)}", model_path=None, created=created)]

    fast, slow = rows("fast-"), rows("peewee-")
    insert_rows(fast, database)
    ThePayne.insert_many([{f.name: r.__data__.get(f.name) for f in ThePayne._meta.sorted_fields
                           if f.name != "task_pk"} for r in slow]).execute()
    back = {r.tag: r for r in ThePayne.select()}
    assert len(back) == 2 * len(fast)
    for i in range(len(fast)):
        by_us, by_peewee = _stored(back[f"fast-{i}"]), _stored(back[f"peewee-{i}"])
        different = {name: (by_us[name], by_peewee[name]) for name in by_us if not _same(by_us[name], by_peewee[name])}
        assert not different, different
    assert back["fast-0"].model_path == AWKWARD_TEXT[0] and back["fast-3"].model_path == AWKWARD_TEXT[3]
    nan = back["fast-0"].teff
    assert (nan is None) if database_url.startswith("sqlite") else math.isnan(nan)  # SQLite stores NaN as NULL
    assert back["fast-1"].teff == math.inf and back["fast-2"].teff == -math.inf and back["fast-6"].teff is None
    database.close()


def test_duplicates_are_ignored_and_two_inserts_share_a_transaction(database_url):
    database = connect(database_url)
    upgrade(database)
    spectrum = SpectrumRecord.create(path="/a.fits", hdu=1, row=0, spectrum_type="apstar_coadd")
    with database.atomic():
        insert_rows([_row(spectrum, f"row-{i}", teff=5000.0 + i) for i in range(3)], database)
        # the second batch repeats row-2 (a concurrent process's result, say): ignored, not an error
        insert_rows([_row(spectrum, f"row-{i}", teff=6000.0 + i) for i in range(2, 5)], database)
    teff = {r.tag: r.teff for r in ThePayne.select()}
    assert teff == {"row-0": 5000.0, "row-1": 5001.0, "row-2": 5002.0, "row-3": 6003.0, "row-4": 6004.0}
    database.close()


@pytest.mark.postgres
def test_a_failed_batch_leaves_nothing_behind(postgres_url):
    database = connect(postgres_url)
    upgrade(database)
    spectrum = SpectrumRecord.create(path="/a.fits", hdu=1, row=0, spectrum_type="apstar_coadd")
    with pytest.raises(Exception), database.atomic():  # noqa: B017  (the driver's own error class)
        insert_rows([_row(spectrum, "a"), ThePayne(spectrum_pk=spectrum.pk, model_sha256=None, tag="x")], database)
    assert ThePayne.select().count() == 0
    insert_rows([_row(spectrum, "a")], database)  # and the next batch still goes in
    assert ThePayne.select().count() == 1
    database.close()


@pytest.mark.postgres
def test_rows_go_into_the_configured_schema(postgres_url):
    database = connect(f"{postgres_url}?schema=payne_rows")
    upgrade(database)
    spectrum = SpectrumRecord.create(path="/a.fits", hdu=1, row=0, spectrum_type="apstar_coadd")
    insert_rows([_row(spectrum, f"row-{i}") for i in range(3)], database)
    assert database.execute_sql("SELECT count(*) FROM payne_rows.thepayne_result").fetchone()[0] == 3
    database.close()
