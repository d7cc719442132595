"""Schema creation and migration, URLs and schemas, ingestion: on SQLite and on the real PostgreSQL server."""
from __future__ import annotations

import pytest
from peewee import IntegrityError

from astra_thepayne import connect
from astra_thepayne.cli import main
from astra_thepayne.db.migrate import (
    applied_migrations,
    available_migrations,
    pending_migrations,
    require_schema,
    upgrade,
)
from astra_thepayne.db.models import ALL_MODELS, Source, SpectrumRecord, ThePayne
from astra_thepayne.errors import ConfigurationError
from astra_thepayne.pipeline.ingest import ingest


def _columns(database, table):
    from astra_thepayne.db.database import schema_of

    return {c.name for c in database.get_columns(table, schema=schema_of(database))}


def test_init_creates_the_schema_the_models_describe(database_url):
    database = connect(database_url)
    assert upgrade(database) == available_migrations()
    assert upgrade(database) == []  # idempotent
    for model in ALL_MODELS:
        assert _columns(database, model._meta.table_name) == {f.column_name for f in model._meta.sorted_fields}
    columns = _columns(database, "thepayne_result")
    assert len([c for c in columns if c.startswith("rho_")]) == 300
    assert {"spectrum_pk", "source_pk", "task_pk", "v_astra", "created", "t_elapsed", "t_overhead", "tag",
            "snr", "result_flags", "model_sha256", "demonstration"} <= columns
    require_schema(database)
    database.close()


def test_upgrade_from_the_previous_schema_keeps_rows(database_url):
    database = connect(database_url)
    assert upgrade(database, target="m0001_initial") == ["m0000_own_table_names", "m0001_initial"]
    assert "noise_model_sha256" not in _columns(database, "thepayne_result")
    with pytest.raises(ConfigurationError, match="thepayne init"):
        require_schema(database)
    # a row written by the previous release, in SQL (the current model has a column the table lacks)
    database.execute_sql("INSERT INTO thepayne_source (sdss4_apogee_id, created) VALUES ('2M1', '2026-01-01 00:00:00')")
    database.execute_sql("INSERT INTO thepayne_spectrum (source_pk, path, hdu, row, spectrum_type, obj, telescope, "
                         "created) VALUES (1, '/x.fits', 1, 0, 'apstar_coadd', '2M1', '', '2026-01-01 00:00:00')")
    database.execute_sql("INSERT INTO thepayne_result (source_pk, spectrum_pk, v_astra, v_thepayne, created, tag, "
                         "model_sha256, demonstration, teff, raw_e_teff, e_teff, result_flags) VALUES "
                         "(1, 1, 1000, '0.1.0', '2026-01-01 00:00:00', '', 'abc', false, 4800.0, 20.0, 20.0, 16)")
    assert pending_migrations(database) == available_migrations()[2:]
    assert main(["--database", database_url, "init"]) == 0
    database = connect(database_url)
    assert applied_migrations(database) == available_migrations()
    row = ThePayne.get()
    assert (row.teff, row.e_teff, row.noise_model_sha256, row.flag_low_snr, row.flag_warn) == (4800.0, 20.0, None,
                                                                                              True, True)
    assert row.intermediate_file is None  # written before m0003: its arrays are found by the derived path
    # m0006: rows written before have no per-label bound bits and no file quality
    assert (row.at_bound_flags, row.starflag, row.vscatter, row.flag_at_bound_teff) == (0, None, None, False)
    assert ThePayne.select().where(ThePayne.flag_at_bound_logg).count() == 0
    assert row.engine == "numpy"  # m0007: the only engine there was
    database.close()


def test_unique_result_per_spectrum_model_and_tag(database_url):
    database = connect(database_url)
    upgrade(database)
    spectrum = SpectrumRecord.create(path="/a.fits", hdu=1, row=0, spectrum_type="apstar_coadd")
    ThePayne.create(spectrum_pk=spectrum.pk, model_sha256="m1", tag="")
    ThePayne.create(spectrum_pk=spectrum.pk, model_sha256="m1", tag="other")
    ThePayne.create(spectrum_pk=spectrum.pk, model_sha256="m2", tag="")
    with pytest.raises(IntegrityError), database.atomic():
        ThePayne.create(spectrum_pk=spectrum.pk, model_sha256="m1", tag="")
    from astra_thepayne.pipeline.runner import insert_rows

    insert_rows([ThePayne(spectrum_pk=spectrum.pk, model_sha256="m1", tag="")])  # ignored, not an error
    assert ThePayne.select().count() == 3
    database.close()


@pytest.mark.postgres
def test_postgres_schema_option_keeps_tables_in_that_schema(postgres_url):
    url = f"{postgres_url}?schema=payne_plugin"
    assert main(["--database", url, "init"]) == 0
    database = connect(url)
    tables = {name for (name,) in database.execute_sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'payne_plugin'")}
    assert {"thepayne_source", "thepayne_spectrum", "thepayne_result", "thepayne_migration"} <= tables
    public = {name for (name,) in database.execute_sql(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
    assert "thepayne_result" not in public
    SpectrumRecord.create(path="/a.fits", hdu=1, row=0, spectrum_type="apstar_coadd")
    assert database.execute_sql("SELECT count(*) FROM payne_plugin.thepayne_spectrum").fetchone()[0] == 1
    # what every later command asks first: peewee < 4.1 (which Astra pins) looked for the tables in `public`, so
    # after `init` every command said the schema was missing
    assert {"thepayne_migration", "thepayne_result"} <= set(database.get_tables())
    assert database.table_exists("thepayne_migration")
    assert "teff" in {column.name for column in database.get_columns("thepayne_result")}
    require_schema(database)
    database.close()


@pytest.mark.parametrize("url", ["nosuchdb://x/y", "postgresql://127.0.0.1", "postgresql://127.0.0.1/db?schema=bad-name"])
def test_unreadable_database_url_is_a_configuration_error(url, capsys):
    with pytest.raises(ConfigurationError):
        connect(url)
    assert main(["--database", url, "init"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error:") and len(err.strip().splitlines()) == 1


def test_commands_before_init_say_so(tmp_path, capsys):
    assert main(["--database", f"sqlite:///{tmp_path / 'x.db'}", "ingest", str(tmp_path)]) == 2
    assert "thepayne init" in capsys.readouterr().err


def test_connect_follows_the_contract_order(tmp_path, monkeypatch):
    monkeypatch.delenv("THEPAYNE_DATABASE_URL", raising=False)
    monkeypatch.setenv("ASTRA_DATABASE_PATH", str(tmp_path / "astra.db"))
    assert connect().database == str(tmp_path / "astra.db")
    monkeypatch.setenv("THEPAYNE_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert connect().database == str(tmp_path / "env.db")
    assert connect(f"sqlite:///{tmp_path / 'arg.db'}").database == str(tmp_path / "arg.db")


def test_ingest_is_idempotent(database_url, spectra_dir, capsys):
    assert main(["--database", database_url, "init"]) == 0
    assert main(["--database", database_url, "ingest", str(spectra_dir)]) == 0
    assert "6 new spectra" in capsys.readouterr().out
    connect(database_url)
    first = [(s.path, s.hdu, s.row, s.spectrum_type, s.source_pk_id) for s in SpectrumRecord.select()]
    # again, and once more naming a file directly: nothing new
    assert main(["--database", database_url, "ingest", str(spectra_dir), str(spectra_dir / "apStar-A.fits")]) == 0
    assert "0 new spectra" in capsys.readouterr().out
    connect(database_url)
    assert sorted(first) == sorted((s.path, s.hdu, s.row, s.spectrum_type, s.source_pk_id)
                                   for s in SpectrumRecord.select())
    assert Source.select().count() == 4
    types = sorted(s.spectrum_type for s in SpectrumRecord.select())
    assert types == ["apstar_coadd"] * 4 + ["apstar_visit"] * 2
    a = Source.get(Source.sdss4_apogee_id == "2M00000001+0000001")
    assert (a.ra, a.dec, a.spectra.count()) == (1.0, 1.0, 3)
    assert all(s.path.startswith("/") for s in SpectrumRecord.select())
    SpectrumRecord._meta.database.close()


def test_ingest_skips_unreadable_files_and_rejects_missing_paths(tmp_path, spectra_dir, capsys):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    connect(url)
    upgrade(connect(url))
    bad = tmp_path / "bad.fits"
    bad.write_text("not fits")
    summary = ingest([bad, spectra_dir / "apStar-B.fits"])
    assert summary.spectra_added == 1 and len(summary.skipped) == 1 and str(bad) in summary.skipped[0][1]
    assert main(["--database", url, "ingest", str(bad)]) == 2
    assert main(["--database", url, "ingest", str(tmp_path / "missing.fits")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_result_model_builder_binds_to_another_base_as_in_astra(tmp_path):
    # Inside Astra the same builder runs with Astra's base model, Source/Spectrum and a text v_astra.
    from peewee import AutoField, Model, SqliteDatabase, TextField

    from astra_thepayne.db.models import make_result_model

    other = SqliteDatabase(str(tmp_path / "astra.db"))

    class AstraLikeBase(Model):
        class Meta:
            database = other

    class AstraSource(AstraLikeBase):
        pk = AutoField()

    class AstraSpectrum(AstraLikeBase):
        pk = AutoField()

    Result = make_result_model("ThePayne", (AstraLikeBase,), AstraSource, AstraSpectrum, table_name="the_payne_x",
                               v_astra_field=TextField(default="0.6.0"))
    other.create_tables([AstraSource, AstraSpectrum, Result])
    spectrum = AstraSpectrum.create()
    Result.create(spectrum_pk=spectrum.pk, model_sha256="m", result_flags=1 | 16)
    row = Result.get()
    assert row.v_astra == "0.6.0" and row.flag_bad and row.flag_low_snr
    assert Result.select().where(Result.flag_bad).count() == 1
    assert Result._meta.database is other and ThePayne._meta.database is not other
    assert {"spectrum_pk", "source_pk"} <= {c.name for c in other.get_columns("the_payne_x")}


def test_ingest_mwm_products_registers_types_and_sdss_ids(database_url, tmp_path, apogee_data_dir):
    from broken_corpus import write_mwm_file

    apstar = apogee_data_dir / "apStar-dr17-2M17335483-2753043.fits"
    write_mwm_file(tmp_path / "mwmStar-test.fits", apstar, kind="mwmStar", apo_rows=(0,), sdss_id=555)
    write_mwm_file(tmp_path / "mwmVisit-test.fits", apstar, kind="mwmVisit", apo_rows=(2, 3), sdss_id=555)
    database = connect(database_url)
    upgrade(database)
    summary = ingest([tmp_path])
    assert summary.spectra_added == 3 and not summary.skipped
    types = sorted(s.spectrum_type for s in SpectrumRecord.select())
    assert types == ["mwmstar", "mwmvisit", "mwmvisit"]
    assert {s.sdss_id for s in Source.select()} == {555}
    assert Source.select().count() == 1  # one star, whatever the product
    assert ingest([tmp_path]).spectra_added == 0
    database.close()
