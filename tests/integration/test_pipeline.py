"""init -> ingest -> run -> re-run -> query -> export, through the command line, on SQLite and PostgreSQL.

One database per backend is populated once per session (``populated`` in conftest.py; fitting is the slow part);
the tests then query it.
"""
from __future__ import annotations

import numpy as np
import pytest
from _spectra_files import run_cli as _cli
from astropy.io import fits

from astra_thepayne import ThePayne
from astra_thepayne.core.labels import LABEL_NAMES
from astra_thepayne.core.wavelength import MODEL_TO_APSTAR, apstar_wavelength
from astra_thepayne.db.models import Source, SpectrumRecord


def test_run_fits_what_is_missing_and_a_rerun_adds_nothing(populated, db):
    code, out, _ = populated.first
    assert code == 0 and "2 spectra fitted" in out
    code, out, _ = populated.second
    assert code == 0 and "4 spectra fitted" in out and "2 bad" in out and "spectra/s" in out
    assert populated.third[0] == 0 and "0 spectra fitted" in populated.third[1]
    assert ThePayne.select().count() == SpectrumRecord.select().count() == 6
    assert ThePayne.select(ThePayne.spectrum_pk).distinct().count() == 6
    # a different tag is a different result set
    assert ThePayne.select().where(ThePayne.tag != "").count() == 0


def test_rows_carry_provenance_timing_and_links(populated, db):
    import hashlib

    from astra_thepayne import __version__
    from astra_thepayne.db.models import version_to_int

    sha = hashlib.sha256(open(populated.model, "rb").read()).hexdigest()
    for row in ThePayne.select():
        assert row.model_sha256 == sha and row.v_thepayne == __version__ and row.v_astra == version_to_int(__version__)
        assert row.demonstration is False and row.tag == ""
        assert row.t_elapsed is not None and row.t_overhead is not None and row.t_elapsed >= row.t_overhead >= 0
        spectrum = SpectrumRecord.get_by_id(row.spectrum_pk_id)
        assert row.source_pk_id == spectrum.source_pk_id
    fitted = ThePayne.select().where(~ThePayne.flag_bad)
    assert fitted.count() == 4
    for row in fitted:
        assert all(getattr(row, n) is not None for n in LABEL_NAMES)
        assert row.chi2 > 0 and row.dof > 7000 and row.reduced_chi2 == pytest.approx(row.chi2 / row.dof)
        assert -1 <= row.rho_teff_logg <= 1 and row.raw_e_teff > 0 and row.e_teff == row.raw_e_teff
        assert row.v_rel is None  # not fitted by default


def test_flags_work_on_rows_in_peewee_and_in_raw_sql(populated, db):
    rows = list(ThePayne.select())
    warn_py = {r.task_pk for r in rows if r.flag_warn}
    bad_py = {r.task_pk for r in rows if r.flag_bad}
    assert warn_py == {r.task_pk for r in ThePayne.select().where(ThePayne.flag_warn)}
    assert bad_py == {r.task_pk for r in ThePayne.select().where(ThePayne.flag_bad)}
    assert warn_py == {pk for (pk,) in db.execute_sql("SELECT task_pk FROM thepayne_result WHERE result_flags > 0")}
    assert bad_py == {pk for (pk,) in db.execute_sql("SELECT task_pk FROM thepayne_result "
                                                     "WHERE (result_flags & 1) <> 0")}
    assert len(bad_py) == 2
    failed_files = {SpectrumRecord.get_by_id(r.spectrum_pk_id).path.rsplit("/", 1)[1] for r in rows if r.flag_bad}
    assert failed_files == {"apStar-C.fits", "apStar-D.fits"}
    # named flags: star B was observed at S/N 40
    low = (ThePayne.select(ThePayne, SpectrumRecord).join(SpectrumRecord, on=ThePayne.spectrum_pk == SpectrumRecord.pk)
           .where(ThePayne.flag_low_snr & ~ThePayne.flag_fitting_failure))
    assert {r.spectrum_pk.path.rsplit("/", 1)[1] for r in low} == {"apStar-B.fits"}
    assert ThePayne.select().where(ThePayne.flag_fitting_failure).count() == 2


def test_lazy_arrays_load_the_pickle_once_and_are_nan_for_failures(populated, db):
    good = ThePayne.select().where(~ThePayne.flag_bad).order_by(ThePayne.task_pk).first()
    path = good.intermediate_path
    assert path.is_file() and path.parent.name == f"{good.spectrum_pk_id:04d}"[-2:]
    np.testing.assert_allclose(good.wavelength, apstar_wavelength(), rtol=1e-12, atol=0)
    model_flux = good.model_flux
    assert model_flux.shape == (8575,) and np.all(np.isfinite(model_flux[MODEL_TO_APSTAR]))
    assert np.allclose(model_flux, good.continuum * good.rectified_model_flux, equal_nan=True)
    hidden = path.with_name(path.name + ".hidden")
    path.rename(hidden)  # cached on first access: no second read; a fresh row must find the file
    try:
        assert good.continuum is good.continuum and np.isfinite(good.continuum[MODEL_TO_APSTAR]).all()
        from astra_thepayne.io.intermediate import IntermediateFileError

        with pytest.raises(IntermediateFileError, match="does not exist"):
            _ = ThePayne.get_by_id(good.task_pk).model_flux
    finally:
        hidden.rename(path)  # the database is shared with other tests
    for bad in ThePayne.select().where(ThePayne.flag_bad):
        assert not bad.intermediate_path.exists()
        assert bad.model_flux.shape == (8575,) and np.all(np.isnan(bad.model_flux))
        assert np.all(np.isnan(bad.continuum))


def test_no_temporary_pickles_are_left_behind(populated):
    leftovers = [p for p in (populated.root / "out").rglob("*") if p.is_file() and not p.name.endswith(".pkl")]
    assert leftovers == []


def test_export_all_star_and_all_visit_catalogues(populated, db, tmp_path):
    code, out, _ = _cli("--database", populated.url, "export", str(tmp_path / "star.fits"))
    assert code == 0, out
    with fits.open(tmp_path / "star.fits") as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "BOSS", "APOGEE"]
        assert len(hdul["BOSS"].data) == 0
        apogee = hdul["APOGEE"].data
        names = list(apogee.columns.names)
        assert all(n == n.lower() for n in names)
        i = names.index("result_flags")
        assert names[i + 1: i + 3] == ["flag_warn", "flag_bad"]
        assert {"source_pk", "spectrum_pk", "sdss4_apogee_id", "ra", "dec", "teff", "e_teff", "raw_e_teff",
                "rho_teff_logg", "chi2", "reduced_chi2", "snr", "v_rel", "task_pk", "model_sha256"} <= set(names)
        # one row per source with a coadd: A, B, C, D
        assert len(apogee) == Source.select().count() == 4
        assert len(set(apogee["source_pk"])) == 4
        assert set(apogee["spectrum_type"]) == {"apstar_coadd"}
        assert apogee["flag_bad"].dtype == bool and int(apogee["flag_bad"].sum()) == 2
        assert np.array_equal(apogee["flag_warn"], apogee["result_flags"] > 0)
        assert np.isnan(apogee["teff"][apogee["flag_bad"]]).all()
        header = hdul[0].header
        assert header["NMODELS"] == 1 and len(header["MODEL1"]) == 64 and header["DEMO"] is False
    code, _, _ = _cli("--database", populated.url, "export", "--visits", str(tmp_path / "visits.fits"))
    assert code == 0
    with fits.open(tmp_path / "visits.fits") as hdul:
        visits = hdul["APOGEE"].data
        assert len(visits) == 2 and set(visits["spectrum_type"]) == {"apstar_visit"}
        assert set(visits["sdss4_apogee_id"]) == {"2M00000001+0000001"}
        assert hdul[0].header["CATALOG"] == "allVisit"


def test_noise_model_apply_sets_errors_in_sql(populated, db, tmp_path):
    from astra_thepayne.pipeline.noise_model import save_corrections

    corrections = {"teff": {"offset": 10.0, "scale": 2.0}, "fe_h": {"offset": 0.01, "scale": 1.5},
                   "not_a_label": {"offset": 1.0, "scale": 1.0}}
    path = save_corrections(tmp_path / "corrections.pkl", corrections, reference={"note": "test"})
    code, out, err = _cli("--database", populated.url, "noise-model", "apply", str(path))
    assert code == 0 and "2 label(s)" in out and "not_a_label" in err
    for row in ThePayne.select().where(~ThePayne.flag_bad):
        assert row.e_teff == pytest.approx(2.0 * row.raw_e_teff + 10.0)
        assert row.e_fe_h == pytest.approx(1.5 * row.raw_e_fe_h + 0.01)
        assert row.e_logg == row.raw_e_logg
        assert row.noise_model_sha256 is not None
    # reapplying starts again from raw_e_*, it does not compound
    assert _cli("--database", populated.url, "noise-model", "apply", str(path))[0] == 0
    row = ThePayne.select().where(~ThePayne.flag_bad).first()
    assert row.e_teff == pytest.approx(2.0 * row.raw_e_teff + 10.0)


def test_page_and_pk_range_select_stable_slices(populated, db):
    from astra_thepayne.pipeline.work_queue import page_range

    pks = [s.pk for s in SpectrumRecord.select().order_by(SpectrumRecord.pk)]
    assert page_range(1, 4) == (pks[0], pks[3])
    assert page_range(2, 4) == (pks[4], pks[5])
    assert page_range(3, 4) is None
    assert page_range(1, 2, pk_min=pks[1]) == (pks[1], pks[2])
    code, out, _ = _cli("--database", populated.url, "run", "--model", populated.model, "--tag", "paged",
                        "--page", "2", "--limit", "2", "--pk-max", str(pks[4]))
    assert code == 0 and "2 spectra fitted" in out
    tagged = {r.spectrum_pk_id for r in ThePayne.select().where(ThePayne.tag == "paged")}
    assert tagged == {pks[2], pks[3]}
    assert _cli("--database", populated.url, "run", "--page", "2")[0] == 2  # --page needs --limit
