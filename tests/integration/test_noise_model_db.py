"""Noise model from the database: repeat visit pairs -> corrections file -> e_* set in SQL (both backends)."""
from __future__ import annotations

import numpy as np
import pytest
from _spectra_files import run_cli

from astra_thepayne import ThePayne, connect
from astra_thepayne.db.migrate import upgrade
from astra_thepayne.db.models import Source, SpectrumRecord
from astra_thepayne.pipeline.noise_model import load_corrections, repeat_pairs

N_STARS, SCALE, OFFSET = 300, 1.7, 15.0


def _fill(rng):
    """N_STARS sources, each with a coadd and two visits; teff of the visits scattered by SCALE * raw_e + OFFSET."""
    sources = [{"sdss4_apogee_id": f"2M{i:08d}"} for i in range(N_STARS)]
    Source.insert_many(sources).execute()
    pks = [s.pk for s in Source.select().order_by(Source.pk)]
    spectra = []
    for i, source_pk in enumerate(pks):
        for row, kind in enumerate(("apstar_coadd", "apstar_visit", "apstar_visit")):
            spectra.append({"source_pk": source_pk, "path": f"/data/apStar-{i}.fits", "hdu": 1, "row": row,
                            "spectrum_type": kind})
    SpectrumRecord.insert_many(spectra).execute()
    results = []
    for spectrum in SpectrumRecord.select().order_by(SpectrumRecord.pk):
        raw = rng.uniform(10, 60)
        teff = 5000 + rng.normal(0, SCALE * raw + OFFSET)
        results.append({"spectrum_pk": spectrum.pk, "source_pk": spectrum.source_pk_id, "model_sha256": "m",
                        "teff": teff, "raw_e_teff": raw, "e_teff": raw, "logg": 3.0, "raw_e_logg": 0.05,
                        "e_logg": 0.05, "result_flags": 0})
    results[-1].update(teff=None, result_flags=1)  # a failed visit is left out of the pairs
    ThePayne.insert_many(results).execute()


def test_calibrate_then_apply(database_url, tmp_path):
    database = connect(database_url)
    upgrade(database)
    _fill(np.random.default_rng(3))
    x1, e1, x2, e2 = repeat_pairs("teff")
    assert len(x1) == N_STARS - 1  # one pair per star, minus the star whose second visit failed
    out = tmp_path / "corrections.pkl"
    code, stdout, stderr = run_cli("--database", database_url, "noise-model", "calibrate", str(out),
                                   "--min-pairs", "50")
    assert code == 0, stderr
    corrections, reference, _ = load_corrections(out)
    # seed 3, 299 pairs: scale and offset are partly degenerate over raw errors of 10-60 K, so test what they are
    # for: the corrected error at typical raw errors is within 8% of the true scatter, and z scores have unit width
    fitted = corrections["teff"]
    for raw in (15.0, 35.0, 55.0):
        assert fitted["scale"] * raw + fitted["offset"] == pytest.approx(SCALE * raw + OFFSET, rel=0.08)
    z = (x1 - x2) / np.hypot(fitted["scale"] * e1 + fitted["offset"], fitted["scale"] * e2 + fitted["offset"])
    assert np.std(z) == pytest.approx(1.0, abs=0.06)
    assert reference["n_pairs"]["teff"] == N_STARS - 1 and "fe_h" not in corrections  # no fe_h values stored
    code, _, stderr = run_cli("--database", database_url, "noise-model", "apply", str(out))
    assert code == 0, stderr
    connect(database_url)
    row = ThePayne.select().where(ThePayne.flag_bad == False).first()  # noqa: E712 - an SQL expression
    assert row.e_teff == pytest.approx(corrections["teff"]["scale"] * row.raw_e_teff + corrections["teff"]["offset"])
    assert run_cli("--database", database_url, "noise-model", "calibrate", str(out), "--tag", "none")[0] == 2
    database.close()


def test_pairs_never_share_an_exposure(database_url):
    """An apStar visit row and the apVisit file it was made from (same source, same MJD) are one exposure."""
    database = connect(database_url)
    upgrade(database)
    source = Source.create(sdss4_apogee_id="2M00000001+0000001")
    visits = [("apstar_visit", 56396, 1), ("apstar_visit", 56433, 2), ("apvisit", 56396, 0), ("apvisit", 56433, 0),
              ("apstar_visit", 56434, 3)]
    for kind, mjd, row in visits:
        spectrum = SpectrumRecord.create(source_pk=source.pk, path=f"/d/{kind}-{mjd}.fits", hdu=1, row=row,
                                         spectrum_type=kind, mjd=mjd)
        ThePayne.create(spectrum_pk=spectrum.pk, source_pk=source.pk, model_sha256="m", teff=5000.0 + mjd % 7,
                        raw_e_teff=10.0, e_teff=10.0, result_flags=0)
    x1, _, x2, _ = repeat_pairs("teff")
    # three exposures (56396, 56433, 56434): one pair of two different ones; the apVisit duplicates never enter
    assert len(x1) == 1 and (x1[0], x2[0]) == (5000.0 + 56396 % 7, 5000.0 + 56433 % 7)
    database.close()


def test_quadrature_correction_applied_in_sql(database_url, tmp_path):
    from astra_thepayne.pipeline.noise_model import apply_corrections_to_database

    database = connect(database_url)
    upgrade(database)
    _fill(np.random.default_rng(4))
    apply_corrections_to_database({"teff": {"offset": 30.0, "scale": 1.5, "form": "quadrature"},
                                   "logg": {"offset": 0.01, "scale": 2.0}})
    row = ThePayne.select().where(ThePayne.flag_bad == False).first()  # noqa: E712 - an SQL expression
    assert row.e_teff == pytest.approx(np.hypot(1.5 * row.raw_e_teff, 30.0))
    assert row.e_logg == pytest.approx(2.0 * 0.05 + 0.01)
    database.close()
