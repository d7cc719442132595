"""The plugin beside Astra's tables (issue 10, items 12-14), without sdss-astra installed.

Astra's database is built here from the layout Astra 0.6 / 0.8 give it (tables ``source``, ``spectrum``, the spectrum
tables, its own ``the_payne``; index names from the table names). What runs inside real Astra is described, with the
commands used to check it, in docs/astra.md.
"""
from __future__ import annotations

import sqlite3

import pytest
from peewee import (
    JOIN,
    AutoField,
    BigIntegerField,
    BitField,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    SqliteDatabase,
    TextField,
)

import astra_thepayne
from astra_thepayne.cli import main
from astra_thepayne.db.database import connect, database_proxy, is_postgres, schema_of
from astra_thepayne.db.migrate import applied_migrations, available_migrations, upgrade
from astra_thepayne.db.models import ALL_MODELS, SpectrumRecord, ThePayne, make_result_model
from astra_thepayne.errors import ConfigurationError
from astra_thepayne.pipeline import astra_binding
from astra_thepayne.pipeline.astra_setup import prepare_astra_database

ASTRA_TABLES = ("source", "spectrum", "apogee_coadded_spectrum_in_ap_star", "the_payne")

# Astra's own tables as Astra 0.6 creates them on SQLite (columns trimmed to those that matter here), with rows.
ASTRA_SCHEMA = """
CREATE TABLE "source" ("pk" INTEGER NOT NULL PRIMARY KEY, "sdss_id" INTEGER, "sdss4_apogee_id" TEXT,
                       "healpix" INTEGER, "n_neighborhood" INTEGER NOT NULL);
CREATE UNIQUE INDEX "source_sdss_id" ON "source" ("sdss_id");
CREATE UNIQUE INDEX "source_sdss4_apogee_id" ON "source" ("sdss4_apogee_id");
CREATE TABLE "spectrum" ("pk" INTEGER NOT NULL PRIMARY KEY, "spectrum_type_flags" INTEGER NOT NULL);
CREATE TABLE "apogee_coadded_spectrum_in_ap_star" ("pk" INTEGER NOT NULL PRIMARY KEY,
    "source_pk_id" INTEGER REFERENCES "source" ("pk"), "spectrum_pk_id" INTEGER UNIQUE REFERENCES "spectrum" ("pk"),
    "release" TEXT NOT NULL, "apred" TEXT NOT NULL, "obj" TEXT NOT NULL, "telescope" TEXT NOT NULL);
CREATE TABLE "the_payne" ("task_pk" INTEGER NOT NULL PRIMARY KEY, "source_pk_id" INTEGER, "spectrum_pk_id" INTEGER,
    "v_astra" TEXT NOT NULL, "teff" REAL, "e_teff" REAL, "result_flags" INTEGER NOT NULL);
CREATE INDEX "the_payne_spectrum_pk_id" ON "the_payne" ("spectrum_pk_id");
INSERT INTO source (pk, sdss_id, sdss4_apogee_id, n_neighborhood) VALUES (1, 10, '2M1', 0), (2, 20, '2M2', 0);
INSERT INTO spectrum (pk, spectrum_type_flags) VALUES (1, 0), (2, 0);
INSERT INTO apogee_coadded_spectrum_in_ap_star VALUES (1, 1, 1, 'dr17', 'dr17', '2M1', 'apo25m');
INSERT INTO the_payne VALUES (1, 1, 1, '0.6.0', 4800.0, 20.0, 0);
"""


def _astra_database(path):
    with sqlite3.connect(path) as connection:
        connection.executescript(ASTRA_SCHEMA)
    return path


def _catalogue(path):
    """Every object of the database that is not the plugin's standalone schema, and the rows of Astra's tables."""
    with sqlite3.connect(path) as connection:
        schema = sorted(connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master "
                                           "WHERE tbl_name NOT LIKE 'thepayne_%'"))
        rows = {table: sorted(connection.execute(f'SELECT * FROM "{table}"')) for table in ASTRA_TABLES}
    return schema, rows


# -- item 13: the standalone commands never touch Astra's tables ------------------------------------------------

def test_standalone_tables_have_names_of_their_own():
    assert {model._meta.table_name for model in ALL_MODELS} == {"thepayne_source", "thepayne_spectrum",
                                                                 "thepayne_result"}


@pytest.mark.slow
def test_init_in_astra_database_leaves_astra_tables_alone(tmp_path, monkeypatch, spectra_dir, toy_model_path, capsys):
    """`thepayne init` on (a copy of) Astra's database, found by $ASTRA_DATABASE_PATH as the contract says, adds
    only the plugin's own thepayne_* tables; ingest and run then work there too, and Astra's rows are unchanged."""
    path = _astra_database(tmp_path / "astra.db")
    before = _catalogue(path)
    monkeypatch.delenv("THEPAYNE_DATABASE_URL", raising=False)
    monkeypatch.setenv("ASTRA_DATABASE_PATH", str(path))
    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.delenv("MWM_ASTRA", raising=False)
    assert main(["init"]) == 0, capsys.readouterr().err
    assert main(["ingest", str(spectra_dir)]) == 0
    assert main(["run", "--model", str(toy_model_path)]) == 0, capsys.readouterr().err
    assert _catalogue(path) == before
    with sqlite3.connect(path) as connection:
        names = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type IN "
                                                        "('table', 'index')")}
        assert connection.execute("SELECT count(*) FROM thepayne_result").fetchone()[0] > 0
    ours = names - {name for _, name, _, _ in before[0]}
    assert ours and all(name.startswith(("thepayne_", "sqlite_autoindex_thepayne_")) for name in ours), sorted(ours)


def _legacy_names(database):
    """Turn a database made by the current migrations into one made before the rename: old table, index and
    sequence names, no m0000 in the history (the columns were the same)."""
    postgres = is_postgres(database)
    old_prefix = {"thepayne_source": "source_", "thepayne_spectrum": "spectrum_", "thepayne_result": "thepayne_"}
    renames = (("thepayne_source", "source"), ("thepayne_spectrum", "spectrum"), ("thepayne_result", "the_payne"))
    for new, old in renames:
        database.execute_sql(f'ALTER TABLE "{new}" RENAME TO "{old}"')
        for index in database.get_indexes(old, schema=schema_of(database)):
            if not index.name.startswith(f"{new}_"):
                continue
            suffix = index.name[len(new) + 1:]
            legacy = f"{old}_pkey" if suffix == "pkey" else old_prefix[new] + suffix
            if postgres:
                database.execute_sql(f'ALTER INDEX "{index.name}" RENAME TO "{legacy}"')
            elif index.sql:
                database.execute_sql(f'DROP INDEX "{index.name}"')
                database.execute_sql(index.sql.replace(f'"{index.name}"', f'"{legacy}"', 1))
        if postgres:
            key = "task_pk" if old == "the_payne" else "pk"
            database.execute_sql(f'ALTER SEQUENCE "{new}_{key}_seq" RENAME TO "{old}_{key}_seq"')
    database.execute_sql("DELETE FROM thepayne_migration WHERE name = 'm0000_own_table_names'")


def _index_names(database, table):
    return {index.name for index in database.get_indexes(table)}


def test_init_moves_an_old_database_onto_the_new_names(database_url, capsys):
    database = connect(database_url)
    upgrade(database, target="m0005_sqlite_claims")
    fresh = {table: _index_names(database, table) for table in ("thepayne_source", "thepayne_spectrum",
                                                                "thepayne_result")}
    _legacy_names(database)
    database.execute_sql("INSERT INTO source (sdss4_apogee_id, created) VALUES ('2M1', '2026-01-01 00:00:00')")
    database.execute_sql("INSERT INTO spectrum (source_pk, path, hdu, row, spectrum_type, obj, telescope, created) "
                         "VALUES (1, '/x.fits', 1, 0, 'apstar_coadd', '2M1', '', '2026-01-01 00:00:00')")
    database.execute_sql("INSERT INTO the_payne (source_pk, spectrum_pk, v_astra, v_thepayne, created, tag, "
                         "model_sha256, demonstration, teff, result_flags) VALUES "
                         "(1, 1, 1000, '0.1.0', '2026-01-01 00:00:00', '', 'abc', false, 4800.0, 0)")
    database.close()
    assert main(["--database", database_url, "init"]) == 0
    assert "m0000_own_table_names" in capsys.readouterr().out
    database = connect(database_url)
    assert applied_migrations(database) == available_migrations()
    tables = set(database.get_tables())
    assert not tables & {"source", "spectrum", "the_payne"}
    assert {table: _index_names(database, table) for table in fresh} == fresh  # as if made with the new names
    row = ThePayne.get()
    assert (row.teff, SpectrumRecord.get_by_id(row.spectrum_pk_id).path) == (4800.0, "/x.fits")
    # the foreign keys follow the renamed tables
    assert {fk.dest_table for fk in database.get_foreign_keys("thepayne_result", schema=schema_of(database))} == {
        "thepayne_source", "thepayne_spectrum"}
    new = SpectrumRecord.create(path="/y.fits", hdu=1, row=0, spectrum_type="apstar_coadd")  # sequences renamed too
    assert new.pk == 2
    ThePayne.create(spectrum_pk=new.pk, model_sha256="abc")
    assert main(["--database", database_url, "init"]) == 0  # and nothing more to do
    database.close()


# -- item 14: `thepayne astra-init` prepares Astra's database ---------------------------------------------------

def _astra_like_models(database):
    """Models laid out as Astra's (index names from table names, FK columns as in Astra 0.8)."""
    class AstraBase(Model):
        class Meta:
            legacy_table_names = False

    class Source(AstraBase):
        pk = AutoField()
        sdss_id = BigIntegerField(null=True, unique=True)
        sdss4_apogee_id = TextField(null=True, unique=True)

    class Spectrum(AstraBase):
        pk = AutoField()
        spectrum_flags = BitField(default=0)

    class ApogeeCoaddedSpectrumInApStar(AstraBase):
        pk = AutoField()
        source = ForeignKeyField(Source, column_name="source_pk", null=True)
        spectrum_pk = ForeignKeyField(Spectrum, column_name="spectrum_pk", unique=True)
        obj = TextField()
        snr = FloatField(null=True)

    class ApogeeVisitSpectrum(AstraBase):
        pk = AutoField()
        spectrum_pk = ForeignKeyField(Spectrum, column_name="spectrum_pk", unique=True)
        mjd = IntegerField()

    class ApogeeVisitSpectrumInApStar(AstraBase):
        pk = AutoField()
        spectrum_pk = ForeignKeyField(Spectrum, column_name="spectrum_pk", unique=True)
        drp_spectrum_pk = ForeignKeyField(ApogeeVisitSpectrum, column_name="drp_spectrum_pk")

    models = [Source, Spectrum, ApogeeCoaddedSpectrumInApStar, ApogeeVisitSpectrum, ApogeeVisitSpectrumInApStar]
    result = make_result_model("ThePayne", (AstraBase,), Source, Spectrum, table_name="the_payne", own_schema=False)
    database.bind([*models, result])
    return result, (ApogeeCoaddedSpectrumInApStar, ApogeeVisitSpectrumInApStar)


def test_astra_init_creates_what_astra_queries_before_the_task_runs(tmp_path):
    database = SqliteDatabase(str(tmp_path / "astra.db"), pragmas={"foreign_keys": 1})
    result, inputs = _astra_like_models(database)
    summary = prepare_astra_database(result, inputs)
    assert summary.created == ["source", "spectrum", "apogee_coadded_spectrum_in_ap_star", "apogee_visit_spectrum",
                               "apogee_visit_spectrum_in_ap_star", "the_payne"]
    assert set(database.get_tables()) == set(summary.created)  # nothing of the standalone schema
    # what `astra execute` / `astra run` ask before fitting: spectra without a result
    query = inputs[0].select().join(result, on=(result.spectrum_pk == inputs[0].spectrum_pk),
                                    join_type=JOIN.LEFT_OUTER).where(result.spectrum_pk.is_null())
    assert list(query) == []
    again = prepare_astra_database(result, inputs)
    assert again.created == [] and again.present == summary.created
    database.close()


def test_astra_init_runs_again_on_a_table_with_a_generated_column(tmp_path):
    """Astra 0.8's results carry ``v_astra_major_minor GENERATED ALWAYS AS (v_astra / 1000) STORED``; SQLite's
    PRAGMA table_info leaves generated columns out, and a second `astra-init` took the table for a foreign one."""
    from peewee import SQL

    database = SqliteDatabase(str(tmp_path / "astra.db"))
    result, inputs = _astra_like_models(database)
    result._meta.add_field("v_astra_major_minor",
                           IntegerField(null=True, constraints=[SQL("GENERATED ALWAYS AS (8000 / 1000) STORED")]))
    first = prepare_astra_database(result, inputs)
    assert "the_payne" in first.created
    assert "v_astra_major_minor" not in {c.name for c in database.get_columns("the_payne")}  # what hid it
    again = prepare_astra_database(result, inputs)
    assert again.created == [] and "the_payne" in again.present
    database.close()


#: columns the result table gained after 0.3 (m0006, m0007): a table made by astra-init of 0.3 lacks them
_LATER_COLUMNS = ("starflag", "vscatter", "at_bound_flags", "engine")


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_astra_init_gives_an_earlier_versions_table_the_new_columns(backend, tmp_path, request):
    """A plugin upgraded inside Astra: the result table that an earlier `astra-init` made lacks the columns of
    later migrations, and Astra's inserts of the new rows failed on them."""
    from playhouse.db_url import connect as connect_url

    from astra_thepayne.pipeline.runner import insert_rows

    if backend == "sqlite":
        database, schema = SqliteDatabase(str(tmp_path / "astra.db")), None
    else:
        database, schema = connect_url(request.getfixturevalue("postgres_url")), "astra_like"
        database.execute_sql(f'CREATE SCHEMA "{schema}"')
    result, inputs = _astra_like_models(database)
    for model in _with_refs(result, inputs):
        model._meta.schema = schema
    prepare_astra_database(result, inputs)
    table = f'"{schema}"."the_payne"' if schema else '"the_payne"'
    spectrum = result._meta.fields["spectrum_pk"].rel_model.create()
    insert_rows([result(spectrum_pk=spectrum.pk, model_sha256="old", tag="before", teff=5000.0)], database)
    for column in _LATER_COLUMNS:
        database.execute_sql(f'ALTER TABLE {table} DROP COLUMN "{column}"')

    summary = prepare_astra_database(result, inputs)
    assert summary.created == [] and summary.added_columns == [
        f"{schema + '.' if schema else ''}the_payne.{c}" for c in sorted(_LATER_COLUMNS, key=_field_order(result))]
    assert "added the columns of this version" in str(summary)
    old = result.get(result.tag == "before")
    assert (old.teff, old.engine, old.at_bound_flags, old.starflag) == (5000.0, "numpy", 0, None)
    insert_rows([result(spectrum_pk=spectrum.pk, model_sha256="new", tag="after", engine="torch:cuda", starflag=3)],
                database)
    assert result.get(result.tag == "after").engine == "torch:cuda"
    # STARFLAG's named bits, in Python and in SQL; a NULL starflag (a file without one) has none
    after = result.get(result.tag == "after")
    assert (after.flag_starflag_bad_pixels, after.flag_starflag_commissioning, after.flag_starflag_low_snr) == (
        True, True, False)
    assert [r.tag for r in result.select().where(result.flag_starflag_commissioning)] == ["after"]
    assert not old.flag_starflag_bad_pixels and result.select().where(~result.flag_starflag_low_snr).count() == 1
    assert prepare_astra_database(result, inputs).added_columns == []
    if schema:
        database.execute_sql(f'DROP SCHEMA "{schema}" CASCADE')
    database.close()


def _with_refs(result, inputs):
    from astra_thepayne.pipeline.astra_setup import _with_dependencies

    return _with_dependencies([result, *inputs])


def _field_order(model):
    order = [f.column_name for f in model._meta.sorted_fields]
    return order.index


def test_the_result_models_are_named_as_their_classes_say():
    """The per-label loop once reused the class-name argument: the model was called ``v_macro``, Astra named its
    summary file astraAllStarv_macro, and rows could not be pickled."""
    import pickle

    assert ThePayne.__name__ == "ThePayne"
    assert make_result_model("AstraThePayne", table_name="x").__name__ == "AstraThePayne"
    row = ThePayne(teff=5000.0, model_sha256="abc")
    assert pickle.loads(pickle.dumps(row)).teff == 5000.0


def test_astra_init_refuses_a_the_payne_table_that_is_not_the_plugins(tmp_path):
    path = _astra_database(tmp_path / "astra.db")
    before = _catalogue(path)
    database = SqliteDatabase(str(path))
    result, inputs = _astra_like_models(database)
    with pytest.raises(ConfigurationError, match="THEPAYNE_ASTRA_TABLE") as error:
        prepare_astra_database(result, inputs)
    assert len(str(error.value).splitlines()) == 1
    database.close()
    assert _catalogue(path) == before  # refused before creating anything


@pytest.mark.parametrize("arguments", [["astra-init"], ["--database", "sqlite:///x.db", "astra-init"]])
def test_astra_init_without_astra_says_why_in_one_line(arguments, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert not astra_binding.integration().available  # the project's environment has no sdss-astra
    assert main(arguments) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error:") and len(err.strip().splitlines()) == 1
    assert "Astra" in err  # says what is missing (sdss-astra, or Astra's configuration instead of --database)
    assert not list(tmp_path.iterdir())  # no database made


@pytest.mark.slow
def test_astra_results_keep_their_arrays_when_thepayne_init_shares_the_database(tmp_path, monkeypatch, spectra_dir,
                                                                             toy_model_path):
    """A result the Astra task wrote names its database by where it is; `thepayne init` adding the standalone
    schema (and its database id) to the same file afterwards must not make its pickle look like another's."""
    from types import SimpleNamespace

    from astra_thepayne.io import read_spectra
    from astra_thepayne.pipeline.task import fit_rows

    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.delenv("MWM_ASTRA", raising=False)
    path = tmp_path / "astra.db"
    database = SqliteDatabase(str(path))
    result, inputs = _astra_like_models(database)
    prepare_astra_database(result, inputs)
    spectrum = result.spectrum_pk.rel_model.create()
    data = read_spectra(spectra_dir / "apStar-A.fits")[0]
    row_like = SimpleNamespace(wavelength=data.wavelength, flux=data.flux, ivar=data.ivar, snr=data.snr,
                               spectrum_pk=spectrum.pk, source_pk=None)
    (row,) = [r for r in fit_rows([row_like], result, model_path=str(toy_model_path)) if r is not ...]
    assert not row.flag_bad and row.intermediate_file
    row.save()
    database.close()
    assert main(["--database", f"sqlite:///{path}", "init"]) == 0

    database = SqliteDatabase(str(path))  # a later session
    result, _ = _astra_like_models(database)
    assert result.get().model_flux.shape == row.model_flux.shape
    database.close()


@pytest.mark.slow
def test_standalone_commands_do_not_import_astra(tmp_path, apogee_data_dir):
    """Where sdss-astra is installed, importing it costs seconds and prints Astra's configuration warnings; the
    standalone commands use their own runner and tables and must not import it (`astra-init` must). A package named
    `astra` that records its import stands in for it here."""
    import os
    import subprocess
    import sys

    marker = tmp_path / "astra-imported"
    (tmp_path / "stub" / "astra").mkdir(parents=True)
    (tmp_path / "stub" / "astra" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('not the real sdss-astra')\n")
    env = {k: v for k, v in os.environ.items() if k != "THEPAYNE_NO_ASTRA"}
    env["PYTHONPATH"] = str(tmp_path / "stub")

    def thepayne(*arguments):
        code = "import sys; from astra_thepayne.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *arguments], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)

    apstar = sorted(apogee_data_dir.glob("apStar-*.fits"))[0]
    done = thepayne("fit", "--model", "demo", "--coadd-only", "--output", str(tmp_path / "fit.csv"), str(apstar))
    assert done.returncode == 0, done.stderr
    assert not marker.exists()
    assert thepayne("astra-init").returncode == 2
    assert marker.exists()


# -- item 12: the obvious query -----------------------------------------------------------------------------------

def test_the_payne_select_before_connect_says_what_to_do():
    database_proxy.initialize(None)
    with pytest.raises(AttributeError, match=r"astra_thepayne\.connect\(\)"):
        astra_thepayne.ThePayne.select().count()


def test_the_obvious_query_reads_the_table_the_astra_task_fills(tmp_path, monkeypatch):
    """Where the Astra integration is active (here its state is set by hand: sdss-astra is not installed), the
    package's ThePayne is the task's result model in Astra's database, and connect() returns that database."""
    monkeypatch.delenv("THEPAYNE_DATABASE_URL", raising=False)
    astra_database = SqliteDatabase(str(tmp_path / "astra.db"))
    result, inputs = _astra_like_models(astra_database)
    prepare_astra_database(result, inputs)
    source = result.source_pk.rel_model.create(sdss4_apogee_id="2M1")
    spectrum = result.spectrum_pk.rel_model.create()
    result.create(source_pk=source.pk, spectrum_pk=spectrum.pk, model_sha256="abc", teff=4800.0)
    active = astra_binding.AstraIntegration(True, result_model=result)
    monkeypatch.setattr(astra_binding, "integration", lambda: active)
    database_proxy.initialize(None)

    assert astra_thepayne.ThePayne is result
    assert [row.teff for row in astra_thepayne.ThePayne.select()] == [4800.0]
    assert astra_thepayne.connect() is astra_database
    assert astra_thepayne.ThePayne is result
    assert [row.teff for row in astra_thepayne.ThePayne.select().where(~astra_thepayne.ThePayne.flag_bad)] == [4800.0]

    other = astra_thepayne.connect(f"sqlite:///{tmp_path / 'own.db'}")  # a database of the standalone commands
    assert other is not astra_database and astra_thepayne.ThePayne is ThePayne
    database_proxy.initialize(None)
